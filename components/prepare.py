"""The `prepare` stage: PRM800K -> step samples (decontaminated, split by problem); benchmark subsets.

Flattening (docs/method.md §5): every rated completion at every step becomes one
StepSample whose previous steps are the chosen trajectory so far (the chosen completion, or
the labeler's own step when they wrote one). Ratings map through `prepare.neutral_rating`:
+1 correct, -1 wrong, 0 correct / wrong / dropped; unrated (null) completions are skipped.
The trajectory ends after the first step whose chosen completion is rated -1, or at a step
where nothing was chosen: no later step has a prefix.

Contamination (PRM800K domain): the overlap (normalised problem text: whitespace, case) of the
training problems with every benchmark the project evaluates -- each ProcessBench subset,
PRMBench and the six Best-of-N test sets -- is reported as `contamination` (problems and items,
before and after decontamination). Decontamination removes the problems of the benchmarks named
in `prepare.decontaminate` (`processbench` = all four subsets). The arithmetic domain's
generated problems overlap nothing; its report says so without loading the benchmarks. Caps (`max_problems`, `max_samples`) are seeded
samples, so they are deterministic. The split into train/validation is by problem.

Also stages the ProcessBench and PRMBench items the `evaluate` stage scores.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components import arithmetic, paths
from components.config import DataParams, Params
from components.data import (
    BON_TESTSETS,
    Source,
    load_bon_testset,
    load_prm800k,
    load_prmbench,
    load_processbench,
    normalize_problem,
    problem_id,
    source_root,
)
from components.io import DataError, write_json, write_jsonl
from components.paths import Layout
from components.records import (
    PROCESSBENCH_SUBSETS,
    CandidatePool,
    PRM800KSolution,
    PRMBenchItem,
    ProcessBenchItem,
    StepSample,
)


@dataclass
class FlattenCounts:
    """What flattening saw and did with each rating."""

    solutions: int = 0
    rated: int = 0
    unrated_skipped: int = 0
    neutral_mapped: int = 0
    neutral_dropped: int = 0
    stopped_at_wrong_step: int = 0
    steps_after_end_ignored: int = 0


@dataclass
class Prepared:
    """Everything the stage writes, plus its report."""

    train: list[StepSample]
    val: list[StepSample]
    processbench: list[ProcessBenchItem]
    prmbench: list[PRMBenchItem]
    report: dict[str, Any] = field(default_factory=dict)
    heldout: list[ProcessBenchItem] = field(default_factory=list)  # in-domain benchmark (arithmetic)
    heldout_kinds: dict[str, str] = field(default_factory=dict)  # erroneous held-out solution id -> first error kind
    bon_pool: list[CandidatePool] = field(default_factory=list)  # in-domain Best-of-N pool (arithmetic)


def rating_label(rating: int, neutral_rating: str) -> bool | None:
    """Label of a rating: +1 -> True, -1 -> False, 0 -> per `neutral_rating` (None = drop)."""
    if rating == 1:
        return True
    if rating == -1:
        return False
    return {"positive": True, "negative": False, "drop": None}[neutral_rating]


def flatten_solution(
    sol: PRM800KSolution, neutral_rating: str, counts: FlattenCounts | None = None
) -> list[StepSample]:
    """Step samples of one solution: every rated completion, with the chosen trajectory prefix."""
    counts = counts if counts is not None else FlattenCounts()
    counts.solutions += 1
    pid = problem_id(sol.problem)
    prefix: list[str] = []
    out: list[StepSample] = []
    for k, step in enumerate(sol.steps):
        for c, comp in enumerate(step.completions):
            if comp.rating is None:
                counts.unrated_skipped += 1
                continue
            counts.rated += 1
            label = rating_label(comp.rating, neutral_rating)
            if comp.rating == 0:
                if label is None:
                    counts.neutral_dropped += 1
                    continue
                counts.neutral_mapped += 1
            out.append(
                StepSample(
                    id=f"{sol.id}-s{k}-c{c}",
                    problem_id=pid,
                    question=sol.problem,
                    previous_steps=list(prefix),
                    now_step=comp.text,
                    step_index=k,
                    label=label,
                    source=sol.source,
                )
            )
        chosen = step.chosen_text()
        if chosen is None or step.chosen_rating() == -1:
            if step.chosen_rating() == -1:
                counts.stopped_at_wrong_step += 1
            counts.steps_after_end_ignored += len(sol.steps) - k - 1
            break
        prefix.append(chosen)
    return out


def flatten(
    solutions: Iterable[PRM800KSolution], neutral_rating: str
) -> tuple[list[StepSample], FlattenCounts]:
    """Step samples of all solutions, in input order, with the flattening counts."""
    counts = FlattenCounts()
    samples: list[StepSample] = []
    for sol in solutions:
        samples.extend(flatten_solution(sol, neutral_rating, counts))
    return samples, counts


# The Best-of-N test sets the project evaluates (best_of_n.datasets), also names in prepare.decontaminate.
BON_EVALUATED = ("aime24", "amc23", "math500", "olympiadbench", "college_math", "minerva_math")


def benchmark_problems(params: Params) -> dict[str, Counter[str]]:
    """Items per normalised problem text of every evaluated benchmark (of data.source): keys
    `processbench/<subset>`, `prmbench` and the Best-of-N test set names."""
    out: dict[str, Counter[str]] = {f"processbench/{sub}": Counter() for sub in PROCESSBENCH_SUBSETS}
    for it in load_processbench(params.data):
        out.setdefault(f"processbench/{it.subset}", Counter())[normalize_problem(it.problem)] += 1
    out["prmbench"] = Counter(normalize_problem(it.modified_question) for it in load_prmbench(params.data))
    for name in BON_EVALUATED:
        out[name] = Counter(normalize_problem(p.problem) for p in load_bon_testset(params.data, name))
    return out


def decontamination_keys(names: Sequence[str], benchmarks: Iterable[str]) -> list[str]:
    """The benchmark keys a prepare.decontaminate list names (`processbench` = all its subsets)."""
    wanted = set(names)
    return [k for k in benchmarks if k in wanted or (k.startswith("processbench/") and "processbench" in wanted)]


def overlap_entry(items: Counter[str], trained: set[str], kept: set[str], removed: bool) -> dict[str, Any]:
    """Overlap of one benchmark with the training problems, before and after decontamination."""
    hit = set(items) & trained
    left = set(items) & kept
    return {
        "problems": len(hit),
        "items": sum(items[p] for p in hit),
        "benchmark_problems": len(items),
        "benchmark_items": sum(items.values()),
        "removed": removed,
        "remaining_problems": len(left),
        "remaining_items": sum(items[p] for p in left),
    }


def contamination_report(
    per_benchmark: dict[str, Counter[str]], trained: set[str], kept: set[str], removed_keys: Sequence[str]
) -> dict[str, Any]:
    """Overlap (normalised problem text) of training with each benchmark, grouped as the evaluation is."""
    entries = {k: overlap_entry(v, trained, kept, k in removed_keys) for k, v in per_benchmark.items()}
    return {
        "applicable": True,
        "training_problems": len(trained),
        "processbench": {k.split("/", 1)[1]: e for k, e in entries.items() if k.startswith("processbench/")},
        "prmbench": entries["prmbench"],
        "best_of_n": {k: entries[k] for k in BON_EVALUATED},
    }


def generated_contamination_report() -> dict[str, Any]:
    """The arithmetic domain's report: generated problems overlap no benchmark (nothing is loaded)."""
    zero = {"problems": 0, "items": 0}
    return {
        "applicable": False,
        "note": "generated arithmetic problems: no overlap with any benchmark by construction",
        "processbench": {sub: dict(zero) for sub in PROCESSBENCH_SUBSETS},
        "prmbench": dict(zero),
        "best_of_n": {name: dict(zero) for name in BON_EVALUATED},
    }


