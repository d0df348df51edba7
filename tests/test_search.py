"""Selection, baselines and curves against hand-computed cases; guided search on the tiny models."""

from __future__ import annotations

import math

import pytest

from components import search
from components.search import ProblemCandidates

# ------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize(
    ("how", "expected"),
    [("min", 0.5), ("last", 0.7), ("product", 0.9 * 0.5 * 0.7), ("mean", 0.7)],
)
def test_aggregate(how, expected):
    assert search.aggregate([0.9, 0.5, 0.7], how) == pytest.approx(expected)


def test_aggregate_skips_unscored_steps_and_rejects_unknown():
    assert search.aggregate([0.9, None, 0.3], "min") == pytest.approx(0.3)
    assert search.aggregate([0.9, None], "last") == pytest.approx(0.9)
    assert search.aggregate([], "mean") is None
    assert search.aggregate([None], "min") is None
    with pytest.raises(ValueError, match="unknown aggregation"):
        search.aggregate([0.5], "max")


# ------------------------------------------------------------------------- selection


def test_best_of_n_tie_break_and_missing_scores():
    assert search.best_of_n([0.2, 0.8, 0.8, None]) == 1
    assert search.best_of_n([None, 0.1]) == 1
    assert search.best_of_n([None, None]) is None
    assert search.best_of_n([]) is None


def test_majority_vote():
    assert search.majority_vote([2, 1, 1]) == 1
    # classes 0 and 1 tie with two votes each: class 0 appears first -> its first member, index 0
    assert search.majority_vote([0, 1, 1, 0, None, 2]) == 0
    assert search.majority_vote([None, 3, None]) == 1
    assert search.majority_vote([None, None]) is None


def test_weighted_vote():
    # class 0: 0.9 + 0.05 = 0.95; class 1: 0.5 + 0.5 = 1.0 -> class 1; tie inside -> index 1
    assert search.weighted_vote([0, 1, 1, 0], [0.9, 0.5, 0.5, 0.05]) == 1
    # the majority class loses to a single high-scoring answer
    assert search.weighted_vote([0, 0, 1], [0.1, 0.2, 0.9]) == 2
    # best member of the winning class
    assert search.weighted_vote([4, 4], [0.3, 0.6]) == 1
    # unscored or unanswered candidates do not vote
    assert search.weighted_vote([0, 1], [None, 0.1]) == 1
    assert search.weighted_vote([None, 1], [0.9, None]) is None
    # equal sums: the class whose first member comes first
    assert search.weighted_vote([1, 0], [0.5, 0.5]) == 0


def test_pass_at_1_and_pass_at_n():
    assert search.pass_at_1([True, False, False, True]) == 0.5
    assert search.pass_at_1([]) == 0.0
    assert search.pass_at_n([False, True]) is True
    assert search.pass_at_n([False, False]) is False


def _problems() -> list[ProblemCandidates]:
    return [
        # right answer is class 1 (a minority with low scores)
        ProblemCandidates("a", [False, True, True, False], [0, 1, 1, 0], [0.9, 0.2, 0.3, 0.1]),
        # right answer is the majority, and the PRM likes the one wrong answer
        ProblemCandidates("b", [True, True, False, True], [0, 0, 1, 0], [0.4, 0.5, 0.95, 0.3]),
    ]


def test_accuracy_per_method_hand_computed():
    probs = _problems()
    assert search.accuracy(probs, "pass@1") == pytest.approx((0.5 + 0.75) / 2)
    assert search.accuracy(probs, "pass@n") == 1.0
    # a: tie 2-2, class 0 first -> wrong; b: class 0 (3 votes) -> right
    assert search.accuracy(probs, "maj") == 0.5
    # a: index 0 (0.9) wrong; b: index 2 (0.95) wrong
    assert search.accuracy(probs, "prm") == 0.0
    # a: class 0 = 1.0 vs class 1 = 0.5 -> wrong; b: class 0 = 1.2 vs 0.95 -> right
    assert search.accuracy(probs, "prm_vote") == 0.5
    assert search.accuracy([], "maj") == 0.0


