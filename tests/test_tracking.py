"""MLflow conventions, read back the way the UI reads them: over a real `mlflow server`'s REST API.

One `mlflow server` (127.0.0.1, free port, temp SQLite store, proxied artifacts) serves this
module. Stages log through it with `MLFLOW_TRACKING_URI=http://...`; the assertions then use
only its REST endpoints (`runs/search`, `runs/get`, `artifacts/list`).
"""

from __future__ import annotations

import json
import os
import shutil
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
    """The link the flow publishes opens the run in the server's UI (its runs view)."""
    p = params()
    run_id = tracking.start_pipeline_run(p)
    url = tracking.run_url(p, run_id)
    assert url.startswith(mlflow_server) and url.endswith(f"/runs/{run_id}{tracking.UI_QUERY}")
    assert httpx.get(url.split("#")[0], timeout=30).status_code == 200


# --------------------------------------------------------------------------------------
# A local SQLite store that moves with the project
# --------------------------------------------------------------------------------------

# Run in the project folder with the default params (tracking_uri sqlite:///mlruns.db, relative):
# log a stage run with a report artifact; with argv[1] == "first", also a registered pyfunc model;
# then read back every run's report and the registered model's MLmodel; print what it saw.
STORE_SCRIPT = r'''
import json, sys
from pathlib import Path
import mlflow
from components import tracking
from components.config import Params

class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input

p = Params()
p.tracking.experiment = sys.argv[2]
with tracking.stage_run("prepare", p, ["prepare"]) as run:
    tracking.log_report({"samples": len(mlflow.search_runs(output_format="list"))}, "reports/prepare.json")  # runs so far
    if sys.argv[1] == "first":
        info = mlflow.pyfunc.log_model(name="m", python_model=Echo(), pip_requirements=["mlflow"])
        mlflow.register_model(info.model_uri, "moved-model")
client = mlflow.MlflowClient()
exp = client.get_experiment_by_name(sys.argv[2])
runs = client.search_runs([exp.experiment_id])
reports = {r.info.run_id: json.loads(Path(mlflow.artifacts.download_artifacts(
    run_id=r.info.run_id, artifact_path="reports/prepare.json")).read_text())["samples"] for r in runs}
model = Path(mlflow.artifacts.download_artifacts("models:/moved-model/1"))
print(json.dumps({"run": run.info.run_id, "artifact_uri": run.info.artifact_uri,
                  "location": exp.artifact_location, "tags": exp.tags, "reports": reports,
                  "model_files": sorted(f.name for f in model.iterdir()),
                  "storage": client.get_model_version_download_uri("moved-model", "1")}))
'''

LEGACY_SCRIPT = r'''
import mlflow
mlflow.set_tracking_uri("sqlite:///mlruns.db")
mlflow.set_experiment("legacy")  # as MLflow creates it: artifacts in <cwd>/mlruns/<id>
with mlflow.start_run() as run:
    mlflow.log_text("old", "note.txt")
print(run.info.run_id)
'''


def _python(script: str, cwd: Path, *args: str) -> str:
    """Run a Python script in `cwd` with the project importable and no MLFLOW_TRACKING_URI."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", tracking.PARENT_RUN_ENV)}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout.strip().splitlines()[-1]


def _move(src: Path, dest: Path) -> None:
    """Move a project folder the way a user would: copy it, then delete the original."""
    shutil.copytree(src, dest)
    shutil.rmtree(src)


def test_a_moved_project_store_reads_and_writes_artifacts_in_its_new_folder(tmp_path: Path) -> None:
    old, new = tmp_path / "old" / "project", tmp_path / "new" / "project"
    old.mkdir(parents=True)
    first = json.loads(_python(STORE_SCRIPT, old, "first", "r-prm-moved"))
    assert first["location"] == str(old / "mlartifacts" / "r-prm-moved")
    assert first["tags"]["mlflow.experimentKind"] == "custom_model_development"
    assert (old / "mlartifacts/r-prm-moved" / first["run"] / "artifacts/reports/prepare.json").exists()
    assert not (old / "mlruns").exists()

    _move(old, new)
    second = json.loads(_python(STORE_SCRIPT, new, "second", "r-prm-moved"))
    assert second["location"] == str(new / "mlartifacts" / "r-prm-moved")
    assert second["artifact_uri"] == str(new / "mlartifacts/r-prm-moved" / second["run"] / "artifacts")
    assert (new / "mlartifacts/r-prm-moved" / second["run"] / "artifacts/reports/prepare.json").exists()
    assert second["tags"][tracking.ARTIFACT_ROOT_TAG] == str(new)
    # the first run's artifacts and the registered model are read from the new folder
    assert second["reports"] == {first["run"]: 1, second["run"]: 2}
    assert "MLmodel" in second["model_files"] and second["storage"].startswith(str(new))
    assert not old.exists()  # nothing was read from or written to the old folder


def test_a_moved_store_made_before_the_artifact_root_tag_is_found_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store MLflow set up on its own (artifacts in <project>/mlruns/<id>) follows the move too."""
    old, new = tmp_path / "old" / "project", tmp_path / "new" / "project"
    old.mkdir(parents=True)
    old_run = _python(LEGACY_SCRIPT, old)
    assert (old / "mlruns").is_dir()
    _move(old, new)
    p = Params()
    p.tracking.experiment = "legacy"
    uri = f"sqlite:///{new / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    with tracking.stage_run("prepare", p, ["prepare"]) as run:
        tracking.log_report({"samples": 1}, "reports/prepare.json")
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("legacy")
    assert exp.artifact_location == str(new / "mlruns" / exp.experiment_id)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND
    assert (new / "mlruns" / exp.experiment_id / run.info.run_id / "artifacts/reports/prepare.json").exists()
    note = mlflow.artifacts.download_artifacts(run_id=old_run, artifact_path="note.txt")
    assert Path(note).read_text() == "old"


