"""Safety: no unsafe deserialisation or code execution on data, and servers on loopback by default.

1. An `ast` scan of the product's source (components/, flows/, bench/) for calls that execute
   or deserialise untrusted input: eval, exec, pickle/dill/joblib/marshal/shelve loads,
   pandas.read_pickle, numpy.load(allow_pickle=True), yaml.load without a SafeLoader,
   yaml.unsafe_load/full_load, torch.load without weights_only=True, subprocess with
   shell=True, os.system/os.popen. The scanner is itself tested on snippets holding each hazard.
2. Listening addresses: every host default, host keyword, bind address and `--host` argument in
   the code (tests included) is loopback; the all-interfaces address appears in no code, config
   or command example of the repository; and the defaults of the servers we start without a
   host (`mlflow models serve`, `mlflow server`, `prefect server start`, Prefect's `serve()`
   webserver, uvicorn, `transformers serve`) are loopback in the pinned versions.
"""

from __future__ import annotations

import ast
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT_DIRS = ("components", "flows", "bench")
ALL_INTERFACES = ".".join(["0"] * 4)  # spelled so that this file does not match its own scan
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

# Resolved call name -> why it is unsafe on data
ALWAYS_UNSAFE = {
    "eval": "eval executes text as code",
    "exec": "exec executes text as code",
    "builtins.eval": "eval executes text as code",
    "builtins.exec": "exec executes text as code",
    "pickle.load": "pickle runs code while loading",
    "pickle.loads": "pickle runs code while loading",
    "pickle.Unpickler": "pickle runs code while loading",
    "_pickle.loads": "pickle runs code while loading",
    "cPickle.loads": "pickle runs code while loading",
    "dill.load": "dill runs code while loading",
    "dill.loads": "dill runs code while loading",
    "cloudpickle.load": "pickle runs code while loading",
    "cloudpickle.loads": "pickle runs code while loading",
    "joblib.load": "joblib unpickles",
    "marshal.load": "marshal loads code objects",
    "marshal.loads": "marshal loads code objects",
    "shelve.open": "shelve unpickles",
    "pandas.read_pickle": "read_pickle unpickles",
    "yaml.unsafe_load": "unsafe YAML constructs arbitrary objects",
    "yaml.unsafe_load_all": "unsafe YAML constructs arbitrary objects",
    "yaml.full_load": "FullLoader constructs Python objects",
    "yaml.full_load_all": "FullLoader constructs Python objects",
    "os.system": "runs a shell",
    "os.popen": "runs a shell",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    call: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.call}: {self.why}"


