"""The R-PRM step scorer as an MLflow pyfunc model (logged from this file: models from code).

Request: rows of `{"question": str, "steps": [str, ...], "id": str (optional)}`, e.g.
`POST /invocations {"dataframe_records": [{"question": "...", "steps": ["...", "..."]}]}`.
Response, per row: `id`, `step_rewards` (the mean over K sampled analyses of P(" Yes") for each
step; null for steps not scored after an early exit), `first_error` (first step whose reward
is below `scoring.threshold`, else -1) and `verdicts` (`"yes"` / `"no"` per step, null where
not scored). Request param `early_exit` (default false) stops scoring a solution at its first
low step; it is the only request param. Any other (`temperature`, `n`, ...) is refused with
HTTP 400 naming it: the sampling settings are fixed at registration. (MLflow drops params the
signature does not declare before `predict` runs and only logs a warning naming them; the
model reads that warning on its own thread and refuses the request instead.)

The model folder travels as the artifact `model`; the scoring parameters (`params.scoring`,
which hold the request limits), the backend parameters (`params.backend`) and the weights
dtype (`model.dtype`) are the model config recorded at registration. Malformed rows (empty question, blank or non-text steps, more than
`scoring.max_steps` steps, more than `scoring.max_chars` characters) are rejected with a
`RequestError` naming the row and field (an oversized question names
`question`, oversized steps `steps`), which the scoring server
answers with HTTP 400; the server keeps serving. Type errors the signature catches (a number
as question, steps that are not a list of text) are answered 400 by MLflow's schema
enforcement before `predict` runs; note that MLflow turns a list that mixes text and numbers
into text (numpy's conversion), so `["x = 1", 7]` is scored as `["x = 1", "7"]`.

Concurrent requests are combined: while one batch is being scored, the requests that arrive
wait, and the next scorer call takes all of them at once (one batched generation instead of
many small ones). Rewards do not depend on this batching because sampling is seeded per
solution and step.

This module knows no MLflow: it is the reward service (`StepRewardService`: request in, rows
out, `RequestError` for a malformed request) and the description of its columns and request
params. The MLflow side, the pyfunc class that wraps the service the model config names (`SERVICE`; a
`RequestError` becomes an MlflowException INVALID_PARAMETER_VALUE, which the scoring server
answers with HTTP 400), the signature built from the columns below and
`mlflow.models.set_model`, lives in components/tracking.py, the file MLflow loads as the model's
code (models from code).
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from components.records import Solution, StepScores
from components.scoring import step_verdicts

MODEL_ARTIFACT = "model"  # key of the HF model folder among the pyfunc's artifacts
MAX_COMBINED_SOLUTIONS = 64  # most solutions one combined scorer call takes from waiting requests

SERVICE = f"{__name__}:StepRewardService"  # what the model config names as the served class

# The request and response columns (name, type, required) and the request params with their
# defaults; `tracking.serving_signature` turns them into the model's MLflow signature. A type is
# "string", "double", "long" or "boolean", with "[]" for a list of them.
INPUT_COLUMNS = (("question", "string", True), ("steps", "string[]", True), ("id", "string", False))
OUTPUT_COLUMNS = (("id", "string", True), ("step_rewards", "double[]", True), ("first_error", "long", True),
                  ("verdicts", "string[]", True))
REQUEST_PARAM_DEFAULTS: dict[str, bool] = {"early_exit": False}
REQUEST_PARAMS = tuple(REQUEST_PARAM_DEFAULTS)


class RequestError(ValueError):
    """A malformed request (a row, a field or a request param); the message names it (HTTP 400)."""


# MLflow's params-schema enforcement (mlflow.models.utils._enforce_params_schema, mlflow 3.17)
# drops undeclared params and logs this warning on the calling thread, just before predict.
_SCHEMA_LOGGER = "mlflow.models.utils"
_UNRECOGNIZED = re.compile(r"Unrecognized params (\[.*?\]) are ignored")


class IgnoredParams(logging.Filter):
    """Remembers, per thread, the request params MLflow's schema enforcement dropped."""

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        """Note the names in an "Unrecognized params [...] are ignored" warning; keep the record."""
        match = _UNRECOGNIZED.search(record.getMessage())
        if match:
            try:
                names = [str(k) for k in ast.literal_eval(match.group(1))]
            except (ValueError, SyntaxError):
                names = [match.group(1)]
            self._local.names = sorted(names)
        return True

    def take(self) -> list[str]:
        """The names noted on this thread since the last call (then forgotten)."""
        names = getattr(self._local, "names", [])
        self._local.names = []
        return names


