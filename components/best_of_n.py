"""The `best-of-n` stage: answer grading, baselines, PRM selection, accuracy curves, guided search.

For each dataset in `best_of_n.datasets` (test sets in `bon/testsets/`, gold answers as
`data.load_bon_testset` gives them):

1. Candidates. With `candidates: pool`, a dataset's real pool when the data has one
   (OlympiadBench: Qwen2.5-7B-Instruct, T=1, 8 per problem, already split into steps), the first
   `n` candidates of each problem (problems with a candidate longer than `max_solution_steps`
   left out and counted: small profiles only); otherwise (and with `candidates: policy` always) `n`
   candidates per problem sampled from the policy model (`policy_model`, default the base
   model) with the Qwen2.5-Math chain-of-thought prompt, split into steps on blank lines. A
   generated pool is journaled under `data/bon/pools/<dataset>.jsonl` as it is sampled
   (`components.journal`: headed by the policy model's identity and the sampling settings) and
   reused by a rerun with the same settings; other settings start it over.
2. Grading (`components.grading`): last `\\boxed{}` (documented fallbacks), math-verify with a
   per-request deadline; outcomes correct / incorrect / no_answer / bad_reference / timeout /
   error are counted, only `correct` counts as solved.
3. Baselines: pass@1 (mean over the n candidates), maj@n (majority over answer classes),
   pass@n (any correct). When a pool carries its publishers' `correct` flags, the same
   baselines from those flags and the per-candidate agreement of our grading with them.
4. PRM: every step of every candidate scored by the step scorer (full scoring, no early exit;
   `scoring` params; all datasets in one scorer call; journaled in
   `data/bon/scores/candidates.jsonl`, headed by the PRM's identity (path and file stats, so a
   retrained PRM rescores) and the scoring settings rewards depend on, not `scoring.threshold`),
   solution score = `aggregation` of the step rewards, best-of-n selection and PRM-weighted
   voting (`components.search`).
5. Accuracy curves for n = 1, 2, 4, ..., N (`curve_repeats` random subsets per point, or the
   first n): `plots/bon_curve.csv` (n, accuracy, dataset, method) and `plots/bon_curve.png`
   (`components.plots.bon_curve_plot`: a panel per dataset with its problem count, the PRM and
   the aggregation in the title).
6. Guided search (`guided_search` params): every strategy on the first `max_problems`
   problems of each dataset, policy = the policy model, PRM = the step scorer.

Bad input is counted, never fatal: a candidate without steps (not scored, never selected by the
PRM), empty steps (dropped before scoring), an unparseable answer, a reference math-verify
cannot parse. Reports: `reports/bon.json`, `reports/guided_search.json`; the stage's MLflow run
gets both, the plots and tables of per-problem choices.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from components import arithmetic, paths, search
from components.backends.base import GenerationBackend, problem_seed
from components.config import BestOfNParams, Params, SamplingParams
from components.data import CANDIDATE_POOLS, load_bon_testset, load_candidate_pool
from components.grading import EXTRACTIONS, OUTCOMES, Grade, Grader, reference_answers
from components.io import DataError, read_jsonl, stat_digest, write_json
from components.journal import finished, open_journal
from components.paths import Layout
from components.records import (
    BonProblem,
    Candidate,
    CandidatePool,
    Solution,
    join_steps,
    split_steps,
)
from components.scoring import (
    StepScorer,
    mean_reward,
    scoring_settings,
)

log = logging.getLogger(__name__)

# Published figures of the real OlympiadBench pool (docs/method.md §11; data README).
PUBLISHED = {"olympiadbench": {"pass@1": 0.380, "pass@8": 0.585}}
CURVE_METHODS = ("pass@1", "maj", "prm", "prm_vote", "pass@n")


# --------------------------------------------------------------------------------------
# Graded candidates
# --------------------------------------------------------------------------------------


@dataclass
class GradedCandidate:
    """One candidate: its (non-empty) steps, grade, PRM step rewards and solution score."""

    index: int
    steps: list[str]
    grade: Grade
    empty_steps: int = 0
    published_correct: bool | None = None
    step_rewards: list[float | None] = field(default_factory=list)
    score: float | None = None


@dataclass
class GradedProblem:
    """A problem's references, graded candidates and answer classes (for voting)."""

    id: str
    dataset: str
    question: str
    references: list[str]
    candidates: list[GradedCandidate]
    classes: list[int | None] = field(default_factory=list)

    def selection_view(self, aggregation: str | None = None) -> search.ProblemCandidates:
        """What `components.search` selection needs; scores re-aggregated from the step rewards
        when `aggregation` is given (else the stage's own `score`)."""
        return search.ProblemCandidates(
            self.id,
            [c.grade.correct for c in self.candidates],
            list(self.classes),
            [c.score if aggregation is None else search.aggregate(c.step_rewards, aggregation)
             for c in self.candidates],
        )


