"""The PRM as a reward: `rprm score` on a solutions file, and a reward function for TRL's GRPO.

Both split a solution that comes as one text into steps on blank lines, as Best-of-N does
(`records.split_steps`, docs/method.md §3), score every step with the R-PRM step scorer (K
sampled analyses per step, reward = mean P(" Yes"), any backend), and reduce the step rewards
to one number per solution with the aggregations of `search.AGGREGATIONS` (`min`, `last`,
`product`, `mean`).

`rprm score INPUT.jsonl --model MODEL --out OUT.jsonl` (`score_file`): one row per solution,
`{"id": str (optional), "question" (or "problem"): str, "steps": [str, ...]}` or a solution
text in `solution` / `response` in place of `steps`. Every row is validated before the model
is loaded: a missing or mistyped field, an empty question, no step, a blank step, more steps
than `scoring.max_steps` or more characters than `scoring.max_chars` (oversized text), or a
repeated id stops the command with `FILE:LINE: field 'F' ...` (exit 2) and nothing is written.
Output, per input row in order: `id` (given, else `row-<line>`), `step_rewards`,
`first_error` (first step below the threshold, -1 if none), `verdicts` (`yes`/`no` per step),
`scores` (`min`, `last`, `product`, `mean` of the step rewards) and `generations`. Each scored
step is journaled in `OUT.journal` (beside OUT) as it finishes, so a killed run resumes where
it stopped; OUT itself is written atomically once everything is scored.

`ProcessReward` is a reward function with TRL's signature
(`reward(prompts, completions, **kwargs) -> list[float]`, GRPOTrainer's `reward_funcs`): one
reward per completion, `aggregation` over the (shaped) step rewards. Shaping (`shaping`):

- `none`: the step rewards as they are (in [0, 1]);
- `verdict`: each step's verdict, 1.0 when its reward is at or above the threshold, else 0.0
  (with `min`: 1 iff no step is judged wrong; with `mean`: the share of steps judged right);
- `centered`: reward minus the threshold (in [-t, 1 - t]; positive for steps judged right), so
  that a longer solution of right steps is not penalised by `mean` and a wrong step pulls the
  reward below zero (`product` is refused with it: signs would multiply).

A completion with no step (empty, or only blank lines) gets `empty_reward` (default 0.0, or
None: TRL then counts it as NaN) instead of stopping training; a completion of the wrong type is
a ValueError naming the row and field, and one longer than `max_steps` / `max_chars` is an
error too unless `oversized="truncate"` (the first `max_steps` steps within `max_chars` are
scored). Identical completions in a batch are scored once. The question is the dataset's
`question` column when the trainer passes one (`question_field`), else the prompt (its last user
message when conversational).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from components.config import Params, ScoringParams
from components.io import DataError, iter_json_lines, unique_records, write_jsonl
from components.records import Solution, split_steps
from components.scoring import first_wrong_step, step_verdicts
from components.search import AGGREGATIONS, aggregate

Shaping = Literal["none", "verdict", "centered"]
SHAPINGS: tuple[str, ...] = ("none", "verdict", "centered")
TEXT_FIELDS: tuple[str, ...] = ("solution", "response")  # unsplit solution text, in place of `steps`

# A step scorer as the reward sees it: solutions -> per solution, one reward per step.
ScoreFn = Callable[[list[Solution]], list[list[float | None]]]


# --------------------------------------------------------------------------------------
# Input rows
# --------------------------------------------------------------------------------------


def parse_solution_row(obj: Any, label: str, line: int, max_steps: int, max_chars: int) -> Solution:
    """One input row -> Solution; DataError naming file, line and field when it is malformed."""
    if not isinstance(obj, dict):
        raise DataError(label, line, None, f"expected a JSON object, got {type(obj).__name__}")
    qkey = "question" if "question" in obj or "problem" not in obj else "problem"
    question = obj.get(qkey)
    if question is None:
        raise DataError(label, line, "question", "missing field")
    if not isinstance(question, str):
        raise DataError(label, line, qkey, f"expected a string, got {type(question).__name__}")
    if not question.strip():
        raise DataError(label, line, qkey, "empty question")
    if "steps" in obj:
        steps = obj["steps"]
        if not isinstance(steps, list):
            raise DataError(label, line, "steps", f"expected a list of strings, got {type(steps).__name__}")
        if not steps:
            raise DataError(label, line, "steps", "empty step list")
        for j, s in enumerate(steps):
            if not isinstance(s, str):
                raise DataError(label, line, f"steps.{j}", f"expected a string, got {type(s).__name__}")
            if not s.strip():
                raise DataError(label, line, f"steps.{j}", "empty step")
        field = "steps"
    else:
        field = next((f for f in TEXT_FIELDS if f in obj), None)
        if field is None:
            raise DataError(label, line, "steps", "missing field (give `steps`, or the solution text in "
                                                  "`solution` or `response`)")
        text = obj[field]
        if not isinstance(text, str):
            raise DataError(label, line, field, f"expected a string, got {type(text).__name__}")
        steps = split_steps(text)
        if not steps:
            raise DataError(label, line, field, "no step (empty text)")
    if len(steps) > max_steps:
        raise DataError(label, line, field, f"{len(steps)} steps; at most {max_steps} (scoring.max_steps)")
    size = len(question) + sum(len(s) for s in steps)
    if size > max_chars:
        raise DataError(label, line, field if len(question) <= max_chars else qkey,
                        f"oversized: question and steps hold {size} characters; at most {max_chars} "
                        "(scoring.max_chars)")
    rid = obj.get("id", f"row-{line}")
    if not isinstance(rid, str) or not rid.strip():
        raise DataError(label, line, "id", "expected a non-empty string when given")
    return Solution(id=rid, question=question, steps=steps)


def read_solutions(path: str | Path, max_steps: int, max_chars: int) -> list[Solution]:
    """Every row of a solutions file, validated (ids unique); DataError at the first bad row."""
    return unique_records(iter_json_lines(path),
                          lambda obj, line: parse_solution_row(obj, str(path), line, max_steps, max_chars),
                          path, key=lambda s: s.id)


def aggregate_scores(step_rewards: Sequence[float | None]) -> dict[str, float | None]:
    """Every aggregation of `search.AGGREGATIONS` over the step rewards."""
    return {how: aggregate(step_rewards, how) for how in AGGREGATIONS}


def output_row(solution: Solution, step_rewards: Sequence[float | None], threshold: float,
               generations: int = 0) -> dict[str, Any]:
    """What `rprm score` writes for one solution."""
    first = first_wrong_step(step_rewards, threshold)
    return {
        "id": solution.id,
        "step_rewards": list(step_rewards),
        "first_error": -1 if first is None else first,
        "verdicts": step_verdicts(step_rewards, threshold),
        "scores": aggregate_scores(step_rewards),
        "generations": generations,
    }


def journal_path(out: str | Path) -> Path:
    """The journal of `rprm score ... --out OUT`: OUT.journal beside it."""
    out = Path(out)
    return out.with_name(out.name + ".journal")


def scoring_params(params: Params, k: int | None = None, threshold: float | None = None) -> ScoringParams:
    """params.scoring with K and the threshold overridden where given."""
    scoring = params.scoring.model_copy(deep=True)
    if k is not None:
        if k < 1:
            raise DataError("--k", None, "k", f"must be >= 1, got {k}")
        scoring.sampling.n = k
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise DataError("--threshold", None, "threshold", f"must be in [0, 1], got {threshold}")
        scoring.threshold = threshold
    return scoring


def load_scorer_backend(params: Params, model: str | Path) -> tuple[Any, str]:
    """(backend, model identity) for `model`: a folder or registry URI resolved to a folder
    (`registry.resolve_model`); with `backend.kind: openai`, the model name asked of the server."""
    from components.backends import load_backend

    if params.backend.kind == "openai" and not str(model).startswith("models:/") and not Path(model).is_dir():
        return load_backend(params.backend, str(model)), f"openai:{model}"
    from components.registry import resolve_model

    folder, ident = resolve_model(str(model))
    return load_backend(params.backend, folder, dtype=params.model.dtype), ident


def score_file(
    params: Params,
    input_path: Path,
    model: str,
    out: Path,
    *,
    k: int | None = None,
    threshold: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`rprm score`: score every solution of `input_path` with the PRM `model`; write `out`."""
    from components.scoring import StepScorer

    scoring = scoring_params(params, k, threshold)
    solutions = read_solutions(input_path, scoring.max_steps, scoring.max_chars)
    if Path(out).resolve() == Path(input_path).resolve():
        raise DataError(out, None, "out", "is the input file; choose another output")
    backend, ident = load_scorer_backend(params, model)
    try:
        scorer = StepScorer(backend, scoring, early_exit=False, journal=journal_path(out),
                            journal_tag=f"rprm-score:{ident}", progress=progress, desc="score")
        scored = scorer.score_detailed(solutions)
    finally:
        backend.close()
    rows = [output_row(sol, s.rewards(), scoring.threshold, s.generations())
            for sol, s in zip(solutions, scored, strict=True)]
    write_jsonl(out, rows)
    summary = {"solutions": len(rows), "steps": sum(len(r["step_rewards"]) for r in rows),
               "flagged": sum(r["first_error"] >= 0 for r in rows), "model": ident,
               "k": scoring.sampling.n, "threshold": scoring.threshold, "out": str(out)}
    print(f"scored {summary['solutions']} solutions ({summary['steps']} steps, K={summary['k']}) with "
          f"{ident}: {summary['flagged']} have a step below {summary['threshold']:g}; wrote {out}")
    return summary


