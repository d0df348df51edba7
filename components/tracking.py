"""MLflow conventions: one run per stage, nested under the pipeline's parent run when there is one.

Tracking URI: `MLFLOW_TRACKING_URI` if set, else `tracking.tracking_uri` from params (a SQLite
file in the project by default). Experiment `tracking.experiment`. When the Prefect pipeline
runs, it creates the parent run (:func:`start_pipeline_run`) and exports `RPRM_PARENT_RUN_ID`,
so every stage's run nests under one parent run; a stage run alone logs a proper top-level run
with the same params, tags and dataset inputs.

Every stage run carries:
- params: the params sections the stage reads (dotted keys, e.g. `sft.learning_rate`);
- tags: `dvc.stage`, `rprm.stage`, the git commit (`mlflow.source.git.commit`, `git.dirty`),
  and one `data.md5.<path>` tag per input file or folder, hashed as DVC hashes it (the md5 of
  a file; for a folder the md5 of its sorted `{md5, relpath}` listing, suffixed `.dir`), so
  a run can be matched to the `dvc.lock` that produced it;
- dataset inputs (`mlflow.log_input`): one dataset per input, digest = the DVC hash; JSON
  Lines files small enough are logged as pandas datasets (schema and row count in the UI),
  anything else (model folders, large files) as metadata-only datasets.

Secrets never reach MLflow: only params sections are logged, and API keys live in the
environment (params hold only the *name* of the variable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from components.config import Params

PARENT_RUN_ENV = "RPRM_PARENT_RUN_ID"
PANDAS_DATASET_MAX_BYTES = 8 * 1024 * 1024  # larger JSONL inputs are logged as metadata only
_CHUNK = 1024 * 1024

log = logging.getLogger(__name__)


def tracking_uri(params: Params, root: str | Path | None = None) -> str:
    """The effective tracking URI (environment first); a relative SQLite file or folder is
    resolved against `root` when given (else the current directory, as MLflow does)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.tracking_uri
    if root is None:
        return uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((Path(root) / uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri and not uri.startswith(("sqlite:", "databricks")) and not Path(uri).is_absolute():
        return str((Path(root) / uri).resolve())
    return uri


def setup(params: Params, root: str | Path | None = None) -> None:
    """Point MLflow at the store and experiment from params/environment."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params, root))
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


def git_dirty() -> bool | None:
    """Whether the git working tree has uncommitted changes to tracked files (None: no git)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout
    except Exception:
        return None
    return bool(out.strip())


# --------------------------------------------------------------------------------------
# Data hashes (as DVC computes them)
# --------------------------------------------------------------------------------------


def file_md5(path: str | Path) -> str:
    """md5 of a file's bytes (DVC 3's `md5` for files)."""
    h = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def data_hash(path: str | Path) -> str:
    """DVC's hash of a file or folder: md5, or for a folder md5 of its listing + `.dir`."""
    p = Path(path)
    if not p.is_dir():
        return file_md5(p)
    entries = [
        {"md5": file_md5(f), "relpath": f.relative_to(p).as_posix()}
        for f in p.rglob("*")
        if f.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing, usedforsecurity=False).hexdigest() + ".dir"


def _tag_path(path: Path) -> str:
    """A path as written in tag keys: relative to the cwd when inside it, posix separators."""
    try:
        rel = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        rel = path
    return rel.as_posix()


def _dataset(path: Path, digest: str) -> Any:
    """The MLflow dataset describing one input (pandas for small JSONL, else metadata only)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    name = _tag_path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": both are local
        source = resolve_dataset_source(str(path.resolve()))
    if path.is_file() and path.suffix == ".jsonl" and 0 < path.stat().st_size <= PANDAS_DATASET_MAX_BYTES:
        import pandas as pd

        try:
            df = pd.read_json(path, lines=True, dtype=False)
            return mlflow.data.from_pandas(df, source=source, name=name, digest=digest)
        except (ValueError, TypeError) as err:  # unreadable as a table: keep the metadata
            log.debug("dataset %s logged as metadata only: %s", path, err)
    return MetaDataset(source=source, name=name, digest=digest)


def log_inputs(inputs: Sequence[str | Path], context: str = "input") -> dict[str, str]:
    """Hash each existing input, tag it `data.md5.<path>` and log it as a dataset input."""
    import mlflow

    hashes: dict[str, str] = {}
    for item in inputs:
        p = Path(item)
        if not p.exists():
            log.warning("input %s does not exist; not logged", p)
            continue
        digest = data_hash(p)
        key = _tag_path(p)
        hashes[key] = digest
        mlflow.set_tag(f"data.md5.{key}", digest)
        kind = "model" if (p / "config.json").exists() else ("folder" if p.is_dir() else "file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # schema hints about integer columns
            mlflow.log_input(_dataset(p, digest), context=context, tags={"kind": kind})
    return hashes


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------


def _provenance_tags() -> dict[str, str]:
    tags: dict[str, str] = {}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    dirty = git_dirty()
    if dirty is not None:
        tags["git.dirty"] = str(dirty).lower()
    return tags


def _usable_parent(client: Any, run_id: str) -> str | None:
    """The parent run id if it exists in this store and is not deleted, else None (warned)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        log.warning("%s=%s not found in this tracking store (%s); logging a top-level run",
                    PARENT_RUN_ENV, run_id, err.error_code)
        return None
    if run.info.lifecycle_stage == "deleted":
        log.warning("%s=%s is deleted; logging a top-level run", PARENT_RUN_ENV, run_id)
        return None
    return run_id


@contextmanager
def stage_run(
    stage: str,
    params: Params,
    sections: Sequence[str],
    *,
    inputs: Sequence[str | Path] = (),
) -> Iterator[Any]:
    """Open the MLflow run of one stage; logs its params sections, dataset inputs and provenance tags.

    Nested under the run in `RPRM_PARENT_RUN_ID` when set (the pipeline's parent run), else a
    top-level run. The run ends FINISHED, or FAILED when the block raises.
    """
    import mlflow

    setup(params)
    tags = {"rprm.stage": stage, "dvc.stage": stage, **_provenance_tags()}
    active = mlflow.active_run()
    if active is not None:  # called inside another run (e.g. a notebook): nest under it
        parent: str | None = active.info.run_id
    else:
        parent_env = os.environ.get(PARENT_RUN_ENV)
        parent = _usable_parent(mlflow.MlflowClient(), parent_env) if parent_env else None
    with mlflow.start_run(
        run_name=stage, tags=tags, nested=parent is not None, parent_run_id=parent
    ) as run:
        flat: dict[str, Any] = {}
        for name in sections:
            flat.update(flatten(getattr(params, name).model_dump(mode="json"), f"{name}."))
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params({k: str(v)[:6000] for k, v in items[i : i + 100]})
        log_inputs(inputs)
        yield run


def start_pipeline_run(
    params: Params,
    run_name: str = "pipeline",
    tags: Mapping[str, str] | None = None,
    root: str | Path | None = None,
) -> str:
    """Create the parent run of one pipeline execution (left RUNNING) and return its id."""
    import mlflow

    setup(params, root)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    all_tags = {
        "mlflow.runName": run_name,
        "rprm.pipeline": "true",
        **_provenance_tags(),
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    run = client.create_run(experiment.experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def end_pipeline_run(
    params: Params,
    run_id: str,
    status: str = "FINISHED",
    metrics: Mapping[str, float] | None = None,
    root: str | Path | None = None,
) -> None:
    """Log the pipeline's headline metrics on its parent run and close it with `status`."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params, root))
    client = mlflow.MlflowClient()
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key.replace("@", "_at_"), float(value))
    client.set_terminated(run_id, status=status)


def run_url(
    params: Params, run_id: str, ui_url: str | None = None, root: str | Path | None = None
) -> str:
    """Link to a run in the MLflow UI (`ui_url`, else $RPRM_MLFLOW_UI_URL, else an http
    tracking URI, else the local `mlflow ui` address)."""
    import mlflow

    uri = tracking_uri(params, root)
    mlflow.set_tracking_uri(uri)
    run = mlflow.MlflowClient().get_run(run_id)
    base = ui_url or os.environ.get("RPRM_MLFLOW_UI_URL")
    if base is None:
        base = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


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
