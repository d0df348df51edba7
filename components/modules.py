"""Which project files a module needs: its static import closure, read from the source (AST).

A project module is one whose file lies under `root` (the folder holding the top-level package,
e.g. the repository root for `components`). The closure of `components.x` is its file and the
files of every module of the same top-level package that it imports, transitively: imports
anywhere in a file count (functions' lazy imports too), except those under
`if TYPE_CHECKING:`; importing `a.b.c` counts `a/__init__.py` and `a/b/__init__.py` too.
Nothing is imported or run. Used by `rprm register` (the code shipped with the served model)
and by tests/test_stages.py (dvc.yaml code deps).
"""

from __future__ import annotations

import ast
from pathlib import Path

NOT_PACKAGE_DATA = {".py", ".pyc", ".pyo"}  # suffixes of files that are code, not package data


def module_file(module: str, root: Path) -> Path | None:
    """The file of dotted module `module` under `root` (a package's `__init__.py`); None if none."""
    base = root.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether `node` sits under an `if TYPE_CHECKING:` block (never imported at run time)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                return True
    return False


def _with_packages(name: str, root: Path) -> set[str]:
    """`name` and each package above it (`a.b.c`: `a`, `a.b`, `a.b.c`) that has a file under root."""
    parts = name.split(".")
    prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {p for p in prefixes if module_file(p, root) is not None}


def imported_modules(path: Path, root: Path) -> set[str]:
    """Dotted names of the modules of its own top-level package that file `path` imports (`from p import x`: `p.x`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    rel = path.relative_to(root).with_suffix("")
    package = rel.parts[0]
    here = list(rel.parts[:-1])  # the file's package (pkg/x/__init__.py: pkg.x)
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package, `level - 1` packages up
                pkg = here[: len(here) - (node.level - 1)]
                base = ".".join([*pkg, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == package:
                found |= _with_packages(name, root)
    return found


def import_closure(module: str, root: Path) -> set[Path]:
    """Files (relative to root) of `module`, the packages above it and every module they import, transitively."""
    seen: set[str] = set()
    todo = sorted(_with_packages(module, root))
    if module not in todo:
        raise ValueError(f"module {module!r} has no file under {root}")
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(module_file(name, root), root) - seen)  # type: ignore[arg-type]
    return {module_file(name, root).relative_to(root) for name in seen}  # type: ignore[union-attr]


def package_data(package: str, root: Path) -> set[Path]:
    """Non-code files (relative to root) under top-level package `package`, caches left out."""
    return {
        f.relative_to(root)
        for f in (root / package).rglob("*")
        if f.is_file() and f.suffix not in NOT_PACKAGE_DATA and "__pycache__" not in f.parts
    }
