"""The journaled-sampling engine (components.journal): torn and garbage lines, fingerprints and
the two staleness policies, against real files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from components.io import DataError
from components.journal import (
    HEADER_KEY,
    Journal,
    JournalWarning,
    fingerprint,
    finished,
    open_journal,
)


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


def test_open_journal_writes_its_header_and_resumes_under_the_same_settings(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with open_journal(path, {"t": 0.8}) as journal:
        assert finished(journal) == {}
        journal.append({"key": "a", "v": 1})
    header = json.loads(path.read_text().splitlines()[0])
    assert header == {"key": HEADER_KEY, "fingerprint": fingerprint({"t": 0.8}), "settings": {"t": 0.8}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", JournalWarning)
        with open_journal(path, {"t": 0.8}) as journal:
            assert finished(journal) == {"a": {"key": "a", "v": 1}}
    assert len(path.read_text().splitlines()) == 2  # no second header


def test_restart_policy_starts_a_stale_journal_over_with_a_warning_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with open_journal(path, {"t": 0.8}) as journal:
        journal.append({"key": "a", "v": 1})
    with pytest.warns(JournalWarning, match=f"{path}: journal written with other settings"):
        journal = open_journal(path, {"t": 0.2})
    with journal:
        assert finished(journal) == {}
    assert json.loads(path.read_text())["settings"] == {"t": 0.2}


def test_refuse_policy_keeps_a_stale_journal_and_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with open_journal(path, {"t": 0.8}, on_stale="refuse") as journal:
        journal.append({"key": "a", "v": 1})
    before = path.read_bytes()
    with pytest.raises(DataError, match=r"j.jsonl:1: field 'fingerprint' journal written with other settings"):
        open_journal(path, {"t": 0.2}, on_stale="refuse")
    assert path.read_bytes() == before


@pytest.mark.parametrize("on_stale", ["restart", "refuse"])
def test_records_without_a_readable_header_are_not_trusted(tmp_path: Path, on_stale: str) -> None:
    path = tmp_path / "j.jsonl"
    path.write_text(json.dumps({"key": "a", "v": 1}) + "\n")  # a journal from before headers, or a lost first line
    if on_stale == "refuse":
        with pytest.raises(DataError, match="no readable settings line"):
            open_journal(path, {"t": 0.8}, on_stale="refuse")
        return
    with pytest.warns(JournalWarning, match="no readable settings line"), open_journal(path, {"t": 0.8}) as journal:
        assert finished(journal) == {}


def test_fingerprint_ignores_key_order_and_sees_every_value() -> None:
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1, "b": [1, 2]}) != fingerprint({"a": 1, "b": [2, 1]})
    assert len(fingerprint({})) == 16
