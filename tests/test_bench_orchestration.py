"""Section c of the bench (bench/orchestration.py) on a small real DVC project in a temp git repo.

The no-op `dvc repro` is timed in a copy of the completed pipeline: the copy must hold every dep
and out, including persistent trainer checkpoints and paths under names the copy otherwise leaves
out (a `cache/` folder), or the "no-op" reruns the training stages.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """import pathlib, sys
pathlib.Path("models/m").mkdir(parents=True, exist_ok=True)
pathlib.Path("models/m/w.txt").write_text(pathlib.Path("data/cache/x.txt").read_text() * 2)
pathlib.Path("checkpoints/train").mkdir(parents=True, exist_ok=True)
pathlib.Path("checkpoints/train/ckpt.txt").write_text("step 10")
pathlib.Path("reports").mkdir(exist_ok=True)
pathlib.Path("reports/train.json").write_text('{"loss": 0.5}')
"""


@pytest.fixture
def orchestration(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import bench.orchestration as orchestration

    return orchestration


def _project(root: Path) -> Path:
    """A one-stage pipeline with a persistent, uncached checkpoint out, run to completion."""
    (root / "data" / "cache").mkdir(parents=True)
    (root / "data" / "cache" / "x.txt").write_text("abc")
    (root / "tmp").mkdir()
    (root / "tmp" / "scratch.txt").write_text("not part of the pipeline")
    (root / "train.py").write_text(TRAIN)
    (root / "params.yaml").write_text("seed: 0\n")
    stages = {"stages": {"train": {
        "cmd": f"{Path(sys.executable).as_posix()} train.py",
        "deps": ["train.py", "data/cache/x.txt"],
        "outs": ["models/m", {"checkpoints/train": {"persist": True, "cache": False}}],
        "metrics": [{"reports/train.json": {"cache": False}}],
    }}}
    (root / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "repro", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return root


def test_the_copy_of_a_completed_pipeline_is_up_to_date(orchestration, tmp_path: Path) -> None:
    root = _project(tmp_path / "real")
    assert orchestration.project_pipeline_complete(root)
    work = tmp_path / "copy"
    mode, n_stages = orchestration.prepare_project(work, root)
    assert mode == orchestration.COPY_MODE == "copy of the project after a completed real pipeline"
    assert n_stages == 1
    assert (work / "checkpoints" / "train" / "ckpt.txt").read_text() == "step 10"
    assert (work / "data" / "cache" / "x.txt").exists()  # a dep under a name the copy skips
    assert not (work / "tmp").exists() and not (work / ".dvc" / "cache").exists()
    timing = orchestration.time_noop_repro(work, 1)
    assert timing["first_repro_ran"] == [] and len(timing["noop_repro_s"]) == 1


def test_an_unfinished_pipeline_is_timed_on_the_placeholder_dag(orchestration, tmp_path: Path) -> None:
    root = _project(tmp_path / "real")
    (root / "data" / "cache" / "x.txt").write_text("changed")
    assert orchestration.changed_stages(root) == ["train"]
    work = tmp_path / "copy"
    mode, _ = orchestration.prepare_project(work, root)
    assert mode.startswith(orchestration.PLACEHOLDER_MODE) and mode.endswith("do not exist")
    assert "bench_stage.py" in yaml.safe_load((work / "dvc.yaml").read_text())["stages"]["train"]["cmd"]
    timing = orchestration.time_noop_repro(work, 1)
    assert timing["first_repro_ran"] == ["train"]
