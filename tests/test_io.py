"""`components.io` writers: atomically written files get the permissions a plain open gives."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from components.io import atomic_path, current_umask, write_json, write_jsonl, write_text


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run the block under `mask`, restoring the previous umask after."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
def test_new_files_honour_the_umask_like_a_plain_open(tmp_path: Path, mask: int) -> None:
    with umask(mask):
        assert current_umask() == mask
        plain = tmp_path / "plain.txt"
        with plain.open("w") as fh:
            fh.write("x")
        write_text(tmp_path / "a.txt", "x")
        write_json(tmp_path / "b.json", {"a": 1})
        write_jsonl(tmp_path / "c.jsonl", [{"a": 1}])
        with atomic_path(tmp_path / "d.png", "wb") as fh:
            fh.write(b"\x89PNG")
    assert mode(plain) == 0o666 & ~mask
    for name in ("a.txt", "b.json", "c.jsonl", "d.png"):
        assert mode(tmp_path / name) == mode(plain), name
    assert not list(tmp_path.glob(".*.tmp"))


def test_rewriting_an_existing_file_keeps_its_mode(tmp_path: Path) -> None:
    """Like `open(path, "w")` on an existing file: its permissions stay, whatever the umask."""
    path = tmp_path / "report.json"
    write_json(path, {"v": 1})
    path.chmod(0o640)
    with umask(0o077):
        write_json(path, {"v": 2})
    assert mode(path) == 0o640
    assert path.read_text() == '{\n  "v": 2\n}\n'
