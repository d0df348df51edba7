"""Best-of-N selection, baselines, accuracy curves and PRM-guided step-level search.

Pure and small, after Hugging Face's search-and-learn. Two aggregation axes are kept apart:
the K analyses of a step are averaged into a step reward by the scorer (the paper's mean);
this module reduces a candidate's step rewards to a solution score with an explicit
aggregation (`min`, `last`, `product`, `mean`).

Selection on one problem (candidates in pool order, indices 0..N-1):

- best-of-N (`prm`): the candidate with the highest solution score; ties go to the lowest
  index; candidates without a score (no steps) are never selected.
- PRM-weighted voting (`prm_vote`): candidates are grouped by answer class (equivalent final
  answers, see `grading.Grader.answer_classes`); each class scores the sum of its members'
  solution scores; the best class wins (ties: the class whose first member comes first), and
  its highest-scoring member (ties: lowest index) is the selection.
- majority vote (`maj`): the class with most members wins (ties: the class whose first member
  comes first); the selection is its first member. Candidates without an answer do not vote.
- pass@1: the mean correctness over the N candidates; pass@N: any of them correct (oracle).

Accuracy curves subsample n = 1, 2, 4, ... (and N) candidates per problem. With
`repeats = 0` the subset is the first n candidates; otherwise it is the mean over `repeats`
random subsets of size n drawn without replacement by `random.Random(f"{seed}:{problem}:{n}")`
(so the curve does not depend on problem order), and at n = N the single full set.

Guided search (docs/method.md §11; search-and-learn's one-signature design): every
strategy is `strategy(problem, policy, prm, config) -> SearchResult` and `STRATEGIES` maps
names to them. Each has a lockstep form over several problems (`BATCHED_STRATEGIES`: one
policy call and one PRM call per iteration for all of them) that gives every problem the
result it gets alone, because proposals are seeded per (seed, problem, iteration, beam).

Each candidate path is scored under its own id (`path_solution_id`: the problem id and a hash
of the path), so the PRM's K analyses of every candidate come from their own random streams,
as if each candidate were sampled independently; the M candidates of one step never share
(common) random numbers. A path's reward depends only on the path, not on which other
candidates were proposed with it.

- `greedy`: the official greedy step-level search. Each iteration samples M next steps from
  the policy (assistant prefix = the chosen steps joined by a blank line, plus a blank line;
  stop at a blank line), drops empty ones and duplicates, scores each with the PRM (reward of
  the candidate as the last step given the chosen ones: the K-analysis mean), and appends the
  best (ties: first sampled). It stops when the chosen step is final (holds a closed
  `\\boxed{}`, or the backend reports it ended at end of sequence rather than at the blank
  line), at `max_steps`, or when no valid candidate came back (which is also how a policy that
  has finished shows when its backend does not report why it stopped: it adds nothing).
- `beam`: beam search over the same step proposals. Each iteration every active beam samples
  M next steps; all expansions are scored and the `beam_width` best by aggregated path score
  (`config.aggregation` over the path's step rewards; ties: earlier beam, then earlier sample)
  survive (`beam_width` minus the paths already finished). Final expansions move to the finished list; the search stops when `beam_width`
  paths have finished, at `max_steps`, or when nothing is left to expand. The result is the
  best finished path, else the best active one.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from components.backends.base import Conversation, Generation, GenerationBackend, search_seed
from components.config import SamplingParams
from components.grading import last_boxed
from components.records import STEP_SEPARATOR, assistant_prefix, join_steps

Aggregation = Literal["min", "last", "product", "mean"]

POLICY_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


# --------------------------------------------------------------------------------------
# Aggregation of step rewards into a solution score
# --------------------------------------------------------------------------------------


def _product(values: Sequence[float]) -> float:
    return math.prod(values)


AGGREGATIONS: dict[str, Callable[[Sequence[float]], float]] = {
    "min": min,
    "last": lambda values: values[-1],
    "product": _product,
    "mean": lambda values: sum(values) / len(values),
}


def aggregate(step_rewards: Sequence[float | None], how: str) -> float | None:
    """Solution score from step rewards (unscored steps skipped); None when nothing is scored."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r} (one of {sorted(AGGREGATIONS)})")
    values = [float(r) for r in step_rewards if r is not None]
    return AGGREGATIONS[how](values) if values else None


