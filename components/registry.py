"""Model registry: the `register` stage (challenger) and the promotion gate (champion).

`rprm register` logs the trained PRM folder (`models/<register.model>`, normally the DPO
model) as an MLflow pyfunc model from code (the code file is `components/tracking.py`, whose
pyfunc class wraps the reward service of `components/serving.py`), with its signature
(question + steps in; step rewards, first error and verdicts out) and the scoring and backend
parameters as the model config; registers it as a new version of `tracking.registered_model`,
points the alias `register.alias` (`challenger`) at it, and tags the version with the
headline metrics of `reports/processbench.json` and `reports/prmbench.json`, the run, the git
commit and the model folder's hash. It writes `reports/registration.json`. The code shipped with
the model (its `code/components/` folder) is what serving imports: the static import closure of
the code file `components/tracking.py` and of the reward service it wraps,
`components/serving.py` (components/modules.py; lazy imports included, so all three backends),
and the package data (`components/resources/`), nothing else of components/.

Quality gate (`register.gate`): before anything is logged, the model's verdict-reach rate and
first-error F1 on the gate's benchmark (the in-domain held-out benchmark by default) must clear
the floors: reach at least `min_verdict_reach`, F1 above the better of the trivial predictors
"the first step is wrong" and "no step is wrong" by more than `min_f1_margin`. A model that
misses a floor is refused (exit 2, a message naming the metric) and nothing is registered.

`rprm promote` moves the alias `champion` to the challenger when the challenger's
`promote.metric` (held-out first-error F1 by default) beats the champion's by more than
`promote.margin`, or when there is no champion; otherwise it leaves the champion and says why.
Both versions carry the digest of the benchmark files they were judged on; versions judged on
different files are not compared. The decision is
recorded as tags on both versions. Registry stages are deprecated in MLflow; only aliases are
used.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import components
from components import modules, serving, tracking
from components.config import Params
from components.io import DataError, StageRefused, data_hash, read_json_object, write_json
from components.paths import Layout

log = logging.getLogger(__name__)

CHAMPION = "champion"
LOGGED_MODEL_NAME = "prm"  # the pyfunc's name inside the register run
REGISTERED_MODEL_DESCRIPTION = (
    "R-PRM generative process reward model: question + steps -> per-step "
    "rewards (mean P(Yes) over K analyses), predicted first error, verdicts. "
    "Aliases: challenger (latest registered), champion (promoted, served)."
)
CODE_ROOT = Path(components.__file__).resolve().parents[1]  # the folder holding components/
SERVING_REQUIREMENTS = (
    "mlflow", "torch", "transformers", "tokenizers", "safetensors", "accelerate",
    "pydantic", "pyyaml", "numpy", "pandas",
)


# --------------------------------------------------------------------------------------
# Headline metrics
# --------------------------------------------------------------------------------------


def _read_report(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise DataError(path, None, None, "report not found; run the evaluate stage first")
    return read_json_object(path)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _model_section(report: dict[str, Any], path: Path, model: str) -> dict[str, Any]:
    """The metrics of `model` in an evaluate report (`{"models": {name: {...}}}`, or flat)."""
    models = report.get("models")
    if not isinstance(models, dict):
        return report
    section = models.get(model)
    if not isinstance(section, dict):
        raise DataError(path, None, f"models.{model}",
                        f"model '{model}' was not evaluated (add it to evaluate.models)")
    return section


def headline_metrics(model: str, reports: Path) -> dict[str, float]:
    """The model's headline metrics from the evaluate reports in folder `reports` (ProcessBench F1s, PRMScore).

    Keys: `processbench_avg_f1`, `processbench_<subset>_f1`, `processbench_verdict_reach_rate`,
    `heldout_f1`, `heldout_acc_erroneous`, `heldout_acc_correct`, `heldout_verdict_reach_rate`,
    `heldout_trivial_f1` (when the held-out benchmark was evaluated), `prmbench_prmscore`,
    `prmbench_<group>`. Undefined values (null: e.g. a ProcessBench subset without correct or
    without erroneous solutions has no F1) are left out.
    """
    out: dict[str, float] = {}
    pb_path = reports / "processbench.json"
    pb = _model_section(_read_report(pb_path), pb_path, model)
    if (v := _number(pb.get("avg_f1"))) is not None:
        out["processbench_avg_f1"] = v
    for subset, row in (pb.get("subsets") or {}).items():
        if isinstance(row, dict) and (v := _number(row.get("f1"))) is not None:
            out[f"processbench_{subset}_f1"] = v
    if (v := _number(pb.get("verdict_reach_rate"))) is not None:
        out["processbench_verdict_reach_rate"] = v
    held_path = reports / "heldout.json"
    if held_path.exists() and _read_report(held_path).get("items"):
        held = _read_report(held_path)
        section = _model_section(held, held_path, model)
        for key in ("f1", "acc_erroneous", "acc_correct", "verdict_reach_rate"):
            if (v := _number(section.get(key))) is not None:
                out[f"heldout_{key}"] = v
        floors = [_number(t.get("f1")) for t in (held.get("trivial_predictors") or {}).values() if isinstance(t, dict)]
        out["heldout_trivial_f1"] = max([f for f in floors if f is not None], default=0.0)
    prm_path = reports / "prmbench.json"
    prm = _model_section(_read_report(prm_path), prm_path, model)
    if (v := _number(prm.get("prmscore"))) is not None:
        out["prmbench_prmscore"] = v
    for group, value in (prm.get("groups") or {}).items():
        if (v := _number(value)) is not None:
            out[f"prmbench_{group}"] = v
    return out


# --------------------------------------------------------------------------------------
# register
# --------------------------------------------------------------------------------------


def quality_gate(params: Params, metrics: dict[str, float]) -> list[str]:
    """Why the model fails `register.gate` (one line per floor missed); empty when it passes."""
    gate = params.register.gate
    if not gate.enabled:
        return []
    if gate.benchmark == "heldout":
        f1_key, reach_key, floor = "heldout_f1", "heldout_verdict_reach_rate", metrics.get("heldout_trivial_f1", 0.0)
        if "heldout_trivial_f1" not in metrics:
            return ["register.gate.benchmark is 'heldout' but reports/heldout.json has no held-out benchmark "
                    "(domain.kind must be 'arithmetic'; or gate on 'processbench')"]
    else:
        f1_key, reach_key, floor = "processbench_avg_f1", "processbench_verdict_reach_rate", 0.0
    failures = []
    reach = metrics.get(reach_key)
    if reach is None or reach < gate.min_verdict_reach:
        failures.append(f"{reach_key}={'undefined' if reach is None else f'{reach:.3f}'} is below the floor "
                        f"register.gate.min_verdict_reach={gate.min_verdict_reach:g}")
    f1 = metrics.get(f1_key)
    if f1 is None or f1 <= floor + gate.min_f1_margin:
        failures.append(f"{f1_key}={'undefined' if f1 is None else f'{f1:.2f}'} does not beat the better trivial "
                        f"predictor (F1 {floor:.2f}) by more than register.gate.min_f1_margin={gate.min_f1_margin:g}")
    return failures


def benchmark_digests(layout: Layout) -> dict[str, str]:
    """Content digests of the prepared benchmark files a version was judged on (promote compares like with like)."""
    out = {}
    for name, path in (("heldout", layout.heldout), ("processbench", layout.processbench), ("prmbench", layout.prmbench)):
        if path.exists():
            out[name] = data_hash(path)
    return out


def model_config(params: Params) -> dict[str, Any]:
    """What the served model is built from: scoring and backend parameters, weights dtype."""
    return {
        tracking.SERVICE_KEY: serving.SERVICE,
        "scoring": params.scoring.model_dump(mode="json"),
        "backend": params.backend.model_dump(mode="json"),
        "dtype": params.model.dtype,
    }


def serving_requirements() -> list[str]:
    """Pinned pip requirements of the serving environment (this environment's versions)."""
    return [f"{name}=={metadata.version(name)}" for name in SERVING_REQUIREMENTS]


def serving_code_files() -> list[Path]:
    """The served model's code, relative to CODE_ROOT: the static import closures of its code file
    (`tracking`) and of the service it wraps (`serving`), and the package data."""
    return sorted(modules.import_closure(tracking.__name__, CODE_ROOT)
                  | modules.import_closure(serving.__name__, CODE_ROOT)
                  | modules.package_data(components.__name__, CODE_ROOT))


@contextmanager
def staged_serving_code() -> Iterator[Path]:
    """A temporary copy of `serving_code_files()` in the package layout; yields its components/ folder (removed on exit)."""
    with tempfile.TemporaryDirectory(prefix="rprm-served-code-") as tmp:
        for rel in serving_code_files():
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(CODE_ROOT / rel, Path(tmp) / rel)
        yield Path(tmp) / components.__name__


@contextmanager
def pyfunc_spec(params: Params, model_dir: Path, model_hash: str) -> Iterator[dict[str, Any]]:
    """What the PRM pyfunc is made of (the arguments of `mlflow.pyfunc.log_model`/`save_model`); use it inside the with block.

    The code path is a staged copy of `serving_code_files()`; MLflow copies it to the model's
    `code/components/` and puts `code/` first on sys.path when it loads the model.
    """
    with staged_serving_code() as code:
        yield {
            "python_model": Path(tracking.__file__),
            "artifacts": {serving.MODEL_ARTIFACT: str(model_dir)},
            "code_paths": [str(code)],
            "model_config": model_config(params),
            "signature": tracking.serving_signature(serving.INPUT_COLUMNS, serving.OUTPUT_COLUMNS,
                                                    serving.REQUEST_PARAM_DEFAULTS),
            "pip_requirements": serving_requirements(),
            "metadata": {"rprm": {"model": params.register.model, "model_md5": model_hash,
                                  "scoring": params.scoring.model_dump(mode="json")}},
        }


def _log_pyfunc(params: Params, model_dir: Path, model_hash: str) -> Any:
    """Log the PRM folder as a models-from-code pyfunc in the active run."""
    with pyfunc_spec(params, model_dir, model_hash) as spec:
        return tracking.log_pyfunc(LOGGED_MODEL_NAME, spec)


def _check_model_dir(name: str, layout: Layout) -> Path:
    """The folder of pipeline model `name` (register.model); DataError naming it and its stage if unusable."""
    model_dir = layout.require_model(name, "register.model")
    if not any(model_dir.glob("tokenizer*")):
        raise DataError(model_dir, None, None, "model folder has no tokenizer")
    return model_dir


def run_register(params: Params, layout: Layout = Layout()) -> dict[str, Any]:
    """`rprm register`: log the layout's PRM as a pyfunc, register a version with alias challenger."""
    model_dir = _check_model_dir(params.register.model, layout)
    metrics = headline_metrics(params.register.model, layout.reports)
    failures = quality_gate(params, metrics)
    if failures:
        raise StageRefused(f"quality gate: models/{params.register.model} is not registered: " + "; ".join(failures))
    digests = benchmark_digests(layout)
    name = params.tracking.registered_model
    inputs = [model_dir, layout.report("processbench.json"), layout.report("prmbench.json")]
    sections = ["backend", "scoring", "tracking", "register"]
    with tracking.stage_run("register", params, sections, inputs=inputs, root=layout.root) as run:
        model_hash = data_hash(model_dir)
        with warnings.catch_warnings():
            # No input example on purpose (validating one would load the model and sample K
            # analyses at registration); the signature is explicit.
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = _log_pyfunc(params, model_dir, model_hash)
        client = tracking.registry_client()
        tracking.ensure_registered_model(client, name, REGISTERED_MODEL_DESCRIPTION)
        commit = tracking.git_commit()
        tags = {
            **{k: f"{v:.6g}" for k, v in metrics.items()},
            "source.run_id": run.info.run_id,
            "source.model": params.register.model,
            "source.model_md5": model_hash,
            **({"source.git_commit": commit} if commit else {}),
            "scoring.k": str(params.scoring.sampling.n),
            "scoring.threshold": str(params.scoring.threshold),
            **{f"benchmark.{b}_md5": d for b, d in digests.items()},
        }
        version = tracking.register_version(info.model_uri, name, tags)
        tracking.set_alias(client, name, params.register.alias, version.version)
        tracking.log_report({f"headline.{k}": v for k, v in metrics.items()})
        report = {
            "registered_model": name,
            "version": int(version.version),
            "alias": params.register.alias,
            "model_uri": f"models:/{name}/{version.version}",
            "alias_uri": f"models:/{name}@{params.register.alias}",
            "logged_model_uri": info.model_uri,
            "run_id": run.info.run_id,
            "model": params.register.model,
            "model_md5": model_hash,
            "metrics": metrics,
        }
        tracking.log_json(report, "reports/registration.json")
    write_json(layout.report("registration.json"), report)
    gate_metric = metrics.get(params.promote.metric)
    print(f"registered {name} version {version.version} as @{params.register.alias} "
          + (f"({params.promote.metric}={gate_metric:.4g})" if gate_metric is not None else
             f"(no {params.promote.metric}: undefined on this evaluation; the promotion gate "
             "cannot compare this version with a champion)"))
    return report


# --------------------------------------------------------------------------------------
# promote
# --------------------------------------------------------------------------------------


def _metric(version: Any, key: str) -> float | None:
    raw = (version.tags or {}).get(key)
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _benchmark_of(metric: str) -> str | None:
    """The version tag holding the digest of the benchmark `metric` is measured on, if any."""
    for bench in ("heldout", "processbench", "prmbench"):
        if metric.startswith(f"{bench}_"):
            return f"benchmark.{bench}_md5"
    return None


def promote(params: Params) -> dict[str, Any]:
    """`rprm promote`: move `champion` to the challenger if it wins by the margin; record why."""
    tracking.setup(params)
    client = tracking.registry_client()
    name, key, margin = params.tracking.registered_model, params.promote.metric, params.promote.margin
    challenger = tracking.version_by_alias(client, name, params.register.alias)
    champion = tracking.version_by_alias(client, name, CHAMPION)
    decision: dict[str, Any] = {
        "registered_model": name,
        "metric": key,
        "margin": margin,
        "challenger": int(challenger.version) if challenger else None,
        "champion_before": int(champion.version) if champion else None,
        "challenger_metric": _metric(challenger, key) if challenger else None,
        "champion_metric": _metric(champion, key) if champion else None,
    }
    if challenger is None:
        promoted, reason = False, f"no version has the alias '{params.register.alias}'; run `rprm register`"
    elif champion is not None and champion.version == challenger.version:
        promoted, reason = False, f"version {challenger.version} is already the champion"
    elif champion is None:
        promoted, reason = True, "no champion yet" + (
            "" if decision["challenger_metric"] is not None else f" (the challenger has no '{key}')")
    elif decision["challenger_metric"] is None:
        promoted, reason = False, (f"challenger version {challenger.version} has no '{key}' "
                                   "(undefined on its evaluation); the champion stays")
    elif _benchmark_of(key) and (challenger.tags or {}).get(_benchmark_of(key)) != (champion.tags or {}).get(_benchmark_of(key)):
        promoted, reason = False, (f"challenger version {challenger.version} and champion version {champion.version} "
                                   f"were judged on different {key.split('_')[0]} benchmark files "
                                   f"(tag {_benchmark_of(key)}); re-evaluate both on the same one")
    elif decision["champion_metric"] is None:
        promoted, reason = False, (f"champion version {champion.version} has no '{key}' tag; "
                                   "compare by hand and move the alias if intended")
    else:
        gain = decision["challenger_metric"] - decision["champion_metric"]
        decision["gain"] = gain
        promoted = gain > margin
        verb = "beats" if promoted else "does not beat"
        reason = (f"challenger {key}={decision['challenger_metric']:.6g} {verb} champion "
                  f"{decision['champion_metric']:.6g} by more than {margin:g} (gain {gain:+.6g})")
    decision.update(promoted=promoted, reason=reason,
                    champion_after=int(challenger.version) if promoted else decision["champion_before"],
                    decided_at=datetime.now(UTC).isoformat(timespec="seconds"))
    if promoted:
        tracking.set_alias(client, name, CHAMPION, challenger.version)
    _record(client, name, decision, challenger, champion)
    print(outcome_line(decision))
    return decision


def outcome_line(decision: dict[str, Any]) -> str:
    """What `rprm promote` prints: which version is the champion afterwards, and why."""
    name, after = decision["registered_model"], decision["champion_after"]
    if decision["promoted"]:
        before = decision["champion_before"]
        replaced = f", replacing version {before}" if before is not None else ""
        return f"promoted: {name} version {after} is now the champion{replaced} ({decision['reason']})"
    if after is None:
        return f"no promotion: {name} has no champion ({decision['reason']})"
    return f"no promotion: {name} version {after} stays the champion ({decision['reason']})"


def _record(client: Any, name: str, decision: dict[str, Any], challenger: Any, champion: Any) -> None:
    """Tag the decision on the challenger and on the champion it was compared with."""
    if challenger is None:
        return
    outcome = "promoted" if decision["promoted"] else "kept"
    if champion is not None and champion.version == challenger.version:
        return  # nothing was compared
    common = {"promotion.decision": outcome, "promotion.reason": decision["reason"],
              "promotion.decided_at": decision["decided_at"]}
    tracking.set_version_tags(client, name, challenger.version, common)
    if champion is not None:
        tracking.set_version_tags(client, name, challenger.version, {"promotion.compared_with": champion.version})
        role = "replaced_by" if decision["promoted"] else "defended_against"
        tracking.set_version_tags(client, name, champion.version, {
            f"promotion.{role}": challenger.version,
            "promotion.reason": decision["reason"],
            "promotion.decided_at": decision["decided_at"],
        })


# --------------------------------------------------------------------------------------
# Resolving a model for scoring: a folder or a registry URI
# --------------------------------------------------------------------------------------

REGISTRY_CACHE = Path.home() / ".cache" / "rprm" / "registry"  # downloaded registered versions


def _parse_models_uri(spec: str) -> tuple[str, str | None, str | None]:
    """`models:/<name>@<alias>` or `models:/<name>/<version>` -> (name, alias, version)."""
    rest = spec.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, alias, None
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, None, version
    return rest, None, None


def _model_folder(root: Path) -> Path | None:
    """The HF model folder inside a downloaded pyfunc (its `model` artifact) or the folder itself."""
    for cand in (root / "artifacts" / serving.MODEL_ARTIFACT, root):
        if (cand / "config.json").is_file():
            return cand
    return None


def resolve_model(spec: str, cache_dir: Path | None = None) -> tuple[Path, str]:
    """(local model folder, identity) of a model folder or a registry URI (`models:/r-prm@champion`,
    `models:/r-prm/3`); DataError naming `spec` and the field 'model' when it does not resolve.

    A registered version is downloaded once from the tracking store (MLFLOW_TRACKING_URI) into
    `cache_dir` (~/.cache/rprm/registry/<name>/<version>) and reused; the identity is
    `models:/<name>/<version>` (or, for a folder, its absolute path).
    """
    if not spec.startswith("models:/"):
        path = Path(spec)
        if not path.is_dir():
            raise DataError(spec, None, "model", "does not resolve: no such folder (give a model folder "
                                                 "or a registry URI such as models:/r-prm@champion)")
        folder = _model_folder(path)
        if folder is None:
            raise DataError(spec, None, "model", "does not resolve: not a model folder (no config.json)")
        return folder, str(folder.resolve())
    name, alias, version = _parse_models_uri(spec)
    if not name or (version is not None and not version.isdigit()):
        raise DataError(spec, None, "model", "does not resolve: expected models:/<name>@<alias> or "
                                             "models:/<name>/<version>")
    try:
        mv = tracking.find_version(tracking.registry_client(), name, alias, version)
    except tracking.RegistryError as err:
        store = tracking.current_tracking_uri()
        raise DataError(spec, None, "model", f"does not resolve in the tracking store {store}: "
                                             f"{str(err).splitlines()[0]}") from None
    ident = f"models:/{name}/{mv.version}"
    target = (cache_dir or REGISTRY_CACHE) / name / str(mv.version)
    folder = _model_folder(target)
    if folder is not None:
        return folder, ident
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{mv.version}-", dir=target.parent))
    try:
        try:
            tracking.download_artifacts(ident, tmp)
        except (tracking.RegistryError, OSError) as err:
            raise DataError(spec, None, "model", f"resolves to {ident} but its files cannot be downloaded: "
                                                 f"{str(err).splitlines()[0]}") from None
        if _model_folder(tmp) is None:
            raise DataError(spec, None, "model", f"resolves to {ident}, which holds no model folder "
                                                 "(artifacts/model/config.json)")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    folder = _model_folder(target)
    assert folder is not None
    return folder, ident
