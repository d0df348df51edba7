"""ProcessBench and PRMBench metrics (docs/method.md §10) and the scoring commands.

Pure metric functions first, then readers that validate a predictions / results file against a
benchmark (loaded by `components.data`), then the two CLI entry points (`rprm score-processbench`,
`rprm score-prmbench`).

ProcessBench (QwenLM/ProcessBench `run_eval.py`): per subset, `acc_erroneous` =
100 x share of samples with label != -1 whose predicted first error equals the label,
`acc_correct` the same over label == -1, `f1` their harmonic mean; `avg_f1` the unweighted
mean over subsets. The predicted first error is the first step with reward < threshold
(strict), else -1. Undefined values are reported as null, never a crash:
- a subset without erroneous (or without correct) samples has a null accuracy for that side
  and a null F1 (the harmonic mean needs both);
- both accuracies 0 gives F1 = 0 (the limit of the harmonic mean; the official code divides by
  zero there);
- `avg_f1` is the mean over the subsets whose F1 is defined (listed in `avg_over`); null when
  none is. On the complete benchmark every subset is defined, so it is the paper's number.

PRMBench (ssmisya/PRMBench `prmtest_classified/task.py`): per item, E = the 0-based
set of `error_steps` (given 1-based); for each judged step i: i not in E and label True -> TP,
not in E and False -> FN, in E and False -> TN, in E and True -> FP (an error step beyond the
solution's length simply never matches, as upstream). Precision/recall/F1 and the negative ones
are computed exactly as upstream, -1 where a ratio is undefined. PRMScore = 0.5 F1 + 0.5
negative F1, except `multi_solutions` = F1 only. Groups are plain means of their classes'
PRMScores; `overall` is computed on the pooled confusion matrix of every item of the nine
classes (not the mean of the groups). Like the official loader, only the first item of an idx
that occurs several times is scored (five `multi_solutions` idx are duplicated in the preview
data); the others are counted in `duplicates_skipped`. Scores are fractions in [0, 1], as the
official evaluator reports them.

Scoring files from any PRM: two modes (`--mode`), and every report says which one was used.
- `threshold` (default): decisions are remade from the file's scores with our threshold:
  ProcessBench's first error from `step_rewards` (a line with only `first_error` keeps it),
  PRMBench's step labels from `step_level_validity_scores` (`label = score >= threshold`, or `>`;
  a line with only labels keeps them);
- `file`: the file's own decisions, as the official evaluators read them; the threshold is
  ignored: ProcessBench's `first_error` per line (QwenLM's `run_eval.py` compares the PRM's
  predicted index), PRMBench's `step_level_validity_labels` (ssmisya/PRMBench's `task.py` reads
  only the labels). A line without them is an error naming file, line and field.
The report's `mode` and `threshold` (null in `file` mode) say what was done, and
`prediction_source` / `label_source` count where each line's decision came from.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from components.data import load_prmbench_file, load_processbench_file
from components.io import DataError, iter_json_lines, write_json
from components.records import (
    PRMBENCH_CLASSES,
    PRMBENCH_GROUPS,
    PROCESSBENCH_SUBSETS,
    PRMBenchItem,
    ProcessBenchItem,
    processbench_subset,
)
from components.scoring import step_is_wrong

POSITIVE_F1_ONLY = frozenset({"multi_solutions"})
REDUNDANCY_CLASSES = frozenset({"redundency", "circular"})

Comparison = Literal[">=", ">"]
ScoreMode = Literal["threshold", "file"]
SCORE_MODES: tuple[str, ...] = ("threshold", "file")


# --------------------------------------------------------------------------------------
# ProcessBench
# --------------------------------------------------------------------------------------


def predict_first_error(step_rewards: Sequence[float | None], threshold: float) -> int:
    """First step with reward < threshold (strict), else -1.

    A null reward (a step an early exit did not score) is allowed only after a step below the
    threshold; reaching one earlier raises ValueError, since the prediction is then unknown.
    """
    for i, r in enumerate(step_rewards):
        if r is None:
            raise ValueError(f"step {i} was not scored and no earlier step is below {threshold}")
        if step_is_wrong(r, threshold):
            return i
    return -1


def _pct(hits: int, n: int) -> float | None:
    return 100.0 * hits / n if n else None


def harmonic_f1(acc_erroneous: float | None, acc_correct: float | None) -> float | None:
    """Harmonic mean of the two accuracies; null if either is null, 0 if both are 0."""
    if acc_erroneous is None or acc_correct is None:
        return None
    if acc_erroneous + acc_correct == 0:
        return 0.0
    return 2.0 * acc_erroneous * acc_correct / (acc_erroneous + acc_correct)


def processbench_subset_metrics(labels: Sequence[int], preds: Sequence[int]) -> dict[str, Any]:
    """Accuracy on erroneous and on correct samples (x100), their F1, counts; nulls if undefined."""
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    err = [p == g for g, p in zip(labels, preds, strict=True) if g != -1]
    cor = [p == g for g, p in zip(labels, preds, strict=True) if g == -1]
    acc_err, acc_cor = _pct(sum(err), len(err)), _pct(sum(cor), len(cor))
    return {
        "n": len(labels),
        "n_erroneous": len(err),
        "n_correct": len(cor),
        "acc_erroneous": acc_err,
        "acc_correct": acc_cor,
        "f1": harmonic_f1(acc_err, acc_cor),
    }


def processbench_metrics(
    rows: Iterable[tuple[str, int, int]], subsets: Sequence[str] | None = None
) -> dict[str, Any]:
    """Per-subset metrics and the unweighted average F1 from (subset, label, prediction) rows.

    `subsets` fixes the reported subsets and their order (a listed subset without rows is
    reported with nulls); by default the subsets seen, official ones first.
    """
    by_subset: dict[str, tuple[list[int], list[int]]] = {}
    for subset, label, pred in rows:
        labels, preds = by_subset.setdefault(subset, ([], []))
        labels.append(label)
        preds.append(pred)
    if subsets is None:
        subsets = [s for s in PROCESSBENCH_SUBSETS if s in by_subset]
        subsets += sorted(s for s in by_subset if s not in PROCESSBENCH_SUBSETS)
    else:
        unknown = sorted(set(by_subset) - set(subsets))
        if unknown:
            raise ValueError(f"rows for subsets not requested: {unknown}")
    report = {s: processbench_subset_metrics(*by_subset.get(s, ([], []))) for s in subsets}
    defined = [s for s in subsets if report[s]["f1"] is not None]
    avg = sum(report[s]["f1"] for s in defined) / len(defined) if defined else None
    return {
        "subsets": report,
        "avg_f1": avg,
        "avg_over": defined,
        "n": sum(r["n"] for r in report.values()),
    }


# --------------------------------------------------------------------------------------
# PRMBench
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Confusion:
    """Step-level confusion counts; positive = step judged correct."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn)