def grade_pool(
    problem: BonProblem, pool: CandidatePool, grader: Grader, n: int | None = None
) -> GradedProblem:
    """Grade the first n candidates of a pool against the problem's references; classes set."""
    references = reference_answers(problem.answer)
    graded = []
    for i, cand in enumerate(pool.candidates[:n]):
        steps = [s for s in cand.steps if s.strip()]
        text = join_steps(steps) if steps else (cand.response or "")
        graded.append(
            GradedCandidate(
                index=i,
                steps=steps,
                grade=grader.grade(text, references),
                empty_steps=len(cand.steps) - len(steps),
                published_correct=cand.correct,
            )
        )
    gp = GradedProblem(problem.id, problem.dataset, problem.problem, references, graded)
    gp.classes = grader.answer_classes(
        [c.grade.answer if c.grade.outcome in ("correct", "incorrect") else None for c in graded]
    )
    return gp


def baselines(problems: Sequence[GradedProblem]) -> dict[str, Any]:
    """pass@1, maj@n, pass@n and the bad-input counts of graded problems (n = largest pool)."""
    views = [p.selection_view() for p in problems]
    n = max((len(p.candidates) for p in problems), default=0)
    cands = [c for p in problems for c in p.candidates]
    outcomes = Counter(c.grade.outcome for c in cands)
    extraction = Counter(c.grade.extraction for c in cands)
    return {
        "problems": len(problems),
        "n": n,
        "candidates": len(cands),
        "pass@1": search.accuracy(views, "pass@1"),
        f"maj@{n}": search.accuracy(views, "maj"),
        f"pass@{n}": search.accuracy(views, "pass@n"),
        "counts": {
            "outcomes": {k: outcomes.get(k, 0) for k in OUTCOMES},
            "extraction": {k: extraction.get(k, 0) for k in EXTRACTIONS},
            "fallback_extractions": extraction.get("answer_phrase", 0) + extraction.get("last_number", 0),
            "candidates_without_steps": sum(not c.steps for c in cands),
            "empty_steps_dropped": sum(c.empty_steps for c in cands),
            "unparseable_answers": outcomes.get("no_answer", 0),
            "bad_reference_problems": sum(
                any(c.grade.outcome == "bad_reference" for c in p.candidates) for p in problems
            ),
        },
    }


