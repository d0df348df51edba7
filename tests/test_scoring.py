"""The step scorer on the real tiny verdict model (hf backend).

Early exit gives the full-scoring predictions with fewer generations; the one-pass verdict
probabilities equal the two-pass (teacher-forced) reference; the fallback paths; results do not
depend on batching; a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from components import prompts
from components.backends.base import Generation
from components.config import BackendParams, SamplingParams, ScoringParams
from components.io import DataError
from components.journal import JournalWarning
from components.records import Solution
from components.scoring import (
    NEUTRAL_REWARD,
    StepScorer,
    sampled_verdict_value,
    step_conversation,
    step_seed,
)

ROOT = Path(__file__).resolve().parents[1]
K = 4


def scoring_params(**kw: object) -> ScoringParams:
    sampling = SamplingParams(n=int(kw.pop("n", K)), temperature=1.0, top_p=1.0,
                              max_new_tokens=int(kw.pop("max_new_tokens", 160)), seed=7)
    return ScoringParams(sampling=sampling, **kw)


@pytest.fixture(scope="module")
def backend(verdict_model_dir: Path):
    from components.backends import load_backend

    b = load_backend(BackendParams(kind="hf", batch_size=16, device="cpu"), verdict_model_dir)
    yield b
    b.close()


@pytest.fixture(scope="module")
def solutions() -> list[Solution]:
    """Real ProcessBench solutions (bundled gsm8k), shortened to keep the tiny model fast."""
    out = []
    for line in (ROOT / "data/bundled/processbench/gsm8k.jsonl").read_text().splitlines()[:4]:
        obj = json.loads(line)
        out.append(Solution(id=obj["id"], question=obj["problem"][:200], steps=[s[:120] for s in obj["steps"][:3]]))
    return out


class CountingBackend:
    """The real backend, counting the analyses it is asked for (no behaviour change)."""

    def __init__(self, inner: object):
        self.inner = inner
        self.name = inner.name
        self.sampler, self.forced_in_generation = inner.sampler, inner.forced_in_generation
        self.rows = 0
        self.calls = 0

    def generate(self, conversations: Sequence, sampling: SamplingParams, **kw: object) -> list[list[Generation]]:
        self.calls += 1
        self.rows += len(conversations) * sampling.n
        return self.inner.generate(conversations, sampling, **kw)

    def verdict_probability(self, conversations: Sequence, prefixes: Sequence[str]) -> list[float | None]:
        return self.inner.verdict_probability(conversations, prefixes)

    def close(self) -> None:
        """The shared backend is closed by its fixture."""


class InterruptAfter(CountingBackend):
    """Fault injection: a Ctrl-C (KeyboardInterrupt) on backend call number `calls` + 1."""

    def __init__(self, inner: object, calls: int):
        super().__init__(inner)
        self.limit = calls

    def generate(self, conversations: Sequence, sampling: SamplingParams, **kw: object) -> list[list[Generation]]:
        if self.calls >= self.limit:
            raise KeyboardInterrupt
        return super().generate(conversations, sampling, **kw)


@pytest.fixture(scope="module")
def full(backend: object, solutions: list[Solution]):
    """Every step of every solution scored (shared by several tests)."""
    return StepScorer(backend, scoring_params(), early_exit=False, progress=False).score_detailed(solutions)


def test_step_seed_is_stable_and_distinct() -> None:
    assert step_seed(0, "gsm8k-0", 1) == step_seed(0, "gsm8k-0", 1)
    seeds = {step_seed(s, i, j) for s in (0, 1) for i in ("a", "b") for j in range(5)}
    assert len(seeds) == 20 and all(0 <= x < 2**31 for x in seeds)


def test_sampled_verdict_value_reads_first_verdict() -> None:
    assert sampled_verdict_value("x\nVerification: Is the step correct (Yes/No)? Yes") == 1.0
    assert sampled_verdict_value("Is the step correct (Yes/No)? No. Is the step correct (Yes/No)? Yes") == 0.0
    assert sampled_verdict_value("Is the step correct (Yes/No)? maybe") is None
    assert sampled_verdict_value("no verdict at all") is None


def test_full_scoring_scores_every_step(full, solutions: list[Solution]) -> None:
    for s, sol in zip(full, solutions, strict=True):
        assert s.complete and len(s.values) == len(sol.steps) and all(len(v) == K for v in s.values)
        rec = s.to_step_scores(0.5)
        assert rec.generations == K * len(sol.steps)
        assert all(r is not None and 0.0 <= r <= 1.0 for r in rec.step_rewards)
        for i, r in enumerate(rec.step_rewards):
            assert r == pytest.approx(sum(rec.samples[i]) / len(rec.samples[i]))
    values = [v for s in full for step in s.values for v in step]
    assert len(set(values)) > 1  # the model's verdicts vary: a real signal, not a constant


def test_early_exit_same_predictions_fewer_generations(backend, full, solutions: list[Solution]) -> None:
    # a threshold inside the observed reward range, so some solutions exit before their last step,
    # and mid-way between two rewards: a batch of another shape moves a reward by float32 noise
    # (~1e-6), which must not carry it across the threshold
    rewards = sorted({r for s in full for r in s.rewards()})
    mid = len(rewards) // 2
    gaps = sorted(range(1, len(rewards)), key=lambda i: abs(i - mid))
    i = next(i for i in gaps if rewards[i] - rewards[i - 1] > 1e-3)
    threshold = (rewards[i - 1] + rewards[i]) / 2
    counting = CountingBackend(backend)
    early = StepScorer(counting, scoring_params(threshold=threshold), early_exit=True, progress=False).score(solutions)
    expected = [s.first_error(threshold) for s in full]
    assert [e.first_error for e in early] == expected
    full_gens = sum(s.generations() for s in full)
    assert sum(e.generations for e in early) == counting.rows < full_gens
    for e, f in zip(early, full, strict=True):  # the same samples: scored prefix identical to full scoring
        scored = [r for r in e.step_rewards if r is not None]
        assert scored == pytest.approx(f.rewards()[: len(scored)], abs=1e-5)
        assert e.first_error == -1 or all(r is None for r in e.step_rewards[e.first_error + 1:])


def test_one_pass_probabilities_equal_two_pass_reference(backend, full, solutions: list[Solution]) -> None:
    """Scorer values vs the official two-pass procedure on the same sampled analyses.

    The two-pass reference re-encodes the analysis text; when the sampled tokens are not the
    tokenizer's own encoding of that text (e.g. a stray partial UTF-8 byte, seen as U+FFFD), the
    model sees different tokens and the numbers legitimately differ by a little. Such analyses
    are rare; every other one must agree to 1e-4.
    """
    sp = scoring_params()
    where = [(s, sol, i) for sol, s in zip(solutions, full, strict=True) for i in range(len(sol.steps))]
    convs = [step_conversation(sol, i) for _, sol, i in where]
    # the same analyses again (same per-step seeds), then the official two-pass procedure on them:
    # cut each analysis at the first verdict phrase (or, post-processed, append the fallback
    # question), teacher-force it, read P(Yes) at the last position
    sampled = backend.generate(convs, sp.sampling, seeds=[step_seed(sp.sampling.seed, sol.id, i) for _, sol, i in where])
    flat = [(w, conv, j, g) for w, conv, gens in zip(where, convs, sampled, strict=True) for j, g in enumerate(gens)]
    prefixes = [prompts.cut_at_verdict(g.text)[0] if g.p_yes is not None
                else prompts.cut_at_verdict(prompts.postprocess_response(g.text))[0] for _, _, _, g in flat]
    refs = backend.verdict_probability([conv for _, conv, _, _ in flat], prefixes)
    one_pass_diffs: list[float] = []
    fallbacks = 0
    for ((s, sol, i), _, j, g), r in zip(flat, refs, strict=True):
        if g.p_yes is None:  # never reached the verdict: the scorer's fallback is this very pass
            fallbacks += 1
            assert s.values[i][j] == pytest.approx(r, abs=1e-4), (sol.id, i, j)
        else:  # read in the generation pass, and the scorer used exactly that number
            assert prompts.VERDICT_PHRASE in g.text
            assert s.values[i][j] == pytest.approx(g.p_yes, abs=1e-5), (sol.id, i, j)
            one_pass_diffs.append(abs(s.values[i][j] - r))
    total = sum(s.generations() for s in full)
    assert fallbacks == sum(s.fallbacks() for s in full)
    assert len(one_pass_diffs) >= 0.25 * total  # the one-pass path was exercised on many analyses
    agree = sum(d <= 1e-4 for d in one_pass_diffs)
    assert agree >= 0.9 * len(one_pass_diffs), sorted(one_pass_diffs)[-5:]
    assert max(one_pass_diffs) < 0.05


def test_results_do_not_depend_on_batching(backend, full, solutions: list[Solution]) -> None:
    # other batch compositions: two solutions at a time, in reverse order
    regrouped = StepScorer(backend, scoring_params(), early_exit=False, max_active=2,
                           progress=False).score_detailed(solutions[::-1])[::-1]
    for a, b in zip(regrouped, full, strict=True):
        assert len(a.values) == len(b.values)
        assert all(x == pytest.approx(y, abs=1e-5) for x, y in zip(a.values, b.values, strict=True))


def test_smaller_k_is_the_first_k_analyses(backend, full, solutions: list[Solution]) -> None:
    two = StepScorer(backend, scoring_params(n=2), early_exit=False, progress=False).score_detailed(solutions[:2])
    for a, b in zip(two, full[:2], strict=True):
        for va, vb in zip(a.values, b.values, strict=True):
            assert va == pytest.approx(vb[:2], abs=1e-5)
        assert a.rewards() == pytest.approx(b.rewards(k=2), abs=1e-5)


def test_fallback_teacher_forced_when_no_verdict_is_reached(backend, solutions: list[Solution]) -> None:
    sp = scoring_params(max_new_tokens=6, n=2)  # too short to reach the verdict line
    sols = solutions[:2]
    scored = StepScorer(backend, sp, early_exit=False, progress=False).score_detailed(sols)
    for sol, s in zip(sols, scored, strict=True):
        assert s.fallbacks() == s.generations() == 2 * len(sol.steps)
        for i in range(len(sol.steps)):
            conv = step_conversation(sol, i)
            gens = backend.generate([conv], sp.sampling, seeds=[step_seed(sp.sampling.seed, sol.id, i)])[0]
            assert all(g.p_yes is None for g in gens)
            prefixes = [prompts.cut_at_verdict(prompts.postprocess_response(g.text))[0] for g in gens]
            assert all(p.endswith(prompts.FALLBACK_SUFFIX) for p in prefixes)
            assert s.values[i] == pytest.approx(backend.verdict_probability([conv] * 2, prefixes), abs=1e-5)
    dropped = StepScorer(backend, scoring_params(max_new_tokens=6, n=2, fallback="drop"), early_exit=False,
                         progress=False).score(sols[:1])[0]
    assert dropped.step_rewards == [NEUTRAL_REWARD] * len(sols[0].steps)  # nothing kept: neutral reward
    assert dropped.samples == [[] for _ in sols[0].steps] and dropped.fallbacks == dropped.generations
    voted = StepScorer(backend, scoring_params(max_new_tokens=6, n=2, fallback="sampled_verdict"),
                       early_exit=False, progress=False).score_detailed(sols[:1])[0]
    assert all(v is None for step in voted.values for v in step)  # no verdict to read in 6 tokens


def test_resumed_run_equals_uninterrupted(backend, full, solutions: list[Solution], tmp_path: Path) -> None:
    journal = tmp_path / "scores.journal.jsonl"
    interrupted = InterruptAfter(backend, calls=1)
    with pytest.raises(KeyboardInterrupt):
        StepScorer(interrupted, scoring_params(), early_exit=False, max_active=3, journal=journal,
                   progress=False).score_detailed(solutions)
    journaled = len(journal.read_text().splitlines()) - 1  # minus the settings record
    # one wave (full scoring: every step of the three active solutions) finished before the interrupt
    assert journaled == sum(len(s.steps) for s in solutions[:3])
    counting = CountingBackend(backend)
    resumed = StepScorer(counting, scoring_params(), early_exit=False, max_active=3, journal=journal,
                         progress=False).score_detailed(solutions)
    total_steps = sum(len(s.steps) for s in solutions)
    assert counting.rows == K * (total_steps - journaled)  # nothing journaled was generated again
    for a, b in zip(resumed, full, strict=True):
        assert all(x == pytest.approx(y, abs=1e-5) for x, y in zip(a.values, b.values, strict=True))
    # a finished journal serves a rerun, and a smaller K, without any generation
    again = CountingBackend(backend)
    two = StepScorer(again, scoring_params(n=2), early_exit=True, journal=journal, progress=False).score(solutions)
    assert again.rows == 0 and [t.generations for t in two] == [2 * (t.first_error + 1 if t.first_error >= 0
                                                                     else len(s.steps))
                                                                 for t, s in zip(two, solutions, strict=True)]
    with pytest.raises(DataError, match="other settings"):
        StepScorer(backend, scoring_params(fallback="drop"), early_exit=False, journal=journal,
                   progress=False).score(solutions)


def test_a_damaged_journal_line_costs_only_its_step(backend, full, solutions: list[Solution],
                                                    tmp_path: Path) -> None:
    """A garbage line in the middle of a scoring journal is skipped with a warning naming it: only
    that step is scored again; a journal whose settings line is unreadable is refused."""
    journal = tmp_path / "scores.journal.jsonl"
    StepScorer(CountingBackend(backend), scoring_params(), early_exit=False, journal=journal,
               progress=False).score(solutions)  # the same wrapper (sampler fingerprint) as the rerun
    lines = journal.read_text().splitlines(keepends=True)
    lines[3] = "{not json\n"
    journal.write_text("".join(lines))
    counting = CountingBackend(backend)
    with pytest.warns(JournalWarning, match=rf"{journal}:4: unreadable journal line skipped"):
        again = StepScorer(counting, scoring_params(), early_exit=False, journal=journal,
                           progress=False).score_detailed(solutions)
    assert counting.rows == K  # the one lost step, K analyses
    for a, b in zip(again, full, strict=True):
        assert all(x == pytest.approx(y, abs=1e-5) for x, y in zip(a.values, b.values, strict=True))
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("garbage\n" + "".join(lines[1:]))
    with pytest.warns(JournalWarning), pytest.raises(DataError, match="no readable settings line"):
        StepScorer(CountingBackend(backend), scoring_params(), early_exit=False, journal=journal,
                   progress=False).score(solutions)


def test_sweep_exit_rule_determines_every_listed_point(backend, full, solutions: list[Solution]) -> None:
    points = [(1, 0.5), (2, 0.5), (4, 0.5), (4, 0.3), (4, 0.7)]
    scored = StepScorer(backend, scoring_params(), early_exit=True, exit_points=points,
                        progress=False).score_detailed(solutions)
    for s, f in zip(scored, full, strict=True):
        for k, t in points:
            assert s.first_error(t, k) == f.first_error(t, k)
    assert sum(len(s.values) for s in scored) <= sum(len(f.values) for f in full)
    with pytest.raises(ValueError, match="exit point"):
        StepScorer(backend, scoring_params(), early_exit=True, exit_points=[(8, 0.5)])