# --------------------------------------------------------------------------------------
# Selection on one problem
# --------------------------------------------------------------------------------------


def best_of_n(scores: Sequence[float | None]) -> int | None:
    """Index of the highest score (ties: lowest index); None when no candidate has a score."""
    best: int | None = None
    for i, s in enumerate(scores):
        if s is not None and (best is None or s > scores[best]):  # type: ignore[operator]
            best = i
    return best


def _class_winner(classes: Sequence[int | None], weights: Sequence[float]) -> int | None:
    totals: dict[int, float] = {}
    first: dict[int, int] = {}
    for i, (c, w) in enumerate(zip(classes, weights, strict=True)):
        if c is None:
            continue
        totals[c] = totals.get(c, 0.0) + w
        first.setdefault(c, i)
    if not totals:
        return None
    return max(totals, key=lambda c: (totals[c], -first[c]))


def majority_vote(classes: Sequence[int | None]) -> int | None:
    """Index of the first member of the most frequent answer class (ties: earliest class)."""
    winner = _class_winner(classes, [1.0] * len(classes))
    return None if winner is None else classes.index(winner)


def weighted_vote(classes: Sequence[int | None], scores: Sequence[float | None]) -> int | None:
    """PRM-weighted vote: the class with the largest score sum; its best-scored member's index.

    Candidates without a class or without a score do not vote. Ties between classes go to the
    class whose first member comes first; within the class to the lowest index.
    """
    voting = [c if s is not None else None for c, s in zip(classes, scores, strict=True)]
    winner = _class_winner(voting, [s if s is not None else 0.0 for s in scores])
    if winner is None:
        return None
    members = [i for i, c in enumerate(voting) if c == winner]
    return max(members, key=lambda i: (scores[i], -i))  # type: ignore[return-value]


def pass_at_1(correct: Sequence[bool]) -> float:
    """Mean correctness over the candidates (0.0 for none)."""
    return sum(map(bool, correct)) / len(correct) if correct else 0.0


def pass_at_n(correct: Sequence[bool]) -> bool:
    """Whether any candidate is correct (oracle upper bound)."""
    return any(correct)


@dataclass
class ProblemCandidates:
    """What selection needs about one problem's N candidates (all lists in pool order)."""

    id: str
    correct: list[bool]
    classes: list[int | None]
    scores: list[float | None]

    def subset(self, idx: Sequence[int]) -> ProblemCandidates:
        """The same problem restricted to candidates `idx` (in that order)."""
        return ProblemCandidates(
            self.id,
            [self.correct[i] for i in idx],
            [self.classes[i] for i in idx],
            [self.scores[i] for i in idx],
        )


def _chosen_correct(p: ProblemCandidates, chosen: int | None) -> float:
    return float(chosen is not None and p.correct[chosen])


METHODS: dict[str, Callable[[ProblemCandidates], float]] = {
    "pass@1": lambda p: pass_at_1(p.correct),
    "maj": lambda p: _chosen_correct(p, majority_vote(p.classes)),
    "prm": lambda p: _chosen_correct(p, best_of_n(p.scores)),
    "prm_vote": lambda p: _chosen_correct(p, weighted_vote(p.classes, p.scores)),
    "pass@n": lambda p: float(pass_at_n(p.correct)),
}


def accuracy(problems: Sequence[ProblemCandidates], method: str) -> float:
    """Mean over problems of a selection method's correctness (0.0 for no problems)."""
    fn = METHODS[method]
    return sum(fn(p) for p in problems) / len(problems) if problems else 0.0


