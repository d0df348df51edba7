"""Prefect flows against a REAL local Prefect server, on a temp git + DVC copy of the project.

One `prefect server start` (127.0.0.1, temp PREFECT_HOME, SQLite) serves the module. The
project copy has the real dvc.yaml, code and bundled data, a params file shrunk to the minimum
(K = 1, a few benchmark items) and the tiny verdict model standing in for models/{base,sft,dpo}
(the training stages are covered by their own tests). The flows run `prepare`, `evaluate`
and `register` through DVC for real, and the promotion gate on the real MLflow registry.

- `serve()` (flows/deploy.py, a subprocess) creates the cron deployment and runs its flow
  runs: a first retraining takes in a new labelled file (a malformed one is rejected),
  reruns the stages, registers version 1 and promotes it (no champion yet); a third one,
  after a scoring parameter changed, registers version 2 and keeps the champion (margin).
- `prefect.yaml` + a process worker (`prefect deploy --all`, `prefect worker start
  --run-once`) runs the second retraining, where nothing changed: the pipeline is skipped.

Everything is checked over the Prefect REST API (flow run states, schedules, artifacts, logs)
and the MLflow store of the project copy.
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

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENT = "test-retrain"
STAGES = ["prepare", "evaluate", "register"]
CRON = "0 3 * * *"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, with everything it spawned."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    with log.open("wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def wait_for(check, what: str, proc: subprocess.Popen | None, log: Path | None, timeout: float):
    """Poll `check()` until it returns a truthy value; fail with the log if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(1.0)
    pytest.fail(f"{what}: not done after {timeout}s" + (f":\n{log.read_text()[-4000:]}" if log else ""))


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A real Prefect server on 127.0.0.1 (temp home, SQLite); the env that points at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RPRM_PARENT_RUN_ID", None)
    log = home / "server.log"
    proc = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                  "--port", str(port), "--no-ui", "--analytics-off"], log, env, home)
    try:
        wait_for(lambda: httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=5).status_code == 200,
                 "prefect server", proc, log, 180)
        yield env
    finally:
        stop_group(proc)