def test_sample_sizes():
    assert search.sample_sizes(8) == [1, 2, 4, 8]
    assert search.sample_sizes(6) == [1, 2, 4, 6]
    assert search.sample_sizes(1) == [1]


def test_curve_first_n_hand_computed():
    rows = search.accuracy_curve(_problems()[:1], ["pass@1", "maj", "prm", "prm_vote", "pass@n"], repeats=0)
    got = {(r["n"], r["method"]): r["accuracy"] for r in rows}
    # n=1: candidate 0 only (wrong)
    assert [got[(1, m)] for m in ("pass@1", "maj", "prm", "prm_vote", "pass@n")] == [0, 0, 0, 0, 0]
    # n=2: candidates 0, 1
    assert got[(2, "pass@1")] == 0.5
    assert got[(2, "maj")] == 0.0  # 1-1 tie, class 0 first
    assert got[(2, "prm")] == 0.0
    assert got[(2, "prm_vote")] == 0.0
    assert got[(2, "pass@n")] == 1.0
    assert got[(4, "pass@1")] == 0.5 and got[(4, "pass@n")] == 1.0
    assert sorted({r["n"] for r in rows}) == [1, 2, 4]


def test_curve_random_subsets_are_seeded_and_averaged():
    probs = _problems()
    a = search.accuracy_curve(probs, ["pass@1", "prm"], repeats=16, seed=3)
    b = search.accuracy_curve(list(reversed(probs)), ["pass@1", "prm"], repeats=16, seed=3)
    assert a == b  # independent of problem order
    # at n = N there is one subset: the full-set numbers
    full = {r["method"]: r["accuracy"] for r in a if r["n"] == 4}
    assert full == {"pass@1": search.accuracy(probs, "pass@1"), "prm": search.accuracy(probs, "prm")}
    # the n = 1 pass@1 point is a mean over 16 single draws per problem, so a multiple of 1/32
    one = next(r["accuracy"] for r in a if r["n"] == 1 and r["method"] == "pass@1")
    assert math.isclose(one * 32, round(one * 32))
    subs = search.subsets("a", 8, 3, 5, seed=1)
    assert len(subs) == 5 and all(len(s) == 3 == len(set(s)) and s == sorted(s) for s in subs)
    assert subs == search.subsets("a", 8, 3, 5, seed=1)
    assert search.subsets("a", 8, 3, 0, seed=1) == [[0, 1, 2]]
    assert search.subsets("a", 8, 8, 5, seed=1) == [list(range(8))]


# ------------------------------------------------------------------------- guided search