def decontaminate(
    samples: Sequence[StepSample], banned: set[str]
) -> tuple[list[StepSample], set[str], int]:
    """Drop samples whose problem is banned; return kept samples, removed problem ids, removed count."""
    kept: list[StepSample] = []
    removed_problems: set[str] = set()
    for s in samples:
        if normalize_problem(s.question) in banned:
            removed_problems.add(s.problem_id)
        else:
            kept.append(s)
    return kept, removed_problems, len(samples) - len(kept)


def cap(
    samples: Sequence[StepSample], max_problems: int | None, max_samples: int | None, seed: int
) -> list[StepSample]:
    """Seeded, deterministic caps: a sample of problems, then a sample of step samples (order kept)."""
    out = list(samples)
    if max_problems is not None:
        problems = sorted({s.problem_id for s in out})
        if len(problems) > max_problems:
            random.Random(f"{seed}:problems").shuffle(problems)
            keep = set(problems[:max_problems])
            out = [s for s in out if s.problem_id in keep]
    if max_samples is not None and len(out) > max_samples:
        idx = sorted(random.Random(f"{seed}:samples").sample(range(len(out)), max_samples))
        out = [out[i] for i in idx]
    return out


def split_by_problem(
    samples: Sequence[StepSample], val_fraction: float, seed: int
) -> tuple[list[StepSample], list[StepSample]]:
    """Train/validation split by problem: a seeded share of the problems goes to validation.

    With val_fraction > 0 and at least two problems, validation gets at least one problem
    and train keeps at least one.
    """
    problems = sorted({s.problem_id for s in samples})
    n_val = round(val_fraction * len(problems))
    if val_fraction > 0 and len(problems) >= 2:
        n_val = min(max(n_val, 1), len(problems) - 1)
    random.Random(f"{seed}:split").shuffle(problems)
    val_ids = set(problems[:n_val])
    train = [s for s in samples if s.problem_id not in val_ids]
    val = [s for s in samples if s.problem_id in val_ids]
    return train, val