def sample_sizes(n_max: int) -> list[int]:
    """1, 2, 4, ... up to n_max, with n_max itself last."""
    out = []
    n = 1
    while n < n_max:
        out.append(n)
        n *= 2
    return [*out, n_max] if n_max >= 1 else []


def subsets(problem_id: str, n_total: int, n: int, repeats: int, seed: int) -> list[list[int]]:
    """Candidate index subsets of size n for one problem (see the module docstring)."""
    if n >= n_total:
        return [list(range(n_total))]
    if repeats <= 0:
        return [list(range(n))]
    rng = random.Random(f"{seed}:{problem_id}:{n}")
    return [sorted(rng.sample(range(n_total), n)) for _ in range(repeats)]


def accuracy_curve(
    problems: Sequence[ProblemCandidates],
    methods: Sequence[str],
    *,
    repeats: int = 0,
    seed: int = 0,
    ns: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Rows {n, method, accuracy} of each method at each subsample size n."""
    if not problems:
        return []
    n_total = min(len(p.correct) for p in problems)
    rows = []
    for n in ns or sample_sizes(n_total):
        for method in methods:
            fn = METHODS[method]
            per_problem = []
            for p in problems:
                subs = subsets(p.id, len(p.correct), n, repeats, seed)
                per_problem.append(sum(fn(p.subset(s)) for s in subs) / len(subs))
            rows.append({"n": n, "method": method, "accuracy": sum(per_problem) / len(per_problem)})
    return rows


# --------------------------------------------------------------------------------------
# Guided search
# --------------------------------------------------------------------------------------


class StepRewarder(Protocol):
    """The PRM as search sees it: reward of the last step of each path, given the ones before."""

    def __call__(self, requests: Sequence[tuple[str, str, Sequence[str]]]) -> list[float | None]:
        """One reward per (problem id, question, path) request (None when it was not scored)."""
        ...


@dataclass
class SearchConfig:
    """Settings of one guided search (built from best_of_n.guided_search params)."""

    candidates_per_step: int = 4
    beam_width: int = 2
    max_steps: int = 4
    step_max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.95
    aggregation: str = "min"
    seed: int = 0


@dataclass
class SearchResult:
    """The path a search settled on and what it cost."""

    problem_id: str
    strategy: str
    steps: list[str]
    step_rewards: list[float | None]
    score: float | None
    stop_reason: Literal["final", "max_steps", "no_candidates"]
    iterations: int = 0
    generated: int = 0  # candidate steps sampled from the policy
    scored: int = 0  # candidate steps scored by the PRM
    dropped: int = 0  # empty, failed or duplicate candidates
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The solution text (steps joined by a blank line)."""
        return join_steps(self.steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (with the solution text)."""
        return {**asdict(self), "text": self.text}


@dataclass
class Proposal:
    """A proposed next step and whether it ends the solution."""

    text: str
    final: bool


def policy_messages(question: str) -> Conversation:
    """The policy's chat: the Qwen2.5-Math chain-of-thought system prompt and the problem."""
    return [{"role": "system", "content": POLICY_SYSTEM_PROMPT}, {"role": "user", "content": question}]


def path_solution_id(problem_id: str, path: Sequence[str]) -> str:
    """Id under which the PRM scores a candidate path: its own per (problem, path), so each
    candidate's analyses are seeded independently of the other candidates'."""
    digest = hashlib.sha256(json.dumps(list(path), ensure_ascii=False).encode()).hexdigest()[:16]
    return f"{problem_id}#guided:{digest}"


def is_final_step(text: str, generation: Generation) -> bool:
    """A proposed step ends the solution: it holds a closed `\\boxed{}`, or the engine says it
    stopped at end of sequence (`meta["stop_reason"] == "eos"`, where a backend reports it)."""
    return last_boxed(text) is not None or generation.meta.get("stop_reason") == "eos"


def propose_steps(
    requests: Sequence[tuple[Any, Sequence[str], int]],
    policy: GenerationBackend,
    config: SearchConfig,
    iteration: int,
) -> tuple[list[list[Proposal]], int, int]:
    """M next steps for each (problem, path, beam index) in one policy call.

    Empty and failed generations and duplicates (within one path's proposals) are dropped.
    Returns (proposals per request, sampled, dropped).
    """
    if not requests:
        return [], 0, 0
    sampling = SamplingParams(
        n=config.candidates_per_step,
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=config.step_max_new_tokens,
        seed=config.seed,
    )
    outputs = policy.generate(
        [policy_messages(prob.problem) for prob, _, _ in requests],
        sampling,
        seeds=[search_seed(config.seed, prob.id, iteration, beam) for prob, _, beam in requests],
        assistant_prefixes=[assistant_prefix(path) for _, path, _ in requests],
        stop=[STEP_SEPARATOR],
    )
    proposals: list[list[Proposal]] = []
    sampled = dropped = 0
    for gens in outputs:
        seen: set[str] = set()
        mine: list[Proposal] = []
        for g in gens:
            sampled += 1
            text = g.text.strip()
            if g.error or not text or text in seen:
                dropped += 1
                continue
            seen.add(text)
            mine.append(Proposal(text, final=is_final_step(text, g)))
        proposals.append(mine)
    return proposals, sampled, dropped


def greedy_search_many(
    problems: Sequence[Any], policy: GenerationBackend, prm: StepRewarder, config: SearchConfig
) -> list[SearchResult]:
    """Greedy search on several problems in lockstep: one policy and one PRM call per iteration.

    Each problem's result is the one `greedy_search` gives it alone (seeds are per problem).
    """
    results = [SearchResult(p.id, "greedy", [], [], None, "max_steps") for p in problems]
    active = list(range(len(problems)))
    for it in range(config.max_steps):
        if not active:
            break
        props, sampled, dropped = propose_steps(
            [(problems[i], results[i].steps, 0) for i in active], policy, config, it
        )
        requests = [
            (problems[i].id, problems[i].problem, [*results[i].steps, p.text])
            for i, ps in zip(active, props, strict=True)
            for p in ps
        ]
        rewards = iter(prm(requests))
        still = []
        for i, ps in zip(active, props, strict=True):
            res = results[i]
            res.iterations = it + 1
            res.generated += config.candidates_per_step
            res.dropped += config.candidates_per_step - len(ps)
            if not ps:
                res.stop_reason = "no_candidates"
                continue
            mine = [next(rewards) for _ in ps]
            res.scored += len(ps)
            best = best_of_n(mine)
            pick = ps[best] if best is not None else ps[0]
            res.steps.append(pick.text)
            res.step_rewards.append(mine[best] if best is not None else None)
            if pick.final:
                res.stop_reason = "final"
            else:
                still.append(i)
        active = still
    for res in results:
        res.score = aggregate(res.step_rewards, config.aggregation)
    return results


@dataclass
class _Beam:
    steps: list[str]
    rewards: list[float | None]
    final: bool = False


def beam_search_many(
    problems: Sequence[Any], policy: GenerationBackend, prm: StepRewarder, config: SearchConfig
) -> list[SearchResult]:
    """Beam search on several problems in lockstep: one policy and one PRM call per iteration."""

    def path_score(b: _Beam) -> float:
        s = aggregate(b.rewards, config.aggregation)
        return -math.inf if s is None else s

    beams: list[list[_Beam]] = [[_Beam([], [])] for _ in problems]
    finished: list[list[_Beam]] = [[] for _ in problems]
    stats = [{"iterations": 0, "generated": 0, "scored": 0, "dropped": 0} for _ in problems]
    stop: list[Literal["max_steps", "no_candidates"]] = ["max_steps"] * len(problems)
    active = list(range(len(problems)))
    for it in range(config.max_steps):
        if not active:
            break
        asks = [(i, b, beam) for i in active for b, beam in enumerate(beams[i])]
        props, _, _ = propose_steps([(problems[i], beam.steps, b) for i, b, beam in asks], policy, config, it)
        requests = [
            (problems[i].id, problems[i].problem, [*beam.steps, p.text])
            for (i, _, beam), ps in zip(asks, props, strict=True)
            for p in ps
        ]
        rewards = iter(prm(requests))
        children: dict[int, list[_Beam]] = {i: [] for i in active}
        for (i, _, beam), ps in zip(asks, props, strict=True):
            st = stats[i]
            st["iterations"] = it + 1
            st["generated"] += config.candidates_per_step
            st["dropped"] += config.candidates_per_step - len(ps)
            st["scored"] += len(ps)
            children[i].extend(_Beam([*beam.steps, p.text], [*beam.rewards, next(rewards)], p.final) for p in ps)
        still = []
        for i in active:
            kids = children[i]
            if not kids:
                stop[i] = "no_candidates"
                continue
            ranked = sorted(range(len(kids)), key=lambda k, kids=kids: (-path_score(kids[k]), k))
            keep = [kids[k] for k in ranked[: config.beam_width - len(finished[i])]]
            finished[i].extend(b for b in keep if b.final)
            beams[i] = [b for b in keep if not b.final]
            if len(finished[i]) < config.beam_width and beams[i]:
                still.append(i)
        active = still
    results = []
    for i, prob in enumerate(problems):
        pool = finished[i] or beams[i]
        best = max(pool, key=lambda b, pool=pool: (path_score(b), -pool.index(b)))
        results.append(
            SearchResult(
                prob.id,
                "beam",
                best.steps,
                best.rewards,
                aggregate(best.rewards, config.aggregation),
                "final" if finished[i] else stop[i],
                meta={"finished": len(finished[i]), "active": len(beams[i])},
                **stats[i],
            )
        )
    return results


def greedy_search(problem: Any, policy: GenerationBackend, prm: StepRewarder, config: SearchConfig) -> SearchResult:
    """Greedy step-level search: M proposals per step, keep the PRM's best (see module docstring)."""
    return greedy_search_many([problem], policy, prm, config)[0]


def beam_search(problem: Any, policy: GenerationBackend, prm: StepRewarder, config: SearchConfig) -> SearchResult:
    """Beam search over step proposals, beams ranked by aggregated path score (module docstring)."""
    return beam_search_many([problem], policy, prm, config)[0]


Strategy = Callable[[Any, GenerationBackend, StepRewarder, SearchConfig], SearchResult]
BatchedStrategy = Callable[[Sequence[Any], GenerationBackend, StepRewarder, SearchConfig], list[SearchResult]]

STRATEGIES: Mapping[str, Strategy] = {"greedy": greedy_search, "beam": beam_search}
BATCHED_STRATEGIES: Mapping[str, BatchedStrategy] = {"greedy": greedy_search_many, "beam": beam_search_many}


def run_strategy(
    name: str, problem: Any, policy: GenerationBackend, prm: StepRewarder, config: SearchConfig
) -> SearchResult:
    """Dispatch a guided-search strategy by name."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown search strategy {name!r} (one of {sorted(STRATEGIES)})")
    return STRATEGIES[name](problem, policy, prm, config)


def run_strategy_many(
    name: str, problems: Sequence[Any], policy: GenerationBackend, prm: StepRewarder, config: SearchConfig
) -> list[SearchResult]:
    """Dispatch a strategy by name on several problems in lockstep (same results as one by one)."""
    if name not in BATCHED_STRATEGIES:
        raise ValueError(f"unknown search strategy {name!r} (one of {sorted(BATCHED_STRATEGIES)})")
    return BATCHED_STRATEGIES[name](problems, policy, prm, config)