def shrunk_params() -> dict:
    """params.yaml cut to the minimum that still runs prepare -> evaluate -> register for real."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["prepare"]["max_problems"] = 6
    p["domain"]["kind"] = "prm800k"  # retraining brings in new PRM800K-format labelled solutions
    p["register"]["gate"].update(enabled=False, benchmark="processbench")  # untrained test models; gate tested elsewhere
    p["promote"]["metric"] = "processbench_avg_f1"
    p["scoring"]["sampling"].update(n=1, max_new_tokens=16)
    ev = p["evaluate"]
    ev.update(models=["dpo"], k_sweep=[1], thresholds=[0.5])
    ev["processbench"].update(subsets=["gsm8k", "math"], max_per_subset=2)
    ev["prmbench"]["max_items"] = 2
    return p


def add_correct_processbench_solutions(folder: Path) -> None:
    """Put one correct solution (label -1) first in the gsm8k and math files of the copy.

    The bundled ProcessBench subset holds only erroneous solutions, so its F1 (the harmonic
    mean of the accuracies on erroneous and on correct solutions) would be undefined and the
    promotion gate would have nothing to compare.
    """
    for subset in ("gsm8k", "math"):
        path = folder / f"{subset}.jsonl"
        correct = {
            "id": f"{subset}-test-correct", "generator": "hand-written", "label": -1,
            "final_answer_correct": True,
            "problem": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                       "many clips in May. How many clips did Natalia sell altogether in April and May?",
            "steps": ["In May she sold 48 / 2 = 24 clips.", "Altogether she sold 48 + 24 = 72 clips.",
                      "The answer is \\boxed{72}."],
        }
        path.write_text(json.dumps(correct) + "\n" + path.read_text())


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
                   cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, verdict_model_dir: Path) -> Path:
    """A git + DVC copy of the project with shrunk params and models in place."""
    root = tmp_path_factory.mktemp("project")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("components", "flows", "data/bundled", "data/labelled"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    for name in ("dvc.yaml", "prefect.yaml", ".gitignore", "pyproject.toml"):
        shutil.copy2(REPO / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(shrunk_params(), sort_keys=False))
    add_correct_processbench_solutions(root / "data" / "bundled" / "processbench")
    for model in ("base", "sft", "dpo"):
        shutil.copytree(verdict_model_dir, root / "models" / model)
    git("init", "-q", cwd=root)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    git("add", "-A", cwd=root)
    git("commit", "-q", "-m", "project", cwd=root)
    return root


def incoming_files(root: Path) -> None:
    """A new labelled PRM800K solution (new id) and a malformed file, dropped into data/incoming."""
    incoming = root / "data" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    line = (REPO / "data/bundled/prm800k/phase1_train_plus.solutions.jsonl").read_text().splitlines()[3]
    obj = json.loads(line)
    obj["id"] = "incoming-batch1-00000"
    (incoming / "batch1.jsonl").write_text(json.dumps(obj) + "\n")
    (incoming / "broken.jsonl").write_text(json.dumps(obj | {"id": "incoming-x"}) + "\n{not json\n")


@pytest.fixture(scope="module")
def served(prefect_env: dict[str, str], project: Path) -> dict:
    """flows/deploy.py serving the retraining deployment (cron) from the project copy."""
    log = project.parent / "serve.log"
    proc = start([sys.executable, "-m", "flows.deploy", "--name", DEPLOYMENT, "--cron", CRON,
                  "--project-dir", str(project), "--stages", *STAGES, "--retries", "1"],
                 log, prefect_env, project)
    api = prefect_env["PREFECT_API_URL"]

    def deployment():
        r = httpx.get(f"{api}/deployments/name/rprm-retrain/{DEPLOYMENT}", timeout=10)
        return r.json() if r.status_code == 200 else None

    try:
        dep = wait_for(deployment, "serve() deployment", proc, log, 120)
        yield {"api": api, "deployment": dep, "log": log, "proc": proc}
    finally:
        stop_group(proc)


def call(method: str, url: str, **kwargs) -> httpx.Response:
    """One Prefect REST call; retried on 5xx and connection errors, as Prefect's client does
    (a loaded machine makes the server's SQLite answer 503 now and then)."""
    for attempt in range(8):
        try:
            r = httpx.request(method, url, timeout=30, **kwargs)
            if r.status_code < 500:
                r.raise_for_status()
                return r
        except httpx.TransportError:
            if attempt == 7:
                raise
        time.sleep(1 + attempt)
    r.raise_for_status()
    return r


def run_deployment(api: str, deployment_id: str, proc, log, parameters: dict | None = None,
                   timeout: float = 900) -> dict:
    """Trigger a flow run of a deployment now and wait for its final state."""
    run_id = call("POST", f"{api}/deployments/{deployment_id}/create_flow_run",
                  json={"parameters": parameters or {}}).json()["id"]

    def final():
        run = call("GET", f"{api}/flow_runs/{run_id}").json()
        return run if run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None

    run = wait_for(final, f"flow run {run_id}", proc, log, timeout)
    if run["state"]["type"] != "COMPLETED":
        pytest.fail(f"flow run {run['state']}:\n" + "\n".join(flow_logs(api, run_id)[-60:]))
    return run


def flow_logs(api: str, flow_run_id: str) -> list[str]:
    r = call("POST", f"{api}/logs/filter", json={
        "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200})
    return [entry["message"] for entry in r.json()]


def artifact(api: str, key: str, flow_run_id: str) -> str:
    r = call("POST", f"{api}/artifacts/filter", json={
        "artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [flow_run_id]}}})
    (found,) = r.json()
    return found["data"]


def registry_state(root: Path) -> tuple[dict[str, int], list]:
    """Aliases and versions of r-prm in the project copy's MLflow store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    model = client.get_registered_model("r-prm")
    versions = sorted(client.search_model_versions("name='r-prm'"), key=lambda v: int(v.version))
    return {k: int(v) for k, v in model.aliases.items()}, versions


def subflow_runs(api: str, parent_flow_run_id: str) -> list[dict]:
    r = call("POST", f"{api}/flow_runs/filter", json={
        "flow_runs": {"parent_flow_run_id": {"any_": [parent_flow_run_id]}}})
    return r.json()


@pytest.mark.slow
@pytest.mark.timeout(2400)  # three real retrainings; the machine is shared
def test_scheduled_retraining_end_to_end(served: dict, project: Path, prefect_env: dict) -> None:
    api, dep = served["api"], served["deployment"]
    # the deployment serve() created carries the cron schedule
    schedules = [s["schedule"] for s in dep["schedules"]]
    assert [(s["cron"], s["timezone"]) for s in schedules] == [(CRON, "UTC")]
    assert dep["parameters"]["stages"] == STAGES

    # 1) new labelled data: accepted file merged, malformed one rejected, stages rerun,
    #    version 1 registered and promoted (no champion yet)
    incoming_files(project)
    run1 = run_deployment(api, dep["id"], served["proc"], served["log"])
    assert (project / "data/labelled/batch1.jsonl").exists()
    assert not (project / "data/incoming/batch1.jsonl").exists()
    note = (project / "data/incoming/rejected/broken.jsonl.error.txt").read_text()
    assert "broken.jsonl:2" in note and "invalid JSON" in note
    from components.config import DataParams
    from components.data import load_prm800k

    bundled = load_prm800k(DataParams(bundled_dir=str(REPO / "data/bundled"),
                                      prm800k_files=shrunk_params()["data"]["prm800k_files"]))
    prepare_report = json.loads((project / "reports/prepare.json").read_text())
    assert prepare_report["solutions"] == len(bundled) + 1  # the accepted file was read
    aliases, versions = registry_state(project)
    assert [str(v.version) for v in versions] == ["1"] and aliases == {"challenger": 1, "champion": 1}
    assert versions[0].tags["promotion.decision"] == "promoted"
    summary = artifact(api, "rprm-retrain", run1["id"])
    assert "batch1.jsonl" in summary and "broken.jsonl" in summary and "**promoted**" in summary
    (sub,) = subflow_runs(api, run1["id"])
    pipeline_md = artifact(api, "rprm-pipeline", sub["id"])
    for stage in STAGES:
        assert f"| {stage} | ran |" in pipeline_md
    assert "processbench.processbench_avg_f1" in pipeline_md and "/runs/" in pipeline_md
    logs = "\n".join(flow_logs(api, sub["id"]))
    assert "Running stage 'evaluate'" in logs  # DVC's own output, streamed into Prefect
    # MLflow: one parent run with a nested run per stage
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns.db'}")
    exp = client.get_experiment_by_name("r-prm")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`rprm.pipeline` = 'true'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    (prepare_run,) = [r for r in children if r.info.run_name == "prepare"]
    assert prepare_run.data.tags["data.md5.data/labelled"].endswith(".dir")

    # 2) nothing new: prefect.yaml deployment on a process work pool; pipeline not run
    pool = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", "rprm", "--type", "process"],
                          cwd=project, env=prefect_env, capture_output=True, text=True)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deploy = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
                            cwd=project, env=prefect_env, capture_output=True, text=True)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    nightly = call("GET", f"{api}/deployments/name/rprm-retrain/retrain-nightly").json()
    assert nightly["work_pool_name"] == "rprm"
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == [CRON]
    assert call("GET", f"{api}/deployments/name/rprm-pipeline/pipeline").status_code == 200
    run2_id = call("POST", f"{api}/deployments/{nightly['id']}/create_flow_run",
                   json={"parameters": {"stages": STAGES, "retries": 0}}).json()["id"]
    worker = subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", "rprm",
                             "--run-once", "--type", "process"],
                            cwd=project, env=prefect_env, capture_output=True, text=True, timeout=300)
    run2 = call("GET", f"{api}/flow_runs/{run2_id}").json()
    assert run2["state"]["type"] == "COMPLETED", worker.stdout[-3000:] + worker.stderr[-3000:]
    assert subflow_runs(api, run2_id) == []  # up to date: the pipeline was not run
    summary = artifact(api, "rprm-retrain", run2_id)
    assert "none (pipeline not run)" in summary and "already the champion" in summary
    assert [str(v.version) for v in registry_state(project)[1]] == ["1"]

    # 3) a scoring parameter changed: evaluate + register rerun -> version 2; a margin no
    #    F1 gain can reach keeps the champion
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["scoring"]["sampling"]["seed"] = 1
    params["promote"]["margin"] = 1000.0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run3 = run_deployment(api, dep["id"], served["proc"], served["log"])
    aliases, versions = registry_state(project)
    assert [str(v.version) for v in versions] == ["1", "2"]
    assert aliases == {"challenger": 2, "champion": 1}
    assert versions[1].tags["promotion.decision"] == "kept"
    assert "does not beat" in versions[1].tags["promotion.reason"]
    assert versions[0].tags["promotion.defended_against"] == "2"
    (sub3,) = subflow_runs(api, run3["id"])
    pipeline_md = artifact(api, "rprm-pipeline", sub3["id"])
    assert "| prepare | skipped |" in pipeline_md
    assert "| evaluate | ran |" in pipeline_md and "| register | ran |" in pipeline_md
    assert "**kept**" in artifact(api, "rprm-retrain", run3["id"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_remote_stage_is_retried_after_a_failure(project: Path, prefect_env: dict, tmp_path: Path) -> None:
    """`evaluate` fails while another DVC process holds the repository lock (a real failure:
    DVC gives up after 3 s); the flow retries it with backoff and the retry runs it."""
    from dvc.repo import Repo

    root = tmp_path / "project"
    shutil.copytree(project, root, symlinks=True)
    env = {**prefect_env, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", "prepare"], cwd=root, env=env,
                   check=True, capture_output=True)
    api, log = prefect_env["PREFECT_API_URL"], tmp_path / "flow.log"
    holder = Repo(str(root))
    holder.lock.lock()
    try:
        proc = start([sys.executable, "-m", "flows.pipeline", "--project-dir", str(root), "--stages", "evaluate",
                      "--retries", "2", "--retry-backoff", "1"], log, env, root)
    except BaseException:
        holder.lock.unlock()
        raise
    try:
        try:
            wait_for(lambda: "Unable to acquire lock" in log.read_text(errors="replace"),
                     "first attempt failing on the DVC lock", proc, log, 300)
        finally:
            holder.lock.unlock()
            holder.close()
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        stop_group(proc)

    (run,) = call("POST", f"{api}/flow_runs/filter", json={
        "flows": {"name": {"any_": ["rprm-pipeline"]}}, "flow_runs": {"deployment_id": {"is_null_": True}},
        "sort": "START_TIME_DESC", "limit": 1}).json()
    assert run["state"]["type"] == "COMPLETED"
    (task_run,) = call("POST", f"{api}/task_runs/filter", json={
        "flow_runs": {"id": {"any_": [run["id"]]}}}).json()
    assert task_run["name"] == "evaluate" and task_run["state"]["type"] == "COMPLETED"
    assert task_run["run_count"] == 2
    history = call("GET", f"{api}/task_run_states/", params={"task_run_id": task_run["id"]}).json()
    assert [s["name"] for s in history].count("Retrying") == 1
    assert json.loads((root / "reports/processbench.json").read_text())


def _reports(root: Path) -> None:
    """Evaluate, sample-pairs and best-of-n reports as their stages write them (numbers made up)."""
    reports = root / "reports"
    reports.mkdir(exist_ok=True)
    cost = {"fallbacks": 3, "generations": 60, "steps_total": 10}
    (reports / "processbench.json").write_text(json.dumps({
        "processbench_avg_f1": 41.5, "headline_model": "dpo",
        "models": {"sft": {"avg_f1": 38.25, "cost": cost}, "dpo": {"avg_f1": 41.5, "cost": cost}}}))
    (reports / "prmbench.json").write_text(json.dumps({
        "prmbench_prmscore": 0.61, "models": {"dpo": {"prmscore": 0.61}}}))
    (reports / "pairs.json").write_text(json.dumps({"valid_rate": 0.866, "pairs": 12}))
    (reports / "heldout.json").write_text(json.dumps({"heldout_f1": 16.3, "models": {
        "dpo": {"f1": 16.26, "verdict_reach_rate": 0.9836}, "base": {"f1": 0.0, "verdict_reach_rate": 0.0}}}))
    (reports / "bon.json").write_text(json.dumps({"datasets": {"math500": {
        "n": 8, "pass@1": 0.4, "maj@8": 0.5, "prm@8": 0.55, "prm_vote@8": 0.52}}}))


def test_the_headline_table_leads_the_summary(tmp_path: Path) -> None:
    """A handful of headline numbers first, then every top-level report number."""
    from flows.pipeline import headline_metrics, headline_rows, summary_markdown

    _reports(tmp_path)
    rows = dict(headline_rows(tmp_path))
    assert rows["held-out first-error F1 (dpo)"] == "16.3 (verdict reach 98.4%)"
    assert rows["held-out first-error F1 (base)"] == "0.0 (verdict reach 0.0%)"
    assert list(rows).index("held-out first-error F1 (dpo)") < list(rows).index("ProcessBench avg F1 (dpo)")
    assert rows["ProcessBench avg F1 (dpo)"] == "41.5" and rows["ProcessBench avg F1 (sft)"] == "38.2"
    assert rows["analyses reaching the verdict (dpo, ProcessBench)"] == "95.0% (fallback 5.0%)"
    assert rows["SFT analyses reaching a valid verdict (sample-pairs)"] == "86.6%"
    assert rows["PRMBench PRMScore (dpo)"] == "0.610"
    assert rows["Best-of-N gain (math500, prm@8 0.550)"] == "+0.050 over maj@8; +0.150 over pass@1"
    md = summary_markdown([{"stage": "prepare", "status": "skipped", "seconds": 1.0}],
                          headline_metrics(tmp_path), "http://ui/#/r", headline=list(rows.items()),
                          experiment_link="http://ui/#/e", noop=True)
    assert md.index("## Headline") < md.index("## Every report number")
    assert md.index("| ProcessBench avg F1 (dpo) | 41.5 |") < md.index("| pairs.pairs | 12 |")
    assert "No-op" in md and "| prepare | skipped | 1.0 |" in md and "[http://ui/#/e]" in md
    assert headline_rows(tmp_path / "nowhere") == []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_pipeline_that_reruns_nothing_is_marked_noop(project: Path, prefect_env: dict, tmp_path: Path) -> None:
    """Every selected stage cached: the MLflow parent run says no-op and copies no metrics; the
    Prefect artifact says so too and leads with the headline table."""
    from mlflow import MlflowClient

    root = tmp_path / "project"
    shutil.copytree(project, root, symlinks=True)
    env = {**prefect_env, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", "prepare"], cwd=root, env=env,
                   check=True, capture_output=True)
    _reports(root)
    out = subprocess.run([sys.executable, "-m", "flows.pipeline", "--project-dir", str(root), "--stages", "prepare",
                          "--retries", "0"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "no-op: every stage was up to date" in out.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    exp = client.get_experiment_by_name("r-prm")
    link = next(line for line in out.stdout.splitlines() if line.startswith("MLflow parent run: "))
    assert link.endswith("?workflowType=machine_learning")
    parent = client.get_run(link.split("/runs/")[1].split("?")[0])
    assert parent.data.tags["rprm.pipeline"] == "true"
    assert parent.data.tags["rprm.noop"] == "true" and parent.data.metrics == {}
    assert parent.info.run_name.endswith("(no-op: every stage cached)")
    assert client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'") == []

    api = prefect_env["PREFECT_API_URL"]
    (run,) = call("POST", f"{api}/flow_runs/filter", json={
        "flows": {"name": {"any_": ["rprm-pipeline"]}}, "flow_runs": {"deployment_id": {"is_null_": True}},
        "sort": "START_TIME_DESC", "limit": 1}).json()
    md = artifact(api, "rprm-pipeline", run["id"])
    assert "No-op" in md and "| prepare | skipped |" in md and "workflowType=machine_learning" in md
    assert md.index("| ProcessBench avg F1 (dpo) | 41.5 |") < md.index("## Every report number")
