"""Prefect flow `rprm-retrain`: bring in new labelled data, rerun what changed, run the promotion gate.

1. Intake: every `data/incoming/*.jsonl` (PRM800K format, either line format) is validated
   with the data loaders (`components.prepare.load_labelled`) and checked for solution ids
   already in the training data. Accepted files move to `data/labelled/`, which the
   `prepare` stage reads (a DVC dependency, so prepare and everything downstream rerun);
   rejected files move to `data/incoming/rejected/` beside a `.error.txt` note naming the
   file, line and field at fault. A file whose content is already in `data/labelled/` is
   dropped as a duplicate.
2. Change detection: `dvc status` of the pipeline's stages. Nothing changed: the pipeline
   is not run (a cheap no-op). Something changed (new data, code, params, a missing
   output): the `rprm-pipeline` flow runs as a subflow, and DVC reruns only what is stale.
3. Gate: `components.registry.promote` moves `champion` to the new challenger if it beats
   the champion by `promote.margin`, else keeps the champion and records why.

Deploy it on a cron schedule with `python -m flows.deploy` (one machine, `serve()`) or with
`prefect deploy --all` and a process worker (`prefect.yaml`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components import paths, registry
from components.config import load_params
from components.data import load_prm800k
from components.io import DataError, file_digest
from components.prepare import load_labelled
from flows.pipeline import STAGES, pipeline, stage_env

REJECTED = "rejected"


def _reject(path: Path, incoming: Path, message: str) -> str:
    rejected = incoming / REJECTED
    rejected.mkdir(parents=True, exist_ok=True)
    target = rejected / path.name
    shutil.move(path, target)
    (rejected / f"{path.name}.error.txt").write_text(message + "\n", encoding="utf-8")
    return message


@task(name="intake")
def intake(project_dir: str) -> dict[str, Any]:
    """Validate data/incoming/*.jsonl; move accepted files to data/labelled/, rejected aside."""
    log = get_run_logger()
    root = Path(project_dir)
    params = load_params(root / "params.yaml")
    layout = paths.Layout(root)
    incoming, labelled = layout.incoming, layout.labelled
    files = sorted(incoming.glob("*.jsonl"))
    result: dict[str, Any] = {"accepted": [], "rejected": {}, "duplicates": []}
    if not files:
        log.info("no new files in %s", incoming)
        return result
    labelled.mkdir(parents=True, exist_ok=True)
    known = {s.id for s in load_prm800k(params.data)} | {s.id for s in load_labelled(params.data, labelled)}
    existing = {file_digest(p, "sha256") for p in labelled.glob("*.jsonl")}
    for path in files:
        if file_digest(path, "sha256") in existing:
            path.unlink()
            result["duplicates"].append(path.name)
            log.info("%s: already in %s; dropped", path.name, labelled)
            continue
        staging = incoming / ".validating"
        staging.mkdir(exist_ok=True)
        try:
            shutil.copy2(path, staging / path.name)
            solutions = load_labelled(params.data, staging)
            if not solutions:
                raise DataError(path, None, None, "no labelled solution in the file")
            clash = next((s.id for s in solutions if s.id in known), None)
            if clash is not None:
                raise DataError(path, None, "id", f"solution id {clash!r} is already in the training data")
        except DataError as err:
            result["rejected"][path.name] = _reject(path, incoming, str(err).replace(str(staging), str(incoming)))
            log.warning("rejected %s", result["rejected"][path.name])
            continue
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        target = labelled / path.name
        if target.exists():
            target = labelled / f"{path.stem}-{file_digest(path, 'sha256')[:8]}.jsonl"
        shutil.move(path, target)
        known |= {s.id for s in solutions}
        existing.add(file_digest(target, "sha256"))
        result["accepted"].append({"file": target.name, "solutions": len(solutions)})
        log.info("accepted %s: %d solutions -> %s", path.name, len(solutions), target)
    return result


@task(name="dvc-status")
def changed_stages(project_dir: str, stages: list[str] | None) -> list[str]:
    """Stages `dvc status` reports as changed (deps, params, outs or never run)."""
    targets = [] if stages is None else [s for s in STAGES if s in stages]
    env = stage_env()
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json", *targets],
        cwd=project_dir, env=env, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"dvc status failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    status = json.loads(proc.stdout or "{}")
    changed = [name.split(":")[-1] for name in status]
    get_run_logger().info("changed stages: %s", changed or "none")
    return changed


@task(name="promotion-gate")
def promotion_gate(project_dir: str) -> dict[str, Any]:
    """Run `rprm promote` logic: champion moved to the challenger, or kept with the reason."""
    decision = registry.promote(load_params(Path(project_dir) / "params.yaml"))
    get_run_logger().info("promotion: %s", decision["reason"])
    return decision


def summary_markdown(result: dict[str, Any]) -> str:
    """The retraining's markdown artifact: intake, what reran, the gate's decision."""
    intake_result, decision = result["intake"], result["promotion"]
    lines = ["# R-PRM retraining", ""]
    lines.append(f"- accepted files: {', '.join(a['file'] for a in intake_result['accepted']) or 'none'}")
    for name, why in intake_result["rejected"].items():
        lines.append(f"- rejected `{name}`: {why}")
    if intake_result["duplicates"]:
        lines.append(f"- duplicates dropped: {', '.join(intake_result['duplicates'])}")
    lines.append(f"- changed stages: {', '.join(result['changed']) or 'none (pipeline not run)'}")
    if result["pipeline"]:
        lines.append(f"- MLflow parent run: {result['pipeline']['run_url']}")
    verb = "promoted" if decision["promoted"] else "kept"
    lines.append(f"- gate: **{verb}** (champion: {decision['champion_after']}); {decision['reason']}")
    return "\n".join(lines) + "\n"


@flow(name="rprm-retrain", log_prints=True)
def retrain(
    project_dir: str = ".",
    stages: list[str] | None = None,
    retries: int = 3,
    retry_backoff_s: float = 10.0,
    force: bool = False,
) -> dict[str, Any]:
    """Intake new labelled data; rerun the pipeline if anything changed (or `force`); promote."""
    root = Path(project_dir).resolve()
    os.chdir(root)  # relative paths (params, SQLite store) are the project's; one run per process
    intake_result = intake(str(root))
    changed = changed_stages(str(root), stages)
    result: dict[str, Any] = {"intake": intake_result, "changed": changed, "pipeline": None}
    if changed or force:
        result["pipeline"] = pipeline(
            project_dir=str(root), stages=stages, retries=retries, retry_backoff_s=retry_backoff_s
        )
    result["promotion"] = promotion_gate(str(root))
    create_markdown_artifact(summary_markdown(result), key="rprm-retrain",
                             description="R-PRM retraining: intake, reruns, promotion decision")
    return result


if __name__ == "__main__":
    retrain()