def _label_counts(samples: Sequence[StepSample]) -> dict[str, int]:
    pos = sum(1 for s in samples if s.label)
    return {
        "samples": len(samples),
        "positives": pos,
        "negatives": len(samples) - pos,
        "problems": len({s.problem_id for s in samples}),
    }


def benchmark_source(params: Params) -> Source:
    """Where the evaluate stage's benchmarks come from: the full copy in data.dir (or the hub,
    already complete) when evaluate.full_benchmarks, else data.source."""
    if params.evaluate.full_benchmarks and params.data.source != "hub":
        return "dir"
    return params.data.source


def stage_benchmarks(params: Params) -> tuple[list[ProcessBenchItem], list[PRMBenchItem], dict[str, Any]]:
    """The ProcessBench and PRMBench items to evaluate, per evaluate.* params.

    Subsets and the R-PRM quick-eval selection always apply; the caps (max_per_subset,
    prmbench.max_items) apply unless evaluate.full_benchmarks.
    """
    ev = params.evaluate
    source = benchmark_source(params)
    full = ev.full_benchmarks
    pb = load_processbench(
        params.data,
        ev.processbench.subsets,
        None if full else ev.processbench.max_per_subset,
        ev.processbench.rprm_part_subset,
        source=source,
    )
    prmb = load_prmbench(params.data, None if full else ev.prmbench.max_items, source=source)
    info = {
        "source": source,
        "full": full,
        "processbench": {"items": len(pb), "per_subset": dict(Counter(it.subset for it in pb))},
        "prmbench": {"items": len(prmb), "per_class": dict(Counter(it.classification for it in prmb))},
    }
    return pb, prmb, info


