"""MLflow conventions, read back the way the UI reads them: over a real `mlflow server`'s REST API.

One `mlflow server` (127.0.0.1, free port, temp SQLite store, proxied artifacts) serves this
module. Stages log through it with `MLFLOW_TRACKING_URI=http://...`; the assertions then use
only its REST endpoints (`runs/search`, `runs/get`, `artifacts/list`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from components import tracking
from components.config import Params

EXPERIMENT = "r-prm-tracking-test"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    """Poll `url` until it answers 200; fail with the server log if the process dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"server at {url} not up after {timeout}s:\n{log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session, with everything it spawned."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real tracking server on 127.0.0.1 over a temp SQLite store; yields its base URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = root / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, log)
        yield url
    finally:
        stop_group(proc)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_server: str) -> Path:
    """A committed git project with stage inputs, as cwd, tracking to the server."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    data = tmp_path / "data" / "prepared"
    data.mkdir(parents=True)
    rows = [
        {"id": f"p{i}-s0", "problem_id": f"p{i}", "question": f"What is {i}+1?",
         "previous_steps": [], "now_step": f"{i}+1={i + 1}", "step_index": 0, "label": True}
        for i in range(5)
    ]
    (data / "steps_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "qwen2"}')
    (model / "weights.bin").write_bytes(bytes(range(256)) * 10)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["git", "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "inputs"], check=True)
    return tmp_path


def params() -> Params:
    p = Params()
    p.tracking.experiment = EXPERIMENT
    return p


def rest(base: str, endpoint: str, **query) -> dict:
    """GET one MLflow REST endpoint, as the UI does."""
    r = httpx.get(f"{base}/api/2.0/mlflow/{endpoint}", params=query, timeout=30)
    r.raise_for_status()
    return r.json()


def search(base: str, filter_string: str) -> list[dict]:
    exp = rest(base, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    r = httpx.post(
        f"{base}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [exp["experiment_id"]], "filter": filter_string, "max_results": 100},
        timeout=30,
    )
    r.raise_for_status()
    return r.json().get("runs", [])


def as_dict(items: list[dict] | None) -> dict[str, str]:
    return {i["key"]: i["value"] for i in items or []}


def test_data_hash_equals_dvc(tmp_path: Path) -> None:
    """Folder and file hashes equal the md5s DVC writes for the same data."""
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "a.txt").write_text("alpha\r\nbeta\n")
    (tmp_path / "folder" / "sub" / "b.bin").write_bytes(os.urandom(3000))
    (tmp_path / "single.jsonl").write_text('{"x": 1}\n')
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dvc, "add", "-q", "folder", "single.jsonl"], cwd=tmp_path, check=True)
    for name in ("folder", "single.jsonl"):
        dvc_md5 = yaml.safe_load((tmp_path / f"{name}.dvc").read_text())["outs"][0]["md5"]
        assert tracking.data_hash(tmp_path / name) == dvc_md5


def test_pipeline_parent_with_nested_stage_runs(project: Path, mlflow_server: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Parent run + one nested run per stage, with params, metrics, tags, inputs, artifacts."""
    p = params()
    parent = tracking.start_pipeline_run(p, run_name="pipeline-test", tags={"prefect.flow_run_id": "abc"})
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)
    steps = Path("data/prepared/steps_train.jsonl")
    model = Path("models/base")

    with tracking.stage_run("synthesize", p, ["teacher", "synthesize"], inputs=[steps]):
        tracking.log_report({"kept": 4, "agreement": {"overall": 0.75, "yes": 1.0}, "ok": True},
                            "reports/synthesis.json")
        tracking.log_table([{"sample_id": "p0-s0", "kept": True}], "tables/critiques.json")
    with tracking.stage_run("sft", p, ["sft"], inputs=[model, "missing/file.jsonl"]):
        tracking.log_report({"eval_loss": 1.5})
    with pytest.raises(RuntimeError), tracking.stage_run("dpo", p, ["dpo"]):
        raise RuntimeError("training diverged")
    tracking.end_pipeline_run(p, parent, metrics={"processbench_avg_f1": 0.42})

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    top = rest(mlflow_server, "runs/get", run_id=parent)["run"]
    assert top["info"]["status"] == "FINISHED"
    assert top["info"]["run_name"] == "pipeline-test"
    assert as_dict(top["data"].get("metrics"))["processbench_avg_f1"] == pytest.approx(0.42)
    top_tags = as_dict(top["data"]["tags"])
    assert top_tags["mlflow.source.git.commit"] == commit
    assert top_tags["prefect.flow_run_id"] == "abc"
    assert "mlflow.parentRunId" not in top_tags

    children = search(mlflow_server, f"tags.mlflow.parentRunId = '{parent}'")
    by_name = {r["info"]["run_name"]: r for r in children}
    assert set(by_name) == {"synthesize", "sft", "dpo"}
    assert by_name["dpo"]["info"]["status"] == "FAILED"

    synth = rest(mlflow_server, "runs/get", run_id=by_name["synthesize"]["info"]["run_id"])["run"]
    assert synth["info"]["status"] == "FINISHED"
    prm = as_dict(synth["data"]["params"])
    assert prm["synthesize.balance"] == "True"
    assert prm["teacher.sampling.n"] == str(p.teacher.sampling.n)
    assert prm["teacher.backend.openai.api_key_env"] == "OPENAI_API_KEY"  # the name, never a key
    assert not any(k.startswith("sft.") for k in prm)
    metrics = as_dict(synth["data"]["metrics"])
    assert metrics == {"kept": 4.0, "agreement.overall": 0.75, "agreement.yes": 1.0}
    tags = as_dict(synth["data"]["tags"])
    assert tags["dvc.stage"] == "synthesize"
    assert tags["mlflow.source.git.commit"] == commit
    assert tags["git.dirty"] == "false"
    assert tags["mlflow.parentRunId"] == parent
    assert tags["data.md5.data/prepared/steps_train.jsonl"] == tracking.data_hash(steps)
    inputs = synth["inputs"]["dataset_inputs"]
    assert len(inputs) == 1
    ds = inputs[0]["dataset"]
    assert ds["name"] == "data/prepared/steps_train.jsonl"
    assert ds["digest"] == tracking.data_hash(steps)
    assert ds["source_type"] == "local"
    assert json.loads(ds["profile"])["num_rows"] == 5
    assert "now_step" in ds["schema"]
    listing = rest(mlflow_server, "artifacts/list", run_id=synth["info"]["run_id"], path="reports")
    assert [f["path"] for f in listing["files"]] == ["reports/synthesis.json"]
    listing = rest(mlflow_server, "artifacts/list", run_id=synth["info"]["run_id"], path="tables")
    assert [f["path"] for f in listing["files"]] == ["tables/critiques.json"]

    sft = rest(mlflow_server, "runs/get", run_id=by_name["sft"]["info"]["run_id"])["run"]
    sft_tags = as_dict(sft["data"]["tags"])
    assert sft_tags["data.md5.models/base"] == tracking.data_hash(model)
    assert sft_tags["data.md5.models/base"].endswith(".dir")
    assert not any("missing" in k for k in sft_tags)
    (model_input,) = sft["inputs"]["dataset_inputs"]
    assert model_input["dataset"]["digest"] == tracking.data_hash(model)
    assert as_dict(model_input["tags"])["kind"] == "model"


