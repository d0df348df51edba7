"""Prefect flow `rprm-pipeline`: the DVC stages as tasks, in DAG order; DVC decides what reruns.

The stages and their order come from the stage table, `components.stages.STAGES`.

Each task runs `dvc repro --single-item <stage>` in the project folder, so DVC's lock file
and cache decide whether the stage reruns or is skipped, and streams the stage's output into
the Prefect logger (progress bars are logged when they finish, or every 30 s while they run).
The stages that call generation engines, which may be remote (`synthesize`, `sample-pairs`,
`evaluate`, `best-of-n`), are retried with exponential backoff; they journal finished work,
so a retry resumes instead of starting over.

The flow creates the MLflow parent run of this pipeline execution and exports its id as
`RPRM_PARENT_RUN_ID` to the stages, whose runs nest under it. At the end it logs the headline
metrics on the parent run and publishes a markdown artifact (`rprm-pipeline`): the MLflow
links, the per-stage outcome, a short headline table (ProcessBench average F1 and PRMBench
PRMScore per model, how often analyses reached the verdict, the Best-of-N gain) and then every
top-level number of `reports/*.json`. When DVC skipped every stage (nothing changed), no stage
run nests under the parent run: it is tagged `rprm.noop=true`, named "... (no-op: every stage
cached)" and carries no metrics. The UI links use `RPRM_MLFLOW_UI_URL` when set (else an
http(s) tracking URI, else http://127.0.0.1:5000, what `mlflow ui` serves).

    python -m flows.pipeline                     # the whole chain, in this folder
    python -m flows.pipeline --stages evaluate register
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from components import tracking
from components.config import load_params
from components.stages import STAGE_NAMES
from components.stages import STAGES as STAGE_TABLE

# the stage table (components/stages.py), which the `rprm` commands and dvc.yaml follow too
STAGES: tuple[str, ...] = STAGE_NAMES
REMOTE_STAGES = frozenset(s.name for s in STAGE_TABLE if s.remote)
PROGRESS_LOG_INTERVAL_S = 30.0


def stage_env(parent_run_id: str | None = None, tracking_uri: str | None = None) -> dict[str, str]:
    """Environment of the stage subprocesses: parent run, tracking store, unbuffered output."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)  # where `dvc` and `rprm` are installed
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if parent_run_id:
        env[tracking.PARENT_RUN_ENV] = parent_run_id
    return env


