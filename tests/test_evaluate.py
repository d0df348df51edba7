"""The `evaluate` stage end to end on the tiny verdict model: reports, sweeps, plots, MLflow."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from components import benchmarks, evaluate, paths
from components.config import Params
from components.io import DataError
from components.records import PRMBenchItem, ProcessBenchItem

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data" / "bundled"


def prepared_processbench() -> list[ProcessBenchItem]:
    """Bundled ProcessBench solutions, shortened; the part before a first error is an all-correct solution.

    The bundled subsets hold erroneous solutions only, so correct ones (label -1) are made from
    the steps before the labelled first error, which the annotators judged correct.
    """
    items = []
    for subset in ("gsm8k", "math"):
        rows = [json.loads(x) for x in (BUNDLED / "processbench" / f"{subset}.jsonl").read_text().splitlines()]
        for row in rows[:8]:
            steps = [s[:100] for s in row["steps"]]
            label = row["label"]
            if label >= 2 and sum(it.subset == subset and it.label == -1 for it in items) < 2:
                steps, label = steps[:label], -1
            if len(steps) > 4 or sum(it.subset == subset for it in items) >= 4:
                continue
            items.append(ProcessBenchItem(id=row["id"], generator=row["generator"], problem=row["problem"][:150],
                                          steps=steps, final_answer_correct=label == -1, label=label, subset=subset))
    assert {(it.subset, it.label == -1) for it in items} == {("gsm8k", True), ("gsm8k", False),
                                                            ("math", True), ("math", False)}
    return items


def prepared_prmbench() -> list[PRMBenchItem]:
    """The shortest bundled PRMBench item of three classes (at most 4 steps), one idx repeated as upstream."""
    rows = [json.loads(x) for x in (BUNDLED / "prmbench" / "prmbench_preview.jsonl").read_text().splitlines()]
    items = []
    for cls in ("confidence", "deception", "multi_solutions"):
        pos, row = min(((p, r) for p, r in enumerate(rows) if r["classification"] == cls),
                       key=lambda pr: len(pr[1]["modified_process"]))
        items.append(PRMBenchItem(idx=row["idx"], classification=cls, modified_question=row["modified_question"][:150],
                                  modified_process=[s[:100] for s in row["modified_process"][:4]],
                                  error_steps=row["error_steps"], position=pos))
    items.append(items[-1].model_copy(update={"modified_process": items[-1].modified_process[:2],
                                              "position": len(rows)}))
    return items


def stage_params(default_params: Params, tmp_path: Path, **evaluate_kw: object) -> Params:
    data = default_params.model_dump()
    data["scoring"]["sampling"].update(n=2, max_new_tokens=160, temperature=1.0, top_p=1.0, seed=3)
    data["evaluate"].update({"models": ["sft"], "k_sweep": [1, 2], "thresholds": [0.3, 0.5, 0.7], **evaluate_kw})
    data["evaluate"]["processbench"]["subsets"] = ["gsm8k", "math"]
    data["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlruns.db'}"
    return Params.model_validate(data)


@pytest.fixture()
def workdir(tmp_path: Path, verdict_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with prepared benchmarks and only a base model (the verdict model)."""
    work = tmp_path / "project"
    (work / "models").mkdir(parents=True)
    (work / "models" / "base").symlink_to(verdict_model_dir, target_is_directory=True)
    from components.io import write_jsonl

    write_jsonl(work / paths.PROCESSBENCH, prepared_processbench())
    write_jsonl(work / paths.PRMBENCH, prepared_prmbench())
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RPRM_PARENT_RUN_ID", raising=False)
    return work