class RecordingRewarder:
    """The real PRM (step scorer on the tiny verdict model), with every call recorded."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[list[tuple[str, list[str]]], list[float | None]]] = []

    def __call__(self, requests):
        rewards = self.inner(requests)
        self.calls.append(([(pid, list(path)) for pid, _, path in requests], list(rewards)))
        return rewards

    def for_problem(self, pid):
        """Per call: (paths, rewards) of one problem."""
        out = []
        for reqs, rewards in self.calls:
            mine = [(path, r) for (p, path), r in zip(reqs, rewards, strict=True) if p == pid]
            if mine:
                out.append(([p for p, _ in mine], [r for _, r in mine]))
        return out


@pytest.fixture(scope="module")
def engines(tiny_model_dir, verdict_model_dir, default_params):
    """Policy = the tiny base model, PRM = the step scorer on the tiny verdict model (hf backend)."""
    from components.backends import load_backend
    from components.config import SamplingParams
    from components.scoring import StepScorer

    policy = load_backend(default_params.backend, tiny_model_dir)
    prm_backend = load_backend(default_params.backend, verdict_model_dir)
    scoring = default_params.scoring.model_copy(
        update={"sampling": SamplingParams(n=2, temperature=0.95, top_p=0.95, max_new_tokens=96, seed=0)}
    )
    scorer = StepScorer(prm_backend, scoring, early_exit=False, progress=False)
    yield policy, scorer
    policy.close()
    prm_backend.close()


def _config(**kw) -> search.SearchConfig:
    base = dict(candidates_per_step=3, beam_width=2, max_steps=2, step_max_new_tokens=24,
                temperature=1.0, top_p=1.0, aggregation="min", seed=7)
    return search.SearchConfig(**{**base, **kw})


def _search_problems():
    from components.records import BonProblem

    return [
        BonProblem(id="amc23-0", dataset="amc23", problem="What is $2+3$?", answer="5"),
        BonProblem(id="aime24-1", dataset="aime24", problem="Find $x$ if $2x = 10$.", answer="5"),
    ]


def test_greedy_search_keeps_the_prm_best_step(engines):
    from components.best_of_n import ScorerRewarder

    policy, scorer = engines
    probs = _search_problems()
    prm = RecordingRewarder(ScorerRewarder(scorer))
    cfg = _config()
    results = search.run_strategy_many("greedy", probs, policy, prm, cfg)
    assert len(prm.calls) <= cfg.max_steps  # lockstep: one PRM call per iteration for both

    for prob, result in zip(probs, results, strict=True):
        calls = prm.for_problem(prob.id)
        assert result.strategy == "greedy" and result.problem_id == prob.id
        assert 1 <= len(result.steps) <= cfg.max_steps
        assert len(result.step_rewards) == len(result.steps) == len(calls)
        assert result.generated == result.iterations * cfg.candidates_per_step
        assert result.scored + result.dropped == result.generated
        assert result.stop_reason in ("final", "max_steps", "no_candidates")
        if result.stop_reason == "max_steps":
            assert len(result.steps) == cfg.max_steps
        for t, (paths, rewards) in enumerate(calls):
            assert all(p[:-1] == result.steps[:t] for p in paths)  # proposals extend the chosen prefix
            assert all(r is not None and 0.0 <= r <= 1.0 for r in rewards)
            best = max(range(len(rewards)), key=lambda i, rewards=rewards: (rewards[i], -i))
            assert paths[best][-1] == result.steps[t]  # the PRM's best (first on ties) was kept
            assert rewards[best] == result.step_rewards[t]
        assert result.score == pytest.approx(min(result.step_rewards))
        assert "\n\n" not in "".join(result.steps)  # steps were cut at blank lines

    # the single-problem strategy (the common signature) gives that problem the same search
    # (to float32 noise: a batch pads its sequences, a single problem does not)
    alone = search.run_strategy("greedy", probs[1], policy, ScorerRewarder(scorer), cfg)
    assert alone.steps == results[1].steps
    assert alone.step_rewards == pytest.approx(results[1].step_rewards, abs=1e-5)


def test_beam_search_same_signature(engines):
    from components.best_of_n import ScorerRewarder

    policy, scorer = engines
    prob = _search_problems()[0]
    prm = RecordingRewarder(ScorerRewarder(scorer))
    cfg = _config(aggregation="mean")
    result = search.STRATEGIES["beam"](prob, policy, prm, cfg)

    assert result.strategy == "beam"
    assert 1 <= len(result.steps) <= cfg.max_steps
    assert result.score == pytest.approx(search.aggregate(result.step_rewards, "mean"))
    calls = prm.for_problem(prob.id)
    # the first iteration expands the single empty beam, later ones up to beam_width beams
    assert len(calls[0][0]) <= cfg.candidates_per_step
    assert all(len(paths) <= cfg.beam_width * cfg.candidates_per_step for paths, _ in calls)
    recorded = {tuple(p): r for paths, rewards in calls for p, r in zip(paths, rewards, strict=True)}
    # every step reward of the result is the one the PRM gave that prefix
    for t in range(len(result.steps)):
        assert recorded[tuple(result.steps[: t + 1])] == result.step_rewards[t]
    if result.stop_reason == "max_steps":
        # nothing finished: the result is the best-scoring child of the last iteration

        def path_score(p):
            return search.aggregate([recorded[tuple(p[: i + 1])] for i in range(len(p))], "mean")

        assert result.score == pytest.approx(max(path_score(p) for p in calls[-1][0]))
    with pytest.raises(ValueError, match="unknown search strategy"):
        search.run_strategy("dvts", prob, policy, prm, cfg)


def test_rewarder_equals_the_step_scorer(engines):
    """The batched last-step rewards are the scorer's own numbers for the same solution id."""
    from components.best_of_n import ScorerRewarder
    from components.records import Solution

    _, scorer = engines
    rewarder = ScorerRewarder(scorer)
    question = "What is $2+3$?"
    paths = [["2 + 3 = 6."], ["2 + 3 = 5.", "So the answer is \\boxed{5}."]]
    got = rewarder([("p-eq", question, p) for p in paths])
    for path, reward in zip(paths, got, strict=True):
        sol = Solution(id=ScorerRewarder.solution_id("p-eq", path), question=question, steps=path)
        (scored,) = scorer.score_detailed([sol])
        assert reward == pytest.approx(scored.reward(len(path) - 1), abs=1e-5)
        assert 0.0 <= reward <= 1.0


