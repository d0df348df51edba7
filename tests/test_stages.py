"""The stage table (components/stages.py) is what dvc.yaml, the `rprm` commands and the Prefect
flow follow, and each dvc.yaml stage's code deps cover every project module its entry module
imports, so `dvc repro` reruns a stage when any code it runs changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.modules import import_closure, module_file
from components.stages import STAGE_NAMES, STAGES, stage

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "components"


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def covered(path: Path, deps: list[str]) -> bool:
    """Whether a dvc.yaml dep (a file, or a folder holding it) covers `path`."""
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


def missing_code_deps(name: str, spec: dict) -> list[str]:
    """Project files that stage `name`'s entry module imports but its dvc.yaml deps miss."""
    deps = [next(iter(d)) if isinstance(d, dict) else d for d in spec.get("deps", [])]
    files = import_closure(stage(name).module, ROOT)
    init = Path(PACKAGE, "__init__.py")
    if not (ROOT / init).read_text(encoding="utf-8").strip():  # empty: nothing to depend on
        files.discard(init)
    return sorted(str(f) for f in files if not covered(f, deps))


def test_dvc_stages_are_the_table_in_order() -> None:
    stages = dvc_stages()
    assert list(stages) == list(STAGE_NAMES)
    for name, spec in stages.items():
        assert spec["cmd"] == f"rprm {name}", name


def test_flow_and_cli_are_built_from_the_table() -> None:
    from components.cli import app
    from flows import pipeline

    assert pipeline.STAGES == STAGE_NAMES
    assert pipeline.REMOTE_STAGES == {s.name for s in STAGES if s.remote}
    commands = [c.name for c in app.registered_commands]
    assert commands[: len(STAGES)] == list(STAGE_NAMES)
    for s in STAGES:
        module, func = s.target.split(":")
        path = module_file(s.module, ROOT)
        assert path is not None, s.name
        assert func in path.read_text(), s


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_code_deps_cover_every_module_the_stage_imports(name: str) -> None:
    missing = missing_code_deps(name, dvc_stages()[name])
    assert not missing, f"dvc.yaml stage {name}: deps miss {missing} (imported by {stage(name).module})"


def test_missing_dep_is_reported(tmp_path: Path) -> None:
    """The check itself: a stage whose deps drop a module it imports is caught, naming the file."""
    spec = dict(dvc_stages()["best-of-n"])
    spec["deps"] = [d for d in spec["deps"] if d != "components/prompts.py"]
    assert "components/prompts.py" in missing_code_deps("best-of-n", spec)
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("def f():\n    from .leaf import g\n")
    (pkg / "sub" / "leaf.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                         "    from components import hidden\n")
    (pkg / "hidden.py").write_text("")
    (pkg / "entry.py").write_text("import json\n\ndef run():\n    from components import sub\n")
    assert import_closure("components.entry", tmp_path) == {
        Path("components/__init__.py"), Path("components/entry.py"), Path("components/sub/__init__.py"),
        Path("components/sub/leaf.py"),
    }
