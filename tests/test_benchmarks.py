"""ProcessBench and PRMBench metrics against hand-computed cases, properties, and the scoring commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from components import benchmarks as B
from components.cli import app
from components.data import load_prmbench_file, load_processbench_file
from components.io import DataError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SHARED_PB = SHARED / "processbench"
SHARED_PRMB = SHARED / "prmbench" / "prmbench_preview.jsonl"
needs_shared = pytest.mark.skipif(not SHARED_PRMB.exists(), reason="full benchmark copies (../shared/data) not present")


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- ProcessBench


def test_first_error_is_first_step_strictly_below_threshold() -> None:
    assert B.predict_first_error([0.9, 0.5, 0.49, 0.1], 0.5) == 2
    assert B.predict_first_error([0.5, 0.5], 0.5) == -1
    assert B.predict_first_error([0.2, None, None], 0.5) == 0  # early exit leaves nulls after it
    with pytest.raises(ValueError, match="step 1 was not scored"):
        B.predict_first_error([0.9, None, 0.1], 0.5)


def test_processbench_hand_computed() -> None:
    rows = [
        # gsm8k: erroneous 1/2 right, correct 1/2 right -> 50, 50, F1 50
        ("gsm8k", -1, -1), ("gsm8k", -1, 1), ("gsm8k", 2, 2), ("gsm8k", 0, 3),
        # math: erroneous 2/2, correct 1/2 -> 100, 50, F1 66.67
        ("math", 1, 1), ("math", 0, 0), ("math", -1, -1), ("math", -1, 0),
    ]
    r = B.processbench_metrics(rows)
    g, m = r["subsets"]["gsm8k"], r["subsets"]["math"]
    assert (g["n_erroneous"], g["n_correct"], g["acc_erroneous"], g["acc_correct"], g["f1"]) == (2, 2, 50.0, 50.0, 50.0)
    assert (m["acc_erroneous"], m["acc_correct"]) == (100.0, 50.0)
    assert m["f1"] == pytest.approx(200 / 3)
    assert r["avg_f1"] == pytest.approx((50 + 200 / 3) / 2)
    assert r["avg_over"] == ["gsm8k", "math"] and r["n"] == 8


def test_processbench_empty_and_all_correct_subsets_report_null() -> None:
    rows = [("gsm8k", 1, 1), ("gsm8k", -1, 0), ("math", -1, -1), ("math", -1, -1)]
    r = B.processbench_metrics(rows, subsets=["gsm8k", "math", "omnimath"])
    assert r["subsets"]["gsm8k"]["f1"] == 0.0  # 100 and 0 -> harmonic mean 0
    math_ = r["subsets"]["math"]  # all correct: no erroneous sample, F1 undefined
    assert (math_["acc_erroneous"], math_["acc_correct"], math_["f1"]) == (None, 100.0, None)
    omni = r["subsets"]["omnimath"]  # requested, no rows
    assert omni == {"n": 0, "n_erroneous": 0, "n_correct": 0, "acc_erroneous": None, "acc_correct": None, "f1": None}
    assert r["avg_over"] == ["gsm8k"] and r["avg_f1"] == 0.0
    assert B.processbench_metrics([("math", -1, -1)])["avg_f1"] is None
    assert B.processbench_metrics([])["avg_f1"] is None
    both_zero = B.processbench_subset_metrics([0, -1], [1, 0])
    assert (both_zero["acc_erroneous"], both_zero["acc_correct"], both_zero["f1"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="not requested"):
        B.processbench_metrics(rows, subsets=["gsm8k"])


labels_st = st.lists(st.integers(min_value=-1, max_value=6), min_size=0, max_size=40)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), labels=labels_st)
def test_processbench_properties(data: st.DataObject, labels: list[int]) -> None:
    preds = data.draw(st.lists(st.integers(min_value=-1, max_value=6), min_size=len(labels), max_size=len(labels)))
    r = B.processbench_subset_metrics(labels, preds)
    for key in ("acc_erroneous", "acc_correct", "f1"):
        assert r[key] is None or 0.0 <= r[key] <= 100.0
    if r["f1"] is not None:  # harmonic mean lies between the two accuracies' min and their mean
        lo, hi = sorted([r["acc_erroneous"], r["acc_correct"]])
        assert lo - 1e-9 <= r["f1"] <= (lo + hi) / 2 + 1e-9
    perfect = B.processbench_subset_metrics(labels, labels)
    if any(g == -1 for g in labels) and any(g != -1 for g in labels):
        assert perfect["f1"] == 100.0
    rev = B.processbench_subset_metrics(labels[::-1], preds[::-1])
    assert rev == r  # order of samples does not matter


@settings(max_examples=200, deadline=None)
@given(a=st.floats(0, 100), b=st.floats(0, 100))
def test_harmonic_f1_symmetric_and_bounded(a: float, b: float) -> None:
    f = B.harmonic_f1(a, b)
    assert f == B.harmonic_f1(b, a)
    assert 0.0 <= f <= 100.0 and min(a, b) - 1e-9 <= f <= max(a, b) + 1e-9
    assert B.harmonic_f1(a, a) == pytest.approx(a)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(B.PROCESSBENCH_SUBSETS), st.integers(-1, 4), st.integers(-1, 4)),
                max_size=60))
def test_processbench_average_between_subset_f1s(rows: list[tuple[str, int, int]]) -> None:
    r = B.processbench_metrics(rows)
    f1s = [r["subsets"][s]["f1"] for s in r["avg_over"]]
    if f1s:
        assert min(f1s) - 1e-9 <= r["avg_f1"] <= max(f1s) + 1e-9
    else:
        assert r["avg_f1"] is None


# ---------------------------------------------------------------------------------- PRMBench


def test_step_confusion_rules_one_based_errors() -> None:
    # error_steps [2, 3] -> 0-based {1, 2}; labels True = judged correct
    assert B.step_confusion([2, 3], [True, False, True, False]) == B.Confusion(tp=1, fp=1, tn=1, fn=1)
    assert B.step_confusion([9], [True, False]) == B.Confusion(tp=1, fn=1)  # error step past the end never matches


def test_f1_scores_follow_upstream_undefined_values() -> None:
    assert B.f1_scores(B.Confusion())["f1"] == -1.0  # nothing at all
    no_pos = B.f1_scores(B.Confusion(tn=3, fn=2))  # no step judged correct: P undefined, R = 0
    assert no_pos["precision"] == -1.0 and no_pos["recall"] == 0.0 and no_pos["f1"] == 0.0
    assert B.f1_scores(B.Confusion(fp=2, fn=3, tn=1))["f1"] == -1.0  # P = R = 0
    full = B.f1_scores(B.Confusion(tp=3, fp=1, tn=1, fn=2))
    assert full["f1"] == pytest.approx(2 / 3) and full["negative_f1"] == pytest.approx(0.4)


def test_step_labels_comparison() -> None:
    assert B.step_labels([0.5, 0.49, 0.9], 0.5, ">=") == [True, False, True]
    assert B.step_labels([0.5, 0.49, 0.9], 0.5, ">") == [False, False, True]
    with pytest.raises(ValueError):
        B.step_labels([0.5], 0.5, "<")  # type: ignore[arg-type]


def test_prmbench_hand_computed() -> None:
    rows = [
        ("circular", [2, 3], [True, False, True, False]),  # TP1 FP1 TN1 FN1
        ("multi_solutions", [], [True, True, False]),  # TP2 FN1
        ("correct", [], [False, False]),  # official extra item: own class, never in overall
    ]
    r = B.prmbench_metrics(rows)
    assert r["overall"]["tp"] == 3 and r["overall"]["fn"] == 2 and r["n_items"] == 2 and r["n_steps"] == 7
    # pooled: P = 3/4, R = 3/5 -> F1 2/3; negP = 1/3, negR = 1/2 -> negF1 0.4
    assert r["prmscore"] == pytest.approx(0.5 * 2 / 3 + 0.5 * 0.4)
    assert r["classes"]["circular"]["prmscore"] == pytest.approx(0.5)
    ms = r["classes"]["multi_solutions"]  # F1 only: P = 1, R = 2/3
    assert ms["prmscore"] == pytest.approx(0.8) and ms["negative_recall"] == -1.0
    assert r["groups"] == {"simplicity": pytest.approx(0.5), "soundness": None, "sensitivity": pytest.approx(0.8)}
    assert r["classes"]["correct"]["items"] == 1
    assert "redundency" in r["classes_missing"]


def test_prmbench_overall_is_pooled_not_mean_of_groups() -> None:
    rows = [("redundency", [1], [False, True, True, True])] + [("deception", [2], [False, True])] * 3
    r = B.prmbench_metrics(rows)
    mean_groups = sum(v for v in r["groups"].values() if v is not None) / 2
    pooled = B.prmscore(B.Confusion(tp=3, fn=3, tn=1, fp=3))
    assert r["prmscore"] == pytest.approx(pooled) and r["prmscore"] != pytest.approx(mean_groups)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(B.PRMBENCH_CLASSES), st.integers(1, 8)), min_size=1, max_size=20), st.data())
def test_prmbench_perfect_labels_score_one(shapes: list[tuple[str, int]], data: st.DataObject) -> None:
    rows = []
    for cls, n in shapes:
        errors = [] if cls == "multi_solutions" else sorted(data.draw(st.sets(st.integers(1, n), max_size=n)))
        rows.append((cls, errors, [i + 1 not in errors for i in range(n)]))
    r = B.prmbench_metrics(rows)
    pooled = r["overall"]
    if pooled["tp"] and pooled["tn"]:
        assert r["prmscore"] == pytest.approx(1.0)
    for cls, c in r["classes"].items():
        if c["tp"] and (c["tn"] or cls == "multi_solutions"):
            assert c["prmscore"] == pytest.approx(1.0)
        assert -1.0 <= c["prmscore"] <= 1.0


# ---------------------------------------------------------------------------------- commands


def _pb_benchmark(tmp_path: Path) -> Path:
    folder = tmp_path / "pb"
    folder.mkdir()
    write_lines(folder / "gsm8k.jsonl", [
        {"id": "gsm8k-0", "generator": "g", "problem": "p", "steps": ["a", "b", "c"], "final_answer_correct": False, "label": 1},
        {"id": "gsm8k-1", "generator": "g", "problem": "p", "steps": ["a", "b"], "final_answer_correct": True, "label": -1},
    ])
    write_lines(folder / "math.jsonl", [
        {"id": "math-0", "generator": "g", "problem": "p", "steps": ["a", "b"], "final_answer_correct": False, "label": 0},
        {"id": "math-1", "generator": "g", "problem": "p", "steps": ["a"], "final_answer_correct": True, "label": -1},
    ])
    return folder


def test_score_processbench_rewards_and_indices(tmp_path: Path) -> None:
    bench = _pb_benchmark(tmp_path)
    preds = write_lines(tmp_path / "preds.jsonl", [
        {"id": "gsm8k-0", "step_rewards": [0.9, 0.2, None]},  # -> 1 (right)
        {"id": "gsm8k-1", "step_rewards": [0.9, 0.5]},  # -> -1 at 0.5 (right)
        {"id": "math-0", "first_error": 1},  # wrong
        {"id": "math-1", "first_error": -1, "samples": [[0.7]]},  # right; extra fields ignored
    ])
    out = tmp_path / "report.json"
    r = B.cli_score_processbench(preds, bench, 0.5, out)
    assert r["subsets"]["gsm8k"]["f1"] == 100.0
    assert (r["subsets"]["math"]["acc_erroneous"], r["subsets"]["math"]["acc_correct"]) == (0.0, 100.0)
    assert r["avg_f1"] == 50.0
    assert json.loads(out.read_text())["avg_f1"] == 50.0
    # a higher threshold flags gsm8k-1's second step (0.5 < 0.6): its correct-sample accuracy drops
    assert B.cli_score_processbench(preds, bench, 0.6, None)["subsets"]["gsm8k"]["acc_correct"] == 0.0


BAD_PREDICTIONS = [
    ([{"id": "gsm8k-0", "first_error": 1}, {"id": "gsm8k-1", "first_error": -1}, {"id": "math-0", "first_error": 0}],
     None, "math-1"),  # missing id
    ([{"id": "gsm8k-9", "first_error": 1}], 1, "gsm8k-9"),  # unknown id
    ([{"id": "gsm8k-0", "step_rewards": [0.9, 0.2]}], 1, "gsm8k-0"),  # wrong number of step scores
    ([{"id": "gsm8k-1", "first_error": -1}, {"id": "gsm8k-0", "step_rewards": [0.9, 1.5, 0.1]}], 2, "outside [0, 1]"),
    (['{"id": "gsm8k-0", "step_rewards": [0.9, NaN, 0.1]}'], 1, "NaN"),
    ([{"id": "gsm8k-0", "step_rewards": [0.9, "high", 0.1]}], 1, "must be a number"),
    ([{"id": "gsm8k-0", "step_rewards": [0.9, None, 0.1]}], 1, "not scored"),
    ([{"id": "gsm8k-0", "first_error": 3}], 1, "gsm8k-0"),  # index out of range
    ([{"id": "gsm8k-0", "first_error": 1}, {"id": "gsm8k-0", "first_error": 1}], 2, "duplicate"),
    ([{"id": "gsm8k-0"}], 1, "step_rewards` or `first_error"),
    (["not json"], 1, "invalid JSON"),
]


@pytest.mark.parametrize(("rows", "line", "needle"), BAD_PREDICTIONS)
def test_bad_predictions_fail_naming_file_line_and_id(tmp_path: Path, rows: list, line: int | None, needle: str) -> None:
    bench = _pb_benchmark(tmp_path)
    preds = write_lines(tmp_path / "bad_preds.jsonl", rows)
    with pytest.raises(DataError) as err:
        B.read_processbench_predictions(preds, load_processbench_file(bench), 0.5)
    assert err.value.path == str(preds) and err.value.line == line
    assert needle in str(err.value)


def test_cli_bad_predictions_exit_nonzero_and_write_nothing(tmp_path: Path) -> None:
    bench = _pb_benchmark(tmp_path)
    preds = write_lines(tmp_path / "preds.jsonl", [{"id": "gsm8k-0", "step_rewards": [0.9, float("nan"), 0.1]}])
    out = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["score-processbench", str(preds), "--benchmark", str(bench), "--out", str(out)])
    assert res.exit_code != 0
    assert "preds.jsonl:1" in res.output and "gsm8k-0" in res.output and "NaN" in res.output
    assert not out.exists()


@needs_shared
def test_cli_score_processbench_full_benchmark_perfect_predictions(tmp_path: Path) -> None:
    items = load_processbench_file(SHARED_PB)
    assert len(items) == 3400
    rows = []
    for it in items:  # a PRM that is exactly right, as step rewards
        rows.append({"id": it.id, "step_rewards": [0.9 if it.label == -1 or i < it.label else 0.1
                                                   for i in range(len(it.steps))]})
    preds = write_lines(tmp_path / "perfect.jsonl", rows)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["score-processbench", str(preds), "--benchmark", str(SHARED_PB), "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["avg_f1"] == 100.0
    assert {s: (r["n_erroneous"], r["n_correct"]) for s, r in report["subsets"].items()} == {
        "gsm8k": (207, 193), "math": (594, 406), "olympiadbench": (661, 339), "omnimath": (759, 241)}
    assert "average" in res.output


def _prmb_benchmark(tmp_path: Path) -> Path:
    def item(idx: str, cls: str, n: int, errors: list[int]) -> dict:
        return {"idx": idx, "classification": cls, "modified_question": "q", "original_question": "q",
                "modified_process": [f"{i + 1}. s" for i in range(n)], "original_process": ["1. s"],
                "error_steps": errors, "modified_steps": errors, "reason": "", "question": "q"}
    return write_lines(tmp_path / "prmb.jsonl", [
        item("circular_p_0", "circular", 4, [2, 3]),
        item("redundency_p_0", "redundency", 2, [2]),
        item("multi_solutions_p_1", "multi_solutions", 3, []),
        item("multi_solutions_p_1", "multi_solutions", 2, []),  # repeated idx, as in the real data
    ])


def test_score_prmbench_hand_made_results(tmp_path: Path) -> None:
    bench = _prmb_benchmark(tmp_path)
    results = write_lines(tmp_path / "results.jsonl", [
        # scores thresholded at 0.5 with >=: [T, F, T, F] -> TP1 FP1 TN1 FN1
        {"idx": "circular_p_0", "scores": {"step_level_validity_scores": [0.5, 0.2, 0.7, 0.1],
                                           "step_level_validity_labels": [False, False, False, False]}},
        # redundancy labels replace validity labels for Simplicity: not [False, True] -> [True, False]: TP1 TN1
        {"idx": "redundency_redundency_p_0", "scores": {"step_level_redundancy_labels": [False, True],
                                                        "step_level_validity_labels": [False, False]}},
        {"idx": "multi_solutions_p_1", "scores": {"step_level_validity_labels": [True, True, False]}},  # TP2 FN1
        {"idx": "multi_solutions_p_1", "scores": {"step_level_validity_labels": [True, True]}},  # ignored (dup)
        {"idx": "correct_p_0", "scores": {"step_level_validity_labels": [True]}},  # ignored, counted
    ])
    out = tmp_path / "r.json"
    r = B.cli_score_prmbench(results, bench, 0.5, out)
    ov = r["overall"]
    assert (ov["tp"], ov["fp"], ov["tn"], ov["fn"]) == (4, 1, 2, 2)
    assert r["classes"]["circular"]["prmscore"] == pytest.approx(0.5)
    assert r["classes"]["redundency"]["prmscore"] == pytest.approx(1.0)
    assert r["classes"]["multi_solutions"]["prmscore"] == pytest.approx(0.8)
    assert r["groups"]["simplicity"] == pytest.approx(0.75)
    # pooled: P = 4/5, R = 4/6, negP = 2/4, negR = 2/3
    f1 = 2 * 0.8 * (2 / 3) / (0.8 + 2 / 3)
    nf1 = 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)
    assert r["prmscore"] == pytest.approx(0.5 * f1 + 0.5 * nf1)
    assert (r["duplicates_skipped"], r["correct_items_ignored"]) == (1, 1)
    assert r["label_source"] == {"scores": 1, "redundancy_labels": 1, "labels": 1}
    assert json.loads(out.read_text())["prmscore"] == pytest.approx(r["prmscore"])
    strict = B.cli_score_prmbench(results, bench, 0.5, None, comparison=">")  # 0.5 is no longer correct
    assert strict["classes"]["circular"]["tp"] == 0 and strict["classes"]["circular"]["fn"] == 2


BAD_RESULTS = [
    ([{"idx": "circular_p_0", "scores": {"step_level_validity_scores": [0.5, 0.2, 0.7]}}], 1, "3 step scores"),
    ([{"idx": "circular_p_0", "scores": {"step_level_validity_scores": [0.5, 0.2, 0.7, 1.2]}}], 1, "outside [0, 1]"),
    (['{"idx": "circular_p_0", "scores": {"step_level_validity_scores": [0.5, NaN, 0.7, 0.1]}}'], 1, "NaN"),
    ([{"idx": "circular_p_0", "scores": {"step_level_validity_labels": [1, 0, 1, 0]}}], 1, "true/false"),
    ([{"idx": "nope_p_0", "scores": {"step_level_validity_labels": [True]}}], 1, "unknown idx"),
    ([{"idx": "circular_p_0", "scores": {}}], 1, "needs step_level_validity_scores"),
    ([{"idx": "circular_p_0", "scores": {"step_level_validity_labels": [True] * 4}},
      {"idx": "circular_p_0", "scores": {"step_level_validity_labels": [True] * 4}}], 2, "duplicate idx"),
    ([{"idx": "circular_p_0", "scores": {"step_level_validity_labels": [True] * 4}}], None, "have no result"),
    # garbage labels beside valid scores: the scores decide, but the labels are not ignored
    ([{"idx": "circular_p_0", "scores": {"step_level_validity_scores": [0.5, 0.2, 0.7, 0.1],
                                         "step_level_validity_labels": "garbage"}}], 1, "str step labels"),
    ([{"idx": "circular_p_0", "scores": {"step_level_validity_scores": [0.5, 0.2, 0.7, 0.1],
                                         "step_level_validity_labels": [True, "yes", False, False]}}],
     1, "scores.step_level_validity_labels[1]"),
    ([{"idx": "circular_p_0", "scores": {"step_level_validity_scores": [0.5, 0.2, 0.7, 0.1],
                                         "step_level_validity_labels": [True, False]}}], 1, "2 step labels"),
]


@pytest.mark.parametrize(("rows", "line", "needle"), BAD_RESULTS)
def test_bad_prmbench_results_fail_naming_file_line_and_idx(tmp_path: Path, rows: list, line: int | None,
                                                            needle: str) -> None:
    bench = _prmb_benchmark(tmp_path)
    results = write_lines(tmp_path / "bad_results.jsonl", rows)
    out = tmp_path / "r.json"
    with pytest.raises(DataError) as err:
        B.cli_score_prmbench(results, bench, 0.5, out)
    assert err.value.path == str(results) and err.value.line == line and needle in str(err.value)
    assert not out.exists()


def test_invalid_items_are_skipped_as_upstream(tmp_path: Path) -> None:
    bench = _prmb_benchmark(tmp_path)
    results = write_lines(tmp_path / "results.jsonl", [
        {"idx": "circular_p_0", "validity": False},
        {"idx": "redundency_p_0", "scores": {"step_level_validity_labels": [True, False]}},
        {"idx": "multi_solutions_p_1", "scores": {"step_level_validity_labels": [True, True, True]}},
    ])
    r = B.cli_score_prmbench(results, bench, 0.5, None)
    assert r["invalid_items"] == 1 and "circular" not in r["classes"] and r["n_items"] == 2


def test_prmbench_file_mode_uses_the_files_labels_and_ignores_the_threshold(tmp_path: Path) -> None:
    """`--mode file` reads step_level_validity_labels as the official evaluator; the report says so."""
    bench = _prmb_benchmark(tmp_path)
    # scores and labels disagree on purpose: the labels are what the PRM's own threshold gave (0.61)
    results = write_lines(tmp_path / "results.jsonl", [
        {"idx": "circular_p_0", "scores": {"step_level_validity_scores": [0.6, 0.6, 0.9, 0.1],
                                           "step_level_validity_labels": [False, False, True, False]}},
        {"idx": "redundency_p_0", "scores": {"step_level_validity_scores": [0.9, 0.55],
                                             "step_level_validity_labels": [True, False]}},
        {"idx": "multi_solutions_p_1", "scores": {"step_level_validity_scores": [0.7, 0.58, 0.2],
                                                  "step_level_validity_labels": [True, False, False]}},
    ])
    rethresholded = B.cli_score_prmbench(results, bench, 0.5, None)
    assert rethresholded["mode"] == "threshold" and rethresholded["threshold"] == 0.5
    assert rethresholded["comparison"] == ">=" and rethresholded["label_source"] == {"scores": 3}
    # at 0.5 the 0.6 / 0.55 / 0.58 steps count as correct (circular errors are steps 2 and 3)
    assert [rethresholded["classes"]["circular"][k] for k in ("tp", "fp", "tn", "fn")] == [1, 2, 0, 1]
    out = tmp_path / "file_mode.json"
    official = B.cli_score_prmbench(results, bench, 0.5, out, mode="file")
    assert official["mode"] == "file" and official["threshold"] is None and official["comparison"] is None
    assert official["label_source"] == {"labels": 3}
    assert [official["classes"]["circular"][k] for k in ("tp", "fp", "tn", "fn")] == [0, 1, 1, 2]
    assert [official["classes"]["redundency"][k] for k in ("tp", "fp", "tn", "fn")] == [1, 0, 1, 0]
    assert [official["classes"]["multi_solutions"][k] for k in ("tp", "fp", "tn", "fn")] == [1, 0, 0, 2]
    assert json.loads(out.read_text())["mode"] == "file"
    # the file's labels equal our relabelling at the PRM's own threshold (0.61)
    at_061 = B.cli_score_prmbench(results, bench, 0.61, None)
    assert at_061["prmscore"] == pytest.approx(official["prmscore"]) and at_061["overall"] == official["overall"]
    # the threshold plays no part in file mode
    for t, comparison in [(0.0, ">="), (0.99, ">")]:
        again = B.cli_score_prmbench(results, bench, t, None, comparison=comparison, mode="file")
        assert again["overall"] == official["overall"] and again["classes"] == official["classes"]
    # a line with scores only cannot be scored in file mode: file, line and field named
    scores_only = write_lines(tmp_path / "scores_only.jsonl", [
        {"idx": "circular_p_0", "scores": {"step_level_validity_labels": [True] * 4}},
        {"idx": "redundency_p_0", "scores": {"step_level_validity_scores": [0.9, 0.1]}},
        {"idx": "multi_solutions_p_1", "scores": {"step_level_validity_labels": [True] * 3}},
    ])
    with pytest.raises(DataError) as err:
        B.cli_score_prmbench(scores_only, bench, 0.5, None, mode="file")
    assert (err.value.line, err.value.field) == (2, "scores.step_level_validity_labels")
    assert "--mode file" in str(err.value)
    with pytest.raises(DataError, match="mode must be one of"):
        B.cli_score_prmbench(results, bench, 0.5, None, mode="labels")


def test_processbench_file_mode_uses_the_files_first_error(tmp_path: Path) -> None:
    """`--mode file` takes each line's `first_error` (the PRM's own decision); the report says so."""
    bench = _pb_benchmark(tmp_path)
    # StepScores-like lines: first_error was decided by the PRM at its own threshold (0.6)
    preds = write_lines(tmp_path / "preds.jsonl", [
        {"id": "gsm8k-0", "step_rewards": [0.9, 0.55, 0.1], "first_error": 1},
        {"id": "gsm8k-1", "step_rewards": [0.9, 0.7], "first_error": -1},
        {"id": "math-0", "step_rewards": [0.58, 0.2], "first_error": 0},
        {"id": "math-1", "first_error": -1},
    ])
    rethresholded = B.cli_score_processbench(preds, bench, 0.5, None)
    assert rethresholded["mode"] == "threshold" and rethresholded["threshold"] == 0.5
    assert rethresholded["prediction_source"] == {"step_rewards": 3, "first_error": 1}
    assert rethresholded["subsets"]["gsm8k"]["acc_erroneous"] == 0.0  # 0.55 >= 0.5: first error at step 2
    out = tmp_path / "pb.json"
    official = B.cli_score_processbench(preds, bench, 0.5, out, mode="file")
    assert official["mode"] == "file" and official["threshold"] is None
    assert official["prediction_source"] == {"first_error": 4}
    assert official["avg_f1"] == 100.0
    assert json.loads(out.read_text())["mode"] == "file"
    assert B.cli_score_processbench(preds, bench, 0.0, None, mode="file")["avg_f1"] == 100.0  # threshold ignored
    rewards_only = write_lines(tmp_path / "rewards_only.jsonl", [
        {"id": "gsm8k-0", "first_error": 1}, {"id": "gsm8k-1", "step_rewards": [0.9, 0.7]},
    ])
    with pytest.raises(DataError) as err:
        B.cli_score_processbench(rewards_only, bench, 0.5, None, mode="file")
    assert (err.value.line, err.value.field) == (2, "first_error") and "gsm8k-1" in str(err.value)


def test_cli_mode_flag_reaches_the_report(tmp_path: Path) -> None:
    bench = _prmb_benchmark(tmp_path)
    results = write_lines(tmp_path / "results.jsonl", [
        {"idx": "circular_p_0", "scores": {"step_level_validity_labels": [True, False, True, False],
                                           "step_level_validity_scores": [0.1, 0.1, 0.1, 0.1]}},
        {"idx": "redundency_p_0", "scores": {"step_level_validity_labels": [True, False]}},
        {"idx": "multi_solutions_p_1", "scores": {"step_level_validity_labels": [True, True, True]}},
    ])
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["score-prmbench", str(results), "--benchmark", str(bench), "--out", str(out),
                                   "--mode", "file"])
    assert res.exit_code == 0, res.output
    assert "threshold ignored" in res.output
    report = json.loads(out.read_text())
    assert report["mode"] == "file" and report["threshold"] is None and report["label_source"] == {"labels": 3}
    pb = _pb_benchmark(tmp_path)
    preds = write_lines(tmp_path / "p.jsonl", [{"id": i, "first_error": -1} for i in ("gsm8k-0", "gsm8k-1", "math-0", "math-1")])
    res = CliRunner().invoke(app, ["score-processbench", str(preds), "--benchmark", str(pb), "--out", str(out),
                                   "--mode", "file"])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["mode"] == "file"
    res = CliRunner().invoke(app, ["score-processbench", str(preds), "--benchmark", str(pb), "--mode", "labels"])
    assert res.exit_code != 0 and "mode must be one of" in res.output


@needs_shared
def test_perfect_labels_give_prmscore_one_on_full_prmbench(tmp_path: Path) -> None:
    items = load_prmbench_file(SHARED_PRMB)
    assert len(items) == 6216
    lines = []
    for it in items:
        errors = {e - 1 for e in it.error_steps}
        lines.append({"idx": it.idx, "scores": {
            "step_level_validity_scores": [0.0 if i in errors else 1.0 for i in range(len(it.modified_process))]}})
    results = write_lines(tmp_path / "perfect.jsonl", lines)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["score-prmbench", str(results), "--benchmark", str(SHARED_PRMB), "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["prmscore"] == 1.0
    assert all(v == 1.0 for v in r["groups"].values())
    assert all(c["prmscore"] == 1.0 for c in r["classes"].values())
    assert r["n_items"] == 6211 and r["duplicates_skipped"] == 5  # five repeated multi_solutions idx
    assert r["classes"]["multi_solutions"]["items"] == 160 and r["classes_missing"] == []
    # all steps judged correct: every error step is a false positive, negative F1 is 0
    everything_ok = write_lines(tmp_path / "all_ok.jsonl", [
        {"idx": it.idx, "scores": {"step_level_validity_labels": [True] * len(it.modified_process)}} for it in items])
    r2 = B.cli_score_prmbench(everything_ok, SHARED_PRMB, 0.5, None)
    assert r2["overall"]["negative_f1"] == 0.0 and math.isclose(r2["prmscore"], 0.5 * r2["overall"]["f1"])


def test_cli_scoring_defaults_to_the_bundled_benchmarks(tmp_path: Path) -> None:
    """Without --benchmark both commands score against the copies bundled in the project."""
    pb_items = load_processbench_file(ROOT / "data" / "bundled" / "processbench")
    preds = write_lines(tmp_path / "preds.jsonl", [{"id": it.id, "first_error": it.label} for it in pb_items])
    prmb_items = load_prmbench_file(ROOT / "data" / "bundled" / "prmbench" / "prmbench_preview.jsonl")
    results = write_lines(tmp_path / "results.jsonl", [
        {"idx": it.idx, "scores": {"step_level_validity_labels": [
            i + 1 not in it.error_steps for i in range(len(it.modified_process))]}}
        for it in prmb_items
    ])
    runner = CliRunner()
    pb_out, prmb_out = tmp_path / "pb.json", tmp_path / "prmb.json"
    res = runner.invoke(app, ["score-processbench", str(preds), "--out", str(pb_out)])
    assert res.exit_code == 0, res.output
    report = json.loads(pb_out.read_text())
    assert report["benchmark"].endswith("data/bundled/processbench") and report["avg_f1"] == 100.0
    res = runner.invoke(app, ["score-prmbench", str(results), "--out", str(prmb_out)])
    assert res.exit_code == 0, res.output
    report = json.loads(prmb_out.read_text())
    assert report["benchmark"].endswith("data/bundled/prmbench/prmbench_preview.jsonl")
    assert report["prmscore"] == pytest.approx(1.0)
