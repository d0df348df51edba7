"""MLflow conventions: one run per stage, nested under the pipeline's parent run when there is one.

Tracking URI: `MLFLOW_TRACKING_URI` if set, else `tracking.tracking_uri` from params (a SQLite
file in the project by default). Experiment `tracking.experiment`. When the Prefect pipeline
runs, it exports `RPRM_PARENT_RUN_ID` so every stage's run nests under one parent run; a stage
run alone logs a proper top-level run. Secrets never reach MLflow: only params sections are
logged, and API keys live in the environment, never in params.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from components.config import Params

PARENT_RUN_ENV = "RPRM_PARENT_RUN_ID"


def tracking_uri(params: Params) -> str:
    """The effective tracking URI (environment first)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.tracking_uri


def setup(params: Params) -> None:
    """Point MLflow at the store and experiment from params/environment."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params))
    mlflow.set_experiment(params.tracking.experiment)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts/lists into dotted keys."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list) and obj and all(isinstance(v, Mapping) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = obj
    return out


def git_commit() -> str | None:
    """Current git commit of the project, if it is a git repository."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except Exception:
        return None


@contextmanager
def stage_run(
    stage: str,
    params: Params,
    sections: Sequence[str],
    *,
    inputs: Sequence[str | Path] = (),
) -> Iterator[Any]:
    """Open the MLflow run of one stage; logs its params sections and provenance tags."""
    import mlflow

    setup(params)
    parent = os.environ.get(PARENT_RUN_ENV)
    tags = {"rprm.stage": stage, "dvc.stage": stage}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        flat: dict[str, Any] = {}
        for name in sections:
            flat.update(flatten(getattr(params, name).model_dump(mode="json"), f"{name}."))
        for i in range(0, len(flat), 100):
            chunk = dict(list(flat.items())[i : i + 100])
            mlflow.log_params({k: str(v)[:6000] for k, v in chunk.items()})
        for path in inputs:
            p = Path(path)
            if p.exists():
                mlflow.set_tag(f"input.{p.name}", str(p))
        yield run


def log_report(report: Mapping[str, Any], artifact_file: str | None = None) -> None:
    """Log every numeric leaf of a report as a metric (dotted names), and the JSON as artifact."""
    import mlflow

    metrics = {
        k: float(v)
        for k, v in flatten(dict(report)).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if metrics:
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()})
    if artifact_file:
        mlflow.log_text(json.dumps(report, indent=2, sort_keys=True), artifact_file)


def log_table(rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
    """Log rows as an MLflow table artifact (viewable in the UI)."""
    import mlflow
    import pandas as pd

    if rows:
        mlflow.log_table(pd.DataFrame(list(rows)), artifact_file=artifact_file)
