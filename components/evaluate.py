"""The `evaluate` stage: ProcessBench and PRMBench with inference-time scaling and threshold curves.

For each model in `evaluate.models` (`models/<name>`; a model not trained yet is replaced by the
base model, and the report says so) the stage scores the prepared benchmark subsets
(`data/prepared/processbench.jsonl`, `data/prepared/prmbench.jsonl`) with the step scorer and
writes `reports/{processbench,prmbench,scaling}.json`, PNG figures in `plots/` (the DVC plots;
`components.plots`), the tables behind them (`plots/{scaling,threshold}.csv`), per-model StepScores and an official-format PRMBench results
file in `data/scores/<model>/`, and logs all of it to the stage's MLflow run with a table of
per-solution predictions.

K and the scaling sweep. `scoring.sampling.n` is the headline K (the reported numbers);
`evaluate.k_sweep` lists the other K of the scaling curve. Sampling happens ONCE, at
K_max = max(scoring.sampling.n, *k_sweep): analysis j of a step is drawn from its own seeded
stream (components.scoring.step_seed), so the first k of the K_max analyses are exactly the
analyses a run at K = k would draw, and every k of the sweep is read from the same samples.
The threshold sweep (`evaluate.thresholds`, plus `scoring.threshold`) reads the same rewards.

Early exit and the sweeps. The stage reports ProcessBench at the points (k, headline
threshold) for every k of the K sweep and (headline K, t) for every t of the threshold sweep.
With `evaluate.early_exit`, a solution stops being scored once the prediction at every one of
these points is determined, i.e. once for each point some scored step has a mean over its
first k analyses below that threshold (the first such step is then among the scored steps,
and later steps cannot change it). Stopping at the first step below the headline threshold at
the headline K alone would be wrong for the sweeps: a smaller k or a lower threshold can flag
a later step (rewards 0.4 then 0.2 at K = 4 but 0.6 then 0.3 at k = 1; at threshold 0.3 only
the second step is flagged). So every reported number equals the one full scoring gives; the
report states the generations this saved, and what a plain early exit at the headline
(K, threshold) alone would have needed. The price is set by the lowest threshold of the sweep:
a solution whose rewards never fall below it is scored to its end (with a tiny model whose
rewards sit between 0.3 and 0.45, the default sweep down to 0.3 scores every step while the
headline alone would skip most). Sweeping only thresholds at or above `scoring.threshold`, or
none (`evaluate.thresholds: []`), keeps the saving of the plain early exit; the K sweep costs
little extra. PRMBench needs a verdict for every step and is always scored fully.

Resume: scoring journals live in `data/scores/journals/` (a DVC output kept across runs),
one per evaluated model and benchmark, headed by everything the values depend on (model files,
backend, sampling, fallback; `components.journal`), so a crashed or interrupted stage resumes
where it stopped, a second requested model that falls back to the same base model reuses the
first one's work, and a changed setting starts the journal over.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from components import benchmarks, plots
from components.config import Params, ScoringParams
from components.io import (
    DataError,
    read_json_object,
    read_jsonl,
    stat_digest,
    write_json,
    write_jsonl,
)
from components.paths import Layout
from components.records import PRMBenchItem, ProcessBenchItem, Solution, processbench_subset
from components.scoring import ScoredSolution, StepScorer

console = Console(stderr=True)



@dataclass(frozen=True)
class SweepPlan:
    """The K and thresholds the stage reports, and the K it samples at."""

    k: int  # headline K (scoring.sampling.n)
    ks: list[int]  # every K reported (sweep plus headline), ascending
    threshold: float  # headline threshold (scoring.threshold)
    thresholds: list[float]  # every threshold reported, ascending

    @property
    def k_max(self) -> int:
        """The K sampled once."""
        return self.ks[-1]

    @property
    def points(self) -> list[tuple[int, float]]:
        """Every (k, threshold) whose ProcessBench prediction is reported."""
        return sorted({(k, self.threshold) for k in self.ks} | {(self.k, t) for t in self.thresholds})


def sweep_plan(params: Params) -> SweepPlan:
    """K and thresholds from params: the headline values plus the sweeps."""
    k = params.scoring.sampling.n
    if any(x < 1 for x in params.evaluate.k_sweep):
        raise ValueError(f"evaluate.k_sweep values must be >= 1, got {params.evaluate.k_sweep}")
    thresholds = sorted(set(params.evaluate.thresholds) | {params.scoring.threshold})
    if not all(0.0 <= t <= 1.0 for t in thresholds):
        raise ValueError(f"evaluate.thresholds must be in [0, 1], got {params.evaluate.thresholds}")
    return SweepPlan(k, sorted(set(params.evaluate.k_sweep) | {k}), params.scoring.threshold, thresholds)


def sampling_scoring(params: Params, plan: SweepPlan, benchmark: str = "processbench") -> ScoringParams:
    """Scoring params with sampling.n raised to the K sampled once (K_max); PRMBench takes
    evaluate.prmbench.sampling in place of scoring.sampling when that is set."""
    base = params.scoring.sampling
    if benchmark == "prmbench" and params.evaluate.prmbench.sampling is not None:
        base = params.evaluate.prmbench.sampling
    sampling = base.model_copy(update={"n": plan.k_max})
    return params.scoring.model_copy(update={"sampling": sampling})


def resolve_model(name: str, layout: Layout) -> tuple[Path, str]:
    """(model folder, name of the model actually evaluated): the base model if `name` is not built."""
    path = layout.model_dir(name)
    if (path / "config.json").exists():
        return path, name
    if name != "base" and (layout.base_model / "config.json").exists():
        return layout.base_model, "base"
    raise DataError(path, None, None, f"model {name!r} not found (and no base model): run the pipeline first")


def processbench_solutions(items: Sequence[ProcessBenchItem]) -> list[Solution]:
    """ProcessBench items as Solutions (gold first error and subset kept)."""
    return [
        Solution(id=it.id, question=it.problem, steps=it.steps, first_error=it.label,
                 subset=processbench_subset(it))
        for it in items
    ]


def prmbench_solution_id(item: PRMBenchItem, occurrence: int) -> str:
    """Unique solution id of a PRMBench item: its idx, plus `#n` for a repeated idx."""
    return item.idx if occurrence == 0 else f"{item.idx}#{occurrence}"


def prmbench_solutions(items: Sequence[PRMBenchItem]) -> list[Solution]:
    """PRMBench items as Solutions (the modified question and process).

    Built without validation: three official items contain a blank step, which the benchmark
    grades as is (the prompt then shows an empty Now Step), as upstream does.
    """
    occ = benchmarks.prmbench_occurrences(items)
    return [
        Solution.model_construct(
            id=prmbench_solution_id(it, o), question=it.modified_question, steps=list(it.modified_process),
            first_error=None, step_labels=None, subset=it.classification,
        )
        for it, o in zip(items, occ, strict=True)
    ]


def journal_path(scores: Path, model: str, bench: str) -> Path:
    """Scoring journal of (evaluated model, benchmark) under the scores folder; started over when
    its settings change."""
    return scores / "journals" / f"{model}-{bench}.jsonl"


# --------------------------------------------------------------------------------------
# Metrics from scored solutions
# --------------------------------------------------------------------------------------


def processbench_at(items: Sequence[ProcessBenchItem], scored: Sequence[ScoredSolution], subsets: Sequence[str],
                    k: int, threshold: float) -> dict[str, Any]:
    """ProcessBench metrics with rewards over the first k analyses at a threshold."""
    rows = []
    for it, s in zip(items, scored, strict=True):
        pred = s.first_error(threshold, k)
        if pred is None:
            raise RuntimeError(f"{it.id}: prediction at k={k}, threshold={threshold} not determined")
        rows.append((processbench_subset(it), it.label, pred))
    return benchmarks.processbench_metrics(rows, subsets)


def accuracy_by_error_kind(items: Sequence[ProcessBenchItem], scored: Sequence[ScoredSolution],
                           kinds: Mapping[str, str], k: int, threshold: float) -> dict[str, dict[str, Any]]:
    """Per kind of first error (`none`: all-correct solutions; `unknown`: an erroneous one `kinds` lacks),
    how many solutions there are and how many the PRM gets exactly right (ProcessBench's criterion)."""
    tally: dict[str, list[int]] = {}
    for it, s in zip(items, scored, strict=True):
        kind = "none" if it.label < 0 else kinds.get(it.id, "unknown")
        n_found = tally.setdefault(kind, [0, 0])
        n_found[0] += 1
        n_found[1] += s.first_error(threshold, k) == it.label
    return {kind: {"solutions": n, "found": found, "accuracy": 100.0 * found / n}
            for kind, (n, found) in sorted(tally.items())}


def processbench_cost(items: Sequence[ProcessBenchItem], scored: Sequence[ScoredSolution],
                      plan: SweepPlan, early_exit: bool) -> dict[str, Any]:
    """Steps and analyses used, against full scoring and a plain headline-only early exit."""
    total = sum(len(it.steps) for it in items)
    used = sum(len(s.values) for s in scored)
    needed = 0
    for s in scored:
        fe = s.first_error(plan.threshold, plan.k)
        needed += s.n_steps if fe in (-1, None) else fe + 1
    return {
        "early_exit": early_exit,
        "steps_total": total,
        "steps_scored": used,
        "steps_headline_early_exit": needed,
        "generations": used * plan.k_max,
        "generations_full": total * plan.k_max,
        "saved_fraction": 1 - used / total if total else None,
        "saved_fraction_headline_early_exit": 1 - needed / total if total else None,
        "fallbacks": sum(s.fallbacks() for s in scored),
        "dropped": sum(s.dropped() for s in scored),
    }


def prmbench_at(items: Sequence[PRMBenchItem], scored: Sequence[ScoredSolution], k: int, threshold: float,
                comparison: benchmarks.Comparison) -> dict[str, Any]:
    """PRMBench metrics (first occurrence of each idx, as upstream) at (k, threshold)."""
    rows = []
    for it, o, s in zip(items, benchmarks.prmbench_occurrences(items), scored, strict=True):
        if o == 0:
            rewards = [r for r in s.rewards(k) if r is not None]
            rows.append((it.classification, list(it.error_steps), benchmarks.step_labels(rewards, threshold, comparison)))
    report = benchmarks.prmbench_metrics(rows)
    report["duplicates_skipped"] = len(items) - len(rows)
    return report


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def verdict_reach(scored: Sequence[ScoredSolution]) -> dict[str, Any]:
    """Analyses that reached the verdict phrase in the generation pass (no fallback), and their share."""
    gens = sum(s.generations() for s in scored)
    fallbacks = sum(s.fallbacks() for s in scored)
    return {"generations": gens, "fallbacks": fallbacks,
            "verdict_reach_rate": (gens - fallbacks) / gens if gens else None}


def trivial_predictors(items: Sequence[ProcessBenchItem]) -> dict[str, Any]:
    """First-error F1 of the two predictors that read no step: "the first step is wrong", "no step is wrong"."""
    out = {}
    for name, pred in (("first_step_wrong", 0), ("no_step_wrong", -1)):
        m = benchmarks.processbench_subset_metrics([it.label for it in items], [pred] * len(items))
        out[name] = {"f1": m["f1"], "acc_erroneous": m["acc_erroneous"], "acc_correct": m["acc_correct"]}
    return out


def _load_heldout_kinds(layout: Layout) -> dict[str, str]:
    """The first-error kind of each erroneous held-out solution, as `prepare` wrote it ({} if absent)."""
    if not layout.heldout_kinds.exists():
        return {}
    kinds = read_json_object(layout.heldout_kinds)
    bad = next((k for k, v in kinds.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(layout.heldout_kinds, None, bad, "expected an error kind (a string) for each solution id")
    return kinds


def _load_heldout(layout: Layout) -> list[ProcessBenchItem]:
    """The in-domain held-out benchmark staged by `prepare` (empty outside the arithmetic domain)."""
    if not layout.heldout.exists():
        return []
    return read_jsonl(layout.heldout, ProcessBenchItem, key=lambda r: r.id, allow_empty=True)


def _load_benchmarks(layout: Layout) -> tuple[list[ProcessBenchItem], list[PRMBenchItem]]:
    for p in (layout.processbench, layout.prmbench):
        if not p.exists():
            raise DataError(p, None, None, "benchmark file not found: run `rprm prepare` first")
    pb = read_jsonl(layout.processbench, ProcessBenchItem, key=lambda r: r.id)
    prmb = read_jsonl(layout.prmbench, PRMBenchItem)
    return pb, prmb


def _prediction_rows(model: str, pb_items: Sequence[ProcessBenchItem], pb_scored: Sequence[ScoredSolution],
                     prmb_items: Sequence[PRMBenchItem], prmb_scored: Sequence[ScoredSolution], plan: SweepPlan,
                     prmb_threshold: float, comparison: benchmarks.Comparison) -> list[dict[str, Any]]:
    rows = []
    for it, s in zip(pb_items, pb_scored, strict=True):
        pred = s.first_error(plan.threshold, plan.k)
        rows.append({
            "model": model, "benchmark": "processbench", "id": it.id, "group": processbench_subset(it),
            "label": str(it.label), "prediction": str(pred), "correct": pred == it.label,
            "steps": s.n_steps, "steps_scored": len(s.values), "generations": s.generations(),
            "fallbacks": s.fallbacks(),
            "step_rewards": json.dumps([None if r is None else round(r, 4) for r in s.rewards(plan.k)]),
        })
    for it, s in zip(prmb_items, prmb_scored, strict=True):
        rewards = [r for r in s.rewards(plan.k) if r is not None]
        labels = benchmarks.step_labels(rewards, prmb_threshold, comparison)
        wrong = [i + 1 for i, ok in enumerate(labels) if not ok]
        gold = {e for e in it.error_steps if e <= len(labels)}
        rows.append({
            "model": model, "benchmark": "prmbench", "id": s.id, "group": it.classification,
            "label": json.dumps(sorted(gold)), "prediction": json.dumps(wrong), "correct": set(wrong) == gold,
            "steps": s.n_steps, "steps_scored": len(s.values), "generations": s.generations(),
            "fallbacks": s.fallbacks(), "step_rewards": json.dumps([round(r, 4) for r in rewards]),
        })
    return rows


def _evaluate_model(params: Params, name: str, plan: SweepPlan, pb_items: list[ProcessBenchItem],
                    prmb_items: list[PRMBenchItem], subsets: list[str],
                    heldout_items: list[ProcessBenchItem], heldout_kinds: Mapping[str, str],
                    layout: Layout) -> dict[str, Any]:
    from components.backends import load_backend

    ev = params.evaluate
    path, evaluated = resolve_model(name, layout)
    if evaluated != name:
        console.print(f"[yellow]model {name!r} not found at {layout.model_dir(name)}: evaluating the base model "
                      f"({path}) in its place[/yellow]")
    scoring = sampling_scoring(params, plan)
    prmb_scoring = sampling_scoring(params, plan, "prmbench")
    tag = f"{evaluated}:{stat_digest(path)}:{params.model.dtype}"
    backend = load_backend(params.backend, path, dtype=params.model.dtype)
    try:
        heldout_scored = StepScorer(
            backend, scoring, ev.early_exit, exit_points=plan.points,
            journal=journal_path(layout.scores, evaluated, "heldout"), journal_tag=tag, on_stale="restart",
            desc=f"{name} held-out",
        ).score_detailed(processbench_solutions(heldout_items)) if heldout_items else []
        pb_scored = StepScorer(
            backend, scoring, ev.early_exit, exit_points=plan.points,
            journal=journal_path(layout.scores, evaluated, "processbench"), journal_tag=tag, on_stale="restart",
            desc=f"{name} processbench",
        ).score_detailed(processbench_solutions(pb_items))
        prmb_scored = StepScorer(
            backend, prmb_scoring, False, journal=journal_path(layout.scores, evaluated, "prmbench"),
            journal_tag=tag, on_stale="restart",
            desc=f"{name} prmbench",
        ).score_detailed(prmbench_solutions(prmb_items))
    finally:
        backend.close()

    info = {"model": name, "evaluated_model": evaluated, "model_path": str(path), "substituted": evaluated != name}
    thr, cmp_ = ev.prmbench.threshold, ev.prmbench.comparison
    pb = {**info, "k": plan.k, "threshold": plan.threshold,
          **processbench_at(pb_items, pb_scored, subsets, plan.k, plan.threshold),
          **verdict_reach(pb_scored),
          "cost": processbench_cost(pb_items, pb_scored, plan, ev.early_exit)}
    heldout: dict[str, Any] = {}
    if heldout_items:
        hsubsets = sorted({processbench_subset(it) for it in heldout_items})
        at = processbench_at(heldout_items, heldout_scored, hsubsets, plan.k, plan.threshold)
        heldout = {**info, "k": plan.k, "threshold": plan.threshold, "f1": at["avg_f1"],
                   **({k: v for k, v in at["subsets"][hsubsets[0]].items() if k != "f1"} if len(hsubsets) == 1 else {}),
                   "subsets": at["subsets"], **verdict_reach(heldout_scored),
                   "f1_vs_k": {str(k): processbench_at(heldout_items, heldout_scored, hsubsets, k, plan.threshold)["avg_f1"]
                               for k in plan.ks},
                   "f1_vs_threshold": {f"{t:g}": processbench_at(heldout_items, heldout_scored, hsubsets, plan.k, t)["avg_f1"]
                                       for t in plan.thresholds},
                   "cost": processbench_cost(heldout_items, heldout_scored, plan, ev.early_exit),
                   "by_first_error_kind": accuracy_by_error_kind(heldout_items, heldout_scored, heldout_kinds,
                                                                 plan.k, plan.threshold)}
    prmb = {**info, "k": plan.k, "threshold": thr, "comparison": cmp_,
            **prmbench_at(prmb_items, prmb_scored, plan.k, thr, cmp_),
            **verdict_reach(prmb_scored)}
    scaling = {
        "processbench_k": {str(k): _curve_point(processbench_at(pb_items, pb_scored, subsets, k, plan.threshold))
                           for k in plan.ks},
        "processbench_threshold": {f"{t:g}": _curve_point(processbench_at(pb_items, pb_scored, subsets, plan.k, t))
                                   for t in plan.thresholds},
        "prmbench_k": {str(k): prmbench_at(prmb_items, prmb_scored, k, thr, cmp_)["prmscore"] for k in plan.ks},
        "prmbench_threshold": {f"{t:g}": prmbench_at(prmb_items, prmb_scored, plan.k, t, cmp_)["prmscore"]
                               for t in plan.thresholds},
    }

    out = layout.scores / name
    write_jsonl(out / "processbench.jsonl", (s.to_step_scores(plan.threshold, plan.k) for s in pb_scored))
    write_jsonl(out / "heldout.jsonl", (s.to_step_scores(plan.threshold, plan.k) for s in heldout_scored))
    write_jsonl(out / "prmbench.jsonl", (s.to_step_scores(thr, plan.k) for s in prmb_scored))
    write_jsonl(out / "prmbench_results.jsonl", (
        benchmarks.prmbench_result_line(it, [r for r in s.rewards(plan.k) if r is not None], thr, cmp_)
        for it, s in zip(prmb_items, prmb_scored, strict=True)
    ))
    rows = _prediction_rows(name, pb_items, pb_scored, prmb_items, prmb_scored, plan, thr, cmp_)
    if heldout:
        def num(x: float | None) -> str:
            return "-" if x is None else f"{x:.1f}"

        console.print(f"{name}: held-out ({len(heldout_items)} solutions) first-error F1 {num(heldout['f1'])} "
                      f"(erroneous {num(heldout.get('acc_erroneous'))}, correct {num(heldout.get('acc_correct'))}), "
                      f"verdict reach {_pct(heldout['verdict_reach_rate'])}")
        console.print(f"{name}: found exactly, by first error: " + ", ".join(
            f"{kind} {v['found']}/{v['solutions']}" for kind, v in heldout["by_first_error_kind"].items()))
    console.print(benchmarks.processbench_table(pb, f"ProcessBench: {name} (K={plan.k}, threshold {plan.threshold})"))
    console.print(benchmarks.prmbench_table(prmb, f"PRMBench: {name} (K={plan.k}, score {cmp_} {thr})"))
    c = pb["cost"]
    console.print(f"{name}: ProcessBench scored {c['steps_scored']}/{c['steps_total']} steps "
                  f"({c['generations']} analyses; early exit saved {_pct(c['saved_fraction'])}, a headline-only "
                  f"early exit would save {_pct(c['saved_fraction_headline_early_exit'])})")
    return {"processbench": pb, "prmbench": prmb, "heldout": heldout, "scaling": scaling, "rows": rows}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _curve_point(report: dict[str, Any]) -> dict[str, Any]:
    return {"avg_f1": report["avg_f1"], "subsets": {s: r["f1"] for s, r in report["subsets"].items()}}


def _write_plots(models: list[str], scaling: dict[str, Any], prmb: dict[str, Any], subsets: list[str],
                 plan: SweepPlan, pb_counts: dict[str, int], thr: float, cmp_: str, folder: Path) -> list[Path]:
    """The CSV tables (plain outputs) and PNG figures (the DVC plots) of the evaluate stage, in `folder`."""
    head = models[-1]
    k_rows, t_rows = [], []
    for k in plan.ks:
        point = scaling[head]["processbench_k"][str(k)]
        row = {"k": k, "f1_avg": point["avg_f1"], "model": head, **{f"f1_{s}": point["subsets"][s] for s in subsets}}
        row.update({f"f1_avg_{m}": scaling[m]["processbench_k"][str(k)]["avg_f1"] for m in models})
        row.update({f"prmscore_{m}": scaling[m]["prmbench_k"][str(k)] for m in models})
        k_rows.append(row)
    for t in plan.thresholds:
        point = scaling[head]["processbench_threshold"][f"{t:g}"]
        row = {"threshold": t, "f1_avg": point["avg_f1"], "model": head,
               **{f"f1_{s}": point["subsets"][s] for s in subsets}}
        row.update({f"f1_avg_{m}": scaling[m]["processbench_threshold"][f"{t:g}"]["avg_f1"] for m in models})
        row.update({f"prmscore_{m}": scaling[m]["prmbench_threshold"][f"{t:g}"] for m in models})
        t_rows.append(row)
    extra = [f"f1_{s}" for s in subsets] + [f"f1_avg_{m}" for m in models] + [f"prmscore_{m}" for m in models]
    out = [
        plots.write_csv(folder / "scaling.csv", k_rows, ["k", "f1_avg", "model", *extra]),
        plots.write_csv(folder / "threshold.csv", t_rows, ["threshold", "f1_avg", "model", *extra]),
    ]
    n_pb = sum(pb_counts.values())
    per_subset = ", ".join(f"{s} {pb_counts.get(s, 0)}" for s in subsets)
    reward = f"step reward = mean P(Yes) over K analyses; first error = first step below {plan.threshold:g}"
    k_note = (f"n = {n_pb} ProcessBench solutions ({per_subset})\n{reward}\n"
              f"dashed: per-subset F1 of {head}")
    k_series: dict[str, dict[float, float | None]] = {
        f"{m} avg": {k: scaling[m]["processbench_k"][str(k)]["avg_f1"] for k in plan.ks} for m in models
    }
    k_series.update({f"{head} {s} (n={pb_counts.get(s, 0)})": {k: scaling[head]["processbench_k"][str(k)]["subsets"][s]
                                                               for k in plan.ks} for s in subsets})
    dashed = [f"{head} {s} (n={pb_counts.get(s, 0)})" for s in subsets]
    out.append(plots.line_plot(k_series, folder / "scaling.png",
                               title=f"ProcessBench first-error F1 vs sampled analyses K — models {', '.join(models)}",
                               x_label="K (analyses per step)", y_label="F1 (0-100)", log2_x=True,
                               dashed=dashed, note=k_note, y_bounds=(0.0, 100.0)))
    t_series: dict[str, dict[float, float | None]] = {
        f"{m} avg": {t: scaling[m]["processbench_threshold"][f"{t:g}"]["avg_f1"] for t in plan.thresholds}
        for m in models
    }
    t_series.update({f"{head} {s} (n={pb_counts.get(s, 0)})": {
        t: scaling[head]["processbench_threshold"][f"{t:g}"]["subsets"][s] for t in plan.thresholds} for s in subsets})
    t_note = (f"n = {n_pb} ProcessBench solutions ({per_subset})\nstep reward = mean P(Yes) over K={plan.k} "
              f"analyses; first error = first step below the threshold\ndashed: per-subset F1 of {head}")
    out.append(plots.line_plot(t_series, folder / "threshold.png",
                               title=f"ProcessBench first-error F1 vs threshold (K={plan.k}) — models {', '.join(models)}",
                               x_label="threshold", y_label="F1 (0-100)", dashed=dashed, note=t_note,
                               y_bounds=(0.0, 100.0)))
    some = next(iter(prmb.values()), {})
    class_items = {c: v.get("items") for c, v in (some.get("classes") or {}).items()}
    bars = {
        m: {f"overall (n={r.get('n_items')})": r["prmscore"], **r["groups"],
            **{f"{c} (n={class_items.get(c)})": v["prmscore"] for c, v in r["classes"].items()}}
        for m, r in prmb.items()
    }
    prm_note = (f"n = {some.get('n_items')} PRMBench items, {some.get('n_steps')} steps; step label = "
                f"mean P(Yes) over K={plan.k} analyses {cmp_} {thr:g}\ngroups average their classes")
    out.append(plots.bar_plot(bars, folder / "prmbench.png",
                              title=f"PRMBench PRMScore per class (K={plan.k}) — models {', '.join(prmb)}",
                              y_label="PRMScore (0-1)", note=prm_note, y_bounds=(0.0, 1.0)))
    return out


def run(params: Params, layout: Layout = Layout()) -> dict[str, Any]:
    """Evaluate every model of evaluate.models; write reports, plots and scores (in `layout`); log to MLflow."""
    from components import tracking

    ev = params.evaluate
    if not ev.models:
        raise DataError("params", None, "evaluate.models", "no model to evaluate")
    plan = sweep_plan(params)
    pb_items, prmb_items = _load_benchmarks(layout)
    heldout_items = _load_heldout(layout)
    heldout_kinds = _load_heldout_kinds(layout) if heldout_items else {}
    seen = {processbench_subset(it) for it in pb_items}
    subsets = [s for s in ev.processbench.subsets if s in seen] + sorted(seen - set(ev.processbench.subsets))
    held_inputs = [p for p in (layout.heldout, layout.heldout_kinds) if p.exists()] if heldout_items else []
    inputs = [layout.processbench, layout.prmbench, *held_inputs,
              *dict.fromkeys(resolve_model(m, layout)[0] for m in ev.models)]
    with tracking.stage_run("evaluate", params, sections=["backend", "scoring", "evaluate"], inputs=inputs,
                            root=layout.root):
        results = {m: _evaluate_model(params, m, plan, pb_items, prmb_items, subsets, heldout_items,
                                      heldout_kinds, layout)
                   for m in dict.fromkeys(ev.models)}
        models = list(results)
        head = models[-1]
        out_of_domain = params.domain.kind != "prm800k"
        pb_report = {
            "processbench_avg_f1": results[head]["processbench"]["avg_f1"],
            "headline_model": head, "k": plan.k, "k_sampled": plan.k_max, "threshold": plan.threshold,
            "out_of_domain": out_of_domain,
            "models": {m: r["processbench"] for m, r in results.items()},
        }
        prmb_report = {
            "prmbench_prmscore": results[head]["prmbench"]["prmscore"],
            "headline_model": head, "k": plan.k, "threshold": ev.prmbench.threshold,
            "comparison": ev.prmbench.comparison,
            "sampling": sampling_scoring(params, plan, "prmbench").sampling.model_dump(mode="json")
            | {"n": plan.k, "source": "scoring.sampling" if ev.prmbench.sampling is None else "evaluate.prmbench.sampling"},
            "models": {m: r["prmbench"] for m, r in results.items()},
        }
        scaling = {m: r["scaling"] for m, r in results.items()}
        scaling_report = {"ks": plan.ks, "thresholds": plan.thresholds, "k": plan.k, "threshold": plan.threshold,
                          "models": scaling}
        write_json(layout.report("processbench.json"), pb_report)
        write_json(layout.report("prmbench.json"), prmb_report)
        write_json(layout.report("scaling.json"), scaling_report)
        heldout_report: dict[str, Any] = {"domain": params.domain.kind, "items": len(heldout_items)}
        if heldout_items:
            heldout_report.update({
                "heldout_f1": results[head]["heldout"]["f1"], "headline_model": head, "k": plan.k,
                "threshold": plan.threshold, "trivial_predictors": trivial_predictors(heldout_items),
                "models": {m: r["heldout"] for m, r in results.items()},
            })
        write_json(layout.report("heldout.json"), heldout_report)
        pb_counts = Counter(processbench_subset(it) for it in pb_items)
        figures = _write_plots(models, scaling, {m: r["prmbench"] for m, r in results.items()}, subsets, plan,
                               dict(pb_counts), ev.prmbench.threshold, ev.prmbench.comparison, layout.plots)
        if not heldout_items:  # a DVC output on every domain: say there is nothing to show
            figures.append(plots.line_plot({}, layout.plot("heldout_scaling.png"), x_label="K (analyses per step)", y_label="F1",
                                           title=f"No in-domain held-out benchmark on domain {params.domain.kind!r}",
                                           note="n = 0 solutions: nothing to plot"))
        else:
            figures.append(plots.line_plot(
                {f"{m} ({results[m]['heldout']['evaluated_model']})" if results[m]["heldout"]["substituted"] else m:
                 {k: results[m]["heldout"]["f1_vs_k"][str(k)] for k in plan.ks} for m in models},
                layout.plot("heldout_scaling.png"),
                title=f"Held-out {params.domain.kind} first-error F1 vs K — models {', '.join(models)}",
                x_label="K (analyses per step)", y_label="F1 (0-100)", log2_x=True, y_bounds=(0.0, 100.0),
                note=(f"n = {len(heldout_items)} solutions ({sum(1 for it in heldout_items if it.label >= 0)} with "
                      f"an error, {sum(1 for it in heldout_items if it.label < 0)} all correct)\n"
                      f"step reward = mean P(Yes) over K analyses; first error = first step below "
                      f"{plan.threshold:g}\nbetter trivial predictor: F1 "
                      f"{max((t['f1'] or 0.0) for t in heldout_report['trivial_predictors'].values()):.1f}"),
            ))

        tracking.log_report(pb_report, "reports/processbench.json")
        tracking.log_report(prmb_report, "reports/prmbench.json")
        tracking.log_report(scaling_report, "reports/scaling.json")
        tracking.log_report(heldout_report, "reports/heldout.json")
        for m in models:
            for k in plan.ks:
                f1 = scaling[m]["processbench_k"][str(k)]["avg_f1"]
                if f1 is not None:
                    tracking.log_metric(f"{m}.processbench_avg_f1_vs_k", f1, step=k)
        for f in figures:
            tracking.log_artifact(f, artifact_path="plots")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MLflow's schema hint about integer columns
            tracking.log_table([row for r in results.values() for row in r["rows"]], "predictions.json")
    return {"processbench": pb_report, "prmbench": prmb_report, "scaling": scaling_report, "heldout": heldout_report}
