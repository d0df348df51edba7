"""The R-PRM step scorer: K sampled analyses per step, reward = mean P(" Yes") (docs/method.md §9).

For step i of a solution the scorer samples K analyses of
`prompts.student_messages(question, steps[:i], steps[i])` and takes each analysis's verdict
probability from the generation pass itself (`Generation.p_yes`, read by the backend at the
position after the first `Is the step correct (Yes/No)?`). An analysis without it (it never
reached the verdict phrase, or the engine returned no log-probabilities) gets the fallback
named by `scoring.fallback` (docs/method.md §9.3):

- `teacher_forced`: the official second pass, batched: `backend.verdict_probability(conv,
  cut_at_verdict(postprocess_response(text))[0])`, i.e. the analysis cut at the first verdict
  phrase, or with the fallback question appended when it has none. A backend that says
  `forced_in_generation` (hf) computes the same number inside `generate` from the KV it
  decoded with (`Generation.forced_p_yes`: only the tokens past what was decoded, typically
  the fallback question, are encoded; equal up to float rounding); the others get the
  separate pass. If the backend cannot compute it (returns None), the sampled verdict is
  used, else the analysis is dropped;
- `sampled_verdict`: 1 if the text after the first verdict phrase is `Yes`, 0 if `No`, else
  dropped;
- `drop`: the analysis is excluded from the mean.

The step reward is the mean of the kept values; a step whose K analyses were all dropped gets
the neutral reward 0.5 (GenPRM's convention; the official guided search divides by zero there).

Work is done in waves, each sent to the backend in one call, which batches it under its token
budget (so memory is bounded by the backend, not by the wave). At most `max_active` solutions
are active at once, which bounds the work a crash can lose. Full scoring puts every remaining
step of every active solution in one wave: the backend then fills each batch with the K
analyses of many steps. Early exit takes only the next unscored step of every active solution
per wave (the next one is needed only if this one does not determine the prediction); early
exit removes a solution from the waves, it never serialises the others.

Early exit: a solution stops being scored once its prediction is determined. With the defaults
that is its first step with reward < `scoring.threshold` at K = `scoring.sampling.n`, so the
ProcessBench prediction (first step below the threshold) is identical to full scoring with
fewer generations. For sweeps, `exit_points` lists every (k, threshold) whose prediction must
be exact: a solution stops once, for each point, some scored step has a reward over its first
k analyses below that threshold; the prediction at each listed point is then the one full
scoring gives (at points not listed it may be undetermined: `first_error` returns None).

Determinism and resume: analysis j of step i of solution s is sampled with the backend's
per-row stream for seed `step_seed(sampling.seed, s, i)` and sample index j, so the values do
not depend on batching, on `max_active`, on early exit, or on resuming; the first k of K
analyses are exactly those a run with K = k draws. With a journal, every scored step is
appended (fsynced) as soon as its wave ends; a rerun reuses journaled steps (keyed by solution
id, step, a hash of the prompt and K; a record with more analyses serves a smaller K) and
scores only the rest, with results identical to an uninterrupted run. The journal
(`components.journal`) holds the settings it was written with (backend, sampling except n,
fallback, caller tag); reopened with other settings it is refused (`on_stale="refuse"`, the
default: a user-named journal) or started over (`"restart"`: the stages' own journals), never
silently mixed.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from components import prompts
from components.backends.base import BackendError, Conversation, GenerationBackend, step_seed
from components.config import SamplingParams, ScoringParams
from components.journal import Journal, OnStale, finished, open_journal
from components.records import Solution, StepScores

NEUTRAL_REWARD = 0.5
_SEP = "\x1f"


def mean_reward(values: Sequence[float | None]) -> float:
    """A step reward: the mean of the kept analyses' values (None = dropped), 0.5 if none is kept."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else NEUTRAL_REWARD


def step_is_wrong(reward: float, threshold: float) -> bool:
    """The one prediction rule: a step is wrong iff its reward < threshold (strict)."""
    return reward < threshold


def first_wrong_step(step_rewards: Sequence[float | None], threshold: float) -> int | None:
    """Index of the first scored step that is wrong (null rewards skipped), else None."""
    return next((i for i, r in enumerate(step_rewards) if r is not None and step_is_wrong(r, threshold)), None)


def step_verdicts(step_rewards: Sequence[float | None], threshold: float) -> list[str | None]:
    """Per step "yes" if reward >= threshold, else "no" (a wrong step); None where not scored.

    Written as `>=` as before the rule had one home: a NaN reward, never wrong by
    :func:`step_is_wrong`, still reads "no" here.
    """
    return [None if r is None else ("yes" if r >= threshold else "no") for r in step_rewards]