def published_agreement(problems: Sequence[GradedProblem], max_listed: int = 100) -> dict[str, Any] | None:
    """Baselines from a pool's own `correct` flags and our grading's agreement with them."""
    pairs = [(p, c) for p in problems for c in p.candidates if c.published_correct is not None]
    if not pairs:
        return None
    flagged = [p for p in problems if all(c.published_correct is not None for c in p.candidates)]
    n = max((len(p.candidates) for p in flagged), default=0)
    views = [
        search.ProblemCandidates(p.id, [bool(c.published_correct) for c in p.candidates], p.classes, [None] * len(p.candidates))
        for p in flagged
    ]
    mismatches = [
        {
            "problem_id": p.id,
            "candidate": c.index,
            "references": p.references,
            "answer": c.grade.answer,
            "outcome": c.grade.outcome,
            "published_correct": c.published_correct,
        }
        for p, c in pairs
        if c.grade.correct != c.published_correct
    ]
    return {
        "pass@1": search.accuracy(views, "pass@1"),
        f"maj@{n}": search.accuracy(views, "maj"),  # our answer classes, the publishers' flags
        f"pass@{n}": search.accuracy(views, "pass@n"),
        "candidates": len(pairs),
        "agreeing": len(pairs) - len(mismatches),
        "agreement": (len(pairs) - len(mismatches)) / len(pairs),
        "ours_correct_published_incorrect": sum(m["outcome"] == "correct" for m in mismatches),
        "ours_not_correct_published_correct": sum(m["outcome"] != "correct" for m in mismatches),
        "mismatches": mismatches[:max_listed],
    }


# --------------------------------------------------------------------------------------
# Candidate pools
# --------------------------------------------------------------------------------------


def model_identity(path: Path | str) -> str:
    """A model folder's path and `stat_digest` (so a retrained model starts its journals over); any other name as is."""
    return f"{path}@{stat_digest(path)}" if Path(path).is_dir() else str(path)


def generate_pools(
    problems: Sequence[BonProblem],
    policy: Callable[[], GenerationBackend],
    bp: BestOfNParams,
    policy_name: str,
    out_dir: Path,
    batch_size: int = 8,
) -> tuple[list[CandidatePool], Path]:
    """Sample n candidates per problem into the journal `out_dir/<dataset>.jsonl` (reused with the
    same settings); steps split on blank lines.

    `policy` builds the backend; it is called only when some problem is not journaled yet.
    `policy_name` identifies the policy in the journal's fingerprint (`model_identity`).
    """
    sampling = SamplingParams(
        n=bp.n,
        temperature=bp.policy_temperature,
        top_p=1.0,
        max_new_tokens=bp.policy_max_new_tokens,
        seed=bp.seed,
    )
    settings = {"policy": policy_name, "sampling": sampling.model_dump(mode="json")}
    dataset = problems[0].dataset if problems else "none"
    path = out_dir / f"{dataset}.jsonl"
    with open_journal(path, settings) as journal:
        todo = [p for p in problems if p.id not in journal]
        bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=f"policy {dataset}", unit="problem")
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            outputs = policy().generate(
                [search.policy_messages(p.problem) for p in batch],
                sampling,
                seeds=[problem_seed(bp.seed, p.id) for p in batch],
            )
            for prob, gens in zip(batch, outputs, strict=True):
                journal.append(
                    {
                        "key": prob.id,
                        "responses": [g.text for g in gens],
                        "errors": [g.error for g in gens],
                        "finish_reasons": [g.finish_reason for g in gens],
                    }
                )
            bar.update(len(batch))
        bar.close()
        done = finished(journal)
    pools = []
    for prob in problems:
        rec = done[prob.id]
        cands = [Candidate(steps=split_steps(text), response=text) for text in rec["responses"]]
        pools.append(CandidatePool(id=prob.id, dataset=prob.dataset, problem=prob.problem, answer=prob.answer, candidates=cands))
    return pools, path


# --------------------------------------------------------------------------------------
# PRM scoring
# --------------------------------------------------------------------------------------


