"""The `synthesize` stage: filter, balance, split, journal/resume, teacher faults, secrets."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fault_server import FaultServer

from components import paths, synthesis
from components.backends.openai import OpenAIBackend
from components.config import Params, dump_params, load_params, params_from_dict
from components.io import DataError, read_jsonl, write_jsonl
from components.journal import HEADER_KEY, JournalWarning, fingerprint
from components.prompts import SYSTEM_PROMPT, parse_verdict, render_rprm_prompt
from components.records import Critique, SFTExample, StepSample
from components.teachers import DELAY_ENV, BackendTeacher, OfflineTeacher, load_teacher

REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "RPRM_TEST_TEACHER_KEY"
KEY = "sk-teacher-91c4e7b2a05f4d3e8c6b-never-log-me"
OUTPUTS = (paths.SYNTH_CRITIQUES, paths.SFT_TRAIN, paths.SFT_VAL, synthesis.REPORT)


@pytest.fixture(scope="module")
def bundled_steps() -> tuple[list[StepSample], list[StepSample]]:
    """Train/val step samples flattened from the bundled PRM800K subset (every 8th problem held out)."""
    from components.data import load_prm800k
    from components.prepare import flatten

    params = load_params(REPO / "params.yaml")
    data = params.data.model_copy(update={"bundled_dir": str(REPO / "data" / "bundled")})
    samples, _ = flatten(load_prm800k(data, source="bundled"), "positive")
    problems = sorted({s.problem_id for s in samples})
    held = set(problems[::8])
    return [s for s in samples if s.problem_id not in held], [s for s in samples if s.problem_id in held]


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *head, last = dotted.split(".")
    for k in head:
        d = d[k]
    d[last] = value


def make_project(root: Path, steps: tuple[list[StepSample], list[StepSample]], **overrides: Any) -> Params:
    """A project folder with params.yaml and the prepared step files; returns its params.

    Each project logs to its own MLflow experiment (in the module's shared store).
    """
    d = load_params(REPO / "params.yaml").model_dump(mode="json")
    base = {
        "synthesize.max_samples": 120, "synthesize.val_size": 10, "teacher.sampling.n": 2,
        "synthesize.max_prompt_tokens": None,  # no base model here; the default-profile test covers it
        "tracking.experiment": f"synth-{uuid.uuid4().hex[:10]}",
    }
    for key, value in {**base, **overrides}.items():
        _set(d, key.replace("__", "."), value)
    params = params_from_dict(d)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(dump_params(params), encoding="utf-8")
    write_jsonl(root / paths.STEPS_TRAIN, steps[0])
    write_jsonl(root / paths.STEPS_VAL, steps[1])
    return params


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite MLflow store for the module (creating a store costs seconds; runs are cheap)."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"
    mlflow.MlflowClient(uri).search_experiments()  # creates the tables once
    return uri


@pytest.fixture()
def use_store(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch):
    """Point MLflow at the module's store and make `enter(root)` chdir into a project."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    return monkeypatch.chdir


@pytest.fixture()
def project(tmp_path: Path, use_store) -> Path:
    """An empty project folder, made the working directory."""
    root = tmp_path / "project"
    root.mkdir()
    use_store(root)
    return root


def openai_overrides(server: FaultServer, **kw: Any) -> dict[str, Any]:
    o = {
        "teacher.kind": "backend", "teacher.model": "teacher-model", "teacher.backend.kind": "openai",
        "teacher.backend.openai.base_url": server.base_url, "teacher.backend.openai.model": "teacher-model",
        "teacher.backend.openai.api_key_env": None, "teacher.backend.openai.concurrency": 1,
        "teacher.backend.openai.timeout_s": 2.0, "teacher.backend.openai.max_retries": 1,
        "teacher.backend.openai.backoff_base_s": 0.01, "teacher.backend.openai.backoff_max_s": 0.02,
        "synthesize.max_samples": 30,
    }
    o.update(kw)
    return o


def openai_teacher(params: Params) -> BackendTeacher:
    return BackendTeacher(OpenAIBackend(params.teacher.backend.openai, params.teacher.model))


def read_bytes(root: Path) -> dict[str, bytes]:
    return {str(p): (root / p).read_bytes() for p in OUTPUTS}


def journal_keys(root: Path) -> list[str]:
    keys = [json.loads(line)["key"] for line in (root / paths.SYNTH_JOURNAL).read_text().splitlines() if line.strip()]
    return [k for k in keys if k != HEADER_KEY]


# --------------------------------------------------------------------------------------
# Filter, balance, split
# --------------------------------------------------------------------------------------


def test_offline_run_filters_balances_and_splits_by_problem(project: Path, bundled_steps) -> None:
    params = make_project(project, bundled_steps, **{"teacher.sampling.n": 3})
    report = synthesis.run(params)
    critiques = read_jsonl(paths.SYNTH_CRITIQUES, Critique)
    train = read_jsonl(paths.SFT_TRAIN, SFTExample)
    val = read_jsonl(paths.SFT_VAL, SFTExample, allow_empty=True)
    samples = {s.id: s for s in (*bundled_steps[0], *bundled_steps[1])}

    assert report["steps_attempted"] == 120 and report["analyses_generated"] == len(critiques) == 360
    per_sample = Counter(c.sample_id for c in critiques)
    assert set(per_sample.values()) == {3}
    # one kept analysis per step: the LAST agreeing one, and it is the assistant turn
    by_sample: dict[str, list[Critique]] = {}
    for c in critiques:
        by_sample.setdefault(c.sample_id, []).append(c)
    kept_text = {c.sample_id: c.text for c in critiques if c.kept}
    assert len(kept_text) == sum(c.kept for c in critiques) == len(train) + len(val) == report["kept"] > 0
    for ex in [*train, *val]:
        s = samples[ex.id]
        crits = by_sample[ex.id]
        last_agreeing = [c for c in crits if c.agrees][-1]
        assert last_agreeing.kept and ex.messages[2].content == last_agreeing.text == kept_text[ex.id]
        assert [m.role for m in ex.messages] == ["system", "user", "assistant"]
        assert ex.messages[0].content == SYSTEM_PROMPT
        assert ex.messages[1].content == render_rprm_prompt(s.question, s.previous_steps, s.now_step)
        assert ex.verdict == ("yes" if s.label else "no") == parse_verdict(ex.messages[2].content).verdict
    for c in critiques:
        assert c.agrees == (c.verdict == ("yes" if samples[c.sample_id].label else "no"))
        assert c.generator == OfflineTeacher.name and c.temperature == params.teacher.sampling.temperature
    # 1:1 balance, problems never cross the split, validation from held-out problems only
    assert Counter(e.verdict for e in train)["yes"] == Counter(e.verdict for e in train)["no"]
    assert not {e.problem_id for e in train} & {e.problem_id for e in val}
    assert {e.problem_id for e in val} <= {s.problem_id for s in bundled_steps[1]}
    assert {e.problem_id for e in train} <= {s.problem_id for s in bundled_steps[0]}
    # every analysis is accounted for exactly once
    assert sum(report["drops"].values()) + report["kept"] == report["analyses_generated"]
    assert report["agreeing"] == sum(c.agrees for c in critiques)
    assert report["valid"] == sum(c.verdict != "invalid" for c in critiques)
    assert 0 < report["agreement_rate"] < 1
    assert set(report["agreement_by_label"]) == {"positive", "negative"}
    # MLflow run with the report as metrics and the sample table as an artifact
    import mlflow

    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(params.tracking.experiment).experiment_id])
    assert run.data.tags["rprm.stage"] == "synthesize"
    assert run.data.metrics["agreement_rate"] == pytest.approx(report["agreement_rate"])
    assert run.data.metrics["drops.disagrees"] == report["drops"]["disagrees"]
    assert run.data.params["teacher.sampling.n"] == "3"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"synthesis.json", "synthesis_samples.json"} <= artifacts
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "synthesis_samples.json")).read_text())
    statuses = set(table["data"][i][table["columns"].index("status")] for i in range(len(table["data"])))
    assert "kept" in statuses and len(statuses) > 1


