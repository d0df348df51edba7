"""`rprm register` and `rprm promote` on a temporary SQLite store (real MLflow registry)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from components import registry
from components.config import Params
from components.io import DataError, StageRefused
from components.records import PRMBenchItem, ProcessBenchItem
from components.tracking import data_hash

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> Path:
    """A project dir (cwd) with models/dpo and a SQLite tracking store of its own."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # the client in these tests reads this store too
    monkeypatch.delenv("RPRM_PARENT_RUN_ID", raising=False)
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "dpo")
    return tmp_path


def params(margin: float = 0.0) -> Params:
    """Registry params judged on ProcessBench (the reports these tests write); the gate's floors are
    exercised by the gate tests below, so a null F1 here is registered with the gate off."""
    p = Params()
    p.tracking.experiment = "r-prm-registry-test"
    p.scoring.sampling.n = 2
    p.promote.margin = margin
    p.promote.metric = "processbench_avg_f1"
    p.register.gate.benchmark = "processbench"
    return p


def write_reports(avg_f1: float | None, prmscore: float = 0.55) -> None:
    """Evaluate-stage reports with one section per evaluated model."""
    Path("reports").mkdir(exist_ok=True)
    subsets = {"gsm8k": {"f1": 40.0}, "math": {"f1": None}}
    pb = {"processbench_avg_f1": avg_f1, "headline_model": "dpo",
          "models": {m: {"avg_f1": avg_f1, "subsets": subsets, "verdict_reach_rate": 0.97} for m in ("sft", "dpo")}}
    prm = {"prmbench_prmscore": prmscore, "headline_model": "dpo",
           "models": {m: {"prmscore": prmscore, "groups": {"simplicity": 0.5, "soundness": None}}
                      for m in ("sft", "dpo")}}
    Path("reports/processbench.json").write_text(json.dumps(pb))
    Path("reports/prmbench.json").write_text(json.dumps(prm))


def register(avg_f1: float | None, p: Params | None = None) -> dict:
    write_reports(avg_f1)
    return registry.run_register(p or params())


def aliases(name: str = "r-prm") -> dict[str, str]:
    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


def test_register_logs_pyfunc_version_with_alias_and_tags(project: Path) -> None:
    report = register(45.5)
    assert report["version"] == 1
    assert json.loads(Path("reports/registration.json").read_text()) == report
    assert aliases() == {"challenger": "1"}

    client = MlflowClient()
    version = client.get_model_version_by_alias("r-prm", "challenger")
    assert version.tags["processbench_avg_f1"] == "45.5"
    assert version.tags["processbench_gsm8k_f1"] == "40"
    assert "processbench_math_f1" not in version.tags  # undefined F1 is not a number
    assert version.tags["prmbench_prmscore"] == "0.55"
    assert version.tags["prmbench_simplicity"] == "0.5"
    assert version.tags["source.model_md5"] == data_hash("models/dpo")
    assert version.tags["source.run_id"] == report["run_id"]

    info = mlflow.models.get_model_info("models:/r-prm@challenger")
    sig = info.signature
    assert sig.inputs.input_names() == ["question", "steps", "id"]
    assert sig.outputs.input_names() == ["id", "step_rewards", "first_error", "verdicts"]
    assert sig.params.to_dict()[0]["name"] == "early_exit"

    local = Path(mlflow.artifacts.download_artifacts("models:/r-prm/1"))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["model_code_path"].endswith("tracking.py")  # the code file; it wraps serving's service
    assert pyfunc["config"]["scoring"]["sampling"]["n"] == 2
    assert pyfunc["config"]["scoring"]["max_steps"] == 64
    assert pyfunc["config"]["backend"]["kind"] == "hf"
    assert mlmodel["metadata"]["rprm"]["scoring"]["threshold"] == 0.5
    assert (local / "artifacts" / "dpo" / "config.json").exists()
    # the code shipped is what serving imports (its static import closure) and the package data
    code = local / "code"
    shipped = {f.relative_to(code) for f in code.rglob("*") if f.is_file()}
    assert shipped == set(registry.serving_code_files())
    assert {Path("components/serving.py"), Path("components/__init__.py"), Path("components/scoring.py"),
            Path("components/backends/__init__.py"), Path("components/backends/hf.py"),
            Path("components/resources/teacher_one_shot_official.json")} <= shipped
    for never in ("training", "sft", "dpo", "best_of_n", "cli", "registry", "modules"):
        assert Path(f"components/{never}.py") not in shipped, never
    reqs = (local / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in reqs) and any(r.startswith("mlflow==") for r in reqs)

    run = client.get_run(report["run_id"])
    assert run.data.tags["dvc.stage"] == "register"
    assert run.data.params["register.alias"] == "challenger"
    assert run.data.metrics["headline.processbench_avg_f1"] == 45.5