IGNORED_PARAMS = IgnoredParams()


def watch_ignored_params() -> None:
    """Install the filter on MLflow's schema-enforcement logger (warnings kept enabled there)."""
    logger = logging.getLogger(_SCHEMA_LOGGER)
    if IGNORED_PARAMS not in logger.filters:
        logger.addFilter(IGNORED_PARAMS)
    if not logger.isEnabledFor(logging.WARNING):
        logger.setLevel(logging.WARNING)


def refuse_unknown_params(names: Sequence[str]) -> None:
    """RequestError (HTTP 400) naming request params we do not take."""
    if names:
        raise RequestError(
            f"unknown request params {', '.join(repr(n) for n in names)}: the only request param is "
            f"{', '.join(REQUEST_PARAMS)}; sampling (K, temperature, top_p, max_new_tokens) is fixed "
            "at registration (scoring.* in the model config)"
        )


def _invalid(row: int, field: str, message: str) -> RequestError:
    return RequestError(f"row {row}: field '{field}': {message}")


def _cell(record: dict[str, Any], key: str) -> Any:
    value = record.get(key)
    if value is None:
        return None
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy array from the schema
        value = value.tolist()
    try:
        if value != value:  # NaN for an absent optional column
            return None
    except (TypeError, ValueError):
        pass
    return value


def solution_id(question: str, steps: Sequence[str]) -> str:
    """A content id for rows sent without one (same question and steps -> same id)."""
    digest = hashlib.sha256(json.dumps([question, list(steps)]).encode("utf-8")).hexdigest()
    return f"req-{digest[:16]}"


def _content_key(solution: Solution) -> tuple[str, str, tuple[str, ...]]:
    return solution.id, solution.question, tuple(solution.steps)


def parse_request(records: Sequence[dict[str, Any]], max_steps: int, max_chars: int) -> list[Solution]:
    """Validate request rows into Solutions; RequestError (HTTP 400) naming row and field."""
    if not records:
        raise RequestError("empty request: send at least one row")
    solutions: list[Solution] = []
    seen: dict[str, tuple[int, tuple]] = {}
    for i, record in enumerate(records):
        question = _cell(record, "question")
        steps = _cell(record, "steps")
        rid = _cell(record, "id")
        if not isinstance(question, str) or not question.strip():
            raise _invalid(i, "question", "must be a non-empty string")
        if not isinstance(steps, list) or not steps:
            raise _invalid(i, "steps", "must be a non-empty list of strings")
        for j, step in enumerate(steps):
            if not isinstance(step, str) or not step.strip():
                raise _invalid(i, f"steps.{j}", "must be a non-empty string")
        if len(steps) > max_steps:
            raise _invalid(i, "steps", f"{len(steps)} steps; at most {max_steps} (scoring.max_steps)")
        if len(question) > max_chars:
            raise _invalid(i, "question", f"{len(question)} characters; at most {max_chars} "
                                          "(scoring.max_chars)")
        size = len(question) + sum(len(s) for s in steps)
        if size > max_chars:
            raise _invalid(i, "steps", f"question and steps hold {size} characters; at most "
                                       f"{max_chars} (scoring.max_chars)")
        if rid is not None and (not isinstance(rid, str) or not rid.strip()):
            raise _invalid(i, "id", "must be a non-empty string when given")
        solution = Solution(id=rid or solution_id(question, steps), question=question, steps=steps)
        first = seen.setdefault(solution.id, (i, _content_key(solution)))
        if first[1] != _content_key(solution):
            raise _invalid(i, "id", f"{solution.id!r} is also the id of row {first[0]} with other content")
        solutions.append(solution)
    return solutions


def response_rows(scores: Sequence[StepScores], threshold: float) -> list[dict[str, Any]]:
    """Scorer output -> response rows (rewards, first error, yes/no verdict per scored step)."""
    return [
        {
            "id": s.id,
            "step_rewards": list(s.step_rewards),
            "first_error": s.first_error,
            "verdicts": step_verdicts(s.step_rewards, threshold),
        }
        for s in scores
    ]


