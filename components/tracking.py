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

Artifacts of a local SQLite store live beside the database, in `mlartifacts/<experiment>/`
(so in the project for the default `sqlite:///mlruns.db`). MLflow records artifact locations
as absolute paths, so a project that was moved or copied would keep reading and writing the
old folder: :func:`setup` notices an experiment whose artifact location lies outside the
store's folder and rewrites the locations of that experiment, its runs, logged models and
model versions to the same place under the current folder (:func:`relocate_artifacts`).

Stores behind a server (`http(s)://`) are probed first (:func:`check_store`): an unreachable
server is a one-line error within seconds instead of minutes of MLflow retries.

Every MLflow call (runs, metrics, artifacts, the model registry, the served model) goes through
this module, the only one that imports MLflow (DDP training workers too: `resume_run`). It is
also the served model's code file (models from code): the pyfunc class (`_pyfunc_class`) wraps
the service class the model config names (`components.serving.StepRewardService`, which knows no
MLflow), and the last lines call `mlflow.models.set_model` when MLflow executes this file to load
the model (not when the stages import it). Every import of MLflow here is inside a function, so
importing this module is cheap.

Secrets never reach MLflow: only params sections are logged, and API keys live in the
environment (params hold only the *name* of the variable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from components.config import Params
from components.io import data_hash

PARENT_RUN_ENV = "RPRM_PARENT_RUN_ID"
UI_URL_ENV = "RPRM_MLFLOW_UI_URL"  # base URL of the MLflow UI in published links
DEFAULT_UI_URL = "http://127.0.0.1:5000"  # `mlflow ui` on this machine
PANDAS_DATASET_MAX_BYTES = 8 * 1024 * 1024  # larger JSONL inputs are logged as metadata only
ARTIFACTS_DIR = "mlartifacts"  # beside a local SQLite store: <store folder>/mlartifacts/<experiment>/
ARTIFACT_ROOT_TAG = "rprm.artifact_root"  # experiment tag: the folder its artifact location was set under
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # "Machine learning" (runs), not the GenAI view
UI_QUERY = "?workflowType=machine_learning"  # MLflow 3.17's UI: open the runs ("Model training") view
NOOP_TAG = "rprm.noop"
STORE_PROBE_TIMEOUT_S = 5.0

log = logging.getLogger(__name__)


class TrackingStoreError(RuntimeError):
    """The MLflow tracking store cannot be used (e.g. its server does not answer)."""


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


def check_store(uri: str, timeout: float = STORE_PROBE_TIMEOUT_S) -> None:
    """Probe an http(s) tracking server once; TrackingStoreError naming the URI if it does not answer.

    MLflow's own client retries a dead server for minutes before failing with a traceback; this
    fails within `timeout` seconds. Any answer below 500 counts as reachable (the server decides
    the rest); other URIs (SQLite files, databases) are not probed.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import httpx

    url = uri.rstrip("/") + "/health"
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.TimeoutException:
        raise TrackingStoreError(f"MLflow tracking server {uri} did not answer within {timeout:g} s "
                                 "(MLFLOW_TRACKING_URI or tracking.tracking_uri)") from None
    except httpx.HTTPError as err:
        reason = str(err) or type(err).__name__
        raise TrackingStoreError(f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                                 "or point MLFLOW_TRACKING_URI / tracking.tracking_uri at a running one") from None
    if response.status_code >= 500:
        raise TrackingStoreError(f"MLflow tracking server {uri} answered {url} with HTTP "
                                 f"{response.status_code}; is it healthy?")


def store_dir(uri: str) -> Path | None:
    """The folder of a local SQLite store (its artifacts live there), None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    file = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not file or file == ":memory:":
        return None
    return Path(file).resolve().parent


def _slug(name: str) -> str:
    """A folder name for an experiment name (a hash suffix when characters had to be replaced)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
    if slug != name:
        slug += "-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return slug


def _local_path(location: str | None) -> Path | None:
    """The filesystem path of a local artifact location (a plain path or file: URI), else None."""
    if not location:
        return None
    if location.startswith("file://"):
        location = location.removeprefix("file://")
    elif location.startswith("file:"):
        location = location.removeprefix("file:")
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", location):
        return None  # s3:, mlflow-artifacts:, dbfs:, ...
    path = Path(location)
    return path if path.is_absolute() else None


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _moved_tail(location: Path, folder: Path) -> Path | None:
    """The longest tail (2+ parts) of `location` that exists under `folder`: where a copied
    store's artifacts are now, for stores created before the artifact-root tag existed."""
    parts = location.parts
    for i in range(1, len(parts) - 1):
        tail = Path(*parts[i:])
        if (folder / tail).exists():
            return tail
    return None


def _replace_prefix(value: str | None, old: str, new: str) -> str | None:
    """`value` with the path prefix `old` (plain or file: URI) replaced by `new`, else None."""
    if not value:
        return None
    for scheme in ("", "file://", "file:"):
        prefix = scheme + old
        if value == prefix or value.startswith(prefix + "/"):
            return scheme + new + value[len(prefix):]
    return None


def _rewrite_locations(uri: str, experiment_id: str, old: str, new: str) -> int:
    """Rewrite artifact locations under `old` to `new` for one experiment of a SQLite store
    (experiment, runs, logged models, model versions, trace locations); the number of rows."""
    from mlflow.store.model_registry.dbmodels.models import SqlModelVersion
    from mlflow.store.tracking.dbmodels.models import (
        SqlExperiment,
        SqlLoggedModel,
        SqlRun,
        SqlTraceInfo,
        SqlTraceTag,
    )
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    engine = create_engine(uri)
    changed = 0
    try:
        with Session(engine) as session, session.begin():
            exp_id = int(experiment_id)
            rows: list[tuple[Any, str]] = [
                (r, "artifact_location") for r in session.query(SqlExperiment).filter_by(experiment_id=exp_id)
            ]
            rows += [(r, "artifact_uri") for r in session.query(SqlRun).filter_by(experiment_id=exp_id)]
            rows += [(r, "artifact_location")
                     for r in session.query(SqlLoggedModel).filter_by(experiment_id=exp_id)]
            rows += [(r, field) for r in session.query(SqlModelVersion)
                     for field in ("storage_location", "source")]
            trace_ids = session.query(SqlTraceInfo.request_id).filter_by(experiment_id=exp_id)
            rows += [(r, "value") for r in session.query(SqlTraceTag).filter(
                SqlTraceTag.key == "mlflow.artifactLocation", SqlTraceTag.request_id.in_(trace_ids))]
            for row, field in rows:
                value = _replace_prefix(getattr(row, field), old, new)
                if value is not None and value != getattr(row, field):
                    setattr(row, field, value)
                    changed += 1
    finally:
        engine.dispose()
    return changed


def relocate_artifacts(uri: str, experiment: Any) -> Any:
    """Follow a moved or copied SQLite store: point `experiment`'s artifacts under the store's
    current folder when its location lies outside it. Returns the (re-read) experiment."""
    import mlflow

    folder = store_dir(uri)
    location = _local_path(experiment.artifact_location)
    if folder is None or location is None:
        return experiment
    client = mlflow.MlflowClient(uri)
    recorded = experiment.tags.get(ARTIFACT_ROOT_TAG)
    if _within(location.resolve(), folder):
        if recorded != str(folder):
            client.set_experiment_tag(experiment.experiment_id, ARTIFACT_ROOT_TAG, str(folder))
        return experiment
    if recorded and _within(location, Path(recorded)):
        tail: Path | None = location.relative_to(recorded)
    else:
        tail = _moved_tail(location, folder)
    if tail is None:
        log.warning("experiment %r keeps its artifacts in %s, outside the store's folder %s, and "
                    "that location was not found here; left as it is", experiment.name, location, folder)
        return experiment
    new = folder / tail
    changed = _rewrite_locations(uri, experiment.experiment_id, str(location), str(new))
    client.set_experiment_tag(experiment.experiment_id, ARTIFACT_ROOT_TAG, str(folder))
    log.warning("MLflow store moved: experiment %r artifacts %s -> %s (%d locations rewritten)",
                experiment.name, location, new, changed)
    return client.get_experiment(experiment.experiment_id)


def ensure_experiment(uri: str, name: str) -> Any:
    """The experiment `name` in store `uri`, created if missing (artifacts in the store's folder,
    the runs view as its kind), and relocated if the store was moved (:func:`relocate_artifacts`)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        folder = store_dir(uri)
        location = str(folder / ARTIFACTS_DIR / _slug(name)) if folder else None
        tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        if folder:
            tags[ARTIFACT_ROOT_TAG] = str(folder)
        try:
            client.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException as err:  # created meanwhile by another process
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage != "active":
        return experiment  # mlflow.set_experiment says it is deleted
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return relocate_artifacts(uri, experiment)


def setup(params: Params, root: str | Path | None = None) -> None:
    """Point MLflow at the store and experiment from params/environment (probed, created or
    relocated as needed); TrackingStoreError if the store's server does not answer."""
    import mlflow

    uri = tracking_uri(params, root)
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    ensure_experiment(uri, params.tracking.experiment)
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


def _tag_path(path: Path, root: str | Path | None = None) -> str:
    """A path as written in tag keys: relative to `root` (default: the cwd) when inside it, posix separators."""
    try:
        rel = path.resolve().relative_to(Path(root or Path.cwd()).resolve())
    except ValueError:
        rel = path
    return rel.as_posix()


def _dataset(path: Path, digest: str, root: str | Path | None = None) -> Any:
    """The MLflow dataset describing one input (pandas for small JSONL, else metadata only)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    name = _tag_path(path, root)
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


def log_inputs(inputs: Sequence[str | Path], context: str = "input", root: str | Path | None = None) -> dict[str, str]:
    """Hash each existing input, tag it `data.md5.<path>` (relative to `root`, default the cwd) and
    log it as a dataset input."""
    import mlflow

    hashes: dict[str, str] = {}
    for item in inputs:
        p = Path(item)
        if not p.exists():
            log.warning("input %s does not exist; not logged", p)
            continue
        digest = data_hash(p)
        key = _tag_path(p, root)
        hashes[key] = digest
        mlflow.set_tag(f"data.md5.{key}", digest)
        kind = "model" if (p / "config.json").exists() else ("folder" if p.is_dir() else "file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # schema hints about integer columns
            mlflow.log_input(_dataset(p, digest, root), context=context, tags={"kind": kind})
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
    root: str | Path | None = None,
) -> Iterator[Any]:
    """Open the MLflow run of one stage; logs its params sections, dataset inputs (named relative
    to `root`, the stage's layout root; default the cwd) and provenance tags.

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
        log_inputs(inputs, root=root)
        yield run


@contextmanager
def resume_run(run_id: str) -> Iterator[Any]:
    """Reopen an existing run as the active one (rank 0 of a training launch logs into the stage's run)."""
    import mlflow

    with mlflow.start_run(run_id=run_id) as run:
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
    noop: bool = False,
) -> None:
    """Log the pipeline's headline metrics on its parent run and close it with `status`.

    A `noop` execution (every stage cached, so no stage run nests under it) logs no metrics:
    it is tagged `rprm.noop=true` and renamed "<name> (no-op: every stage cached)", so it is not
    mistaken for a full pipeline run.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params, root))
    client = mlflow.MlflowClient()
    if noop:
        name = client.get_run(run_id).info.run_name or "pipeline"
        client.set_tag(run_id, NOOP_TAG, "true")
        client.update_run(run_id, name=f"{name} (no-op: every stage cached)")
    else:
        for key, value in (metrics or {}).items():
            client.log_metric(run_id, key.replace("@", "_at_"), float(value))
    client.set_terminated(run_id, status=status)


def ui_base(uri: str, ui_url: str | None = None) -> str:
    """Base URL of the MLflow UI: `ui_url`, else $RPRM_MLFLOW_UI_URL, else an http(s) tracking
    URI, else the local `mlflow ui` address (http://127.0.0.1:5000)."""
    base = ui_url or os.environ.get(UI_URL_ENV)
    if not base:
        base = uri if uri.startswith(("http://", "https://")) else DEFAULT_UI_URL
    return base.rstrip("/")


def run_url(
    params: Params, run_id: str, ui_url: str | None = None, root: str | Path | None = None
) -> str:
    """Link to a run in the MLflow UI (base URL from :func:`ui_base`), in the runs view."""
    import mlflow

    uri = tracking_uri(params, root)
    mlflow.set_tracking_uri(uri)
    run = mlflow.MlflowClient().get_run(run_id)
    return f"{ui_base(uri, ui_url)}/#/experiments/{run.info.experiment_id}/runs/{run_id}{UI_QUERY}"


def experiment_url(
    params: Params, ui_url: str | None = None, root: str | Path | None = None
) -> str | None:
    """Link to the experiment's runs list in the MLflow UI, or None if it does not exist yet."""
    import mlflow

    uri = tracking_uri(params, root)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.MlflowClient().get_experiment_by_name(params.tracking.experiment)
    if experiment is None:
        return None
    return f"{ui_base(uri, ui_url)}/#/experiments/{experiment.experiment_id}{UI_QUERY}"


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
        log_json(report, artifact_file)


def log_json(obj: Any, artifact_file: str) -> None:
    """Log a JSON document (indented, sorted keys) as an artifact of the active run."""
    import mlflow

    mlflow.log_text(json.dumps(obj, indent=2, sort_keys=True), artifact_file)


def log_metric(key: str, value: float, step: int | None = None) -> None:
    """Log one metric (at `step`) in the active run."""
    import mlflow

    mlflow.log_metric(key, value, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Log a local file as an artifact of the active run (under `artifact_path`)."""
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_table(rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
    """Log rows as an MLflow table artifact (viewable in the UI)."""
    import mlflow
    import pandas as pd

    if rows:
        mlflow.log_table(pd.DataFrame(list(rows)), artifact_file=artifact_file)


# --------------------------------------------------------------------------------------
# Model registry (register, promote, resolve a models:/ URI)
# --------------------------------------------------------------------------------------


class RegistryError(RuntimeError):
    """A model-registry call failed; the message is the store's."""


def log_pyfunc(name: str, spec: Mapping[str, Any]) -> Any:
    """Log a pyfunc model (`mlflow.pyfunc.log_model` arguments in `spec`) in the active run; its ModelInfo."""
    import mlflow

    return mlflow.pyfunc.log_model(name=name, **spec)


SERVICE_KEY = "service"  # model config entry naming the served class, "module:Class"


def serving_signature(
    inputs: Sequence[tuple[str, str, bool]], outputs: Sequence[tuple[str, str, bool]], params: Mapping[str, Any]
) -> Any:
    """A ModelSignature from plain column descriptions (name, type, required; a type is "string",
    "double", "long" or "boolean", with "[]" for a list) and request params with their defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    def column(name: str, kind: str, required: bool) -> Any:
        dtype = Array(DataType[kind[:-2]]) if kind.endswith("[]") else DataType[kind]
        return ColSpec(dtype, name, required=required)

    kinds = {bool: DataType.boolean, int: DataType.long, float: DataType.double, str: DataType.string}
    return ModelSignature(
        inputs=Schema([column(*c) for c in inputs]),
        outputs=Schema([column(*c) for c in outputs]),
        params=ParamSchema([ParamSpec(n, kinds[type(d)], d) for n, d in params.items()]),
    )


def _pyfunc_class() -> type:
    """The served model as an MLflow PythonModel around the service class its model config names
    (`SERVICE_KEY`: built with `(config, artifacts)`, `predict(model_input, params)` answering rows;
    its `request_error` becomes MlflowException INVALID_PARAMETER_VALUE, answered with HTTP 400).
    The class is looked up by name, so that this module, which every stage imports, does not
    depend on the service's code."""
    import importlib

    import pandas as pd
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import PythonModel, PythonModelContext

    class ServedModel(PythonModel):
        """pyfunc around the configured service (components.serving.StepRewardService for the PRM)."""

        def load_context(self, context: PythonModelContext) -> None:
            """Build the service from the model config and the artifacts."""
            config = dict(context.model_config or {})
            module, _, name = str(config.get(SERVICE_KEY, "")).partition(":")
            if not module or not name:
                raise MlflowException(f"model config has no {SERVICE_KEY!r} entry of the form 'module:Class'")
            service_class = getattr(importlib.import_module(module), name)
            self.service = service_class(config, dict(context.artifacts or {}))

        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN202 (set below)
            """The service's rows; HTTP 400 on a malformed request."""
            try:
                return self.service.predict(model_input, params)
            except self.service.request_error as err:
                raise MlflowException.invalid_parameter_value(str(err)) from None

        # MLflow reads predict's type hints when the class is created (a DataFrame: no schema
        # inferred from them, the logged signature rules); this module's annotations are strings
        # that would not resolve `pd`, so they are given as objects
        predict.__annotations__ = {"context": PythonModelContext, "model_input": pd.DataFrame,
                                   "params": dict[str, Any] | None, "return": list[dict[str, Any]]}

    return ServedModel


def registry_client() -> Any:
    """A client of the current tracking store (MLFLOW_TRACKING_URI or the one `setup` set)."""
    import mlflow

    return mlflow.MlflowClient()


def current_tracking_uri() -> str:
    """The tracking URI MLflow uses now."""
    import mlflow

    return mlflow.get_tracking_uri()


def ensure_registered_model(client: Any, name: str, description: str) -> None:
    """Create registered model `name` (with `description`) unless it exists."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=description)


def register_version(model_uri: str, name: str, tags: Mapping[str, str]) -> Any:
    """Register `model_uri` as a new version of `name` with `tags`; the ModelVersion."""
    import mlflow

    return mlflow.register_model(model_uri, name, tags=tags)


def set_alias(client: Any, name: str, alias: str, version: str | int) -> None:
    """Point `alias` of registered model `name` at `version`."""
    client.set_registered_model_alias(name, alias, version)


def set_version_tags(client: Any, name: str, version: str | int, tags: Mapping[str, Any]) -> None:
    """Set tags on one model version, in the order given."""
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    """The model version `alias` points at, None if it points nowhere (or `name` does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def find_version(client: Any, name: str, alias: str | None = None, version: str | None = None) -> Any:
    """The version of `name` by alias, else by number, else the latest; RegistryError if there is none."""
    from mlflow.exceptions import MlflowException

    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        if version is not None:
            return client.get_model_version(name, version)
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise MlflowException(f"registered model {name!r} has no versions")
        return max(versions, key=lambda v: int(v.version))
    except MlflowException as err:
        raise RegistryError(str(err)) from err


def download_artifacts(artifact_uri: str, dst_path: str | Path) -> None:
    """Download `artifact_uri` (e.g. models:/name/3) into `dst_path`; RegistryError if the store refuses."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst_path))
    except MlflowException as err:
        raise RegistryError(str(err)) from err


if __name__ != "components.tracking":  # MLflow executes this file as the served model's code
    import mlflow

    mlflow.models.set_model(_pyfunc_class()())
