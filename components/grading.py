"""Answer grading for Best-of-N and guided search: extract a final answer, compare it with math-verify.

Extraction (in the calling process, pure string work, no timeout needed):

1. ``boxed``: the content of the LAST ``\\boxed{...}`` or ``\\fbox{...}`` in the text, braces
   balanced (nested braces are kept; ``\\{`` and ``\\}`` do not count as braces). A box that is
   never closed is ignored; an empty box is an empty answer (``no_answer``, no fallback).
2. ``answer_phrase`` (fallback 1, only when there is no box): the text after the LAST
   case-insensitive "the answer is" / "the final answer is" / "final answer:", up to the end
   of that line (of the next non-empty line when the phrase ends its line) or the first
   sentence-ending period (a "." followed by whitespace or the end), whichever comes first,
   with surrounding ``$``, ``\\(``/``\\)``, ``\\[``/``\\]``, spaces, ``:`` and a trailing
   ``.`` removed.
3. ``last_number`` (fallback 2): the last number of the last non-empty line (an optional
   sign, digits with optional thousands commas and an optional decimal part, or ``a/b``).
4. ``none``: nothing found; the candidate is graded ``no_answer``.

The method used is returned with every grade, so a report can count how often the fallbacks
were needed (``Grade.extraction``).

Comparison (math-verify 0.9): the reference and the extracted answer are each parsed with
``math_verify.parse`` as ``$\\boxed{x}$``, else as ``$x$``, else as plain ``x`` (unescaped ``$``
removed first); a parse counts only if it yields a sympy object.
``verify(reference, answer)`` decides; a problem with several references (OlympiadBench
``final_answer`` lists) is correct when any of them verifies.

Timeouts. math-verify's own timeouts use ``signal.alarm``, which raises off the main thread
(threads, Prefect task runners). We disable them (``parsing_timeout=None``,
``timeout_seconds=None``) and run parse+verify in a worker subprocess instead (a fresh
``python`` speaking JSON lines over pipes: no fork of a process holding torch threads, and no
re-import of the caller's ``__main__`` as ``multiprocessing``'s spawn would need). The caller
waits for the reply with a deadline (``select`` on the pipe); past it the worker is killed (a runaway sympy computation cannot be interrupted any other way) and a fresh
one is started for the next request. This works from any thread and process; a lock makes
one grader safe to share between threads.

Outcomes are explicit and never raise: ``correct``, ``incorrect``, ``no_answer`` (nothing
extracted, or the extracted answer does not parse), ``bad_reference`` (no reference parses),
``timeout`` (parse+verify exceeded the deadline) and ``error`` (the worker died for another
reason, e.g. out of memory). Only ``correct`` counts as solved.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Outcome = Literal["correct", "incorrect", "no_answer", "bad_reference", "timeout", "error"]
Extraction = Literal["boxed", "answer_phrase", "last_number", "none"]
OUTCOMES: tuple[Outcome, ...] = ("correct", "incorrect", "no_answer", "bad_reference", "timeout", "error")
EXTRACTIONS: tuple[Extraction, ...] = ("boxed", "answer_phrase", "last_number", "none")

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_PHRASE_RE = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*:)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------


def _balanced_from(text: str, start: int) -> str | None:
    """Content between the `{` at `start - 1` and its matching `}`; None if never closed."""
    depth = 1
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last closed `\\boxed{...}` / `\\fbox{...}` (balanced braces), else None."""
    for match in reversed(list(_BOX_RE.finditer(text))):
        content = _balanced_from(text, match.end())
        if content is not None:
            return content.strip()
    return None


def _clean_phrase_answer(text: str) -> str:
    text = text.strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]"), ("$$", "$$"), ("$", "$")):
        if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
            text = text[len(left) : len(text) - len(right)].strip()
    return text.strip(" :\t").rstrip(".").strip()


def _answer_phrase(text: str) -> str | None:
    matches = list(_PHRASE_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].lstrip(" \t:")
    if rest.startswith("\n"):  # the answer stands on the next non-empty line
        rest = rest.lstrip()
    line = rest.split("\n", 1)[0]
    sentence = re.split(r"\.(?=\s|$)", line, maxsplit=1)[0]
    answer = _clean_phrase_answer(sentence)
    return answer or None


def _last_number(text: str) -> str | None:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    numbers = _NUMBER_RE.findall(lines[-1])
    if not numbers:
        return None
    return re.sub(r"\s+", "", numbers[-1]).replace(",", "")


