"""The `rprm` console script: every stage is a command, and dvc.yaml runs exactly those."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["base-model", "prepare", "synthesize", "sft", "sample-pairs", "dpo", "evaluate", "best-of-n", "register"]


def test_help_lists_every_stage() -> None:
    out = subprocess.run([sys.executable, "-m", "components.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for stage in [*STAGES, "promote", "score-processbench", "score-prmbench"]:
        assert stage in out.stdout, stage


def test_dvc_stages_are_rprm_commands_in_dag_order() -> None:
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert list(dvc["stages"]) == STAGES
    for name, stage in dvc["stages"].items():
        assert stage["cmd"].split()[:2] == ["rprm", name]


def test_layout_is_the_product_shape() -> None:
    for path in ["flows", "components", "dvc.yaml", "params.yaml", "tests", "pyproject.toml",
                 "README.md", "profiles", "bench", "data/bundled", ".ci/run"]:
        assert (ROOT / path).exists(), path


def test_bad_params_file_fails_with_dotted_path(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["sft"]["learning_rate"] = "fast"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "components.cli", "validate-params", "-p", str(bad)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert "sft.learning_rate" in out.stderr and "valid number" in out.stderr