def step_confusion(error_steps: Iterable[int], labels: Sequence[bool]) -> Confusion:
    """Confusion of one item: `error_steps` 1-based, `labels[i]` True = step i judged correct."""
    errors = {e - 1 for e in error_steps}
    tp = fp = tn = fn = 0
    for i, ok in enumerate(labels):
        if i in errors:
            if ok:
                fp += 1
            else:
                tn += 1
        elif ok:
            tp += 1
        else:
            fn += 1
    return Confusion(tp, fp, tn, fn)


def _ratio(num: int, den: int) -> float:
    return num / den if den != 0 else -1.0


def _f1(precision: float, recall: float) -> float:
    # Upstream arithmetic kept on purpose (an undefined ratio is -1 and enters the formula):
    # both undefined -> -1; one undefined (the other is then 0) -> 0; both 0 -> -1.
    return 2 * precision * recall / (precision + recall) if (precision + recall) != 0 else -1.0


def f1_scores(c: Confusion) -> dict[str, float]:
    """Precision, recall, F1 and their negative-class versions, as PRMBench computes them."""
    p, r = _ratio(c.tp, c.tp + c.fp), _ratio(c.tp, c.tp + c.fn)
    np_, nr = _ratio(c.tn, c.tn + c.fn), _ratio(c.tn, c.tn + c.fp)
    return {
        "precision": p,
        "recall": r,
        "f1": _f1(p, r),
        "negative_precision": np_,
        "negative_recall": nr,
        "negative_f1": _f1(np_, nr),
    }