def step_conversation(solution: Solution, step_index: int) -> Conversation:
    """The student prompt that asks for an analysis of step `step_index` of a solution."""
    return prompts.student_messages(solution.question, solution.steps[:step_index], solution.steps[step_index])


def sampled_verdict_value(text: str) -> float | None:
    """1.0 / 0.0 when the text after the first verdict phrase starts with Yes / No, else None."""
    pos = text.find(prompts.VERDICT_PHRASE)
    if pos < 0:
        return None
    rest = text[pos + len(prompts.VERDICT_PHRASE):].lstrip()
    if rest.startswith("Yes"):
        return 1.0
    if rest.startswith("No"):
        return 0.0
    return None


def _fallback_prefix(text: str) -> str:
    """The assistant prefix of the teacher-forced fallback pass for a sampled analysis."""
    return prompts.cut_at_verdict(prompts.postprocess_response(text))[0]


def scoring_settings(scoring_params: ScoringParams) -> dict[str, Any]:
    """The `scoring` fields step values depend on: `sampling` (K included) and `fallback`.

    Not `threshold` (it only reads rewards: first error, early exit) nor `max_steps` and
    `max_chars` (limits of the served model), so journals named or checked by these settings
    survive a change of those.
    """
    return {"sampling": scoring_params.sampling.model_dump(mode="json"), "fallback": scoring_params.fallback}


def scoring_fingerprint(backend: GenerationBackend, scoring_params: ScoringParams, tag: str = "") -> dict[str, Any]:
    """What journaled step values depend on besides the prompt and K: backend (and its sampler), sampling, fallback, tag."""
    settings = scoring_settings(scoring_params)
    sampling = settings["sampling"]
    sampling.pop("n")
    fp = {
        "backend": getattr(backend, "name", type(backend).__name__),
        "sampler": backend.sampler,
        "sampling": sampling,
        "fallback": settings["fallback"],
        "tag": tag,
    }
    if scoring_params.fallback == "teacher_forced" and backend.forced_in_generation:
        fp["fallback_pass"] = "decoding-kv"  # fallback values differ from the separate pass by float rounding
    return fp


def _prompt_hash(conv: Conversation) -> str:
    return hashlib.sha256(json.dumps(conv, ensure_ascii=False).encode()).hexdigest()[:16]