def test_register_fails_cleanly_without_reports(project: Path) -> None:
    with pytest.raises(DataError, match="processbench.json"):
        registry.run_register(params())
    assert not Path("reports/registration.json").exists()
    assert MlflowClient().search_registered_models() == []


def test_register_rejects_a_folder_without_model(project: Path) -> None:
    write_reports(40.0)
    shutil.rmtree("models/dpo")
    Path("models/dpo").mkdir()
    with pytest.raises(DataError, match="config.json"):
        registry.run_register(params())


def test_promote_without_champion_then_kept_then_moved(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """First challenger becomes champion; a small gain is kept out; a large one replaces it.
    Each time `rprm promote` prints which version is the champion afterwards, and why."""
    p = params(margin=2.0)
    assert registry.promote(p)["reason"].startswith("no version has the alias")
    assert capsys.readouterr().out.startswith("no promotion: r-prm has no champion (no version has the alias")

    register(40.0, p)
    capsys.readouterr()
    first = registry.promote(p)
    assert first["promoted"] and first["reason"] == "no champion yet"
    assert capsys.readouterr().out == "promoted: r-prm version 1 is now the champion (no champion yet)\n"
    assert aliases() == {"challenger": "1", "champion": "1"}
    again = registry.promote(p)
    assert not again["promoted"] and "already the champion" in again["reason"]
    assert capsys.readouterr().out.startswith("no promotion: r-prm version 1 stays the champion (")

    register(41.5, p)  # +1.5 <= margin 2.0
    capsys.readouterr()
    kept = registry.promote(p)
    assert not kept["promoted"] and kept["champion_after"] == 1
    assert "does not beat" in kept["reason"]
    assert capsys.readouterr().out.startswith("no promotion: r-prm version 1 stays the champion (challenger")
    assert aliases() == {"challenger": "2", "champion": "1"}
    client = MlflowClient()
    v1, v2 = client.get_model_version("r-prm", "1"), client.get_model_version("r-prm", "2")
    assert v2.tags["promotion.decision"] == "kept"
    assert v2.tags["promotion.compared_with"] == "1"
    assert v1.tags["promotion.defended_against"] == "2"
    assert v1.tags["promotion.reason"] == kept["reason"]

    register(42.5, p)  # +2.5 > margin 2.0
    capsys.readouterr()
    moved = registry.promote(p)
    assert moved["promoted"] and moved["champion_before"] == 1 and moved["champion_after"] == 3
    assert capsys.readouterr().out.startswith(
        "promoted: r-prm version 3 is now the champion, replacing version 1 (challenger")
    assert moved["gain"] == pytest.approx(2.5)
    assert aliases() == {"challenger": "3", "champion": "3"}
    v1, v3 = client.get_model_version("r-prm", "1"), client.get_model_version("r-prm", "3")
    assert v3.tags["promotion.decision"] == "promoted"
    assert v1.tags["promotion.replaced_by"] == "3"


def test_undefined_f1_registers_but_cannot_beat_a_champion(project: Path) -> None:
    """A null ProcessBench F1 (e.g. a subset without correct solutions) is left out, not fatal."""
    p = params(margin=0.0)
    p.register.gate.enabled = False  # the gate would refuse an undefined F1 (tested below)
    register(None, p)
    v1 = MlflowClient().get_model_version("r-prm", "1")
    assert "processbench_avg_f1" not in v1.tags and v1.tags["prmbench_prmscore"] == "0.55"
    first = registry.promote(p)
    assert first["promoted"] and "has no 'processbench_avg_f1'" in first["reason"]
    register(50.0, p)
    decision = registry.promote(p)  # the champion has no metric to compare with
    assert not decision["promoted"] and "compare by hand" in decision["reason"]
    register(None, p)
    decision = registry.promote(p)
    assert not decision["promoted"] and "undefined" in decision["reason"]
    assert aliases() == {"challenger": "3", "champion": "1"}


def test_unevaluated_model_is_a_clear_error(project: Path) -> None:
    write_reports(40.0)
    p = params()
    p.register.model = "sft"
    shutil.copytree("models/dpo", "models/sft")
    report = json.loads(Path("reports/processbench.json").read_text())
    del report["models"]["sft"]
    Path("reports/processbench.json").write_text(json.dumps(report))
    with pytest.raises(DataError, match=r"models\.sft.*not evaluated"):
        registry.run_register(p)


def test_equal_metric_does_not_promote_at_zero_margin(project: Path) -> None:
    p = params(margin=0.0)
    register(40.0, p)
    assert registry.promote(p)["promoted"]
    register(40.0, p)
    decision = registry.promote(p)
    assert not decision["promoted"] and decision["gain"] == 0.0
    assert aliases()["champion"] == "1"


def test_register_model_sft_registers_the_sft_folder(project: Path) -> None:
    """`register.model: sft` logs models/sft (its hash, its files), with models/dpo absent."""
    shutil.move("models/dpo", "models/sft")
    Path("models/sft/SFT_MARKER").write_text("sft\n")  # tells the SFT folder apart in the artifact
    p = params()
    p.register.model = "sft"
    report = register(42.0, p)
    assert report["model"] == "sft"
    assert report["model_md5"] == data_hash("models/sft")
    version = MlflowClient().get_model_version_by_alias("r-prm", "challenger")
    assert version.tags["source.model"] == "sft"
    assert version.tags["source.model_md5"] == data_hash("models/sft")
    local = Path(mlflow.artifacts.download_artifacts("models:/r-prm/1"))
    assert (local / "artifacts" / "sft" / "SFT_MARKER").read_text() == "sft\n"
    assert yaml.safe_load((local / "MLmodel").read_text())["metadata"]["rprm"]["model"] == "sft"


def test_register_names_the_missing_configured_model_folder(project: Path) -> None:
    write_reports(40.0)
    p = params()
    p.register.model = "sft"  # models/dpo exists; models/sft does not
    with pytest.raises(DataError, match=r"^models/sft: does not exist: run `rprm sft` \(or `dvc repro sft`\) first"):
        registry.run_register(p)
    assert MlflowClient().search_registered_models() == []


# --------------------------------------------------------------------------------------
# The quality gate
# --------------------------------------------------------------------------------------


def test_gate_refuses_low_verdict_reach_or_f1_and_registers_nothing(project: Path) -> None:
    p = params()
    write_reports(45.0)
    pb = json.loads(Path("reports/processbench.json").read_text())
    pb["models"]["dpo"]["verdict_reach_rate"] = 0.5
    Path("reports/processbench.json").write_text(json.dumps(pb))
    with pytest.raises(StageRefused, match=r"processbench_verdict_reach_rate=0\.500 is below the floor"):
        registry.run_register(p)
    write_reports(0.0)  # F1 0: no better than "the first step is wrong" / "no step is wrong"
    with pytest.raises(StageRefused, match=r"processbench_avg_f1=0\.00 does not beat the better trivial"):
        registry.run_register(p)
    assert MlflowClient().search_registered_models() == []
    assert not Path("reports/registration.json").exists()
    p.register.gate.benchmark = "heldout"  # no held-out benchmark was evaluated: said, not guessed
    write_reports(45.0)
    with pytest.raises(StageRefused, match="no held-out benchmark"):
        registry.run_register(p)


def test_gate_refuses_a_model_that_never_reaches_a_verdict_end_to_end(
    project: Path, default_params: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The random tiny model never writes the verdict phrase: evaluate it for real on a small
    held-out arithmetic benchmark, then `rprm register` refuses it (exit 2, metric named)."""
    from typer.testing import CliRunner

    from components import arithmetic, evaluate, paths
    from components.cli import app
    from components.io import write_json, write_jsonl

    data = default_params.model_dump()
    data["tracking"]["tracking_uri"] = os.environ["MLFLOW_TRACKING_URI"]
    data["tracking"]["experiment"] = "r-prm-gate-test"
    data["scoring"]["sampling"].update(n=1, max_new_tokens=8)
    data["evaluate"].update(models=["dpo"], k_sweep=[1], thresholds=[])
    p = Params.model_validate(data)
    domain = p.domain.arithmetic.model_copy(update={"heldout_problems": 5})  # 4 with an error, 1 without
    solved = arithmetic.heldout_solutions(domain, arithmetic.problem_splits(domain)["heldout"])
    write_jsonl(paths.HELDOUT, [item for item, _ in solved])
    write_json(paths.HELDOUT_KINDS, {item.id: kind for item, kind in solved if kind})
    bench = json.loads((ROOT / "data/bundled/processbench/gsm8k.jsonl").read_text().splitlines()[0])
    write_jsonl(paths.PROCESSBENCH, [ProcessBenchItem(**{**bench, "steps": bench["steps"][:2], "label": 1},
                                                      subset="gsm8k")])
    row = json.loads((ROOT / "data/bundled/prmbench/prmbench_preview.jsonl").read_text().splitlines()[0])
    write_jsonl(paths.PRMBENCH, [PRMBenchItem(**{**row, "modified_process": row["modified_process"][:2]})])
    evaluate.run(p)
    held = json.loads(Path("reports/heldout.json").read_text())
    assert held["models"]["dpo"]["verdict_reach_rate"] == 0.0
    by_kind = held["models"]["dpo"]["by_first_error_kind"]  # the same solutions, split by their first error
    assert {kind or "none" for _, kind in solved} == set(by_kind) and {None, "no_source"} <= {k for _, k in solved}
    assert sum(v["solutions"] for v in by_kind.values()) == len(solved)
    assert by_kind["none"]["accuracy"] == pytest.approx(held["models"]["dpo"]["acc_correct"])
    erroneous = [v for kind, v in by_kind.items() if kind != "none"]
    assert 100.0 * sum(v["found"] for v in erroneous) / sum(v["solutions"] for v in erroneous) == pytest.approx(
        held["models"]["dpo"]["acc_erroneous"])
    Path("params.yaml").write_text(yaml.safe_dump(p.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["register", "-p", "params.yaml"])
    assert result.exit_code == 2
    assert "heldout_verdict_reach_rate=0.000 is below the floor register.gate.min_verdict_reach=0.9" in result.output
    assert MlflowClient().search_registered_models() == []


def test_promote_refuses_to_compare_versions_judged_on_different_benchmarks(project: Path) -> None:
    p = params()
    Path("data/prepared").mkdir(parents=True)
    Path("data/prepared/processbench.jsonl").write_text('{"id": "a"}\n')
    register(40.0, p)
    assert registry.promote(p)["promoted"]
    Path("data/prepared/processbench.jsonl").write_text('{"id": "b"}\n')  # another benchmark file
    register(60.0, p)
    decision = registry.promote(p)
    assert not decision["promoted"] and "different processbench benchmark files" in decision["reason"]
    assert aliases()["champion"] == "1"