class CombiningBatcher:
    """Scores the union of the solutions submitted by concurrent callers, one scorer call at a time.

    A caller's solutions join the next call unless one of them reuses an id that another
    caller in that call gave to different content (the scorer needs unique ids); identical
    solutions are scored once and shared.
    """

    def __init__(self, score: Callable[[list[Solution], bool], list[StepScores]], max_solutions: int):
        self._score = score
        self._max_solutions = max_solutions
        self._pending: list[tuple[list[Solution], bool, Future]] = []
        self._pending_lock = threading.Lock()
        self._run_lock = threading.Lock()

    def submit(self, solutions: list[Solution], early_exit: bool) -> list[StepScores]:
        """StepScores of `solutions` (in order), possibly scored together with other callers'."""
        future: Future = Future()
        with self._pending_lock:
            self._pending.append((solutions, early_exit, future))
        while not future.done():
            with self._run_lock:
                if not future.done():
                    self._run_next()
        return future.result()

    def _take(self) -> list[tuple[list[Solution], bool, Future]]:
        """Remove and return the requests of the next scorer call."""
        with self._pending_lock:
            if not self._pending:
                return []
            flag = self._pending[0][1]
            taken, rest = [], []
            keys: dict[str, tuple] = {}
            for entry in self._pending:
                solutions, entry_flag, _ = entry
                new = {s.id: _content_key(s) for s in solutions if s.id not in keys}
                fits = (
                    entry_flag == flag
                    and all(keys.get(s.id, _content_key(s)) == _content_key(s) for s in solutions)
                    and (not taken or len(keys) + len(new) <= self._max_solutions)
                )
                if fits:
                    taken.append(entry)
                    keys.update(new)
                else:
                    rest.append(entry)
            self._pending = rest
            return taken

    def _run_next(self) -> None:
        taken = self._take()
        if not taken:
            return
        unique: dict[tuple, Solution] = {}
        for solutions, _, _ in taken:
            for s in solutions:
                unique.setdefault(_content_key(s), s)
        try:
            scored = dict(zip(unique, self._score(list(unique.values()), taken[0][1]), strict=True))
        except BaseException as err:  # every caller of this call sees the failure
            for _, _, future in taken:
                future.set_exception(err)
            return
        for solutions, _, future in taken:
            future.set_result([scored[_content_key(s)] for s in solutions])


class StepRewardService:
    """The PRM as a service: request rows -> per-step rewards, predicted first error and verdicts.

    Built from the model config recorded at registration (`scoring`, `backend`, `dtype`) and the
    artifacts (the model folder under `MODEL_ARTIFACT`); concurrent `predict` calls share one
    scorer (`CombiningBatcher`). `request_error` is what a malformed request raises."""

    request_error = RequestError

    def __init__(self, config: dict[str, Any], artifacts: dict[str, str]):
        from components.backends import load_backend
        from components.config import BackendParams, ScoringParams
        from components.scoring import StepScorer

        self.scoring = ScoringParams.model_validate(config["scoring"])
        backend_params = BackendParams.model_validate(config["backend"])
        # openai: the analyses come from the server at backend.openai.base_url, asked for
        # backend.openai.model (not for the artifact's local folder name)
        model_arg = "" if backend_params.kind == "openai" else artifacts[MODEL_ARTIFACT]
        self.backend = load_backend(backend_params, model_arg, dtype=config["dtype"])
        scorers = {
            flag: StepScorer(self.backend, self.scoring, early_exit=flag, progress=False)
            for flag in (False, True)
        }
        self.batcher = CombiningBatcher(
            lambda solutions, flag: scorers[flag].score(solutions), MAX_COMBINED_SOLUTIONS
        )
        watch_ignored_params()

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Score each row (a DataFrame, a list of dicts or one dict); RequestError on a malformed
        row or an unknown request param."""
        refuse_unknown_params(IGNORED_PARAMS.take())
        refuse_unknown_params(sorted(set(params or {}) - set(REQUEST_PARAMS)))
        if hasattr(model_input, "to_dict"):
            records = model_input.to_dict(orient="records")
        elif isinstance(model_input, dict):
            records = [model_input]
        else:
            records = list(model_input)
        if not all(isinstance(r, dict) for r in records):
            raise RequestError("each row must be an object with 'question' and 'steps'")
        solutions = parse_request(records, self.scoring.max_steps, self.scoring.max_chars)
        early_exit = bool((params or {}).get("early_exit", REQUEST_PARAM_DEFAULTS["early_exit"]))
        return response_rows(self.batcher.submit(solutions, early_exit), self.scoring.threshold)
