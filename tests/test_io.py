"""`components.io`: atomically written files get the permissions a plain open gives; journals
survive damaged lines; record readers do not coerce labels."""

from __future__ import annotations

import json
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from components.io import (
    DataError,
    Journal,
    JournalWarning,
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


def test_journal_skips_a_garbage_line_with_a_warning_and_keeps_the_rest(tmp_path: Path) -> None:
    """A damaged line in the middle costs that line only, and says which one; a torn tail is silent."""
    path = tmp_path / "journal.jsonl"
    lines = [json.dumps({"key": "a", "v": 1}), "{garbage", json.dumps({"key": "b", "v": 2}),
             json.dumps(["no", "key"]), json.dumps({"key": "c", "v": 3})]
    path.write_text("\n".join(lines) + "\n" + '{"key": "torn", "v"', encoding="utf-8")
    with pytest.warns(JournalWarning) as caught:
        journal = Journal(path)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(f"{path}:2: unreadable journal line skipped") for m in messages), messages
    assert any(m.startswith(f"{path}:4: ") for m in messages), messages
    assert len(messages) == 2  # the torn last line is a kill mid-write, not damage
    with journal:
        assert set(journal.done()) == {"a", "b", "c"} and journal.skipped_lines == [2, 4]
        journal.append({"key": "d", "v": 4})
    # rewritten without the bad lines: the next load is clean and sees every record
    with warnings.catch_warnings():
        warnings.simplefilter("error", JournalWarning)
        again = Journal(path)
    with again:
        assert set(again.done()) == {"a", "b", "c", "d"}
    assert path.read_text(encoding="utf-8").count("\n") == 4


def test_journal_torn_tail_only_is_truncated_silently(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text(json.dumps({"key": "a"}) + "\n" + '{"key": "b"', encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error", JournalWarning)
        journal = Journal(path)
    with journal:
        assert set(journal.done()) == {"a"}
    assert path.read_text(encoding="utf-8") == json.dumps({"key": "a"}) + "\n"


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
