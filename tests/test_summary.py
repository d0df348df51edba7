"""The summarize stage: reports/headline.json, a dozen flat numbers with keys no other report uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from components.summary import headline, table

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("base", "sft", "dpo")


def _reports(root: Path) -> Path:
    """Evaluate, best-of-n and dpo reports shaped as their stages write them (numbers made up)."""
    reports = root / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    f1 = {"base": 0.0, "sft": 11.0, "dpo": 16.26}
    reach = {"base": 0.0, "sft": 0.99, "dpo": 0.98361}
    (reports / "processbench.json").write_text(json.dumps({
        "processbench_avg_f1": 4.1, "headline_model": "dpo",
        "models": {m: {"avg_f1": 1.0 + i, "subsets": {"gsm8k": {"f1": 2.0}}, "verdict_reach_rate": 0.5}
                   for i, m in enumerate(MODELS)}}))
    (reports / "prmbench.json").write_text(json.dumps({
        "prmbench_prmscore": 0.52, "models": {m: {"prmscore": 0.5 + i / 100, "groups": {"simplicity": 0.4}}
                                              for i, m in enumerate(MODELS)}}))
    (reports / "heldout.json").write_text(json.dumps({
        "domain": "arithmetic", "items": 60, "heldout_f1": 16.26, "headline_model": "dpo",
        "trivial_predictors": {"first_step_wrong": {"f1": 0.0}},
        "models": {m: {"f1": f1[m], "verdict_reach_rate": reach[m]} for m in MODELS}}))
    (reports / "bon.json").write_text(json.dumps({"aggregation": "min", "datasets": {"arithmetic": {
        "n": 8, "pass@1": 0.308, "maj@8": 0.733, "prm@8": 0.133, "prm_vote@8": 0.533}}}))
    (reports / "dpo.json").write_text(json.dumps({"preference_accuracy": 0.5523255813953488, "runtime_s": 80.1}))
    (reports / "pairs.json").write_text(json.dumps({"valid_rate": 0.866}))
    return reports


def _flat_keys(obj: object, prefix: str = "") -> set[str]:
    """Every key path as DVC flattens a metrics file (`a.b.c`)."""
    if not isinstance(obj, dict):
        return {prefix}
    out: set[str] = set()
    for k, v in obj.items():
        out |= _flat_keys(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def test_headline_numbers(tmp_path: Path) -> None:
    numbers, missing = headline(_reports(tmp_path))
    assert missing == []
    assert numbers == {
        "heldout_f1_base": 0.0, "heldout_f1_sft": 11.0, "heldout_f1_dpo": 16.26,
        "heldout_reach_base": 0.0, "heldout_reach_sft": 0.99, "heldout_reach_dpo": 0.9836,
        "processbench_f1_base": 1.0, "processbench_f1_sft": 2.0, "processbench_f1_dpo": 3.0,
        "prmscore_base": 0.5, "prmscore_sft": 0.51, "prmscore_dpo": 0.52,
        "bon_gain_arithmetic": -0.6, "dpo_pref_acc": 0.5523,
    }
    lines = table(numbers).splitlines()
    assert len(lines) == 14 and max(len(line) for line in lines) < 40


def test_headline_keys_are_used_by_no_other_report(tmp_path: Path) -> None:
    """`dvc exp show` prefixes a column that two metrics files share; headline keys must not collide."""
    reports = _reports(tmp_path)
    numbers, _ = headline(reports)
    others = set().union(*(_flat_keys(json.loads(p.read_text())) for p in reports.glob("*.json")))
    assert not set(numbers) & others


def test_missing_reports_leave_their_numbers_out(tmp_path: Path) -> None:
    reports = _reports(tmp_path)
    (reports / "bon.json").unlink()
    (reports / "dpo.json").unlink()
    numbers, missing = headline(reports)
    assert missing == ["bon", "dpo"]
    assert "bon_gain_arithmetic" not in numbers and "dpo_pref_acc" not in numbers
    assert numbers["heldout_f1_dpo"] == 16.26


def test_cli_writes_the_metrics_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.cli import app

    _reports(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = CliRunner().invoke(app, ["summarize"])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "reports/headline.json").read_text())
    assert written["heldout_f1_dpo"] == 16.26 and len(written) == 14
    assert "heldout_f1_dpo" in result.output


def test_cli_without_reports_fails_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = CliRunner().invoke(app, ["summarize"])
    assert result.exit_code == 2
    assert not (tmp_path / "reports/headline.json").exists()


def test_the_stage_is_a_dvc_metric_between_best_of_n_and_register() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    names = list(stages)
    assert names.index("best-of-n") < names.index("summarize") < names.index("register")
    assert stages["summarize"]["metrics"] == [{"reports/headline.json": {"cache": False}}]
    deps = set(stages["summarize"]["deps"])
    assert {"reports/heldout.json", "reports/bon.json", "reports/dpo.json", "components/summary.py"} <= deps