class _Scanner(ast.NodeVisitor):
    """Finds unsafe calls in one module, resolving import aliases (`import pickle as p`, `from pickle import loads`)."""

    def __init__(self, path: str, tree: ast.Module):
        self.path = path
        self.aliases: dict[str, str] = {}
        self.safe_loader_classes: set[str] = set()
        self.findings: list[Finding] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        # classes of this module deriving (transitively) from a safe YAML loader
        changed = True
        while changed:
            changed = False
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.name not in self.safe_loader_classes:
                    if any(self._is_safe_loader(b) for b in node.bases):
                        self.safe_loader_classes.add(node.name)
                        changed = True

    def resolve(self, node: ast.expr) -> str | None:
        """Dotted name of a call target with import aliases expanded (None if not a plain name)."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def _is_safe_loader(self, node: ast.expr) -> bool:
        name = self.resolve(node)
        return name is not None and (name.rsplit(".", 1)[-1] in SAFE_YAML_LOADERS or name in self.safe_loader_classes)

    def _flag(self, node: ast.Call, call: str, why: str) -> None:
        self.findings.append(Finding(self.path, node.lineno, call, why))

    def visit_Call(self, node: ast.Call) -> None:
        name = self.resolve(node.func)
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        if name in ALWAYS_UNSAFE:
            self._flag(node, name, ALWAYS_UNSAFE[name])
        elif name in ("yaml.load", "yaml.load_all"):
            loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if loader is None or not self._is_safe_loader(loader):
                self._flag(node, name, "yaml.load without a SafeLoader constructs arbitrary objects")
        elif name == "torch.load":
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                self._flag(node, name, "torch.load without weights_only=True unpickles")
        elif name in ("numpy.load", "np.load"):
            ap = kw.get("allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                self._flag(node, name, "numpy.load with allow_pickle unpickles")
        elif name and name.startswith("subprocess."):
            shell = kw.get("shell")
            if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                self._flag(node, name, "shell=True hands the command line to a shell")
        self.generic_visit(node)


def scan_source(source: str, path: str = "<snippet>") -> list[Finding]:
    """Unsafe calls in one Python source text."""
    tree = ast.parse(source, filename=path)
    scanner = _Scanner(path, tree)
    scanner.visit(tree)
    return scanner.findings


def python_files(*dirs: str) -> Iterator[Path]:
    for d in dirs:
        yield from sorted((REPO / d).rglob("*.py"))


# --------------------------------------------------------------------------------------
# 1. Unsafe calls
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("snippet", "call"), [
    ("eval(text)", "eval"),
    ("exec(code, {})", "exec"),
    ("import builtins\nbuiltins.eval(s)", "builtins.eval"),
    ("import pickle\npickle.loads(blob)", "pickle.loads"),
    ("import pickle as pk\npk.load(fh)", "pickle.load"),
    ("from pickle import loads as l\nl(blob)", "pickle.loads"),
    ("import marshal\nmarshal.loads(b)", "marshal.loads"),
    ("import dill\ndill.load(fh)", "dill.load"),
    ("import joblib\njoblib.load(p)", "joblib.load"),
    ("import pandas as pd\npd.read_pickle(p)", "pandas.read_pickle"),
    ("import numpy as np\nnp.load(p, allow_pickle=True)", "numpy.load"),
    ("import yaml\nyaml.load(text)", "yaml.load"),
    ("import yaml\nyaml.load(text, Loader=yaml.Loader)", "yaml.load"),
    ("import yaml\nyaml.load(text, yaml.UnsafeLoader)", "yaml.load"),
    ("import yaml\nyaml.full_load(text)", "yaml.full_load"),
    ("import yaml\nyaml.unsafe_load(text)", "yaml.unsafe_load"),
    ("import torch\ntorch.load(p)", "torch.load"),
    ("import torch\ntorch.load(p, weights_only=False)", "torch.load"),
    ("import subprocess\nsubprocess.run(cmd, shell=True)", "subprocess.run"),
    ("import subprocess as sp\nsp.Popen(cmd, shell=flag)", "subprocess.Popen"),
    ("import os\nos.system(cmd)", "os.system"),
])
def test_scanner_finds_each_hazard(snippet: str, call: str) -> None:
    found = scan_source(snippet)
    assert [f.call for f in found] == [call], found


@pytest.mark.parametrize("snippet", [
    "import yaml\nyaml.safe_load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "import yaml\nclass L(yaml.SafeLoader):\n    pass\nclass M(L):\n    pass\nyaml.load(text, Loader=M)",
    "import torch\ntorch.load(p, weights_only=True)",
    "import subprocess\nsubprocess.run(['git', 'status'], check=True)",
    "import subprocess\nsubprocess.run(cmd, shell=False)",
    "import numpy as np\nnp.load(p)",
    "model.eval()",  # a method named eval is not the builtin
    "import json\njson.loads(text)",
])
def test_scanner_accepts_safe_forms(snippet: str) -> None:
    assert scan_source(snippet) == []


def test_product_source_has_no_unsafe_calls() -> None:
    files = list(python_files(*PRODUCT_DIRS))
    assert any(f.match("components/io.py") for f in files) and any(f.parts[-2] == "flows" for f in files)
    findings = [f for path in files for f in scan_source(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert not findings, "unsafe calls:\n" + "\n".join(map(str, findings))


# --------------------------------------------------------------------------------------
# 2. Listening addresses
# --------------------------------------------------------------------------------------

HOST_NAMES = {"host", "hostname", "bind", "bind_host", "listen", "listen_host", "server_host", "default_host"}
HOST_FLAGS = {"--host", "-h", "--bind", "-b", "--hostname"}
SERVER_CLASSES = ("HTTPServer", "ThreadingHTTPServer", "TCPServer", "ThreadingTCPServer", "UDPServer")


def _const_str(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def listening_addresses(source: str, path: str = "<snippet>") -> list[tuple[int, str, str]]:
    """Every literal address the code listens on or defaults to: (line, where, address)."""
    tree = ast.parse(source, filename=path)
    out: list[tuple[int, str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            positional = a.posonlyargs + a.args
            pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults, strict=True))
            pairs += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is not None]
            for arg, default in pairs:
                if arg.arg in HOST_NAMES and (v := _const_str(default)) is not None:
                    out.append((default.lineno, f"default of {arg.arg}", v))
        elif isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            names = {t.id.lower() for t in targets if isinstance(t, ast.Name)} | {
                t.attr.lower() for t in targets if isinstance(t, ast.Attribute)}
            if names & HOST_NAMES and (v := _const_str(node.value)) is not None:
                out.append((node.lineno, f"assignment to {sorted(names)[0]}", v))
        elif isinstance(node, ast.Call):
            for k in node.keywords:
                if k.arg in HOST_NAMES and (v := _const_str(k.value)) is not None:
                    out.append((k.value.lineno, f"{k.arg}=", v))
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if (func == "bind" or func in SERVER_CLASSES) and node.args and isinstance(node.args[0], ast.Tuple):
                if node.args[0].elts and (v := _const_str(node.args[0].elts[0])) is not None:
                    out.append((node.lineno, f"{func}((address, port))", v))
        elif isinstance(node, ast.List | ast.Tuple):
            elts = node.elts
            for flag, value in zip(elts, elts[1:], strict=False):
                if _const_str(flag) in HOST_FLAGS and (v := _const_str(value)) is not None:
                    out.append((value.lineno, f"{_const_str(flag)} argument", v))
    return out


@pytest.mark.parametrize(("snippet", "address"), [
    ("def serve(host='{a}', port=0): ...", "ALL"),
    ("def serve(*, host: str = '{a}'): ...", "ALL"),
    ("uvicorn.run(app, host='{a}')", "ALL"),
    ("ThreadingHTTPServer(('', 0), Handler)", ""),
    ("s.bind(('{a}', 8000))", "ALL"),
    ("cmd = ['mlflow', 'models', 'serve', '-h', '{a}']", "ALL"),
    ("HOST = '{a}'", "ALL"),
])
def test_address_finder_sees_each_way_of_listening(snippet: str, address: str) -> None:
    found = listening_addresses(snippet.format(a=ALL_INTERFACES))
    assert [a for _, _, a in found] == [ALL_INTERFACES if address == "ALL" else address], found


def repository_text_files() -> list[Path]:
    """Tracked and untracked, not ignored, text files of the repository."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    suffixes = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".json", ".sh", ".txt", ""}
    files = []
    for rel in filter(None, out):
        p = REPO / rel
        if p.is_file() and p.suffix in suffixes and p.stat().st_size < 2_000_000 and not rel.startswith("data/"):
            files.append(p)
    return files


