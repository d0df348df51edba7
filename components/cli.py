"""`rprm`: one command per pipeline stage (what dvc.yaml runs), plus promotion and scoring tools.

The stage commands are built from the stage table, `components.stages.STAGES` (name, the
component function that runs it, help text), which the Prefect flow also runs from.

Each command loads and validates the params file, checks that the MLflow tracking store
answers (an http(s) server is probed with a short timeout), then calls the stage's `run`
function in its component module. Bad params, bad data or an unreachable tracking server end
with a one-line message naming the file, line and field (or the URI), and exit code 2;
nothing is written. Each command's `--help` says what it reads, writes and how it resumes.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from components import paths
from components.backends.base import BackendError
from components.config import Params, ParamsError, load_params
from components.io import DataError, StageRefused
from components.stages import STAGES, Stage
from components.tracking import TrackingStoreError, check_store, tracking_uri


class _HelpFlagWithoutType:
    """Shows `--help` as a plain flag (typer's rich help otherwise labels it `<bool>`)."""

    def get_help_option(self, ctx: Any) -> Any:
        """The help option, with an empty type label."""
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Group(_HelpFlagWithoutType, TyperGroup):
    """The `rprm` command group."""


class _Command(_HelpFlagWithoutType, TyperCommand):
    """One `rprm` command."""


app = typer.Typer(
    cls=_Group,
    help="R-PRM: reasoning-driven generative process reward model pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def command(name: str | None = None) -> Any:
    """Register an `rprm` command (help flag shown without a type label)."""
    return app.command(name, cls=_Command)


ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Params file (params.yaml or a profile).")]


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _load(path: Path) -> Params:
    try:
        return load_params(path)
    except ParamsError as err:
        _fail(str(err))
        raise AssertionError("unreachable") from None


def _call(target: str, *args: Any, **kwargs: Any) -> Any:
    """Import `module:function` lazily (keeps `--help` fast) and run it with clean errors."""
    module, func = target.split(":")
    try:
        return getattr(importlib.import_module(f"components.{module}"), func)(*args, **kwargs)
    except (DataError, ParamsError, BackendError, StageRefused, TrackingStoreError) as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("interrupted; finished work is journaled, rerun to resume", 130)


def _stage(target: str, params_file: Path) -> Any:
    """Load the params, check that the tracking store answers, then run `target` with them and the
    project layout of the current directory (where dvc.yaml runs its commands)."""
    params = _load(params_file)
    try:
        check_store(tracking_uri(params))
    except TrackingStoreError as err:
        _fail(str(err))
    return _call(target, params, paths.Layout())


def _stage_command(stage: Stage) -> Any:
    """The `rprm <stage>` command of a stage of the table (components.stages)."""

    def run_stage(params: ParamsOpt = Path("params.yaml")) -> None:
        if stage.tracked:
            _stage(stage.target, params)
        else:  # no MLflow run: no tracking store to check
            _call(stage.target, _load(params), paths.Layout())

    run_stage.__name__ = run_stage.__qualname__ = stage.name.replace("-", "_")
    run_stage.__doc__ = stage.help
    return command(stage.name)(run_stage)


# one command per pipeline stage, in dependency order (before the tools below, as `--help` lists them)
for _s in STAGES:
    _stage_command(_s)


@command()
def promote(params: ParamsOpt = Path("params.yaml")) -> None:
    """Move alias `champion` to the challenger if it beats the champion by the margin.

    Reads: the versions of the registered model with aliases challenger and champion (their
    `promote.metric` tags).

    Writes: the champion alias and promotion.* tags on both versions; prints which version is
    the champion afterwards and why.

    Resume: nothing to resume; a rerun compares again.
    """
    _stage("registry:promote", params)


def _project_file(path: Path, default: Path) -> Path:
    """`path`; the default (a project-relative path) is looked up from the project root."""
    if path == default and not path.exists():
        return paths.project_root() / default
    return path


@command("score-processbench")
def score_processbench(
    predictions: Annotated[Path, typer.Argument(help="JSONL: id + step_rewards or first_error.")],
    benchmark: Annotated[Path, typer.Option(
        help="ProcessBench folder or .jsonl file (default: the project's bundled subset; "
             "data/prepared/processbench.jsonl is what evaluate scored)."
    )] = paths.BUNDLED_PROCESSBENCH,
    threshold: Annotated[float, typer.Option(help="Step wrong iff reward < threshold.")] = 0.5,
    out: Annotated[Path | None, typer.Option(help="Write the report JSON here.")] = None,
    mode: Annotated[str, typer.Option(help="'threshold': first error from step_rewards at --threshold; "
                                           "'file': the file's first_error (threshold ignored).")] = "threshold",
) -> None:
    """Score any PRM's ProcessBench predictions (per-subset error/correct accuracy, F1, average).

    Reads: the predictions file and the benchmark. Writes: the report to --out, if given
    (nothing when a check fails).
    """
    _call("benchmarks:cli_score_processbench", predictions,
          _project_file(benchmark, paths.BUNDLED_PROCESSBENCH), threshold, out, mode)


@command("score-prmbench")
def score_prmbench(
    results: Annotated[Path, typer.Argument(help="Official PRMBench result JSONL (idx, scores.*).")],
    benchmark: Annotated[Path, typer.Option(
        help="PRMBench .jsonl (default: the project's bundled subset; "
             "data/prepared/prmbench.jsonl is what evaluate scored)."
    )] = paths.BUNDLED_PRMBENCH,
    threshold: Annotated[float, typer.Option(help="Label = score >= threshold.")] = 0.5,
    out: Annotated[Path | None, typer.Option(help="Write the report JSON here.")] = None,
    comparison: Annotated[str, typer.Option(help="'>=' (R-PRM) or '>' (PRMBench's own models).")] = ">=",
    mode: Annotated[str, typer.Option(help="'threshold': labels from step_level_validity_scores at --threshold; "
                                           "'file': the file's step_level_validity_labels, as the official "
                                           "evaluator (threshold ignored).")] = "threshold",
) -> None:
    """Compute PRMScore (overall, per class, per group) of any PRM's PRMBench results.

    Reads: the results file and the benchmark. Writes: the report to --out, if given
    (nothing when a check fails).
    """
    _call("benchmarks:cli_score_prmbench", results, _project_file(benchmark, paths.BUNDLED_PRMBENCH),
          threshold, out, comparison, mode)


@command()
def score(
    input_path: Annotated[Path, typer.Argument(
        metavar="INPUT.jsonl",
        help="Solutions: question (or problem) + steps, or + a solution text in `solution`/`response`; id optional.")],
    model: Annotated[str, typer.Option(
        help="PRM: a model folder or a registry URI (models:/r-prm@champion, models:/r-prm/3); with "
             "backend openai, the model name asked of the server.")],
    out: Annotated[Path, typer.Option(help="Output JSONL (its journal is OUT.journal beside it).")],
    params: ParamsOpt = Path("params.yaml"),
    backend: Annotated[str | None, typer.Option(help="hf, vllm or openai (default: params backend.kind).")] = None,
    k: Annotated[int | None, typer.Option(help="Analyses per step (default: params scoring.sampling.n).")] = None,
    threshold: Annotated[float | None, typer.Option(
        help="Step wrong iff reward < threshold (default: params scoring.threshold).")] = None,
) -> None:
    """Score any solutions file with the PRM: step rewards, first error, verdicts, aggregate scores.

    Reads: INPUT.jsonl (every row validated first: a bad row stops the command naming file,
    line and field, exit 2, nothing written), the model (a registered version is downloaded once
    to ~/.cache/rprm/registry/), params `backend` and `scoring`.

    Writes: OUT (one row per solution: id, step_rewards, first_error, verdicts, scores.min /
    last / product / mean, generations), atomically once everything is scored.

    Resume: every scored step is journaled in OUT.journal; rerun the same command to continue
    (other sampling settings or another model refuse the journal: delete it to start over).
    """
    p = _load(_project_file(params, Path("params.yaml")))
    if backend is not None:
        if backend not in ("hf", "vllm", "openai"):
            _fail(f"--backend: expected hf, vllm or openai, got {backend!r}")
        p.backend.kind = backend  # type: ignore[assignment]
    if model.startswith("models:/"):
        try:
            uri = tracking_uri(p)
            check_store(uri)
        except TrackingStoreError as err:
            _fail(str(err))
        import os

        os.environ.setdefault("MLFLOW_TRACKING_URI", uri)
    _call("rewards:score_file", p, input_path, model, out, k=k, threshold=threshold)


@command("validate-params")
def validate_params(
    params: ParamsOpt = Path("params.yaml"),
    explain: Annotated[bool, typer.Option(
        "--explain", help="Also print every key: dotted path, value, default and description."
    )] = False,
) -> None:
    """Validate a params file or profile and print a one-line summary (--explain: every key)."""
    p = _load(params)
    typer.echo(f"{params}: ok (model={p.model.kind}, teacher={p.teacher.kind}, backend={p.backend.kind})")
    if explain:
        from components.config import explain_params

        typer.echo("\n".join(explain_params(p)))


@command("profile")
def profile(
    source: Annotated[str, typer.Argument(
        help="A profile (profiles/NAME.yaml, an overlay on the defaults), any params file, or `default`."
    )],
    out: Annotated[Path, typer.Option("--out", "-o", help="The params file written.")] = Path("params.yaml"),
) -> None:
    """Write params.yaml from a profile: the profile merged onto the defaults, every key spelled out.

    DVC and the flow read one complete params.yaml; `make pipeline PROFILE=...` runs this first.
    `default` writes the default profile (the committed params.yaml, byte for byte). The file is
    validated before anything is written and replaced atomically.
    """
    from components.config import DEFAULT_HEADER, profile_header, write_params_file

    if source == "default":
        p, header = Params(), DEFAULT_HEADER
    else:
        p, header = _load(Path(source)), profile_header(source)
    write_params_file(p, out, header)
    typer.echo(f"{out}: written from {source}")


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
