"""`components.io`: atomically written files get the permissions a plain open gives; journals
survive damaged lines; record readers do not coerce labels."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from components.io import (
    DataError,
    atomic_path,
    current_umask,
    read_jsonl,
    write_json,
    write_jsonl,
    write_text,
)
from components.records import StepSample


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


@pytest.mark.parametrize("label", ["yes", "true", 1, 0, "no"])
def test_step_sample_label_must_be_a_json_boolean(tmp_path: Path, label: object) -> None:
    """A label that is not true/false/null is an error naming file, line and field (no coercion)."""
    good = {"id": "p1-s0", "problem_id": "p1", "question": "What is 1+1?", "previous_steps": [],
            "now_step": "1+1=2", "step_index": 0, "label": True}
    path = tmp_path / "steps_train.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "p1-s1", "label": label}) + "\n")
    with pytest.raises(DataError) as err:
        read_jsonl(path, StepSample)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 2, "label")
    assert "boolean" in str(err.value)
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "p1-s1", "label": None}) + "\n")
    assert [s.label for s in read_jsonl(path, StepSample)] == [True, None]