class SeedRecordingBackend:
    """The real PRM backend, recording the seeds of every generate call."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.sampler, self.forced_in_generation = inner.sampler, inner.forced_in_generation
        self.seeds: list[list[int]] = []

    def generate(self, conversations, sampling, *, seeds=None, **kw):
        self.seeds.append(list(seeds))
        return self.inner.generate(conversations, sampling, seeds=seeds, **kw)

    def verdict_probability(self, conversations, prefixes):
        return self.inner.verdict_probability(conversations, prefixes)

    def close(self):
        pass


def test_each_candidate_step_is_scored_with_its_own_seeds(engines):
    """The M candidates of one step get independent PRM samples, not common random numbers."""
    from components.best_of_n import ScorerRewarder
    from components.scoring import StepScorer

    _, scorer = engines
    recording = SeedRecordingBackend(scorer.backend)
    rewarder = ScorerRewarder(StepScorer(recording, scorer.params, early_exit=False, progress=False))
    question = "What is $2+3$?"
    prefix = ["We add 2 and 3."]
    candidates = [[*prefix, "2 + 3 = 5."], [*prefix, "2 + 3 = 6."], [*prefix, "So the answer is \\boxed{5}."]]
    together = rewarder([("p-seeds", question, c) for c in candidates])
    (seeds,) = recording.seeds
    assert len(set(seeds)) == len(candidates)  # same problem, same step index, different streams
    ids = {ScorerRewarder.solution_id("p-seeds", c) for c in candidates}
    assert len(ids) == len(candidates) and all(i.startswith("p-seeds#guided:") for i in ids)
    # a candidate's reward depends only on its own path, not on the candidates proposed with it
    for cand, reward in zip(candidates, together, strict=True):
        assert rewarder([("p-seeds", question, cand)]) == [pytest.approx(reward, abs=1e-5)]
    assert recording.seeds[1:] == [[s] for s in seeds]
    # the id (hence the seeds) is a function of the path: same path, same id; another problem, another id
    assert search.path_solution_id("p", ["a", "b"]) == search.path_solution_id("p", ("a", "b"))
    assert search.path_solution_id("p", ["a", "b"]) != search.path_solution_id("q", ["a", "b"])
    assert search.path_solution_id("p", ["a\n\nb"]) != search.path_solution_id("p", ["a", "b"])


def test_final_step_detection():
    from components.backends.base import Generation

    assert search.is_final_step("So the answer is \\boxed{5}.", Generation(text=""))
    assert not search.is_final_step("Let \\boxed{x", Generation(text=""))
    assert search.is_final_step("done", Generation(text="", meta={"stop_reason": "eos"}))
    assert search.assistant_prefix([]) == ""
    assert search.assistant_prefix(["a", "b"]) == "a\n\nb\n\n"
    assert search.search_seed(0, "p", 1, 0) == search.search_seed(0, "p", 1, 0)
    assert search.search_seed(0, "p", 1, 0) != search.search_seed(0, "q", 1, 0)