def test_without_held_out_file_whole_train_problems_are_held_out(project: Path, bundled_steps) -> None:
    params = make_project(project, (bundled_steps[0], []), **{"synthesize.val_size": 15})
    synthesis.run(params)
    train = read_jsonl(paths.SFT_TRAIN, SFTExample)
    val = read_jsonl(paths.SFT_VAL, SFTExample)
    assert len(val) >= 15 and not {e.problem_id for e in train} & {e.problem_id for e in val}


def test_bad_input_names_file_line_field_and_writes_nothing(project: Path, bundled_steps) -> None:
    params = make_project(project, bundled_steps)
    lines = (project / paths.STEPS_TRAIN).read_text().splitlines()
    broken = json.loads(lines[2])
    broken["label"] = "maybe"
    lines[2] = json.dumps(broken)
    (project / paths.STEPS_TRAIN).write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        synthesis.run(params)
    assert "steps_train.jsonl:3" in str(err.value) and "label" in str(err.value)
    assert not (project / paths.SYNTH).exists() and not (project / paths.REPORTS).exists()
    # a held-out file that shares a problem with the training file is refused too
    write_jsonl(project / paths.STEPS_TRAIN, bundled_steps[0])
    write_jsonl(project / paths.STEPS_VAL, [*bundled_steps[1], bundled_steps[0][0].model_copy(update={"id": "x"})])
    with pytest.raises(DataError, match="problem_id"):
        synthesis.run(params)
    assert not (project / paths.SYNTH).exists()