def test_code_listens_on_loopback_only() -> None:
    files = list(python_files(*PRODUCT_DIRS, "tests"))
    bad = []
    seen = 0
    for path in files:
        for line, where, address in listening_addresses(path.read_text(encoding="utf-8"), str(path)):
            seen += 1
            if address not in LOOPBACK:
                bad.append(f"{path.relative_to(REPO)}:{line}: {where} {address!r}")
    assert seen >= 5, "the scan found the test servers' addresses"  # fault server, mlflow/prefect servers
    assert not bad, "non-loopback listening addresses:\n" + "\n".join(bad)


def test_all_interfaces_address_appears_nowhere() -> None:
    pattern = re.compile(re.escape(ALL_INTERFACES) + r"(?![\d.])")
    hits = []
    files = repository_text_files()
    assert any(f.name == "README.md" for f in files) and any(f.name == "dvc.yaml" for f in files)
    for path in files:
        if path == Path(__file__).resolve():
            continue
        for n, text in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if pattern.search(text):
                hits.append(f"{path.relative_to(REPO)}:{n}: {text.strip()[:120]}")
    assert not hits, "all-interfaces address found:\n" + "\n".join(hits)


def test_servers_we_start_default_to_loopback() -> None:
    """The listen defaults of the servers the project starts or documents without an explicit host."""
    import inspect

    import mlflow.cli
    import mlflow.models.cli
    import uvicorn
    from prefect.settings import get_current_settings

    defaults = {}
    for name, cmd in [("mlflow models serve", mlflow.models.cli.commands.commands["serve"]),
                      ("mlflow server", mlflow.cli.cli.commands["server"])]:
        [host] = [p for p in cmd.params if p.name == "host"]
        defaults[name] = host.default
    prefect = get_current_settings()
    defaults["prefect server start"] = prefect.server.api.host
    defaults["prefect serve() webserver"] = prefect.runner.server.host  # flows/deploy.py serves the schedule
    defaults["uvicorn.Config"] = inspect.signature(uvicorn.Config.__init__).parameters["host"].default
    source = (Path(inspect.getfile(uvicorn)).parents[1] / "transformers" / "cli" / "serve.py")
    if source.exists():  # `transformers serve` (tests start it for the openai teacher)
        found = listening_addresses(source.read_text(encoding="utf-8"), str(source))
        defaults["transformers serve"] = next(a for _, where, a in found if where == "default of host")
    assert all(v in LOOPBACK for v in defaults.values()), defaults