def extract_answer(text: str) -> tuple[str | None, Extraction]:
    """The final answer of a solution text and how it was found (see module docstring)."""
    boxed = last_boxed(text)
    if boxed is not None:  # an empty box is a found, empty answer (graded no_answer)
        return boxed or None, "boxed"
    phrase = _answer_phrase(text)
    if phrase:
        return phrase, "answer_phrase"
    number = _last_number(text)
    if number:
        return number, "last_number"
    return None, "none"


def reference_answers(answer: str | Sequence[str] | None, meta: Mapping[str, Any] | None = None) -> list[str]:
    """Gold answers of a test problem: OlympiadBench `meta.final_answer` list, else `answer`."""
    if meta and isinstance(meta.get("final_answer"), list) and meta["final_answer"]:
        golds: Iterable[Any] = meta["final_answer"]
    elif answer is None:
        golds = []
    elif isinstance(answer, str):
        golds = [answer]
    else:
        golds = answer
    return [str(g) for g in golds if str(g).strip()]


# --------------------------------------------------------------------------------------
# Worker process (parse + verify with math-verify's own timeouts disabled)
# --------------------------------------------------------------------------------------


def _strip_dollars(text: str) -> str:
    return _UNESCAPED_DOLLAR.sub("", text).strip()


def _parsed(text: str) -> list[Any] | None:
    """math-verify parse of an answer string; None when no sympy object comes out."""
    from math_verify import parse
    from sympy import Basic
    from sympy.matrices import MatrixBase

    body = _strip_dollars(text)
    if not body:
        return None
    for form in ("$\\boxed{%s}$", "$%s$", "%s"):
        result = parse(form % body, parsing_timeout=None)
        if any(isinstance(x, (Basic, MatrixBase)) for x in result):
            return result
    return None


def _verify_one(answer: str, golds: list[str]) -> str:
    from math_verify import verify

    parsed_golds = [p for p in (_parsed(g) for g in golds) if p is not None]
    if not parsed_golds:
        return "bad_reference"
    target = _parsed(answer)
    if target is None:
        return "no_answer"
    for gold in parsed_golds:
        if verify(gold, target, timeout_seconds=None):
            return "correct"
    return "incorrect"


def _cluster(answers: list[str]) -> list[int]:
    """Equivalence classes of answers (greedy: each joins the first class it verifies with)."""
    from math_verify import verify

    reps: list[tuple[str, list[Any] | None]] = []
    ids: list[int] = []
    for answer in answers:
        parsed = _parsed(answer)
        found = -1
        for k, (rep_text, rep_parsed) in enumerate(reps):
            if rep_text == answer or (
                parsed is not None
                and rep_parsed is not None
                and verify(rep_parsed, parsed, timeout_seconds=None)
                and verify(parsed, rep_parsed, timeout_seconds=None)
            ):
                found = k
                break
        if found < 0:
            reps.append((answer, parsed))
            found = len(reps) - 1
        ids.append(found)
    return ids


def _handle(request: Mapping[str, Any]) -> Any:
    op = request.get("op")
    if op == "verify":
        return _verify_one(str(request["answer"]), [str(g) for g in request["references"]])
    if op == "cluster":
        return _cluster([str(a) for a in request["answers"]])
    if op == "ping":
        return "pong"
    raise ValueError(f"unknown request {op!r}")