def test_changed_teacher_settings_start_the_journal_over(project: Path, bundled_steps, capsys) -> None:
    params = make_project(project, bundled_steps, **{"synthesize.max_samples": 40})
    synthesis.run(params)
    first = (project / paths.SFT_TRAIN).read_bytes()
    synthesis.run(params)  # same settings: everything comes from the journal
    assert "resuming, 40/40" in capsys.readouterr().out
    assert (project / paths.SFT_TRAIN).read_bytes() == first
    hotter = make_project(project, bundled_steps, **{"synthesize.max_samples": 40, "teacher.sampling.temperature": 0.2})
    with pytest.warns(JournalWarning, match="written with other settings"):
        synthesis.run(hotter)
    assert "resuming" not in capsys.readouterr().out
    header, *records = [json.loads(x) for x in (project / paths.SYNTH_JOURNAL).read_text().splitlines()]
    assert header["fingerprint"] == fingerprint(synthesis.teacher_settings(hotter.teacher, hotter.synthesize.seed))
    assert len(records) == 40 and header["settings"]["sampling"]["temperature"] == 0.2


# --------------------------------------------------------------------------------------
# kill -9 and resume
# --------------------------------------------------------------------------------------


def _stage_cmd() -> list[str]:
    return [sys.executable, "-m", "components.cli", "synthesize", "-p", "params.yaml"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != DELAY_ENV}  # MLFLOW_TRACKING_URI is set
    env.update({"PYTHONPATH": str(REPO)}, **extra)
    return env