def test_evaluate_stage_end_to_end(workdir: Path, default_params: Params, tmp_path: Path) -> None:
    params = stage_params(default_params, tmp_path, early_exit=True, models=["sft", "dpo"])
    out = evaluate.run(params)

    pb = json.loads(Path("reports/processbench.json").read_text())
    model = pb["models"]["dpo"]
    assert model["substituted"] and model["evaluated_model"] == "base"  # dpo not built: base evaluated, and said
    assert pb["models"]["sft"]["subsets"] == model["subsets"]  # both fell back to the same base model
    journals = sorted(f.name for f in (paths.SCORES / "journals").glob("*.jsonl"))
    assert journals == ["base-prmbench.jsonl", "base-processbench.jsonl"]  # scored once (no held-out items here)
    assert pb["headline_model"] == "dpo"
    assert pb["processbench_avg_f1"] == model["avg_f1"] == out["processbench"]["processbench_avg_f1"]
    assert set(model["subsets"]) == {"gsm8k", "math"} and pb["k"] == 2 and pb["threshold"] == 0.5
    for r in model["subsets"].values():
        assert r["n_erroneous"] > 0 and r["n_correct"] > 0 and 0.0 <= r["f1"] <= 100.0

    # the StepScores file is a predictions file for `rprm score-processbench`: same numbers
    rescored = benchmarks.cli_score_processbench(paths.SCORES / "dpo" / "processbench.jsonl", paths.PROCESSBENCH,
                                                 0.5, None)
    assert rescored["avg_f1"] == pytest.approx(model["avg_f1"])
    # and the official-format PRMBench results give the reported PRMScore with `rprm score-prmbench`
    prmb = json.loads(Path("reports/prmbench.json").read_text())
    rescored = benchmarks.cli_score_prmbench(paths.SCORES / "dpo" / "prmbench_results.jsonl", paths.PRMBENCH,
                                             0.5, None)
    assert rescored["prmscore"] == pytest.approx(prmb["models"]["dpo"]["prmscore"])
    assert prmb["models"]["dpo"]["duplicates_skipped"] == 1 and prmb["prmbench_prmscore"] is not None

    scaling = json.loads(Path("reports/scaling.json").read_text())["models"]["dpo"]
    assert list(scaling["processbench_k"]) == ["1", "2"]
    assert list(scaling["processbench_threshold"]) == ["0.3", "0.5", "0.7"]
    assert scaling["processbench_k"]["2"]["avg_f1"] == pytest.approx(model["avg_f1"])
    with open("plots/scaling.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["k"] for r in rows] == ["1", "2"] and {"f1_avg", "f1_gsm8k", "f1_avg_sft", "prmscore_dpo"} <= set(rows[0])
    with open("plots/threshold.csv") as fh:
        assert [r["threshold"] for r in csv.DictReader(fh)] == ["0.3", "0.5", "0.7"]
    for png in ("scaling", "threshold", "prmbench"):
        assert Path(f"plots/{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    import mlflow

    mlflow.set_tracking_uri(params.tracking.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[params.tracking.experiment], output_format="list")
    run = next(r for r in runs if r.data.tags.get("rprm.stage") == "evaluate")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["processbench_avg_f1"] == pytest.approx(model["avg_f1"])
    assert run.data.params["scoring.sampling.n"] == "2"
    client = mlflow.MlflowClient()
    assert {"plots", "predictions.json", "reports"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/scaling.png", "plots/threshold.png", "plots/prmbench.png"} <= plots
    table = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                artifact_path="predictions.json")).read_text())
    assert len(table["data"]) == 2 * (len(prepared_processbench()) + len(prepared_prmbench()))

    # Every (K, threshold) number with early exit equals full scoring of the same samples. The
    # full run reuses the journal (same settings) and scores only the steps early exit skipped.
    full = evaluate.run(stage_params(default_params, tmp_path, early_exit=False, models=["dpo"]))
    assert full["scaling"]["models"]["dpo"] == out["scaling"]["models"]["dpo"]
    cost_e = out["processbench"]["models"]["dpo"]["cost"]
    cost_f = full["processbench"]["models"]["dpo"]["cost"]
    assert cost_f["steps_scored"] == cost_f["steps_total"] and cost_f["saved_fraction"] == 0
    assert cost_e["steps_headline_early_exit"] <= cost_e["steps_scored"] <= cost_f["steps_scored"]
    assert sorted(f.name for f in (paths.SCORES / "journals").glob("*.jsonl")) == journals


