"""Teachers for seed-data synthesis (docs/method.md §2.2, §6).

Two kinds, chosen by `teacher.kind`:

- :class:`BackendTeacher`: any generation backend (`hf`, `vllm`, `openai`) holding a teacher
  model, fed the official one-shot teacher chat (:func:`prompts.teacher_messages`). The
  human label is never part of the prompt.
- :class:`OfflineTeacher`: a genuine, if weak, verifier for the default profile. It never reads
  the label. It finds the arithmetic claims of the Now Step (``a op b = c``, chains
  ``a + b = c = d``, common LaTeX), evaluates them with a small safe parser (numbers, ``+ - * /
  ^``, parentheses, ``!`` on small integers; never ``eval``) -- the checker lives in
  `components/checker.py` -- and writes a short analysis in the
  R-PRM section structure ending with the verdict line. When it finds no checkable claim it
  says so and decides by an openly weak heuristic, sampled with a seeded random stream per
  analysis, so its K samples can differ and the agreement filter does real work.

`RPRM_OFFLINE_TEACHER_DELAY_S` (environment, tests only): seconds the offline teacher sleeps
per analysis, to widen the window in which the kill-and-resume test kills the stage.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

from components.backends.base import Generation, GenerationBackend, StreamingBackend, row_seed
from components.checker import (
    DATA_NONE,
    DATA_SOURCED,
    DATA_UNSOURCED,
    DATA_USES,
    FROM_NOWHERE,
    FROM_QUESTION,
    Claim,
    StepCheck,
    check_step,
    clip_text,
    format_number,
)
from components.config import ParamsError, SamplingParams, TeacherParams
from components.prompts import VERDICT_NO, VERDICT_YES, teacher_messages
from components.records import StepSample

DELAY_ENV = "RPRM_OFFLINE_TEACHER_DELAY_S"


class Teacher(Protocol):
    """What the synthesis stage needs from a teacher."""

    name: str  # recorded as Critique.generator

    def analyze_iter(
        self, samples: Sequence[StepSample], sampling: SamplingParams, seeds: Sequence[int]
    ) -> Iterator[tuple[int, list[Generation]]]:
        """Yield (i, `sampling.n` analyses of sample i) as they finish, in any order; seeded per row."""
        ...

    def analyze(
        self, samples: Sequence[StepSample], sampling: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Generation]]:
        """`sampling.n` analyses per sample; analysis j of sample i uses row_seed(seeds[i], j)."""
        ...

    def close(self) -> None:
        """Free resources."""
        ...


# --------------------------------------------------------------------------------------
# The offline teacher
# --------------------------------------------------------------------------------------


# Fixed sentences of the offline teacher's analyses. The tiny model's tokenizer makes each one a
# single token (model.tiny.phrase_tokens), so a tiny model spends its steps on what varies.
FIRST_STEP_PREVIOUS = "None; the Now Step is the first step."
NOW_CALCULATES = ("It computes a new quantity from earlier ones.", "It carries out a calculation.")
NOW_STATES = ("It states a fact or a plan; nothing to compute.", "It describes the next move; no calculation.")
REPEATS = "It repeats a Previous Step."
CONSISTENT = ("It follows from the Previous Steps.", "It is consistent with the Previous Steps.")
CALC_CLAIMS = "The Now Step claims"
CALC_REDONE = "Redoing it:"
CALC_WRONG = "So the calculation is wrong."
CALC_ITSELF_CORRECT = "So the calculation itself is correct."
CALC_CORRECT = ("So the calculation is correct.", "So the calculation is right.")
NO_CALCULATION = "There is no calculation to check."
CONCLUDE_CALC_ERROR = "The Now Step is wrong: it has a calculation error."
CONCLUDE_NO_SOURCE = "The Now Step is wrong: it uses a number with no source."
CONCLUDE_CORRECT = "The Now Step is correct."
CONCLUDE_NO_ERROR = "I find no error."
CONCLUDE_DOUBT = "I doubt the Now Step."
ANALYSIS_PHRASES: tuple[str, ...] = (
    FIRST_STEP_PREVIOUS, *NOW_CALCULATES, *NOW_STATES, REPEATS, *CONSISTENT, CALC_CLAIMS, CALC_WRONG,
    CALC_ITSELF_CORRECT, *CALC_CORRECT, NO_CALCULATION, CONCLUDE_CALC_ERROR, CONCLUDE_NO_SOURCE,
    CONCLUDE_CORRECT, CONCLUDE_NO_ERROR, CONCLUDE_DOUBT, DATA_USES, FROM_QUESTION, FROM_NOWHERE,
    DATA_SOURCED, DATA_UNSOURCED, DATA_NONE,
)
MAX_CLAIMS_SHOWN = 2


def calculation_line(claims: Sequence[Claim], verdict_sentence: str) -> str:
    """Evidence first: each claim as written, then as redone, then the judgement."""
    parts = [f"{CALC_CLAIMS} {c.describe()}. {CALC_REDONE} {clip_text(c.lhs.strip(), 30)} "
             f"{'≈' if c.approx else '='} {format_number(c.lhs_value)}." for c in claims[:MAX_CLAIMS_SHOWN]]
    return " ".join([*parts, verdict_sentence])

def _pick(rng: random.Random, options: Sequence[str]) -> str:
    return options[rng.randrange(len(options))]


def _tempered(p: float, temperature: float) -> float:
    if temperature <= 0:
        return 1.0 if p >= 0.5 else 0.0
    a, b = p ** (1.0 / temperature), (1.0 - p) ** (1.0 / temperature)
    return a / (a + b)


class OfflineTeacher:
    """Calculation-checking teacher: short R-PRM-structured analyses; never reads the label."""

    name = "offline-calculation-checker"

    def __init__(self, delay_s: float | None = None, trace_sources: bool = True):
        env = os.environ.get(DELAY_ENV)
        self.delay_s = delay_s if delay_s is not None else float(env) if env else 0.0
        self.trace_sources = trace_sources  # a number with no source makes a step wrong

    def analyze(
        self, samples: Sequence[StepSample], sampling: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Generation]]:
        """`sampling.n` analyses per sample; analysis j is drawn from row_seed(seeds[i], j)."""
        return [gens for _, gens in self.analyze_iter(samples, sampling, seeds)]

    def analyze_iter(
        self, samples: Sequence[StepSample], sampling: SamplingParams, seeds: Sequence[int]
    ) -> Iterator[tuple[int, list[Generation]]]:
        """Yield (i, analyses of sample i) in order, one sample at a time."""
        for i, (sample, seed) in enumerate(zip(samples, seeds, strict=True)):
            check = check_step(sample)
            gens = []
            for j in range(sampling.n):
                if self.delay_s:
                    time.sleep(self.delay_s)
                rng = random.Random(row_seed(seed, j))
                text, meta = self.write_analysis(sample, rng, sampling.temperature, check)
                gens.append(Generation(text=text, p_yes=None, num_tokens=len(text.split()), meta=meta))
            yield i, gens

    def write_analysis(
        self, sample: StepSample, rng: random.Random, temperature: float, check: StepCheck | None = None
    ) -> tuple[str, dict]:
        """One analysis of a step (no label involved) and a record of how it was decided."""
        check = check or check_step(sample)
        k = len(sample.previous_steps)
        claims, wrong = check.claims, [c for c in check.claims if not c.holds]
        if k == 0:
            prev = FIRST_STEP_PREVIOUS
        elif check.previous_claims:
            prev = f"Steps 1-{k}: {check.previous_claims} calculation(s) checked, " + (
                f"{check.previous_wrong} wrong." if check.previous_wrong else "all hold."
            )
        else:
            prev = f"Steps 1-{k}: no calculation to check."

        if claims:
            now = _pick(rng, NOW_CALCULATES)
        else:
            now = _pick(rng, NOW_STATES)

        data = check.data_source
        consistency = REPEATS if check.repeats else _pick(rng, CONSISTENT)

        # Each section states its evidence first and its judgement last.
        meta: dict = {"claims": len(claims), "wrong_claims": len(wrong)}
        if wrong:
            calc = calculation_line(wrong[:1], CALC_WRONG)
            verdict, conclusion = "No", CONCLUDE_CALC_ERROR
            meta["decided_by"] = "calculation"
        elif check.unsourced and self.trace_sources:
            calc = calculation_line(claims, CALC_ITSELF_CORRECT) if claims else NO_CALCULATION
            verdict, conclusion = "No", CONCLUDE_NO_SOURCE
            meta["decided_by"] = "data_source"
        elif claims:
            calc = calculation_line(claims, _pick(rng, CALC_CORRECT))
            verdict, conclusion = "Yes", CONCLUDE_CORRECT
            meta["decided_by"] = "calculation"
        else:
            p, why = check.prior
            yes = rng.random() < _tempered(p, temperature)
            calc = f"{NO_CALCULATION} Weak rule: {why}."
            verdict = "Yes" if yes else "No"
            conclusion = CONCLUDE_NO_ERROR if yes else CONCLUDE_DOUBT
            meta["decided_by"] = "heuristic"
            meta["heuristic_p_correct"] = p

        text = "\n".join([
            "Analysis:",
            f"**Previous Steps Analysis**: {prev}",
            f"**Now Step Analysis**: {now}",
            f"**Data Source Analysis**: {data}",
            f"**Consistency Analysis**: {consistency}",
            f"**Calculation Analysis**: {calc}",
            f"Conclusion: {conclusion}",
            VERDICT_YES if verdict == "Yes" else VERDICT_NO,
        ])
        return text, meta

    def close(self) -> None:
        """Nothing to free."""


# --------------------------------------------------------------------------------------
# LLM teachers
# --------------------------------------------------------------------------------------


def teacher_conversation(sample: StepSample) -> list[dict[str, str]]:
    """The official one-shot teacher chat for a step sample (the label is never used)."""
    return teacher_messages(sample.question, list(sample.previous_steps), sample.now_step)


class BackendTeacher:
    """A teacher model behind any generation backend, prompted with the one-shot teacher chat.

    Backends that stream finished rows (`generate_iter`, e.g. openai) hand each sample over as
    soon as it is done; others are called `chunk_size` samples at a time.
    """

    def __init__(self, backend: GenerationBackend, chunk_size: int = 64):
        self.backend = backend
        self.chunk_size = chunk_size
        self.name = f"teacher:{backend.name}"

    def analyze(
        self, samples: Sequence[StepSample], sampling: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Generation]]:
        """`sampling.n` analyses per sample from the backend, seeded per row."""
        conversations = [teacher_conversation(s) for s in samples]
        return self.backend.generate(conversations, sampling, seeds=list(seeds), progress=False)

    def analyze_iter(
        self, samples: Sequence[StepSample], sampling: SamplingParams, seeds: Sequence[int]
    ) -> Iterator[tuple[int, list[Generation]]]:
        """Yield (i, analyses of sample i) as the backend finishes them."""
        conversations = [teacher_conversation(s) for s in samples]
        seeds = list(seeds)
        if isinstance(self.backend, StreamingBackend):
            yield from self.backend.generate_iter(conversations, sampling, seeds=seeds)
            return
        for start in range(0, len(conversations), self.chunk_size):
            end = start + self.chunk_size
            out = self.backend.generate(conversations[start:end], sampling, seeds=seeds[start:end], progress=False)
            for k, gens in enumerate(out):
                yield start + k, gens

    def close(self) -> None:
        """Close the backend."""
        self.backend.close()


def load_teacher(params: TeacherParams) -> Teacher:
    """Build the teacher named by params: the offline checker or a backend holding a model."""
    if params.kind == "offline":
        return OfflineTeacher(trace_sources=params.offline_trace_sources)
    from components.backends import load_backend

    if params.backend.kind in ("hf", "vllm") and not params.model:
        raise ParamsError(
            f"teacher.model: required when teacher.kind=backend and teacher.backend.kind="
            f"{params.backend.kind} (a model folder or hub id)"
        )
    chunk = {"hf": params.backend.batch_size, "vllm": 1024}.get(params.backend.kind, 64)
    return BackendTeacher(load_backend(params.backend, params.model or "", dtype=params.dtype), chunk_size=chunk)