def test_kill_9_at_a_random_point_then_resume_equals_uninterrupted(tmp_path: Path, bundled_steps, use_store) -> None:
    total = 120
    reference = tmp_path / "reference"
    params = make_project(reference, bundled_steps)
    use_store(reference)
    synthesis.run(params)

    killed = tmp_path / "killed"
    make_project(killed, bundled_steps)
    target = random.Random(time.time_ns()).randint(1, total - 8)
    proc = subprocess.Popen(
        _stage_cmd(), cwd=killed, env=_env(**{DELAY_ENV: "0.02"}),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    journal = killed / paths.SYNTH_JOURNAL
    while True:
        n = journal.read_bytes().count(b"\n") - 1 if journal.exists() else 0  # its header line left out
        if n >= target:
            os.kill(proc.pid, signal.SIGKILL)
            break
        assert proc.poll() is None, f"stage ended before the kill point {target}: {proc.stdout.read().decode()[-2000:]}"
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_at_kill = len(journal_keys(killed))
    assert target <= done_at_kill < total, f"kill point {target}"
    assert not any((killed / p).exists() for p in OUTPUTS)  # no final output from a killed run

    rerun = subprocess.run(_stage_cmd(), cwd=killed, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"resuming, {done_at_kill}/{total}" in rerun.stdout, f"kill point {target}"
    keys = journal_keys(killed)
    assert len(keys) == len(set(keys)) == total  # nothing lost, nothing duplicated
    assert read_bytes(killed) == read_bytes(reference), f"kill point {target}"


# --------------------------------------------------------------------------------------
# The openai teacher: faults, error budget, secrets
# --------------------------------------------------------------------------------------

SCRIPT = ["503", "503", "drop", "ok", "malformed", "ok", "empty", "ok", "cut", "ok", "500", "500"]


def test_openai_teacher_faults_are_counted_then_retried_on_resume(tmp_path: Path, bundled_steps, use_store) -> None:
    root = tmp_path / "faulty"
    with FaultServer(script=SCRIPT, max_choices=1) as server:
        params = make_project(root, bundled_steps, **openai_overrides(server))
        use_store(root)
        report = synthesis.run(params, teacher=openai_teacher(params))
    # rows 1 and 4 exhausted their retries (2 analyses each); the other faults were retried away
    assert report["teacher_errors"] == report["drops"]["teacher_error"] == 4
    assert report["steps_attempted"] == 30 and report["kept"] > 0
    errors = [c for c in read_jsonl(paths.SYNTH_CRITIQUES, Critique) if c.error]
    assert len(errors) == 4 and all(c.invalid_reason == "teacher_error" and c.verdict == "invalid" for c in errors)
    assert {e.error.split(":")[0] for e in errors} == {"HTTP 503", "HTTP 500"}
    assert len(journal_keys(root)) == 28  # failed samples are not journaled ...

    with FaultServer(max_choices=1) as healthy:
        params = make_project(root, bundled_steps, **openai_overrides(healthy))
        report = synthesis.run(params, teacher=openai_teacher(params))
        assert len(healthy.requests) == 2 * 2  # ... so only they are asked again (n=2, one choice per answer)
    assert report["teacher_errors"] == 0 and len(journal_keys(root)) == 30
    resumed = read_bytes(root)

    clean = tmp_path / "clean"
    with FaultServer(max_choices=1) as healthy:
        params = make_project(clean, bundled_steps, **openai_overrides(healthy))
        use_store(clean)
        synthesis.run(params, teacher=openai_teacher(params))
    assert read_bytes(clean) == resumed


def test_error_budget_stops_the_stage_with_a_clear_message(tmp_path: Path, bundled_steps, use_store) -> None:
    root = tmp_path / "outage"
    with FaultServer(fault_rate=1.0, fault_kinds=["503"]) as server:
        params = make_project(root, bundled_steps, **openai_overrides(
            server, **{"synthesize.max_samples": 40, "teacher.backend.openai.max_retries": 0}))
        use_store(root)
        with pytest.raises(synthesis.TeacherErrorBudgetExceeded) as err:
            synthesis.run(params, teacher=openai_teacher(params))
        assert len(server.requests) < 40  # stopped as soon as the budget was certainly exceeded
        message = str(err.value)
        assert "max_error_rate=0.2" in message and "HTTP 503" in message and "rerun" in message
        assert not any((root / p).exists() for p in OUTPUTS)

        # through the CLI (load_teacher -> load_backend): a one-line error, non-zero exit, no traceback
        cli = subprocess.run(_stage_cmd(), cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
        assert cli.returncode != 0
        assert "error: teacher errors exceed synthesize.max_error_rate" in cli.stderr
        assert "Traceback" not in cli.stderr
    import mlflow

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(params.tracking.experiment).experiment_id])
    assert runs and all(r.info.status == "FAILED" for r in runs)


def test_api_key_leaves_no_trace(tmp_path: Path, bundled_steps, monkeypatch, caplog, capfd) -> None:
    """A whole run with its own MLflow store: no trace of the key in it, the outputs or the logs."""
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlruns.db'}")
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)
    with FaultServer(script=["500", "500", "503"], echo_auth_in_errors=True, max_choices=1) as server:
        params = make_project(project, bundled_steps, **openai_overrides(
            server, **{"teacher.backend.openai.api_key_env": KEY_ENV, "synthesize.max_error_rate": 0.5}))
        report = synthesis.run(params, teacher=openai_teacher(params))
        assert all(r.headers.get("Authorization") == f"Bearer {KEY}" for r in server.requests)
    assert report["teacher_errors"] > 0  # errors whose server text echoed the key were recorded
    out, err = capfd.readouterr()
    assert KEY not in out + err + caplog.text
    files = [p for p in project.rglob("*") if p.is_file()]
    assert any(p.name == "mlruns.db" for p in files) and any("mlartifacts" in p.parts for p in files)
    assert any(p.name == "critiques.jsonl" for p in files) and any(p.name == "synthesis.json" for p in files)
    leaked = [str(p) for p in files if KEY.encode() in p.read_bytes()]
    assert leaked == []
    assert b"[redacted]" in (project / paths.SYNTH_CRITIQUES).read_bytes()