@pytest.fixture
def local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A temporary SQLite store as MLFLOW_TRACKING_URI, cwd a temp folder."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    monkeypatch.delenv(tracking.UI_URL_ENV, raising=False)
    return uri


def test_a_noop_pipeline_run_is_marked_and_carries_no_metrics(local_store: str) -> None:
    import mlflow

    p = params()
    full = tracking.start_pipeline_run(p, run_name="pipeline a")
    tracking.end_pipeline_run(p, full, metrics={"processbench.processbench_avg_f1": 41.5})
    noop = tracking.start_pipeline_run(p, run_name="pipeline b")
    tracking.end_pipeline_run(p, noop, metrics={"processbench.processbench_avg_f1": 41.5}, noop=True)
    client = mlflow.MlflowClient(local_store)
    a, b = client.get_run(full), client.get_run(noop)
    assert a.data.metrics == {"processbench.processbench_avg_f1": 41.5} and tracking.NOOP_TAG not in a.data.tags
    assert b.data.metrics == {} and b.data.tags[tracking.NOOP_TAG] == "true"
    assert b.info.run_name == "pipeline b (no-op: every stage cached)" and b.info.status == "FINISHED"


def test_links_open_the_runs_view_at_the_configured_ui(local_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    p = params()
    run_id = tracking.start_pipeline_run(p)
    url = tracking.run_url(p, run_id)
    assert url.startswith("http://127.0.0.1:5000/#/experiments/")
    assert url.endswith(f"/runs/{run_id}?workflowType=machine_learning")
    monkeypatch.setenv(tracking.UI_URL_ENV, "https://mlflow.example.org/ui/")
    assert tracking.run_url(p, run_id).startswith("https://mlflow.example.org/ui/#/experiments/")
    assert tracking.experiment_url(p).endswith("?workflowType=machine_learning")


def test_an_unreachable_tracking_server_fails_fast_naming_it() -> None:
    port = free_port()  # nothing listens there
    uri = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(tracking.TrackingStoreError) as err:
        tracking.check_store(uri)
    assert time.monotonic() - start < 10
    assert uri in str(err.value) and "unreachable" in str(err.value)
    tracking.check_store("sqlite:///mlruns.db")  # files are not probed


def test_a_running_tracking_server_passes_the_probe(mlflow_server: str) -> None:
    tracking.check_store(mlflow_server)


def test_no_test_can_leave_mlflows_default_store_in_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's fallback store (`sqlite:///mlflow.db` in the current folder) is refused in the
    repository root (tests/conftest.py), and the session has a temporary default store."""
    import sqlite3

    from conftest import MLFLOW_DEFAULT_STORE

    assert os.environ["MLFLOW_TRACKING_URI"]  # the session's, or one a test set
    monkeypatch.chdir(MLFLOW_DEFAULT_STORE.parent)
    existed = MLFLOW_DEFAULT_STORE.exists()
    with pytest.raises(pytest.fail.Exception, match="opened MLflow's default store"):
        sqlite3.connect("mlflow.db")
    assert MLFLOW_DEFAULT_STORE.exists() == existed