def score_candidates(problems: Sequence[GradedProblem], scorer: StepScorer, aggregation: str) -> None:
    """Full scoring of every candidate's steps; step rewards and aggregated score set in place.

    Identical candidates of a problem (same steps) are scored once, under the first one's id, and
    share its rewards (a policy repeats itself; the repeats would cost analyses and say nothing new).
    All problems go to the scorer in one call (solution id `<dataset>/<problem id>#<index>`),
    so its waves advance every dataset's candidates together: the number of backend calls is
    the longest candidate's step count, not the sum over datasets.
    """
    solutions = []
    owners: list[list[GradedCandidate]] = []
    first: dict[tuple[str, str, tuple[str, ...]], int] = {}
    for p in problems:
        for c in p.candidates:
            if not c.steps:
                continue
            key = (p.dataset, p.id, tuple(c.steps))
            if key in first:  # an identical candidate of the same problem: scored once, shared
                owners[first[key]].append(c)
                continue
            first[key] = len(solutions)
            solutions.append(
                Solution(id=f"{p.dataset}/{p.id}#{c.index}", question=p.question, steps=c.steps, subset=p.dataset)
            )
            owners.append([c])
    for cands, scored in zip(owners, scorer.score_detailed(solutions), strict=True):
        for cand in cands:
            cand.step_rewards = scored.rewards()
            cand.score = search.aggregate(cand.step_rewards, aggregation)


class ScorerRewarder:
    """The step scorer as a `search.StepRewarder`: the reward of each path's last step.

    Only the last step of each path is analysed, every request of a call in one backend call,
    so a search costs M proposals per step rather than re-scoring every prefix. The numbers are
    the scorer's own: path p of problem q is the Solution (`search.path_solution_id(q, p)`,
    question, p), so every candidate has its own seeds, and its last step goes through
    `StepScorer.analyse_steps`, the code full scoring uses (same `scoring.fallback`; a test pins
    equality with `score_detailed(...).reward(last)`).
    """

    def __init__(self, scorer: StepScorer):
        self.scorer = scorer

    @staticmethod
    def solution_id(problem_id: str, path: Sequence[str]) -> str:
        """Id under which a path of a problem is scored (its own per path: independent seeds)."""
        return search.path_solution_id(problem_id, path)

    def __call__(self, requests: Sequence[tuple[str, str, Sequence[str]]]) -> list[float | None]:
        """One reward per (problem id, question, path): its last step's K-analysis mean."""
        keys = [(pid, question, tuple(path)) for pid, question, path in requests]
        unique = list(dict.fromkeys(keys))
        if not unique:
            return []
        sols = [Solution(id=self.solution_id(pid, path), question=q, steps=list(path)) for pid, q, path in unique]
        analysed = self.scorer.analyse_steps([(sol, len(sol.steps) - 1) for sol in sols], progress=True)
        values = [vals for vals, _ in analysed]
        rewards = {}
        for key, vals in zip(unique, values, strict=True):
            rewards[key] = mean_reward(vals)
        return [rewards[k] for k in keys]


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------


def prm_metrics(problems: Sequence[GradedProblem]) -> dict[str, float]:
    """Best-of-n and PRM-weighted voting accuracy at the full n."""
    views = [p.selection_view() for p in problems]
    n = max((len(p.candidates) for p in problems), default=0)
    out = {f"prm@{n}": search.accuracy(views, "prm"), f"prm_vote@{n}": search.accuracy(views, "prm_vote")}
    for how in search.AGGREGATIONS:  # every aggregation of the same step rewards, side by side
        agg = [p.selection_view(how) for p in problems]
        out[f"prm_{how}@{n}"] = search.accuracy(agg, "prm")
        out[f"prm_vote_{how}@{n}"] = search.accuracy(agg, "prm_vote")
    return out