# --------------------------------------------------------------------------------------
# Teachers by params; the default profile end to end
# --------------------------------------------------------------------------------------


def test_load_teacher_builds_offline_and_backend_teachers() -> None:
    params = load_params(REPO / "params.yaml")
    assert isinstance(load_teacher(params.teacher), OfflineTeacher)
    with FaultServer() as server:
        d = params.model_dump(mode="json")
        for k, v in openai_overrides(server).items():
            _set(d, k, v)
        teacher = load_teacher(params_from_dict(d).teacher)
        assert isinstance(teacher, BackendTeacher) and isinstance(teacher.backend, OpenAIBackend)
        assert teacher.backend.model == "teacher-model"
        teacher.close()


def test_default_profile_end_to_end_from_bundled_data(project: Path, tiny_model_dir: Path) -> None:
    """Default params on PRM800K with `synthesize.max_prompt_tokens`: only step samples whose student prompt
    fits (the base model's tokenizer) reach the teacher, so every SFT chat fits `sft.max_length`."""
    import shutil

    from transformers import AutoTokenizer

    from components import prepare

    params = load_params(REPO / "params.yaml")
    params.domain.kind = "prm800k"  # long real prompts, some over the limit (the arithmetic ones all fit)
    params.prepare.max_problems = 60
    params.teacher.offline_trace_sources = False
    params.data.bundled_dir = str(REPO / "data" / "bundled")
    params.tracking.experiment = f"synth-{uuid.uuid4().hex[:10]}"
    params.synthesize.max_prompt_tokens = 800
    (project / "params.yaml").write_text(dump_params(params), encoding="utf-8")
    prepare.run(params)
    with pytest.raises(DataError, match="base model folder not found"):
        synthesis.run(params)
    shutil.copytree(tiny_model_dir, project / paths.BASE_MODEL)
    report = synthesis.run(params)
    train = read_jsonl(paths.SFT_TRAIN, SFTExample)
    balance = Counter(e.verdict for e in train)
    assert len(train) >= 40 and balance["yes"] == balance["no"]
    prepared = sum(len(f.read_text().splitlines()) for f in (paths.STEPS_TRAIN, paths.STEPS_VAL))
    assert report["skipped_long_prompts"] > 0
    fitting = prepared - report["skipped_long_prompts"]
    assert report["steps_attempted"] == min(params.synthesize.max_samples, fitting)
    tok = AutoTokenizer.from_pretrained(project / paths.BASE_MODEL)
    for e in train:  # what SFT would drop as longer than sft.max_length: nothing
        chat = tok.apply_chat_template([m.model_dump() for m in e.messages], tokenize=True, return_dict=True)
        assert len(chat["input_ids"]) <= params.sft.max_length, e.id
    assert 0 < report["agreement_rate"] < 1
    assert json.loads((project / synthesis.REPORT).read_text()) == report