def test_missing_benchmark_fails_and_writes_nothing(workdir: Path, default_params: Params, tmp_path: Path) -> None:
    paths.PRMBENCH.unlink()
    with pytest.raises(DataError, match="rprm prepare"):
        evaluate.run(stage_params(default_params, tmp_path))
    assert not paths.REPORTS.exists() and not paths.SCORES.exists()


def test_sweep_plan_samples_once_at_the_largest_k(default_params: Params, tmp_path: Path) -> None:
    params = stage_params(default_params, tmp_path)
    data = params.model_dump()
    data["evaluate"]["k_sweep"] = [1, 8, 2]
    plan = evaluate.sweep_plan(Params.model_validate(data))
    assert (plan.k, plan.ks, plan.k_max) == (2, [1, 2, 8], 8)
    assert plan.thresholds == [0.3, 0.5, 0.7] and plan.threshold == 0.5
    assert evaluate.sampling_scoring(params, plan).sampling.n == 8


def test_prmbench_sampling_override_is_used_for_prmbench_only(default_params: Params) -> None:
    """evaluate.prmbench.sampling (null: scoring.sampling) samples PRMBench's analyses; ProcessBench keeps scoring."""
    plan = evaluate.sweep_plan(default_params)
    assert evaluate.sampling_scoring(default_params, plan, "prmbench") == evaluate.sampling_scoring(default_params, plan)
    p = default_params.model_copy(deep=True)
    p.evaluate.prmbench.sampling = p.scoring.sampling.model_copy(update={"top_p": 1.0})
    prmb, pb = evaluate.sampling_scoring(p, plan, "prmbench"), evaluate.sampling_scoring(p, plan)
    assert prmb.sampling.top_p == 1.0 and pb.sampling.top_p == default_params.scoring.sampling.top_p
    assert prmb.sampling.n == pb.sampling.n == plan.k_max and prmb.threshold == pb.threshold
    raw = p.model_dump(mode="json")
    raw["evaluate"]["prmbench"]["sampling"] = p.scoring.sampling.model_copy(update={"n": p.scoring.sampling.n + 1}).model_dump()
    from components.config import ParamsError, params_from_dict

    with pytest.raises(ParamsError, match=r"evaluate\.prmbench\.sampling\.n must equal scoring\.sampling\.n"):
        params_from_dict(raw)


def test_accuracy_by_error_kind_splits_the_processbench_accuracies() -> None:
    """Per kind of first error, solutions whose first error the PRM finds exactly; all-correct ones as `none`."""
    from components.records import ProcessBenchItem
    from components.scoring import ScoredSolution

    def item(i: int, label: int) -> ProcessBenchItem:
        return ProcessBenchItem(id=f"s{i}", problem="p", steps=["a", "b", "c"], label=label)

    items = [item(0, 1), item(1, 1), item(2, 2), item(3, -1), item(4, 0)]
    scored = [ScoredSolution("s0", 3, [[1.0, 1.0], [0.0, 0.0]]),  # first error found at step 1
              ScoredSolution("s1", 3, [[0.0, 1.0], [0.0, 0.0]]),  # step 0: 0.5 over two analyses, 0 over one
              ScoredSolution("s2", 3, [[1.0], [1.0], [1.0]]),  # missed
              ScoredSolution("s3", 3, [[1.0], [1.0], [0.9]]),  # all correct, right
              ScoredSolution("s4", 3, [[0.0]])]  # found, but its kind is not in the map
    kinds = {"s0": "wrong_result", "s1": "wrong_result", "s2": "wrong_copy_answer"}
    by_kind = evaluate.accuracy_by_error_kind(items, scored, kinds, k=2, threshold=0.5)
    assert by_kind == {
        "none": {"solutions": 1, "found": 1, "accuracy": 100.0},
        "unknown": {"solutions": 1, "found": 1, "accuracy": 100.0},
        "wrong_copy_answer": {"solutions": 1, "found": 0, "accuracy": 0.0},
        "wrong_result": {"solutions": 2, "found": 2, "accuracy": 100.0},
    }
    at_one = evaluate.accuracy_by_error_kind(items, scored, kinds, k=1, threshold=0.5)
    assert at_one["wrong_result"] == {"solutions": 2, "found": 1, "accuracy": 50.0}  # s1 now stops at step 0