@dataclass
class ScoredSolution:
    """Per-analysis values of the scored steps of one solution (a prefix when it exited early).

    `values[i][j]` is the verdict probability of analysis j of step i (None = dropped);
    `fallback[i][j]` says whether it came from a fallback rather than the generation pass.
    """

    id: str
    n_steps: int
    values: list[list[float | None]] = field(default_factory=list)
    fallback: list[list[bool]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether every step was scored."""
        return len(self.values) == self.n_steps

    def reward(self, step: int, k: int | None = None) -> float:
        """Mean kept value of the first k analyses of a scored step (0.5 if none is kept)."""
        return mean_reward(self.values[step][:k])

    def rewards(self, k: int | None = None) -> list[float | None]:
        """Step rewards over the first k analyses; None for steps that were not scored."""
        return [self.reward(i, k) for i in range(len(self.values))] + [None] * (self.n_steps - len(self.values))

    def first_error(self, threshold: float, k: int | None = None) -> int | None:
        """First scored step with reward < threshold; -1 if none and complete; None if unknown."""
        for i in range(len(self.values)):
            if step_is_wrong(self.reward(i, k), threshold):
                return i
        return -1 if self.complete else None

    def generations(self, k: int | None = None) -> int:
        """Analyses the first-k rewards rest on (k per scored step)."""
        return sum(len(v[:k]) for v in self.values)

    def fallbacks(self, k: int | None = None) -> int:
        """Analyses among the first k per step that needed a fallback."""
        return sum(sum(f[:k]) for f in self.fallback)

    def dropped(self, k: int | None = None) -> int:
        """Analyses among the first k per step excluded from the mean."""
        return sum(sum(v is None for v in vals[:k]) for vals in self.values)

    def to_step_scores(self, threshold: float, k: int | None = None) -> StepScores:
        """The StepScores record at (threshold, first k analyses)."""
        first = self.first_error(threshold, k)
        if first is None:
            raise ValueError(f"solution {self.id}: prediction at k={k}, threshold={threshold} is undetermined")
        return StepScores(
            id=self.id,
            step_rewards=self.rewards(k),
            samples=[[v for v in vals[:k] if v is not None] for vals in self.values]
            + [[] for _ in range(self.n_steps - len(self.values))],
            first_error=first,
            generations=self.generations(k),
            fallbacks=self.fallbacks(k),
        )


@dataclass
class _State:
    solution: Solution
    scored: ScoredSolution
    undetermined: set[int]

    @property
    def next_step(self) -> int:
        return len(self.scored.values)


class StepScorer:
    """Scores solutions step by step with any GenerationBackend (see the module docstring)."""

    def __init__(
        self,
        backend: GenerationBackend,
        scoring_params: ScoringParams,
        early_exit: bool,
        *,
        exit_points: Sequence[tuple[int, float]] | None = None,
        journal: str | Path | None = None,
        journal_tag: str = "",
        on_stale: OnStale = "refuse",
        max_active: int = 256,
        progress: bool = True,
        desc: str = "scoring",
    ):
        self.backend = backend
        self.params = scoring_params
        self.sampling: SamplingParams = scoring_params.sampling
        self.early_exit = early_exit
        points = sorted(set(exit_points or [(self.sampling.n, scoring_params.threshold)]))
        for k, t in points:
            if not 1 <= k <= self.sampling.n or not 0.0 <= t <= 1.0:
                raise ValueError(f"exit point (k={k}, threshold={t}) needs 1 <= k <= {self.sampling.n}, t in [0, 1]")
        # per k only the lowest threshold matters: a step below it is below every other one
        self.exit_points = {k: min(t for kk, t in points if kk == k) for k, _ in points}
        self.journal_path = Path(journal) if journal is not None else None
        self.journal_tag = journal_tag
        self.on_stale: OnStale = on_stale
        self.max_active = max(1, max_active)
        self.progress = progress
        self.desc = desc

    # ---------------------------------------------------------------- settings / journal

    def fingerprint(self) -> dict[str, Any]:
        """What the journaled values depend on (besides the prompt and K)."""
        return scoring_fingerprint(self.backend, self.params, self.journal_tag)

    def _open_journal(self) -> Journal | None:
        if self.journal_path is None:
            return None
        return open_journal(self.journal_path, self.fingerprint(), on_stale=self.on_stale)

    @staticmethod
    def _journal_index(journal: Journal) -> dict[tuple[str, int, str], dict[str, Any]]:
        index: dict[tuple[str, int, str], dict[str, Any]] = {}
        for rec in finished(journal).values():
            k = (rec["id"], rec["step"], rec["h"])
            if k not in index or len(rec["v"]) > len(index[k]["v"]):
                index[k] = rec
        return index

    # ---------------------------------------------------------------- scoring

    def _is_done(self, state: _State) -> bool:
        if state.scored.complete:
            return True
        return self.early_exit and not state.undetermined

    def _record_step(self, state: _State, values: list[float | None], fallback: list[bool]) -> None:
        i = state.next_step
        state.scored.values.append(values)
        state.scored.fallback.append(fallback)
        state.undetermined = {k for k in state.undetermined
                              if not step_is_wrong(state.scored.reward(i, k), self.exit_points[k])}

    def score(self, solutions: Sequence[Solution]) -> list[StepScores]:
        """StepScores at K = sampling.n and scoring.threshold, in input order."""
        return [
            s.to_step_scores(self.params.threshold, self.sampling.n) for s in self.score_detailed(solutions)
        ]

    def score_detailed(self, solutions: Sequence[Solution]) -> list[ScoredSolution]:
        """Per-analysis values of every scored step, in input order (see ScoredSolution)."""
        ids = [s.id for s in solutions]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"duplicate solution id {dup!r}")
        journal = self._open_journal()
        try:
            return self._score(solutions, journal)
        finally:
            if journal is not None:
                journal.close()

    def _score(self, solutions: Sequence[Solution], journal: Journal | None) -> list[ScoredSolution]:
        n = self.sampling.n
        index = self._journal_index(journal) if journal is not None else {}
        states: list[_State] = []
        pending: deque[_State] = deque()
        for sol in solutions:
            state = _State(sol, ScoredSolution(sol.id, len(sol.steps)), set(self.exit_points))
            while not self._is_done(state):
                rec = index.get((sol.id, state.next_step, _prompt_hash(step_conversation(sol, state.next_step))))
                if rec is None or len(rec["v"]) < n:
                    break
                self._record_step(state, rec["v"][:n], [bool(f) for f in rec["f"][:n]])
            states.append(state)
            if not self._is_done(state):
                pending.append(state)
        bar = tqdm(total=len(states), desc=self.desc, unit="solution", disable=not self.progress)
        bar.update(len(states) - len(pending))
        active: list[_State] = []
        generated = 0
        try:
            while pending or active:
                while pending and len(active) < self.max_active:
                    active.append(pending.popleft())
                generated += self._wave(active, journal)
                still = [s for s in active if not self._is_done(s)]
                bar.update(len(active) - len(still))
                bar.set_postfix(generated=generated, refresh=False)
                active = still
        finally:
            bar.close()
        return [s.scored for s in states]

    def analyse_steps(
        self,
        requests: Sequence[tuple[Solution, int]],
        progress: bool = False,
        conversations: Sequence[Conversation] | None = None,
    ) -> list[tuple[list[float | None], list[bool]]]:
        """K analyses of each (solution, step index) in one backend call: per request, the K
        verdict values (None where dropped) and which of them came from `scoring.fallback`.
        `conversations`, when given, are the requests' `step_conversation`s, already rendered."""
        n = self.sampling.n
        convs = list(conversations) if conversations is not None else [step_conversation(s, i) for s, i in requests]
        seeds = [step_seed(self.sampling.seed, sol.id, i) for sol, i in requests]
        extra: dict[str, Any] = {}
        if self.params.fallback == "teacher_forced" and self.backend.forced_in_generation:
            extra["teacher_forced"] = _fallback_prefix  # the backend reads it from its decoding KV
        outputs = self.backend.generate(convs, self.sampling, seeds=seeds, progress=progress, **extra)
        if len(outputs) != len(convs):
            raise BackendError(f"backend returned {len(outputs)} results for {len(convs)} prompts")
        values: list[list[float | None]] = []
        fallback: list[list[bool]] = []
        forced: list[tuple[int, int, str]] = []
        for row, ((sol, step), gens) in enumerate(zip(requests, outputs, strict=True)):
            if len(gens) != n:
                raise BackendError(f"solution {sol.id} step {step}: {len(gens)} analyses returned, {n} requested")
            vals: list[float | None] = []
            fb: list[bool] = []
            for j, g in enumerate(gens):
                if g.error:
                    raise BackendError(f"solution {sol.id} step {step} analysis {j}: {g.error}")
                if g.p_yes is not None:
                    vals.append(float(g.p_yes))
                    fb.append(False)
                    continue
                fb.append(True)
                if self.params.fallback == "teacher_forced" and g.forced_p_yes is not None:
                    vals.append(float(g.forced_p_yes))
                elif self.params.fallback == "teacher_forced":
                    vals.append(None)
                    forced.append((row, j, g.text))
                elif self.params.fallback == "sampled_verdict":
                    vals.append(sampled_verdict_value(g.text))
                else:
                    vals.append(None)
            values.append(vals)
            fallback.append(fb)
        if forced:
            prefixes = [_fallback_prefix(text) for _, _, text in forced]
            probs = self.backend.verdict_probability([convs[row] for row, _, _ in forced], prefixes)
            if len(probs) != len(forced):
                raise BackendError(f"backend returned {len(probs)} verdict probabilities for {len(forced)}")
            for (row, j, text), p in zip(forced, probs, strict=True):
                values[row][j] = float(p) if p is not None else sampled_verdict_value(text)
        return list(zip(values, fallback, strict=True))

    def _wave(self, states: list[_State], journal: Journal | None) -> int:
        """Score, in one backend call, every remaining step of the active solutions (full scoring)
        or the next step of each (early exit); return the analyses made."""
        n = self.sampling.n
        active: list[_State] = []
        steps: list[int] = []
        for state in states:
            last = state.scored.n_steps if not self.early_exit else state.next_step + 1
            for i in range(state.next_step, last):
                active.append(state)
                steps.append(i)
        requests = [(s.solution, i) for s, i in zip(active, steps, strict=True)]
        convs = [step_conversation(sol, i) for sol, i in requests]
        analysed = self.analyse_steps(requests, conversations=convs)
        for state, step, conv, (vals, fb) in zip(active, steps, convs, analysed, strict=True):
            if journal is not None:
                h = _prompt_hash(conv)
                journal.append({
                    "key": _SEP.join([state.solution.id, str(step), h, str(n)]),
                    "id": state.solution.id, "step": step, "h": h, "v": vals, "f": [int(x) for x in fb],
                })
            self._record_step(state, vals, fb)
        return n * len(active)