# --------------------------------------------------------------------------------------
# TRL reward function
# --------------------------------------------------------------------------------------


def content_id(question: str, steps: Sequence[str]) -> str:
    """Id of a completion to score: from its content, so its analyses' seeds depend on nothing else."""
    digest = hashlib.sha256(json.dumps([question, list(steps)], ensure_ascii=False).encode()).hexdigest()
    return f"rl-{digest[:16]}"


def _message_text(content: Any, row: int, field: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal-style parts: keep the text ones
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise ValueError(f"row {row}: field '{field}': message content must be a string, got {type(content).__name__}")


def completion_text(completion: Any, row: int) -> str:
    """The text of one completion: a string, or the assistant turns of a conversational one."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(m, dict) for m in completion):
        turns = [m for m in completion if m.get("role", "assistant") == "assistant"]
        return "\n\n".join(_message_text(m.get("content", ""), row, "completions") for m in turns)
    raise ValueError(f"row {row}: field 'completions': expected a string or a list of messages, "
                     f"got {type(completion).__name__}")


def prompt_question(prompt: Any, row: int) -> str:
    """The question in one prompt: the prompt text, or its last user message when conversational."""
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        users = [m for m in prompt if m.get("role") == "user"]
        if not users:
            raise ValueError(f"row {row}: field 'prompts': conversational prompt has no user message")
        text = _message_text(users[-1].get("content", ""), row, "prompts")
    else:
        raise ValueError(f"row {row}: field 'prompts': expected a string or a list of messages, "
                         f"got {type(prompt).__name__}")
    if not text.strip():
        raise ValueError(f"row {row}: field 'prompts': empty question")
    return text


def shape(step_rewards: Sequence[float], shaping: str, threshold: float) -> list[float]:
    """Per-step shaping of step rewards (`none`, `verdict`, `centered`; see the module docstring)."""
    if shaping == "none":
        return list(step_rewards)
    if shaping == "verdict":
        return [1.0 if v == "yes" else 0.0 for v in step_verdicts(step_rewards, threshold)]
    if shaping == "centered":
        return [r - threshold for r in step_rewards]
    raise ValueError(f"unknown shaping {shaping!r} (one of {', '.join(SHAPINGS)})")


def scorer_fn(scorer: Any) -> ScoreFn:
    """A `StepScorer` (full scoring) as a ScoreFn."""

    def score(solutions: list[Solution]) -> list[list[float | None]]:
        return [s.rewards() for s in scorer.score_detailed(solutions)]

    return score


def endpoint_fn(url: str, *, timeout: float = 600.0, batch_size: int = 64) -> ScoreFn:
    """The served model (`mlflow models serve`, POST /invocations) as a ScoreFn."""
    import httpx

    endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/invocations") else "/invocations")

    def score(solutions: list[Solution]) -> list[list[float | None]]:
        out: list[list[float | None]] = []
        with httpx.Client(timeout=timeout) as client:
            for start in range(0, len(solutions), batch_size):
                chunk = solutions[start:start + batch_size]
                records = [{"id": s.id, "question": s.question, "steps": list(s.steps)} for s in chunk]
                r = client.post(endpoint, json={"dataframe_records": records})
                if r.status_code != 200:
                    raise ValueError(f"{endpoint} answered HTTP {r.status_code}: {r.text[:500]}")
                preds = r.json()["predictions"]
                if len(preds) != len(chunk):
                    raise ValueError(f"{endpoint} returned {len(preds)} predictions for {len(chunk)} rows")
                out.extend(p["step_rewards"] for p in preds)
        return out

    return score


class ProcessReward:
    """TRL reward function: the PRM's step rewards of each completion, shaped and aggregated.

    `reward(prompts, completions, **kwargs) -> list[float]` (see the module docstring); its
    `__name__` (`name`) is what TRL logs it under: `rewards/<name>/mean`.
    """

    def __init__(
        self,
        score: ScoreFn | Any,
        *,
        aggregation: str = "min",
        shaping: str = "none",
        threshold: float = 0.5,
        name: str = "prm",
        max_steps: int = 64,
        max_chars: int = 32000,
        oversized: Literal["error", "truncate"] = "error",
        empty_reward: float | None = 0.0,
        question_field: str | None = "question",
    ):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r} (one of {', '.join(AGGREGATIONS)})")
        if shaping not in SHAPINGS:
            raise ValueError(f"unknown shaping {shaping!r} (one of {', '.join(SHAPINGS)})")
        if shaping == "centered" and aggregation == "product":
            raise ValueError("shaping 'centered' with aggregation 'product' multiplies signs; use min, last or mean")
        if oversized not in ("error", "truncate"):
            raise ValueError(f"oversized must be 'error' or 'truncate', got {oversized!r}")
        self.score = scorer_fn(score) if hasattr(score, "score_detailed") else score
        self.aggregation, self.shaping, self.threshold = aggregation, shaping, threshold
        self.max_steps, self.max_chars, self.oversized = max_steps, max_chars, oversized
        self.empty_reward, self.question_field = empty_reward, question_field
        self.__name__ = name

    @classmethod
    def from_model(
        cls,
        model: str | Path,
        params: Params | None = None,
        *,
        k: int | None = None,
        threshold: float | None = None,
        **kwargs: Any,
    ) -> ProcessReward:
        """In-process reward on a model folder or registry URI, backend and scoring from params."""
        from components.scoring import StepScorer

        params = params or Params()
        scoring = scoring_params(params, k, threshold)
        backend, _ = load_scorer_backend(params, model)
        scorer = StepScorer(backend, scoring, early_exit=False, progress=False)
        kwargs.setdefault("max_steps", scoring.max_steps)
        kwargs.setdefault("max_chars", scoring.max_chars)
        return cls(scorer, threshold=scoring.threshold, **kwargs)

    @classmethod
    def from_endpoint(cls, url: str, *, threshold: float = 0.5, **kwargs: Any) -> ProcessReward:
        """Reward from the served model (`mlflow models serve`) at `url`."""
        return cls(endpoint_fn(url), threshold=threshold, **kwargs)

    def _steps(self, question: str, text: str, row: int) -> list[str]:
        steps = split_steps(text)
        if len(steps) > self.max_steps:
            if self.oversized == "error":
                raise ValueError(f"row {row}: field 'completions': {len(steps)} steps; at most {self.max_steps} "
                                 "(max_steps; oversized='truncate' scores the first ones)")
            steps = steps[: self.max_steps]
        size = len(question) + sum(len(s) for s in steps)
        if size > self.max_chars:
            if self.oversized == "error" or len(question) >= self.max_chars:
                field = "prompts" if len(question) >= self.max_chars else "completions"
                raise ValueError(f"row {row}: field '{field}': oversized: {size} characters with the question; "
                                 f"at most {self.max_chars} (max_chars)")
            budget, kept = self.max_chars - len(question), []
            for s in steps:
                if len(s) > budget:
                    break
                kept.append(s)
                budget -= len(s)
            steps = kept
        return steps

    def step_rewards(self, prompts: Sequence[Any], completions: Sequence[Any],
                     questions: Sequence[Any] | None = None) -> list[list[float | None]]:
        """The PRM's step rewards of each completion (empty for a completion with no step)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        if questions is not None and len(questions) != len(completions):
            raise ValueError(f"{len(questions)} questions for {len(completions)} completions")
        sols: list[Solution | None] = []
        for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            if questions is not None:
                question = questions[row]
                if not isinstance(question, str) or not question.strip():
                    raise ValueError(f"row {row}: field '{self.question_field}': expected a non-empty string, "
                                     f"got {type(question).__name__}")
            else:
                question = prompt_question(prompt, row)
            steps = self._steps(question, completion_text(completion, row), row)
            sols.append(Solution(id=content_id(question, steps), question=question, steps=steps) if steps else None)
        unique = list({s.id: s for s in sols if s is not None}.values())
        scored = dict(zip([s.id for s in unique], self.score(unique), strict=True)) if unique else {}
        return [list(scored[s.id]) if s is not None else [] for s in sols]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """One reward per completion (TRL's reward-function signature)."""
        questions = kwargs.get(self.question_field) if self.question_field else None
        per_step = self.step_rewards(prompts, completions, questions)
        rewards: list[float | None] = []
        for steps in per_step:
            values = [r for r in steps if r is not None]
            rewards.append(aggregate(shape(values, self.shaping, self.threshold), self.aggregation)
                           if values else self.empty_reward)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and per_step:
            flagged = [first_wrong_step(s, self.threshold) is not None for s in per_step]
            log_metric(f"prm/{self.__name__}/flagged_rate", sum(flagged) / len(flagged))
            log_metric(f"prm/{self.__name__}/steps", sum(len(s) for s in per_step) / len(per_step))
        return rewards