def serve_worker() -> None:
    """Worker loop: one JSON request per stdin line, one JSON reply per line on the real stdout."""
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  (imported before announcing readiness)

    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    sys.stdout = sys.stderr  # stray prints from libraries never corrupt the protocol
    out.write(json.dumps({"ok": True, "value": "ready"}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            reply = {"ok": True, "value": _handle(json.loads(line))}
        except Exception as err:  # a math-verify bug must not kill the worker
            reply = {"ok": False, "value": f"{type(err).__name__}: {err}"[:300]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class _Worker:
    """One verification subprocess; killed and replaced after a missed deadline.

    A plain subprocess speaking JSON lines (not `multiprocessing`), so it starts the same way
    from any main module, thread, Prefect task or notebook, with the parent's `sys.path`.
    """

    def __init__(self, startup_timeout_s: float):
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self.restarts = 0

    def _start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from components.grading import serve_worker; serve_worker()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._buffer = b""
        ready = self._read_line(self.startup_timeout_s)
        if ready is None:
            self.kill()
            raise RuntimeError(f"grading worker did not start within {self.startup_timeout_s:.0f} s")

    def _read_line(self, timeout_s: float) -> dict[str, Any] | None:
        """Next reply line, or None at the deadline; EOFError when the worker has gone."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError("grading worker closed its output")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def kill(self) -> None:
        """Stop the worker process (if any) and reap it."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
        self.proc = None
        self._buffer = b""

    def request(self, payload: Mapping[str, Any], timeout_s: float) -> tuple[str, Any]:
        """("ok", value) | ("fail", message) | ("timeout", None) | ("error", message)."""
        if self.proc is not None and self.proc.poll() is not None:
            self.kill()
            self.restarts += 1
        if self.proc is None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(payload) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
            reply = self._read_line(timeout_s)
        except (EOFError, OSError, ValueError) as err:
            code = self.proc.poll()
            self.kill()
            self.restarts += 1
            return "error", f"grading worker died ({type(err).__name__}, exit code {code})"
        if reply is None:
            self.kill()
            self.restarts += 1
            return "timeout", None
        return ("ok" if reply.get("ok") else "fail"), reply.get("value")


@dataclass(frozen=True)
class Grade:
    """The grade of one candidate: outcome, the extracted answer and how it was extracted."""

    outcome: Outcome
    answer: str | None
    extraction: Extraction
    detail: str | None = None

    @property
    def correct(self) -> bool:
        """True only for the `correct` outcome."""
        return self.outcome == "correct"


class Grader:
    """Grades answers against references in a worker process with a per-request deadline.

    Thread-safe (one request at a time per grader). Results are cached by (answer, references).
    Use as a context manager or call `close()`; a process-wide instance is available from
    `default_grader()`.
    """

    def __init__(self, timeout_s: float = 5.0, startup_timeout_s: float = 120.0):
        self.timeout_s = timeout_s
        self._worker = _Worker(startup_timeout_s)
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, tuple[str, ...]], tuple[Outcome, str | None]] = {}
        self.class_fallbacks = 0  # answer_classes calls that fell back to string classes

    @property
    def restarts(self) -> int:
        """How many times the worker was replaced (timeouts, crashes)."""
        return self._worker.restarts

    def verify(self, answer: str, references: Sequence[str]) -> tuple[Outcome, str | None]:
        """Outcome of comparing an extracted answer with the references (never raises)."""
        if not references:
            return "bad_reference", "no reference answer"
        key = (answer, tuple(references))
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            status, value = self._worker.request(
                {"op": "verify", "answer": answer, "references": list(references)}, self.timeout_s
            )
            if status == "ok":
                result: tuple[Outcome, str | None] = (value, None)
            elif status == "timeout":
                result = ("timeout", f"parse+verify exceeded {self.timeout_s:g} s")
            else:  # "fail" (an exception inside math-verify) or "error" (the worker died)
                result = ("error", str(value))
            if result[0] != "error":
                self._cache[key] = result
            return result

    def grade(self, text: str, references: Sequence[str]) -> Grade:
        """Extract the final answer of `text` and grade it against the references."""
        answer, how = extract_answer(text)
        if answer is None:
            if not references:
                return Grade("bad_reference", None, how, "no reference answer")
            return Grade("no_answer", None, how, "no final answer found")
        outcome, detail = self.verify(answer, references)
        return Grade(outcome, answer, how, detail)

    def answer_classes(self, answers: Sequence[str | None]) -> list[int | None]:
        """Class id per answer (equal ids = math-verify equivalent both ways); None stays None.

        Falls back to exact string classes (whitespace removed) when the worker times out.
        """
        present = [a for a in answers if a is not None]
        distinct = list(dict.fromkeys(present))
        ids: list[int] | None = None
        if distinct:
            with self._lock:
                status, value = self._worker.request(
                    {"op": "cluster", "answers": distinct}, self.timeout_s * max(1, len(distinct))
                )
            if status == "ok":
                ids = list(value)
        if ids is None:
            self.class_fallbacks += bool(distinct)
            keys = list(dict.fromkeys(re.sub(r"\s+", "", a) for a in distinct))
            ids = [keys.index(re.sub(r"\s+", "", a)) for a in distinct]
        by_answer = dict(zip(distinct, ids, strict=True))
        return [None if a is None else by_answer[a] for a in answers]

    def close(self) -> None:
        """Stop the worker process."""
        with self._lock:
            self._worker.kill()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_DEFAULT: Grader | None = None
_DEFAULT_LOCK = threading.Lock()


def default_grader(timeout_s: float = 5.0) -> Grader:
    """A process-wide grader (started on first use, stopped at exit)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Grader(timeout_s)
            atexit.register(_DEFAULT.close)
        _DEFAULT.timeout_s = timeout_s
        return _DEFAULT


def grade(text: str, references: Sequence[str], timeout_s: float = 5.0) -> Grade:
    """Grade one solution text with the process-wide grader (see `Grader.grade`)."""
    return default_grader(timeout_s).grade(text, references)