def choice_rows(problems: Sequence[GradedProblem]) -> list[dict[str, Any]]:
    """One row per problem: answers, grades, scores and what each method chose."""
    rows = []
    for p in problems:
        v = p.selection_view()
        picks = {
            "prm": search.best_of_n(v.scores),
            "prm_vote": search.weighted_vote(v.classes, v.scores),
            "maj": search.majority_vote(v.classes),
        }
        row: dict[str, Any] = {
            "dataset": p.dataset,
            "problem_id": p.id,
            "references": json.dumps(p.references, ensure_ascii=False),
            "answers": json.dumps([c.grade.answer for c in p.candidates], ensure_ascii=False),
            "outcomes": json.dumps([c.grade.outcome for c in p.candidates]),
            "scores": json.dumps([None if c.score is None else round(c.score, 4) for c in p.candidates]),
            "pass@1": search.pass_at_1(v.correct),
            "pass@n": search.pass_at_n(v.correct),
        }
        for name, idx in picks.items():
            row[f"{name}_choice"] = idx
            row[f"{name}_correct"] = idx is not None and v.correct[idx]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def _without(obj: Any, key: str) -> Any:
    """A copy of nested dicts without `key` anywhere (keeps per-item lists out of the metrics)."""
    if isinstance(obj, dict):
        return {k: _without(v, key) for k, v in obj.items() if k != key}
    return obj


def _model_path(name: str, layout: Layout) -> Path | str:
    if name in paths.MODEL_STAGES:
        return layout.model_dir(name)
    return name


def arithmetic_pools(pool_file: Path) -> list[CandidatePool]:
    """The in-domain Best-of-N pool `prepare` staged for the arithmetic domain (dataset `arithmetic`)."""
    if not pool_file.exists() or pool_file.stat().st_size == 0:
        raise DataError(pool_file, None, None, "no arithmetic Best-of-N pool: set domain.kind: arithmetic "
                        "and run `rprm prepare`, or drop `arithmetic` from best_of_n.datasets")
    return read_jsonl(pool_file, CandidatePool, key=lambda r: r.id)


def load_testset(params: Params, dataset: str, layout: Layout) -> list[BonProblem]:
    """A dataset's problems with reference answers: a bundled test set, or the arithmetic pool's problems."""
    if dataset == arithmetic.SUBSET:
        return [BonProblem(id=p.id, dataset=dataset, problem=p.problem, answer=p.answer or "")
                for p in arithmetic_pools(layout.bon_arithmetic)]
    return load_bon_testset(params.data, dataset)


def required_models(params: Params) -> dict[str, str]:
    """The models the stage will load, by params key: the PRM always, the policy when sampled from."""
    bp = params.best_of_n
    needed: dict[str, str] = {}
    generates = any(not (bp.candidates == "pool" and d in (*CANDIDATE_POOLS, arithmetic.SUBSET)) for d in bp.datasets)
    if generates or (bp.guided_search.enabled and bp.guided_search.strategies):
        needed["best_of_n.policy_model"] = bp.policy_model or "base"  # upstream of the PRM: first
    needed["best_of_n.prm_model"] = bp.prm_model
    return needed


def check_models(params: Params, layout: Layout) -> None:
    """DataError naming the folder and the stage that builds it when a needed pipeline model is missing.

    Only pipeline models (base, sft, dpo) with a local-weights backend (hf, vllm) are checked:
    other names are folders or hub ids, and an `openai` server holds its own weights.
    """
    if params.backend.kind not in ("hf", "vllm"):
        return
    for key, name in required_models(params).items():
        if name in paths.MODEL_STAGES:
            layout.require_model(name, key)


