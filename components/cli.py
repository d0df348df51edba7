"""`rprm`: one command per pipeline stage (what dvc.yaml runs), plus promotion and scoring tools.

Each command loads and validates the params file, then calls the stage's `run` function in
its component module. Bad params or bad data end with a one-line message naming the file,
line and field, and a non-zero exit; nothing is written.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from components.backends.base import BackendError
from components.config import Params, ParamsError, load_params
from components.io import DataError, StageRefused

app = typer.Typer(
    help="R-PRM: reasoning-driven generative process reward model pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

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


def _call(target: str, *args, **kwargs):
    """Import `module:function` lazily (keeps `--help` fast) and run it with clean errors."""
    module, func = target.split(":")
    try:
        return getattr(importlib.import_module(f"components.{module}"), func)(*args, **kwargs)
    except (DataError, ParamsError, BackendError, StageRefused) as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("interrupted; finished work is journaled, rerun to resume", 130)


@app.command("base-model")
def base_model(params: ParamsOpt = Path("params.yaml")) -> None:
    """Build or materialise the base model into models/base/."""
    _call("base_model:run", _load(params))


@app.command()
def prepare(params: ParamsOpt = Path("params.yaml")) -> None:
    """Flatten PRM800K into step samples, decontaminate, split; stage benchmark subsets."""
    _call("prepare:run", _load(params))


@app.command()
def synthesize(params: ParamsOpt = Path("params.yaml")) -> None:
    """Teacher analyses of labelled steps, agreement filter, balance, split -> SFT data."""
    _call("synthesis:run", _load(params))


@app.command()
def sft(params: ParamsOpt = Path("params.yaml")) -> None:
    """Supervised fine-tuning on the synthesized analyses (TRL SFTTrainer) -> models/sft/."""
    _call("training:run_sft", _load(params))


@app.command("sample-pairs")
def sample_pairs(params: ParamsOpt = Path("params.yaml")) -> None:
    """The SFT model samples analyses; chosen/rejected preference pairs -> data/pairs/."""
    _call("pairs:run", _load(params))


@app.command()
def dpo(params: ParamsOpt = Path("params.yaml")) -> None:
    """Direct preference optimisation from the SFT model (TRL DPOTrainer) -> models/dpo/."""
    _call("training:run_dpo", _load(params))


@app.command()
def evaluate(params: ParamsOpt = Path("params.yaml")) -> None:
    """ProcessBench and PRMBench with inference-time scaling and threshold curves."""
    _call("evaluate:run", _load(params))


@app.command("best-of-n")
def best_of_n(params: ParamsOpt = Path("params.yaml")) -> None:
    """Best-of-N selection, baselines and PRM-guided search on the six math test sets."""
    _call("best_of_n:run", _load(params))


@app.command()
def register(params: ParamsOpt = Path("params.yaml")) -> None:
    """Log the trained PRM as an MLflow pyfunc and register it with alias `challenger`."""
    _call("registry:run_register", _load(params))


@app.command()
def promote(params: ParamsOpt = Path("params.yaml")) -> None:
    """Move alias `champion` to the challenger if it beats the champion by the margin."""
    _call("registry:promote", _load(params))


@app.command("score-processbench")
def score_processbench(
    predictions: Annotated[Path, typer.Argument(help="JSONL: id + step_rewards or first_error.")],
    benchmark: Annotated[Path, typer.Option(help="ProcessBench folder or .jsonl file.")] = Path("../shared/data/processbench"),
    threshold: Annotated[float, typer.Option(help="Step wrong iff reward < threshold.")] = 0.5,
    out: Annotated[Path | None, typer.Option(help="Write the report JSON here.")] = None,
    mode: Annotated[str, typer.Option(help="'threshold': first error from step_rewards at --threshold; "
                                           "'file': the file's first_error (threshold ignored).")] = "threshold",
) -> None:
    """Score any PRM's ProcessBench predictions (per-subset error/correct accuracy, F1, average)."""
    _call("benchmarks:cli_score_processbench", predictions, benchmark, threshold, out, mode)


@app.command("score-prmbench")
def score_prmbench(
    results: Annotated[Path, typer.Argument(help="Official PRMBench result JSONL (idx, scores.*).")],
    benchmark: Annotated[Path, typer.Option(help="PRMBench preview .jsonl.")] = Path("../shared/data/prmbench/prmbench_preview.jsonl"),
    threshold: Annotated[float, typer.Option(help="Label = score >= threshold.")] = 0.5,
    out: Annotated[Path | None, typer.Option(help="Write the report JSON here.")] = None,
    comparison: Annotated[str, typer.Option(help="'>=' (R-PRM) or '>' (PRMBench's own models).")] = ">=",
    mode: Annotated[str, typer.Option(help="'threshold': labels from step_level_validity_scores at --threshold; "
                                           "'file': the file's step_level_validity_labels, as the official "
                                           "evaluator (threshold ignored).")] = "threshold",
) -> None:
    """Compute PRMScore (overall, per class, per group) of any PRM's PRMBench results."""
    _call("benchmarks:cli_score_prmbench", results, benchmark, threshold, out, comparison, mode)


@app.command("validate-params")
def validate_params(params: ParamsOpt = Path("params.yaml")) -> None:
    """Validate a params file or profile and print a one-line summary."""
    p = _load(params)
    typer.echo(f"{params}: ok (model={p.model.kind}, teacher={p.teacher.kind}, backend={p.backend.kind})")


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
