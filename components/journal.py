"""The journaled-sampling engine: how every stage keeps finished generations across kills and reruns.

One engine for synthesis (teacher analyses), pair sampling, step scoring (evaluate, best-of-n,
`rprm score`), best-of-n candidate pools and guided search:

- **Seeds.** Every sampled value has its own seed, a function of the run's seed and the unit's
  identity only (`components.backends.base`: `sample_seed`, `step_seed`, `problem_seed`,
  `search_seed`), so a unit sampled after a resume, or in another batch, is the unit an
  uninterrupted run would have sampled.
- **Fingerprint.** What the journaled values depend on besides the unit's identity (model,
  sampling params, backend and its sampler, data), as a JSON-able object; `fingerprint()`
  digests it. The journal's first record holds it (`HEADER_KEY`).
- **Staleness policy.** A journal written under another fingerprint is either started over
  (`on_stale="restart"`: a `JournalWarning` naming the file, used by the pipeline's stages, whose
  journals are DVC outputs tied to their params) or refused (`on_stale="refuse"`: a `DataError`
  naming the file, line 1 and the field; used where the user named the journal, `rprm score
  --out`, so their finished work is never deleted behind their back).
- **Resume.** `Journal.done()` is what a previous (possibly killed) run finished; the caller
  generates only the units not in it and appends each as it finishes (fsynced).

A journal is a plain JSONL file: one header line, then one record per finished unit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Literal

from components.io import DataError, atomic_path

log = logging.getLogger(__name__)

HEADER_KEY = "__fingerprint__"  # the key of a journal's first record
OnStale = Literal["restart", "refuse"]


class JournalWarning(UserWarning):
    """A journal line could not be read and was skipped, or a stale journal was started over."""


def fingerprint(settings: Any) -> str:
    """16-hex sha256 of the settings' sorted JSON: the digest a journal header carries."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


class Journal:
    """Append-only JSONL journal of finished work units, keyed by a string key.

    `done()` returns what a previous (possibly killed) run finished; `append()` writes one
    record and fsyncs it. A torn final line from a kill mid-write is dropped on load and
    truncated away before new appends, so no record is ever lost or duplicated. A complete
    line that is not a JSON object with the key (disk or copy damage, a hand edit) is skipped
    with a warning naming the file and line; the records after it are kept, and the journal is
    rewritten without the bad lines (their work is redone).
    """

    def __init__(self, path: str | Path, key: str = "key"):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, dict[str, Any]] = {}
        self.skipped_lines: list[int] = []  # 1-based numbers of unreadable lines dropped on load
        self._load()
        self._fh = self.path.open("a", encoding="utf-8")

    def _record(self, raw: bytes) -> dict[str, Any] | None:
        """The journal record on one complete line, or None if it is not one."""
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(obj, dict) or self.key not in obj:
            return None
        return obj

    def _load(self) -> None:
        if not self.path.exists():
            return
        kept: list[bytes] = []
        torn = False
        with self.path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.endswith(b"\n"):
                    torn = True  # torn tail from a kill mid-write
                    break
                if not raw.strip():
                    self.skipped_lines.append(lineno)
                    continue
                obj = self._record(raw)
                if obj is None:
                    self.skipped_lines.append(lineno)
                    message = (f"{self.path}:{lineno}: unreadable journal line skipped (not a JSON "
                               f"object with '{self.key}'); the records after it are kept and its "
                               "work is redone")
                    warnings.warn(message, JournalWarning, stacklevel=3)
                    continue
                self._records[str(obj[self.key])] = obj
                kept.append(raw)
        if self.skipped_lines:
            with atomic_path(self.path, "wb") as out:
                out.writelines(kept)
        elif torn:
            with self.path.open("r+b") as fh:
                fh.truncate(sum(len(r) for r in kept))

    def done(self) -> dict[str, dict[str, Any]]:
        """Finished records by key."""
        return self._records

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def append(self, record: dict[str, Any]) -> None:
        """Durably append one finished record (ignored if its key is already journaled)."""
        k = str(record[self.key])
        if k in self._records:
            return
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._records[k] = record

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_journal(path: str | Path, settings: Any, *, key: str = "key", on_stale: OnStale = "restart") -> Journal:
    """The journal at `path` for values that depend on `settings` (see the module docstring).

    New or empty: its header record is written. Same fingerprint: opened to resume. Another
    fingerprint, or records without a readable header: started over (`restart`, with a
    JournalWarning) or a DataError naming the file (`refuse`).
    """
    path = Path(path)
    digest = fingerprint(settings)
    journal = Journal(path, key=key)
    header = journal.done().get(HEADER_KEY)
    if header is not None and header.get("fingerprint") == digest:
        return journal
    if header is not None or len(journal):
        why = (f"written with other settings ({header.get('fingerprint')}, now {digest})" if header is not None
               else "holds records but no readable settings line")
        journal.close()
        if on_stale == "refuse":
            raise DataError(path, 1, "fingerprint",
                            f"journal {why}. Delete it to start over, or restore the settings to resume.")
        message = f"{path}: journal {why}; its records are discarded and sampling starts over"
        log.warning(message)
        warnings.warn(message, JournalWarning, stacklevel=2)
        path.unlink()
        journal = Journal(path, key=key)
    journal.append({key: HEADER_KEY, "fingerprint": digest, "settings": settings})
    return journal


def finished(journal: Journal) -> dict[str, dict[str, Any]]:
    """The journal's unit records by key (its header left out)."""
    return {k: r for k, r in journal.done().items() if k != HEADER_KEY}