def _pool_for(
    dataset: str,
    problems: list[BonProblem],
    params: Params,
    policy: Callable[[], GenerationBackend],
    policy_name: str,
    layout: Layout,
) -> tuple[list[BonProblem], list[CandidatePool], dict[str, Any]]:
    bp = params.best_of_n
    if bp.candidates == "pool" and dataset == arithmetic.SUBSET:
        pools = {p.id: p for p in arithmetic_pools(layout.bon_arithmetic)}
        kept = [p for p in problems if p.id in pools][: bp.max_problems]
        return kept, [pools[p.id] for p in kept], {"pool": f"generated:{paths.BON_ARITHMETIC.as_posix()} ({arithmetic.POLICY_NAME})"}
    if bp.candidates == "pool" and dataset in CANDIDATE_POOLS:
        pools = {p.id: p for p in load_candidate_pool(params.data, dataset)}
        in_pool = [p for p in problems if p.id in pools]
        limit = bp.max_solution_steps
        fits = [
            p for p in in_pool
            if limit is None or all(len(c.steps) <= limit for c in pools[p.id].candidates[: bp.n])
        ]
        kept = fits[: bp.max_problems]
        info = {"pool": f"real:{CANDIDATE_POOLS[dataset][0]}", "pool_problems": len(in_pool),
                "left_out_long": len(in_pool) - len(fits)}
        return kept, [pools[p.id] for p in kept], info
    kept = problems[: bp.max_problems]
    pools, path = generate_pools(kept, policy, bp, model_identity(policy_name), layout.bon_pools)
    return kept, pools, {"pool": f"generated:{path.as_posix()}"}


def search_config(params: Params) -> search.SearchConfig:
    """The guided-search settings from params."""
    gs = params.best_of_n.guided_search
    return search.SearchConfig(
        candidates_per_step=gs.candidates_per_step,
        beam_width=gs.beam_width,
        max_steps=gs.max_steps,
        step_max_new_tokens=gs.step_max_new_tokens,
        temperature=gs.temperature,
        top_p=gs.top_p,
        aggregation=params.best_of_n.aggregation,
        seed=params.best_of_n.seed,
    )