def build(params: Params, labelled: Path = paths.LABELLED) -> Prepared:
    """Load, flatten, decontaminate, cap, split and stage benchmarks (plus the labelled solutions of
    folder `labelled`); nothing is written."""
    pp = params.prepare
    arith = params.domain.kind == "arithmetic"
    splits = arithmetic.problem_splits(params.domain.arithmetic) if arith else {}
    generated = (arithmetic.training_solutions(params.domain.arithmetic, splits["train"]) if arith
                 else load_prm800k(params.data))
    solutions = with_labelled(params.data, generated, labelled)
    samples, fc = flatten(solutions, pp.neutral_rating)
    all_problems = {problem_id(s.problem) for s in solutions}
    decon: dict[str, Any] = {"enabled": bool(pp.decontaminate) and not arith,
                             "benchmarks": [] if arith else list(pp.decontaminate),
                             "removed_problems": 0, "removed_samples": 0}
    contamination: dict[str, Any]
    heldout: list[ProcessBenchItem] = []
    heldout_kinds: dict[str, str] = {}
    bon_pool: list[CandidatePool] = []
    if arith:  # generated problems cannot be in MATH-500 or ProcessBench; held-out ones avoid training's
        solved = arithmetic.heldout_solutions(params.domain.arithmetic, splits["heldout"])
        heldout = [item for item, _ in solved]
        heldout_kinds = {item.id: kind for item, kind in solved if kind is not None}
        bon_pool = arithmetic.bon_pools(params.domain.arithmetic, splits["bon"])
        trained = {s.problem for s in solutions}
        if any(it.problem in trained for it in heldout) or any(p.problem in trained for p in bon_pool):
            raise DataError(labelled, None, "problem", "a labelled training problem is also a held-out "
                            "or Best-of-N problem of the arithmetic domain")
        decon["note"] = "generated domain: held-out and Best-of-N problems are disjoint from training by construction"
        contamination = generated_contamination_report()
    else:
        per_benchmark = benchmark_problems(params)
        keys = decontamination_keys(pp.decontaminate, per_benchmark)
        banned = set().union(*(per_benchmark[k] for k in keys))
        trained = {normalize_problem(s.problem) for s in solutions}
        if keys:
            samples, _, n_removed = decontaminate(samples, banned)
            hit = [s for s in solutions if normalize_problem(s.problem) in banned]
            decon.update(
                removed_problems=len({problem_id(s.problem) for s in hit}),
                removed_solutions=len(hit),
                removed_samples=n_removed,
                reference_problems={k: len(per_benchmark[k]) for k in keys},
            )
        contamination = contamination_report(per_benchmark, trained, trained - banned, keys)
    before_caps = len(samples)
    samples = cap(samples, pp.max_problems, pp.max_samples, pp.seed)
    if not samples:
        raise DataError(
            ", ".join(params.data.prm800k_files), None, None,
            "no step samples left after flattening, decontamination and caps",
        )
    train, val = split_by_problem(samples, pp.val_fraction, pp.seed)
    pb, prmb, bench = stage_benchmarks(params)
    dup = Counter((s.problem_id, tuple(s.previous_steps), s.now_step) for s in samples)
    report: dict[str, Any] = {
        "domain": params.domain.kind,
        "source": "generated" if arith else params.data.source,
        "files": [] if arith else list(params.data.prm800k_files),
        "solutions": len(solutions),
        "problems_read": len(all_problems),
        **_label_counts(samples),
        "train": _label_counts(train),
        "val": _label_counts(val),
        "decontamination": decon,
        "contamination": contamination,
        "neutral": {
            "rating": pp.neutral_rating,
            "mapped": fc.neutral_mapped,
            "dropped": fc.neutral_dropped,
        },
        "rated_completions": fc.rated,
        "unrated_skipped": fc.unrated_skipped,
        "stopped_at_wrong_step": fc.stopped_at_wrong_step,
        "steps_after_trajectory_end": fc.steps_after_end_ignored,
        "capped_samples": before_caps - len(samples),
        "repeated_samples": sum(n - 1 for n in dup.values() if n > 1),
        "benchmarks": bench,
    }
    if arith:
        report["heldout"] = {
            "items": len(heldout),
            "all_correct": sum(it.label == -1 for it in heldout),
            "first_error_at": dict(sorted(Counter(str(it.label) for it in heldout if it.label >= 0).items())),
        }
        report["bon_pool"] = {
            "problems": len(bon_pool),
            "candidates": sum(len(p.candidates) for p in bon_pool),
            "policy_correct_rate": sum(c.correct for p in bon_pool for c in p.candidates)
            / max(1, sum(len(p.candidates) for p in bon_pool)),
        }
        bench["out_of_domain"] = True
    return Prepared(train=train, val=val, processbench=pb, prmbench=prmb, report=report,
                    heldout=heldout, heldout_kinds=heldout_kinds, bon_pool=bon_pool)


