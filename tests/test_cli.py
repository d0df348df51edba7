"""The `rprm` console script: every stage is a command (dvc.yaml runs exactly those) whose help says
what it reads, writes and resumes; an unreachable tracking server fails fast."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["base-model", "prepare", "synthesize", "sft", "sample-pairs", "dpo", "evaluate", "best-of-n", "summarize",
          "register"]


def test_help_lists_every_stage() -> None:
    out = subprocess.run([sys.executable, "-m", "components.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for stage in [*STAGES, "promote", "score", "score-processbench", "score-prmbench"]:
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


def _help(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "components.cli", *args, "--help"], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "120"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_each_stage_help_says_what_it_reads_writes_and_how_it_resumes() -> None:
    for stage in [*STAGES, "promote", "score"]:
        text = " ".join(_help(stage).split())
        for word in ("Reads:", "Writes:", "Resume:"):
            assert word in text, (stage, word)
    assert "data/pairs/journal.jsonl" in " ".join(_help("sample-pairs").split())
    assert "checkpoints/sft/" in _help("sft")
    assert "OUT.journal" in " ".join(_help("score").split())


def test_help_shows_no_type_label_on_flags() -> None:
    for args in [(), *[(c,) for c in [*STAGES, "promote", "score", "score-processbench", "score-prmbench"]]]:
        text = _help(*args)
        assert "--help" in text and "<bool>" not in text, args


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (nothing listens on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("command", ["promote", "sample-pairs"])
def test_unreachable_tracking_server_fails_within_seconds_and_writes_nothing(tmp_path: Path, command: str) -> None:
    """tracking.tracking_uri pointing at a closed port: one line naming the URI, exit 2, no files."""
    uri = f"http://127.0.0.1:{free_port()}"
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["tracking"]["tracking_uri"] = uri
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    before = _tree(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RPRM_PARENT_RUN_ID")}
    env["PYTHONPATH"] = str(ROOT)
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "components.cli", command], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    elapsed = time.monotonic() - start
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MLflow tracking server " + uri), out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert elapsed < 60, elapsed  # MLflow's own retries took ~250 s
    assert _tree(tmp_path) == before
