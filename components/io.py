"""Safe file I/O: validated JSON Lines reading, atomic writes.

Also the digests of files and folders that stages and tracking compare (one place for each kind).

Every reader error names the file, the 1-based line and the field. Every writer goes through a
temporary file in the same folder and an atomic rename, so a crash never leaves a half-written
output that DVC or the next stage would trust. Append-only journals of finished work live in
`components.journal`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R")
_CHUNK = 1024 * 1024


class StageRefused(RuntimeError):
    """A stage refuses to go on for a stated reason (a quality gate, say); nothing was written."""


class DataError(ValueError):
    """Bad input data: carries the file, the 1-based line and the field at fault."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        where = self.path + (f":{line}" if line is not None else "")
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {message}")


def _first_error(err: ValidationError) -> tuple[str, str]:
    e = err.errors()[0]
    field = ".".join(str(p) for p in e["loc"]) or "<record>"
    kind = e["type"]
    if kind == "missing":
        return field, "missing field"
    if kind == "extra_forbidden":
        return field, "unknown field"
    return field, f"{e['msg']} (got {str(e.get('input'))[:80]!r})"


# Longest accepted JSON Lines record, line end included (the largest real record, a PRM800K
# solution, is ~130 KB). Reading stops there, so a file without line breaks (a JSON array, a
# binary blob) fails fast with bounded memory instead of being parsed whole.
MAX_LINE_BYTES = 8 * 1024 * 1024