def _print_counts(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prepare ({report['source']}: {', '.join(report['files'])})")
    table.add_column("split")
    for col in ("problems", "samples", "positives", "negatives"):
        table.add_column(col, justify="right")
    for name in ("train", "val"):
        r = report[name]
        table.add_row(name, *(str(r[c]) for c in ("problems", "samples", "positives", "negatives")))
    table.add_row("all", *(str(report[c]) for c in ("problems", "samples", "positives", "negatives")))
    d, n, b = report["decontamination"], report["neutral"], report["benchmarks"]
    console = Console()
    console.print(table)
    console.print(
        f"decontamination: removed {d['removed_problems']} problems / {d['removed_samples']} samples; "
        f"neutral ({n['rating']}): {n['mapped']} mapped, {n['dropped']} dropped; "
        f"unrated skipped: {report['unrated_skipped']}; capped: {report['capped_samples']}"
    )
    c = report["contamination"]
    if c["applicable"]:
        groups = {**{f"processbench/{k}": v for k, v in c["processbench"].items()},
                  "prmbench": c["prmbench"], **c["best_of_n"]}
        console.print("overlap with training (problems/items; remaining after decontamination): " + ", ".join(
            f"{k} {v['problems']}/{v['items']} ({v['remaining_problems']}/{v['remaining_items']})"
            for k, v in groups.items()))
    console.print(
        f"benchmarks ({b['source']}): ProcessBench {b['processbench']['items']} items "
        f"{b['processbench']['per_subset']}; PRMBench {b['prmbench']['items']} items"
    )


def input_paths(params: Params, labelled: Path) -> list[str]:
    """Local files and folders the stage reads (MLflow dataset inputs); hub datasets are not."""
    out: list[Path] = []
    local = params.data.source != "hub"
    root = source_root(params.data)
    if local and params.domain.kind != "arithmetic":
        out += [root / f for f in params.data.prm800k_files]
    if any(labelled.glob("*.jsonl")):
        out.append(labelled)
    if params.domain.kind != "arithmetic":  # the overlap with every evaluated benchmark is measured
        bon = source_root(params.data, "bundled" if not local else None) / "bon/testsets"
        out += [bon / BON_TESTSETS[name] for name in BON_EVALUATED]
        if local:
            out += [root / "processbench", root / paths.PRMBENCH_FILE]
    bench = benchmark_source(params)
    if bench != "hub":
        broot = source_root(params.data, bench)
        out += [broot / "processbench", broot / paths.PRMBENCH_FILE]
    return [str(p) for p in dict.fromkeys(out)]


# --------------------------------------------------------------------------------------
# Labelled data added for retraining (data/labelled; flows/retrain.py fills it)
# --------------------------------------------------------------------------------------


def load_labelled(data: DataParams, folder: str | Path) -> list[PRM800KSolution]:
    """PRM800K-format solutions of every `*.jsonl` in `folder` (either PRM800K line format)."""
    files = sorted(p.name for p in Path(folder).glob("*.jsonl"))
    if not files:
        return []
    return load_prm800k(data.model_copy(update={"source": "dir", "dir": str(folder)}), files)


def with_labelled(
    data: DataParams, solutions: list[PRM800KSolution], folder: str | Path
) -> list[PRM800KSolution]:
    """`solutions` plus those of `folder`; DataError on an id that is already used."""
    seen = {s.id for s in solutions}
    added = load_labelled(data, folder)
    for sol in added:
        if sol.id in seen:
            raise DataError(Path(folder) / sol.source, None, "id", f"solution id {sol.id!r} is already in the training data")
        seen.add(sol.id)
    return solutions + added


def run(params: Params, layout: Layout = Layout()) -> dict[str, Any]:
    """`rprm prepare`: build everything, then write the layout's outputs atomically and log to MLflow."""
    from components import tracking

    prepared = build(params, layout.labelled)  # every input validated before anything is written
    with tracking.stage_run("prepare", params, sections=["domain", "data", "prepare"],
                            inputs=input_paths(params, layout.labelled), root=layout.root):
        write_jsonl(layout.steps_train, prepared.train)
        write_jsonl(layout.steps_val, prepared.val)
        write_jsonl(layout.processbench, prepared.processbench)
        write_jsonl(layout.prmbench, prepared.prmbench)
        write_jsonl(layout.heldout, prepared.heldout)
        write_json(layout.heldout_kinds, prepared.heldout_kinds)
        write_jsonl(layout.bon_arithmetic, prepared.bon_pool)
        write_json(layout.prepare_counts, prepared.report)
        tracking.log_report(prepared.report, "prepare.json")
    _print_counts(prepared.report)
    return prepared.report