def stream_command(cmd: Sequence[str], cwd: Path, env: dict[str, str], log: Any) -> tuple[int, list[str]]:
    """Run `cmd`, logging each output line (progress-bar redraws throttled); (exit code, tail)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer, tail = b"", []
    last_progress = time.monotonic()

    def emit(raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip()
        if text:
            log.info(text)
            tail.append(text)
            del tail[:-40]

    while True:
        ready, _, _ = select.select([fd], [], [], 1.0)
        chunk = os.read(fd, 65536) if ready else b""
        if ready and not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            emit(_latest(line))  # a progress bar's final state, or a plain line
        if b"\r" in buffer:  # a progress bar being redrawn: keep only its latest state
            cut = buffer.rfind(b"\r")
            shown, buffer = _latest(buffer[:cut]), buffer[cut:]
            if shown and time.monotonic() - last_progress >= PROGRESS_LOG_INTERVAL_S:
                emit(shown)
                last_progress = time.monotonic()
    emit(_latest(buffer))
    return proc.wait(), tail


def _latest(segment: bytes) -> bytes:
    """The last non-blank carriage-return-separated state of a terminal line."""
    parts = [p for p in segment.split(b"\r") if p.strip()]
    return parts[-1] if parts else b""


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(stage: str, project_dir: str, parent_run_id: str, tracking_uri: str) -> dict[str, Any]:
    """`dvc repro --single-item <stage>`; returns whether DVC ran or skipped it, and the time.

    The environment is built here, not passed in: task inputs must not carry secrets.
    """
    log = get_run_logger()
    start = time.monotonic()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    log.info("$ %s", " ".join(cmd[2:]))
    code, tail = stream_command(cmd, Path(project_dir), stage_env(parent_run_id, tracking_uri), log)
    seconds = round(time.monotonic() - start, 1)
    if code != 0:
        raise RuntimeError(f"stage {stage} failed (exit {code}) after {seconds}s:\n" + "\n".join(tail[-15:]))
    skipped = any("didn't change, skipping" in line for line in tail)
    return {"stage": stage, "status": "skipped" if skipped else "ran", "seconds": seconds}


def headline_metrics(project_dir: str | Path) -> dict[str, float]:
    """The top-level numbers of every reports/*.json (`<report>.<key>`): each stage's headline."""
    out: dict[str, float] = {}
    for path in sorted((Path(project_dir) / "reports").glob("*.json")):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(report, dict):
            continue
        for key, value in report.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{path.stem}.{key}"] = value
    return out


def _number(value: Any) -> float | None:
    """A finite number from a report (bools and non-numbers: None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(value)


def _read_report(project_dir: str | Path, name: str) -> dict[str, Any]:
    """reports/<name>.json as a dict ({} when missing or unreadable)."""
    try:
        report = json.loads((Path(project_dir) / "reports" / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return report if isinstance(report, dict) else {}


def _models(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-model sections of an evaluate report (`{"models": {name: {...}}}`)."""
    models = report.get("models")
    return {k: v for k, v in models.items() if isinstance(v, dict)} if isinstance(models, dict) else {}


def _rate(section: dict[str, Any], *keys: str) -> float | None:
    """The first of `keys` found as a number in `section` or its `cost` block."""
    for where in (section, section.get("cost") if isinstance(section.get("cost"), dict) else {}):
        for key in keys:
            if (v := _number(where.get(key))) is not None:
                return v
    return None


def headline_rows(project_dir: str | Path) -> list[tuple[str, str]]:
    """The few numbers to read first, from whichever reports exist: ProcessBench average F1 per
    model, how often analyses reached the verdict (fallback rate), PRMBench PRMScore per model,
    the Best-of-N gain of the PRM over majority voting and over one sample."""
    rows: list[tuple[str, str]] = []
    held = _read_report(project_dir, "heldout")
    for model, section in _models(held).items():  # the in-domain held-out benchmark leads (arithmetic domain)
        f1, reach = _number(section.get("f1")), _number(section.get("verdict_reach_rate"))
        if f1 is not None or reach is not None:
            rows.append((f"held-out first-error F1 ({model})",
                         (f"{f1:.1f}" if f1 is not None else "-") +
                         (f" (verdict reach {reach:.1%})" if reach is not None else "")))
    pb = _read_report(project_dir, "processbench")
    for model, section in _models(pb).items():
        if (v := _number(section.get("avg_f1"))) is not None:
            rows.append((f"ProcessBench avg F1 ({model})", f"{v:.1f}"))
    for model, section in _models(pb).items():
        reach = _rate(section, "verdict_reach_rate", "verdict_rate")
        fallbacks, generations = _rate(section, "fallbacks"), _rate(section, "generations")
        fallback = _rate(section, "fallback_rate")
        if fallback is None and fallbacks is not None and generations:
            fallback = fallbacks / generations
        if reach is None and fallback is not None:
            reach = 1.0 - fallback
        if reach is not None:
            detail = f" (fallback {fallback:.1%})" if fallback is not None else ""
            rows.append((f"analyses reaching the verdict ({model}, ProcessBench)", f"{reach:.1%}{detail}"))
    pairs = _read_report(project_dir, "pairs")
    if (v := _number(pairs.get("valid_rate"))) is not None:
        rows.append(("SFT analyses reaching a valid verdict (sample-pairs)", f"{v:.1%}"))
    prm = _read_report(project_dir, "prmbench")
    for model, section in _models(prm).items():
        if (v := _number(section.get("prmscore"))) is not None:
            rows.append((f"PRMBench PRMScore ({model})", f"{v:.3f}"))
    bon = _read_report(project_dir, "bon")
    datasets = bon.get("datasets") if isinstance(bon.get("datasets"), dict) else {}
    for dataset, entry in datasets.items():
        if not isinstance(entry, dict):
            continue
        n = entry.get("n")
        best, maj, one = (_number(entry.get(f"prm@{n}")), _number(entry.get(f"maj@{n}")),
                          _number(entry.get("pass@1")))
        if best is None:
            continue
        gains = [f"{best - ref:+.3f} over {name}" for ref, name in ((maj, f"maj@{n}"), (one, "pass@1"))
                 if ref is not None]
        rows.append((f"Best-of-N gain ({dataset}, prm@{n} {best:.3f})", "; ".join(gains) or "-"))
    return rows


def summary_markdown(results: Sequence[dict[str, Any]], metrics: dict[str, float], run_link: str | None,
                     failed: str | None = None, headline: Sequence[tuple[str, str]] = (),
                     experiment_link: str | None = None, noop: bool = False) -> str:
    """The pipeline's markdown artifact: MLflow links, stage outcomes, headline table, every metric."""
    lines = ["# R-PRM pipeline", ""]
    if run_link:
        lines += [f"MLflow parent run: [{run_link}]({run_link})", ""]
    if experiment_link:
        lines += [f"All runs of the experiment: [{experiment_link}]({experiment_link})", ""]
    if failed:
        lines += [f"**Failed at stage `{failed}`.**", ""]
    if noop:
        lines += ["**No-op: DVC found every stage up to date, nothing reran.** The MLflow parent "
                  "run is tagged `rprm.noop=true` and carries no metrics; the numbers below are "
                  "those of the last run that produced the reports.", ""]
    lines += ["| stage | outcome | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in results]
    if headline:
        lines += ["", "## Headline", "", "| headline | value |", "| --- | ---: |"]
        lines += [f"| {name} | {value} |" for name, value in headline]
    lines += ["", "## Every report number", "", "| metric | value |", "| --- | ---: |"]
    for key, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    return "\n".join(lines) + "\n"


@flow(name="rprm-pipeline", log_prints=True)
def pipeline(
    project_dir: str = ".",
    stages: list[str] | None = None,
    retries: int = 3,
    retry_backoff_s: float = 10.0,
) -> dict[str, Any]:
    """Run the DVC stages (all, or `stages`, in DAG order) under one MLflow parent run."""
    log = get_run_logger()
    root = Path(project_dir).resolve()
    os.chdir(root)  # relative paths (params, SQLite store) are the project's; one run per process
    selected = list(STAGES) if stages is None else [s for s in STAGES if s in stages]
    unknown = sorted(set(stages or ()) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {list(STAGES)}")
    params = load_params(root / "params.yaml")
    uri = tracking.tracking_uri(params, root)
    parent = tracking.start_pipeline_run(
        params, run_name=f"pipeline {flow_run.get_name() or ''}".strip(),
        tags={"prefect.flow_run_id": str(flow_run.get_id() or ""), "rprm.stages": ",".join(selected)},
        root=root,
    )
    link = tracking.run_url(params, parent, root=root)
    log.info("MLflow parent run %s: %s", parent, link)
    results: list[dict[str, Any]] = []
    failed: str | None = None
    try:
        for stage in selected:
            runner = run_stage
            if stage in REMOTE_STAGES and retries > 0:
                runner = run_stage.with_options(
                    retries=retries,
                    retry_delay_seconds=exponential_backoff(backoff_factor=retry_backoff_s),
                    retry_jitter_factor=0.5,
                )
            failed = stage
            results.append(runner(stage, str(root), parent, uri))
        failed = None
    finally:
        metrics = headline_metrics(root)
        noop = not failed and bool(results) and all(r["status"] == "skipped" for r in results)
        tracking.end_pipeline_run(params, parent, "FAILED" if failed else "FINISHED", metrics,
                                  root=root, noop=noop)
        create_markdown_artifact(
            summary_markdown(results, metrics, link, failed, headline_rows(root),
                             tracking.experiment_url(params, root=root), noop),
            key="rprm-pipeline",
            description="R-PRM pipeline: stage outcomes, headline metrics, MLflow parent run",
        )
    return {"parent_run_id": parent, "run_url": link, "stages": results, "metrics": metrics, "noop": noop}


def main() -> None:
    """CLI: run the flow once (an ephemeral Prefect API is used when none is configured)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--stages", nargs="*", choices=STAGES)
    parser.add_argument("--retries", type=int, default=3, help="retries of the remote-engine stages")
    parser.add_argument("--retry-backoff", type=float, default=10.0,
                        help="seconds before the first retry; doubles with each retry (+-50%% jitter)")
    args = parser.parse_args()
    result = pipeline(project_dir=args.project_dir, stages=args.stages, retries=args.retries,
                      retry_backoff_s=args.retry_backoff)
    for r in result["stages"]:
        print(f"{r['stage']:<13} {r['status']:<8} {r['seconds']:>7.1f} s")
    print(f"{'total':<22} {sum(r['seconds'] for r in result['stages']):>7.1f} s")
    if result["noop"]:
        print("no-op: every stage was up to date (the MLflow parent run is tagged rprm.noop=true)")
    print(f"MLflow parent run: {result['run_url']}")


if __name__ == "__main__":
    main()