def iter_json_lines(path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed JSON) for each non-blank line; DataError on bad bytes, JSON or a too-long line."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    if path.is_dir():
        raise DataError(path, None, None, "is a folder, expected a JSON Lines file")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(iter(lambda: fh.readline(max_line_bytes + 1), b""), start=1):
            if len(raw) > max_line_bytes:
                raise DataError(
                    path, lineno, None,
                    f"line longer than {max_line_bytes} bytes (expected one JSON object per line)",
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(path, lineno, None, f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(path, lineno, None, f"invalid JSON: {err.msg} (column {err.colno})") from None


def parse_record(
    model: type[T], obj: Any, path: str | Path, line: int | None, *, strict: bool = False
) -> T:
    """Validate one decoded object against a record type; DataError names file, line, field.

    With `strict`, no type coercion (a string "3" is not an int, 1 is not a bool); without it,
    fields declared strict in the record type (e.g. StepSample.label) stay strict.
    """
    if not isinstance(obj, dict):
        raise DataError(path, line, None, f"expected a JSON object, got {type(obj).__name__}")
    try:
        return model.model_validate(obj, strict=True if strict else None)
    except ValidationError as err:
        field, msg = _first_error(err)
        raise DataError(path, line, field, msg) from None


def unique_records(
    rows: Iterable[tuple[int, Any]],
    parse: Callable[[Any, int], R],
    label: str | Path,
    *,
    key: Callable[[R], Any] | None = None,
    allow_empty: bool = False,
) -> list[R]:
    """Parse (line, object) rows in order; with `key`, a repeated key is a DataError naming both
    lines (field `id`), and no row at all is one unless `allow_empty`."""
    out: list[R] = []
    seen: dict[Any, int] = {}
    for lineno, obj in rows:
        rec = parse(obj, lineno)
        if key is not None:
            k = key(rec)
            if k in seen:
                raise DataError(label, lineno, "id", f"duplicate id {k!r} (first on line {seen[k]})")
            seen[k] = lineno
        out.append(rec)
    if not out and not allow_empty:
        raise DataError(label, None, None, "no records")
    return out


def read_jsonl(
    path: str | Path,
    model: type[T],
    *,
    key: Callable[[T], Any] | None = None,
    allow_empty: bool = False,
) -> list[T]:
    """Read and validate a whole JSONL file; with `key`, duplicate keys are an error."""
    return unique_records(iter_json_lines(path), lambda obj, lineno: parse_record(model, obj, path, lineno),
                          path, key=key, allow_empty=allow_empty)


def read_json(path: str | Path) -> Any:
    """Read a JSON document; DataError on bad bytes or JSON."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    if path.is_dir():
        raise DataError(path, None, None, "is a folder, expected a JSON file")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(path, None, None, f"not valid UTF-8 ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise DataError(path, err.lineno, None, f"invalid JSON: {err.msg}") from None


def read_json_object(path: str | Path) -> dict[str, Any]:
    """Read a JSON document that must be an object (a report); DataError as `read_json` otherwise."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise DataError(path, None, None, "expected a JSON object")
    return obj


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting and restoring (brief, not thread-safe)
    os.umask(mask)
    return mask


def _plain_open_mode(path: Path) -> int:
    """Permission bits `open(path, "w")` would leave: the file's own if it exists, else 0666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


@contextmanager
def atomic_path(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temp file beside `path`; on success fsync and rename it over `path`.

    The result gets the permissions a plain `open(path, "w")` would give (not mkstemp's
    0600): an existing file keeps its mode, a new one gets 0666 minus the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            os.fchmod(fh.fileno(), _plain_open_mode(path))
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _to_obj(rec: Any) -> Any:
    return rec.model_dump(mode="json") if isinstance(rec, BaseModel) else rec


def write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Atomically write records (pydantic models or dicts) as JSON Lines; return the count."""
    n = 0
    with atomic_path(path) as fh:
        for rec in records:
            fh.write(json.dumps(_to_obj(rec), ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write a JSON document (sorted keys, indented)."""
    with atomic_path(path) as fh:
        json.dump(_to_obj(obj), fh, indent=2, sort_keys=True, ensure_ascii=False)
        fh.write("\n")


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(path) as fh:
        fh.write(text)


# --------------------------------------------------------------------------------------
# Digests of files and folders
# --------------------------------------------------------------------------------------


def tree_files(path: str | Path) -> list[Path]:
    """The files under a folder (sorted paths, any depth), or [path] for a file."""
    path = Path(path)
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def file_digest(path: str | Path, algorithm: str = "md5") -> str:
    """Hex digest of a file's bytes (read in chunks) with a hashlib algorithm."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_md5(path: str | Path) -> str:
    """md5 of a file's bytes (DVC 3's `md5` for files)."""
    return file_digest(path, "md5")


def data_hash(path: str | Path) -> str:
    """DVC's hash of a file or folder: md5, or for a folder md5 of its listing + `.dir`."""
    p = Path(path)
    if not p.is_dir():
        return file_md5(p)
    entries = [{"md5": file_md5(f), "relpath": f.relative_to(p).as_posix()} for f in tree_files(p)]
    entries.sort(key=lambda e: e["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing, usedforsecurity=False).hexdigest() + ".dir"


def content_digest(path: str | Path) -> str:
    """sha256 of every file's name (not its folder) and bytes, in `tree_files` order."""
    h = hashlib.sha256()
    for f in tree_files(path):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


_HEAD_BYTES = 1024 * 1024


def head_digest(path: str | Path) -> str:
    """Cheap identity of a file or folder: relative names, sizes and the first MiB of each file."""
    path = Path(path)
    h = hashlib.sha256()
    for f in tree_files(path):
        h.update(f.relative_to(path).as_posix().encode() if f != path else b".")
        fh_digest = hashlib.sha256()
        with f.open("rb") as fh:
            fh_digest.update(fh.read(_HEAD_BYTES))
        fh_digest.update(str(f.stat().st_size).encode())
        h.update(fh_digest.hexdigest().encode())
    return h.hexdigest()


def stat_digest(path: str | Path) -> str:
    """Cheap identity of a folder: relative names, sizes and modification times of its files (16 hex)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in tree_files(path):
        st = f.stat()
        h.update(f"{f.relative_to(path).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