def run_guided_search(
    problems_by_dataset: dict[str, list[BonProblem]],
    policy: Callable[[], GenerationBackend],
    scorer: StepScorer,
    grader: Grader,
    params: Params,
    journal_path: Path,
    journal_settings: dict[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every strategy on the first guided_search.max_problems problems per dataset; report + rows.

    Each strategy runs on all datasets' problems in lockstep (one policy and one PRM call per
    iteration); results are journaled per (strategy, dataset, problem) and reused on a rerun
    with the same `journal_settings` (the journal starts over when they change).
    `policy` builds the policy backend (called only when something is not journaled yet).
    """
    gs = params.best_of_n.guided_search
    config = search_config(params)
    report: dict[str, Any] = {
        "config": {**config.__dict__, "strategies": list(gs.strategies)},
        "datasets": {d: {} for d in problems_by_dataset},
    }
    rows: list[dict[str, Any]] = []
    chosen = [(d, prob) for d, probs in problems_by_dataset.items() for prob in probs[: gs.max_problems]]
    with open_journal(journal_path, journal_settings) as journal:
        for strategy in gs.strategies:
            todo = [(d, prob) for d, prob in chosen if f"{strategy}|{d}|{prob.id}" not in journal]
            if todo:
                log.info("guided search (%s) on %d problems", strategy, len(todo))
                results = search.run_strategy_many(
                    strategy, [prob for _, prob in todo], policy(), ScorerRewarder(scorer), config
                )
                for (d, prob), res in zip(todo, results, strict=True):
                    journal.append({"key": f"{strategy}|{d}|{prob.id}", "dataset": d, **res.to_dict()})
            graded: dict[str, list[tuple[dict[str, Any], Grade]]] = {d: [] for d in problems_by_dataset}
            for d, prob in chosen:
                rec = journal.done()[f"{strategy}|{d}|{prob.id}"]
                grade = grader.grade(rec["text"], reference_answers(prob.answer))
                graded[d].append((rec, grade))
                rows.append(
                    {
                        "dataset": d,
                        "strategy": strategy,
                        "problem_id": prob.id,
                        "steps": len(rec["steps"]),
                        "score": rec["score"],
                        "stop_reason": rec["stop_reason"],
                        "answer": grade.answer,
                        "outcome": grade.outcome,
                        "generated": rec["generated"],
                        "scored": rec["scored"],
                        "text": rec["text"][:2000],
                    }
                )
            for d, results in graded.items():
                k = len(results)
                report["datasets"][d][strategy] = {
                    "problems": k,
                    "accuracy": sum(g.correct for _, g in results) / k if k else 0.0,
                    "mean_steps": sum(len(r["steps"]) for r, _ in results) / k if k else 0.0,
                    "stop_reasons": dict(Counter(r["stop_reason"] for r, _ in results)),
                    "outcomes": dict(Counter(g.outcome for _, g in results)),
                    "generated_steps": sum(r["generated"] for r, _ in results),
                    "scored_steps": sum(r["scored"] for r, _ in results),
                }
    return report, rows


def without_timings(obj: Any) -> Any:
    """A report without its wall-clock `seconds` entries (they differ between identical runs)."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k != "seconds"}
    return obj


def scoring_journal_settings(params: Params, prm_path: Path | str) -> dict[str, Any]:
    """What the guided-search journal's values depend on besides the policy and the search: the
    PRM (`model_identity`) and the `scoring` fields step rewards depend on
    (`scoring.scoring_settings`), so a change of `scoring.threshold`, which Best-of-N never reads,
    keeps it."""
    return {"prm": model_identity(prm_path), "scoring": scoring_settings(params.scoring)}


def run(params: Params, layout: Layout = Layout()) -> dict[str, Any]:
    """The `rprm best-of-n` stage (see the module docstring) on `layout`'s files; returns the bon report."""
    from components import tracking
    from components.backends import load_backend
    from components.plots import bon_curve_plot, write_csv

    bp = params.best_of_n
    # Every input file and model folder is checked before any model, MLflow run or journal: bad
    # data or a missing model fails here (file, line, field) and nothing is written.
    testsets = {d: load_testset(params, d, layout) for d in bp.datasets}
    for d in bp.datasets:
        if bp.candidates == "pool" and d in CANDIDATE_POOLS:
            load_candidate_pool(params.data, d)
    check_models(params, layout)
    prm_path = _model_path(bp.prm_model, layout)
    policy_path = _model_path(bp.policy_model or "base", layout)
    backends: dict[str, GenerationBackend] = {}

    def get_backend(path: Path | str) -> GenerationBackend:
        if str(path) not in backends:
            if str(path) == arithmetic.POLICY_NAME:  # the simulated policy of the arithmetic domain
                domain = params.domain.arithmetic
                backends[str(path)] = arithmetic.ArithmeticPolicy(domain, arithmetic.problem_splits(domain)["bon"])
            else:
                backends[str(path)] = load_backend(params.backend, path)
        return backends[str(path)]

    def policy() -> GenerationBackend:
        return get_backend(policy_path)

    journal_settings = scoring_journal_settings(params, prm_path)

    def scorer_for(journal: Path, desc: str) -> StepScorer:
        return StepScorer(
            get_backend(prm_path), params.scoring, early_exit=False, journal=journal,
            journal_tag=f"best-of-n prm={journal_settings['prm']}", on_stale="restart", desc=desc,
        )

    inputs = [Path(params.data.dir if params.data.source == "dir" else params.data.bundled_dir) / "bon", Path(prm_path)]
    report: dict[str, Any] = {"aggregation": bp.aggregation, "prm_model": str(prm_path), "datasets": {}}
    curve_rows: list[dict[str, Any]] = []
    choice_table: list[dict[str, Any]] = []
    guided_problems: dict[str, list[BonProblem]] = {}
    with tracking.stage_run("best-of-n", params, sections=["backend", "scoring", "best_of_n"], inputs=[p for p in inputs if Path(p).exists()], root=layout.root):
        with Grader(bp.grading_timeout_s) as grader:
            try:
                graded_by: dict[str, list[GradedProblem]] = {}
                origins: dict[str, dict[str, Any]] = {}
                seconds: dict[str, dict[str, float]] = {}
                for dataset in bp.datasets:
                    t0 = time.monotonic()
                    testset = testsets[dataset]
                    guided_problems[dataset] = testset
                    problems, pools, origins[dataset] = _pool_for(dataset, testset, params, policy, str(policy_path), layout)
                    t1 = time.monotonic()
                    graded_by[dataset] = [
                        grade_pool(prob, pool, grader, bp.n)
                        for prob, pool in tqdm(list(zip(problems, pools, strict=True)), desc=f"grading {dataset}", unit="problem")
                    ]
                    seconds[dataset] = {"pool": t1 - t0, "grading": time.monotonic() - t1}
                t0 = time.monotonic()
                scorer = scorer_for(layout.bon_scores / "candidates.jsonl", "prm candidates")
                score_candidates([p for gs in graded_by.values() for p in gs], scorer, bp.aggregation)
                report["seconds"] = {"prm_scoring": time.monotonic() - t0}
                for dataset, graded in graded_by.items():
                    origin = origins[dataset]
                    entry = {**origin, **baselines(graded), **prm_metrics(graded)}
                    entry["seconds"] = seconds[dataset]
                    agreement = published_agreement(graded)
                    if agreement is not None:
                        entry["publisher_labels"] = agreement
                    if dataset in PUBLISHED and origin["pool"].startswith("real:"):
                        entry["published"] = PUBLISHED[dataset]
                    report["datasets"][dataset] = entry
                    for row in search.accuracy_curve(
                        [p.selection_view() for p in graded], CURVE_METHODS, repeats=bp.curve_repeats, seed=bp.seed
                    ):
                        curve_rows.append({**row, "dataset": dataset})
                    choice_table.extend(choice_rows(graded))
                report["grader_restarts"] = grader.restarts
                report["answer_class_fallbacks"] = grader.class_fallbacks
                guided: dict[str, Any] = {"enabled": bp.guided_search.enabled}
                guided_rows: list[dict[str, Any]] = []
                if bp.guided_search.enabled and bp.guided_search.strategies:
                    gs_scorer = StepScorer(get_backend(prm_path), params.scoring, early_exit=False, progress=False)
                    gs_settings = {**journal_settings, "policy": model_identity(policy_path), **search_config(params).__dict__}
                    t0 = time.monotonic()
                    g_report, guided_rows = run_guided_search(
                        guided_problems, policy, gs_scorer, grader, params,
                        layout.bon_guided / "results.jsonl", gs_settings,
                    )
                    guided.update(g_report)
                    guided["seconds"] = time.monotonic() - t0
                    for d, entry in guided["datasets"].items():
                        if d in report["datasets"]:  # sampling from the policy alone, on the same problems
                            entry["policy_alone_pass@1"] = report["datasets"][d]["pass@1"]
            finally:
                for b in backends.values():
                    b.close()
        write_csv(layout.bon_curve_csv, curve_rows, ["n", "accuracy", "dataset", "method"])
        png = bon_curve_plot(curve_rows, layout.bon_curve_png, methods=CURVE_METHODS,
                             problems={d: len(g) for d, g in graded_by.items()}, prm_model=bp.prm_model,
                             aggregation=bp.aggregation, repeats=bp.curve_repeats)
        # wall-clock `seconds` go to MLflow only: the report files are a function of params and data
        write_json(layout.bon_report, without_timings(report))
        write_json(layout.guided_search_report, without_timings(guided))
        tracking.log_report(_without(report, "mismatches"))  # metrics (lists stay in the JSON)
        tracking.log_report(_without(guided, "config"))
        tracking.log_json(report, "bon.json")
        tracking.log_json(guided, "guided_search.json")
        tracking.log_table(choice_table, "bon_choices.json")
        tracking.log_table(guided_rows, "guided_search_choices.json")
        tracking.log_artifact(png, "plots")
        tracking.log_artifact(layout.bon_curve_csv, "plots")
    return report