def test_stage_alone_logs_a_top_level_run(project: Path, mlflow_server: str) -> None:
    """Without a pipeline, a stage still logs a complete run, at the top level."""
    p = params()
    with tracking.stage_run("prepare", p, ["data", "prepare"],
                            inputs=["data/prepared/steps_train.jsonl"]) as run:
        tracking.log_report({"samples": 5})
    got = rest(mlflow_server, "runs/get", run_id=run.info.run_id)["run"]
    tags = as_dict(got["data"]["tags"])
    assert "mlflow.parentRunId" not in tags
    assert tags["dvc.stage"] == "prepare"
    assert "mlflow.source.git.commit" in tags
    assert as_dict(got["data"]["params"])["prepare.seed"] == "42"
    assert as_dict(got["data"]["metrics"]) == {"samples": 5.0}
    assert len(got["inputs"]["dataset_inputs"]) == 1


def test_unknown_parent_falls_back_to_top_level(project: Path, mlflow_server: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale RPRM_PARENT_RUN_ID (another store) does not fail the stage."""
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, "0123456789abcdef0123456789abcdef")
    with tracking.stage_run("prepare", params(), ["prepare"]) as run:
        pass
    got = rest(mlflow_server, "runs/get", run_id=run.info.run_id)["run"]
    assert got["info"]["status"] == "FINISHED"
    assert "mlflow.parentRunId" not in as_dict(got["data"]["tags"])


def test_run_url_points_at_the_run(project: Path, mlflow_server: str) -> None:
    """The link the flow publishes opens the run in the server's UI."""
    p = params()
    run_id = tracking.start_pipeline_run(p)
    url = tracking.run_url(p, run_id)
    assert url.startswith(mlflow_server) and url.endswith(f"/runs/{run_id}")
    assert httpx.get(url.split("#")[0], timeout=30).status_code == 200