def prmscore(c: Confusion, classification: str | None = None) -> float:
    """0.5 F1 + 0.5 negative F1; positive F1 only for `multi_solutions`."""
    s = f1_scores(c)
    if classification in POSITIVE_F1_ONLY:
        return s["f1"]
    return 0.5 * s["f1"] + 0.5 * s["negative_f1"]


def step_labels(scores: Sequence[float], threshold: float, comparison: Comparison = ">=") -> list[bool]:
    """Step judged correct iff score >= threshold (R-PRM) or > threshold (PRMBench's models)."""
    if comparison == ">=":
        return [s >= threshold for s in scores]
    if comparison == ">":
        return [s > threshold for s in scores]
    raise ValueError(f"comparison must be '>=' or '>', got {comparison!r}")


def _confusion_dict(c: Confusion) -> dict[str, int]:
    return {"tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn}


def prmbench_metrics(items: Iterable[tuple[str, Sequence[int], Sequence[bool]]]) -> dict[str, Any]:
    """PRMScore overall, per class and per group from (classification, error_steps, labels).

    Rows of class `correct` (the official loader's extra items) are reported as their own class
    but never enter the overall score or a group. A group averages the classes present; a group
    with no class present is null.
    """
    per_class: dict[str, Confusion] = {}
    items_per_class: Counter[str] = Counter()
    pooled = Confusion()
    for classification, error_steps, labels in items:
        c = step_confusion(error_steps, labels)
        per_class[classification] = per_class.get(classification, Confusion()) + c
        items_per_class[classification] += 1
        if classification != "correct":
            pooled = pooled + c
    classes: dict[str, Any] = {}
    order = [c for c in PRMBENCH_CLASSES if c in per_class] + sorted(
        c for c in per_class if c not in PRMBENCH_CLASSES
    )
    for name in order:
        c = per_class[name]
        classes[name] = {
            "prmscore": prmscore(c, name),
            "items": items_per_class[name],
            **f1_scores(c),
            **_confusion_dict(c),
        }
    groups: dict[str, float | None] = {}
    for group, members in PRMBENCH_GROUPS.items():
        present = [classes[m]["prmscore"] for m in members if m in classes]
        groups[group] = sum(present) / len(present) if present else None
    n_items = sum(v for k, v in items_per_class.items() if k != "correct")
    return {
        "prmscore": prmscore(pooled) if n_items else None,
        "overall": {**f1_scores(pooled), **_confusion_dict(pooled)} if n_items else None,
        "groups": groups,
        "classes": classes,
        "classes_missing": [c for c in PRMBENCH_CLASSES if c not in classes],
        "n_items": n_items,
        "n_steps": pooled.tp + pooled.fp + pooled.tn + pooled.fn,
    }


def prmbench_occurrences(items: Sequence[PRMBenchItem]) -> list[int]:
    """For each item, how many earlier items share its idx (0 for the first occurrence)."""
    seen: Counter[str] = Counter()
    out = []
    for item in items:
        out.append(seen[item.idx])
        seen[item.idx] += 1
    return out


# --------------------------------------------------------------------------------------
# Predictions / results files (any PRM)
# --------------------------------------------------------------------------------------


def _line_key(obj: Any, field: str, path: Path, line: int) -> str:
    """The string `field` of a line's JSON object; DataError naming file, line and field otherwise."""
    if not isinstance(obj, dict):
        raise DataError(path, line, None, f"expected a JSON object, got {type(obj).__name__}")
    value = obj.get(field)
    if not isinstance(value, str):
        raise DataError(path, line, field, f"missing or non-string {field} ({value!r})")
    return value


def _check_scores(values: Any, n_steps: int, path: Path, line: int, field: str, who: str,
                  allow_null: bool) -> list[float | None]:
    if not isinstance(values, list):
        raise DataError(path, line, field, f"{who}: expected a list of step scores, got {type(values).__name__}")
    if len(values) != n_steps:
        raise DataError(path, line, field, f"{who}: {len(values)} step scores, but the solution has {n_steps} steps")
    out: list[float | None] = []
    for j, v in enumerate(values):
        if v is None and allow_null:
            out.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DataError(path, line, f"{field}[{j}]", f"{who}: step score must be a number, got {v!r}")
        if math.isnan(v):
            raise DataError(path, line, f"{field}[{j}]", f"{who}: step score is NaN")
        if not 0.0 <= v <= 1.0:
            raise DataError(path, line, f"{field}[{j}]", f"{who}: step score {v!r} is outside [0, 1]")
        out.append(float(v))
    return out


def read_processbench_predictions(
    path: str | Path, items: Sequence[ProcessBenchItem], threshold: float, mode: ScoreMode = "threshold",
    sources: Counter[str] | None = None,
) -> dict[str, int]:
    """Validate a predictions file against the benchmark and return the predicted first errors.

    One JSON object per line with `id` and either `step_rewards` (one score in [0, 1] per step;
    null allowed only after a step below the threshold, as an early exit leaves them) or
    `first_error` (-1 or a 0-based step index). In `threshold` mode `step_rewards` wins when both
    are present (a StepScores file is a valid predictions file); in `file` mode `first_error` is
    required and used, the threshold ignored. `sources`, when given, counts the lines decided by
    each field. Unknown, duplicate or missing ids, a wrong number of scores, a NaN or
    out-of-range score: DataError naming file, line and id.
    """
    path = Path(path)
    if mode not in SCORE_MODES:
        raise DataError(path, None, None, f"mode must be one of {SCORE_MODES}, got {mode!r}")
    by_id = {it.id: it for it in items}
    preds: dict[str, int] = {}
    lines: dict[str, int] = {}
    for line, obj in iter_json_lines(path):
        sid = _line_key(obj, "id", path, line)
        who = f"id {sid!r}"
        item = by_id.get(sid)
        if item is None:
            raise DataError(path, line, "id", f"unknown id {sid!r} (not in the benchmark)")
        if sid in preds:
            raise DataError(path, line, "id", f"duplicate id {sid!r} (first on line {lines[sid]})")
        n = len(item.steps)
        if mode == "threshold" and "step_rewards" in obj and obj["step_rewards"] is not None:
            rewards = _check_scores(obj["step_rewards"], n, path, line, "step_rewards", who, allow_null=True)
            try:
                pred = predict_first_error(rewards, threshold)
            except ValueError as err:
                raise DataError(path, line, "step_rewards", f"{who}: {err}") from None
            source = "step_rewards"
        elif obj.get("first_error") is not None:
            pred = obj["first_error"]
            if isinstance(pred, bool) or not isinstance(pred, int) or not -1 <= pred < n:
                raise DataError(path, line, "first_error", f"{who}: must be -1 or a step index in [0, {n - 1}], got {pred!r}")
            source = "first_error"
        elif mode == "file":
            raise DataError(path, line, "first_error", f"{who}: --mode file uses the file's `first_error`, and this line has none")
        else:
            raise DataError(path, line, "step_rewards", f"{who}: needs `step_rewards` or `first_error`")
        if sources is not None:
            sources[source] += 1
        preds[sid] = pred
        lines[sid] = line
    missing = [it.id for it in items if it.id not in preds]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(path, None, "id", f"{len(missing)} benchmark solutions have no prediction: {shown}")
    return preds


@dataclass
class PRMBenchResults:
    """Validated PRMBench results: labels per scored item and what was skipped."""

    rows: list[tuple[str, list[int], list[bool]]]
    ids: list[str]
    duplicates_skipped: int
    invalid_items: int
    correct_items_ignored: int
    label_source: dict[str, int]


def _check_labels(labels: Any, n: int, path: Path, line: int, who: str) -> list[bool]:
    """`step_level_validity_labels`: exactly `n` JSON booleans; DataError naming line and field."""
    field = "scores.step_level_validity_labels"
    if not isinstance(labels, list) or len(labels) != n:
        got = len(labels) if isinstance(labels, list) else type(labels).__name__
        raise DataError(path, line, field, f"{who}: {got} step labels, but the solution has {n} steps")
    for j, v in enumerate(labels):
        if not isinstance(v, bool):
            raise DataError(path, line, f"{field}[{j}]", f"{who}: step label must be true/false, got {v!r}")
    return list(labels)


def _result_labels(scores: Mapping[str, Any], n: int, classification: str, path: Path, line: int,
                   who: str, threshold: float, comparison: Comparison,
                   mode: ScoreMode = "threshold") -> tuple[list[bool], str]:
    labels = None
    if "step_level_validity_labels" in scores:  # checked even where other fields decide
        labels = _check_labels(scores["step_level_validity_labels"], n, path, line, who)
    if classification in REDUNDANCY_CLASSES and "step_level_redundancy_labels" in scores:
        red = scores["step_level_redundancy_labels"]
        if not isinstance(red, list) or len(red) != n or not all(isinstance(v, bool) for v in red):
            raise DataError(path, line, "scores.step_level_redundancy_labels",
                            f"{who}: expected {n} booleans (one per step)")
        return [not v for v in red], "redundancy_labels"
    if mode == "file" and "step_level_validity_labels" not in scores:
        raise DataError(path, line, "scores.step_level_validity_labels",
                        f"{who}: --mode file uses the file's step labels, and this line has none")
    if mode == "threshold" and "step_level_validity_scores" in scores:
        vals = _check_scores(scores["step_level_validity_scores"], n, path, line,
                             "scores.step_level_validity_scores", who, allow_null=False)
        return step_labels([float(v) for v in vals if v is not None], threshold, comparison), "scores"
    if labels is not None:
        return labels, "labels"
    raise DataError(path, line, "scores", f"{who}: needs step_level_validity_scores or step_level_validity_labels")


def read_prmbench_results(
    path: str | Path,
    items: Sequence[PRMBenchItem],
    threshold: float,
    comparison: Comparison = ">=",
    mode: ScoreMode = "threshold",
) -> PRMBenchResults:
    """Validate an official-format PRMBench results file and label every step.

    Lines: `{"idx": "<classification>_<source idx>", "scores": {...}}` with
    `step_level_validity_scores` and/or `step_level_validity_labels`. In `threshold` mode the
    scores are thresholded here with `comparison` (labels are used when there are no scores); in
    `file` mode the labels are used as they are (threshold ignored, as the official evaluator)
    and a line without them is an error. `step_level_redundancy_labels` replace them for the two
    Simplicity classes, as upstream. `"validity": false` marks an item
    the PRM failed on: skipped and counted, as upstream. An idx with the classification prefix
    doubled is accepted; `correct_*` items (the official loader's extras) are ignored and
    counted. Only the first item of a repeated idx is scored (official de-duplication); a
    repeated idx in the results is an error unless the benchmark repeats it too. Every scored
    benchmark item needs a result.
    """
    path = Path(path)
    if mode not in SCORE_MODES:
        raise DataError(path, None, None, f"mode must be one of {SCORE_MODES}, got {mode!r}")
    first: dict[str, PRMBenchItem] = {}
    dup_idx: set[str] = set()
    for it in items:
        if it.idx in first:
            dup_idx.add(it.idx)
        else:
            first[it.idx] = it
    duplicates_skipped = len(items) - len(first)
    labels_by_idx: dict[str, list[bool] | None] = {}
    lines: dict[str, int] = {}
    invalid = correct_ignored = 0
    sources: Counter[str] = Counter()
    for line, obj in iter_json_lines(path):
        idx = _line_key(obj, "idx", path, line)
        key = idx
        if key not in first:
            cls = next((c for c in PRMBENCH_CLASSES if key.startswith(c + "_" + c + "_")), None)
            if cls is not None and key[len(cls) + 1:] in first:
                key = key[len(cls) + 1:]
            elif key.startswith("correct_"):
                correct_ignored += 1
                continue
            else:
                raise DataError(path, line, "idx", f"unknown idx {idx!r} (not in the benchmark)")
        if key in labels_by_idx:
            if key in dup_idx:
                continue
            raise DataError(path, line, "idx", f"duplicate idx {idx!r} (first on line {lines[key]})")
        lines[key] = line
        item = first[key]
        who = f"idx {idx!r}"
        if obj.get("validity") is False:
            labels_by_idx[key] = None
            invalid += 1
            continue
        scores = obj.get("scores")
        if not isinstance(scores, dict):
            raise DataError(path, line, "scores", f"{who}: expected an object with step scores or labels")
        labels, source = _result_labels(scores, len(item.modified_process), item.classification,
                                        path, line, who, threshold, comparison, mode)
        labels_by_idx[key] = labels
        sources[source] += 1
    missing = [k for k in first if k not in labels_by_idx]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(path, None, "idx", f"{len(missing)} benchmark items have no result: {shown}")
    rows: list[tuple[str, list[int], list[bool]]] = []
    ids: list[str] = []
    for key, item in first.items():
        labels = labels_by_idx[key]
        if labels is None:
            continue
        rows.append((item.classification, list(item.error_steps), labels))
        ids.append(key)
    return PRMBenchResults(rows, ids, duplicates_skipped, invalid, correct_ignored, dict(sources))


# --------------------------------------------------------------------------------------
# Tables and CLI entry points
# --------------------------------------------------------------------------------------


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def processbench_table(report: Mapping[str, Any], title: str = "ProcessBench") -> Any:
    """A rich table of a ProcessBench report (per subset and average)."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("subset", "n", "erroneous", "correct", "acc err", "acc cor", "F1"):
        table.add_column(col, justify="left" if col == "subset" else "right")
    for name, r in report["subsets"].items():
        table.add_row(name, str(r["n"]), str(r["n_erroneous"]), str(r["n_correct"]),
                      _fmt(r["acc_erroneous"]), _fmt(r["acc_correct"]), _fmt(r["f1"]))
    table.add_row("average", str(report["n"]), "", "", "", "", _fmt(report["avg_f1"]), style="bold")
    return table


def prmbench_table(report: Mapping[str, Any], title: str = "PRMBench") -> Any:
    """A rich table of a PRMBench report (overall, groups, classes)."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("", "items", "PRMScore", "F1", "neg F1"):
        table.add_column(col, justify="left" if not col else "right")
    ov = report["overall"] or {}
    table.add_row("overall", str(report["n_items"]), _fmt(report["prmscore"], 3),
                  _fmt(ov.get("f1"), 3), _fmt(ov.get("negative_f1"), 3), style="bold")
    for group, members in PRMBENCH_GROUPS.items():
        table.add_row(group, "", _fmt(report["groups"][group], 3), "", "", style="italic")
        for m in members:
            if m in report["classes"]:
                c = report["classes"][m]
                table.add_row(f"  {m}", str(c["items"]), _fmt(c["prmscore"], 3),
                              _fmt(c["f1"], 3), _fmt(c["negative_f1"], 3))
    return table


def _print(table: Any) -> None:
    from rich.console import Console

    Console().print(table)


def _mode_title(mode: ScoreMode, rule: str) -> str:
    return rule if mode == "threshold" else "the file's own decisions, threshold ignored"


def cli_score_processbench(predictions: Path, benchmark: Path, threshold: float, out: Path | None,
                           mode: ScoreMode = "threshold") -> dict[str, Any]:
    """Score a ProcessBench predictions file (any PRM); print the table, write `out` if given.

    `mode` (module docstring): `threshold` remakes each first error from `step_rewards`;
    `file` uses the file's `first_error` as the official evaluator does. The report says which.
    Every check runs before anything is written: a bad file raises DataError and no report.
    """
    if mode not in SCORE_MODES:
        raise DataError(predictions, None, None, f"mode must be one of {SCORE_MODES}, got {mode!r}")
    if not 0.0 <= threshold <= 1.0:
        raise DataError(predictions, None, None, f"threshold must be in [0, 1], got {threshold}")
    items = load_processbench_file(benchmark)
    sources: Counter[str] = Counter()
    preds = read_processbench_predictions(predictions, items, threshold, mode, sources)
    report = processbench_metrics((processbench_subset(it), it.label, preds[it.id]) for it in items)
    report.update(
        mode=mode, threshold=threshold if mode == "threshold" else None,
        prediction_source=dict(sources), predictions=str(predictions), benchmark=str(benchmark),
    )
    rule = f"first step with reward < {threshold}"
    _print(processbench_table(report, f"ProcessBench ({predictions.name}; {_mode_title(mode, rule)})"))
    if out is not None:
        write_json(out, report)
    return report


def cli_score_prmbench(results: Path, benchmark: Path, threshold: float, out: Path | None,
                       comparison: Comparison = ">=", mode: ScoreMode = "threshold") -> dict[str, Any]:
    """Score an official-format PRMBench results file; print the table, write `out` if given.

    `mode` (module docstring): `threshold` relabels steps from `step_level_validity_scores`;
    `file` uses `step_level_validity_labels` as the official evaluator does. The report says which.
    Every check runs before anything is written: a bad file raises DataError and no report.
    """
    if mode not in SCORE_MODES:
        raise DataError(results, None, None, f"mode must be one of {SCORE_MODES}, got {mode!r}")
    if not 0.0 <= threshold <= 1.0:
        raise DataError(results, None, None, f"threshold must be in [0, 1], got {threshold}")
    if comparison not in (">=", ">"):
        raise DataError(results, None, None, f"comparison must be '>=' or '>', got {comparison!r}")
    items = load_prmbench_file(benchmark)
    res = read_prmbench_results(results, items, threshold, comparison, mode)
    report = prmbench_metrics(res.rows)
    report.update(
        mode=mode, threshold=threshold if mode == "threshold" else None,
        comparison=comparison if mode == "threshold" else None, results=str(results), benchmark=str(benchmark),
        duplicates_skipped=res.duplicates_skipped, invalid_items=res.invalid_items,
        correct_items_ignored=res.correct_items_ignored, label_source=res.label_source,
    )
    rule = f"label = score {comparison} {threshold}"
    _print(prmbench_table(report, f"PRMBench ({results.name}; {_mode_title(mode, rule)})"))
    if out is not None:
        write_json(out, report)
    return report


def prmbench_result_line(item: PRMBenchItem, scores: Sequence[float], threshold: float,
                         comparison: Comparison = ">=") -> dict[str, Any]:
    """One line of the official PRMBench result format for an item's step scores."""
    return {
        "idx": item.idx,
        "scores": {
            "step_level_validity_scores": [float(s) for s in scores],
            "step_level_validity_labels": step_labels(scores, threshold, comparison),
        },
    }

