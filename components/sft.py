"""The `sft` stage: supervised fine-tuning of models/base on the synthesized analyses -> models/sft/.

What SFT adds to the shared training path of `components.training` (docs/method.md §7): its
records (`SFTExample`, checked against their analysis' verdict), TRL's `SFTTrainer` with the loss
on the completion only, and the report's token counts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from components.config import Params, TrainParams
from components.io import DataError
from components.paths import Layout
from components.prompts import parse_verdict
from components.records import SFTExample
from components.training import Recipe, StageIO, chat_ids, peft_config, run_stage

log = logging.getLogger(__name__)


def run(params: Params, layout: Layout = Layout()) -> dict[str, Any]:
    """`rprm sft`: fine-tune models/base on data/synth into models/sft (under `layout`); return reports/sft.json."""
    return run_stage(RECIPE, params, layout)


def _sft_row(rec: SFTExample, path: Path, line: int) -> dict[str, Any]:
    msgs = [m.model_dump() for m in rec.messages]
    if msgs[-1]["role"] != "assistant":
        raise DataError(path, line, "messages", "the last message must be the assistant's analysis")
    if any(m["role"] == "assistant" for m in msgs[:-1]):
        raise DataError(path, line, "messages", "only the last message may be the assistant's")
    parsed = parse_verdict(msgs[-1]["content"])
    if parsed.verdict != rec.verdict:
        raise DataError(path, line, "verdict",
                        f"record says {rec.verdict!r} but the analysis parses as {parsed.verdict!r}"
                        + (f" ({parsed.reason})" if parsed.reason else ""))
    return {"id": rec.id, "prompt": msgs[:-1], "completion": msgs[-1:], "verdict": rec.verdict}


def _too_long(row: dict[str, Any], tokenizer: Any, section: TrainParams) -> bool:
    return len(chat_ids(tokenizer, row["prompt"] + row["completion"])) > section.max_length


def _make_trainer(model: Any, args_kw: dict[str, Any], *, train_ds: Any, val_ds: Any, tokenizer: Any,
                  section: TrainParams, io_: StageIO, params: Params, callbacks: list[Any]) -> Any:
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**args_kw, completion_only_loss=True, assistant_only_loss=False, packing=False)
    return SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                      processing_class=tokenizer, peft_config=peft_config(section),
                      callbacks=callbacks)


def _report(report: dict[str, Any], trainer: Any, eval_metrics: dict[str, float], info: dict[str, Any],
            preference: dict[str, Any] | None) -> None:
    ds = trainer.train_dataset
    tokens = sum(len(x) for x in ds["input_ids"])
    loss_tokens = sum(sum(1 for t in labels if t != -100) for labels in ds["labels"])
    report["tokens"] = {
        "train_per_epoch": tokens,
        "completion_per_epoch": loss_tokens,
        "seen": round(tokens * (trainer.state.epoch or 0.0)),
    }


def analysis_budget(rows: list[dict[str, Any]], tokenizer: Any, params: Params) -> dict[str, Any]:
    """Token lengths of the training analyses against scoring.sampling.max_new_tokens: {analyses, mean,
    max, limit, over_limit}; logs a warning when any is longer (a model trained on them is cut off
    before its verdict)."""
    limit = params.scoring.sampling.max_new_tokens
    lengths = [len(tokenizer(r["completion"][-1]["content"], add_special_tokens=False)["input_ids"]) for r in rows]
    budget = {"analyses": len(lengths), "mean": round(sum(lengths) / max(1, len(lengths)), 1),
              "max": max(lengths, default=0), "limit": limit, "over_limit": sum(n > limit for n in lengths)}
    if budget["over_limit"]:
        log.warning("sft: %d of %d training analyses (%.0f%%) are longer than scoring.sampling.max_new_tokens=%d "
                    "tokens (longest %d): a model trained on them is often cut off before its verdict; raise "
                    "max_new_tokens (scoring.sampling, sample_pairs.sampling, the generation checks) or shorten "
                    "the teacher's analyses", budget["over_limit"], budget["analyses"],
                    100 * budget["over_limit"] / budget["analyses"], limit, budget["max"])
    return budget


RECIPE = Recipe(
    stage="sft",
    record=SFTExample,
    row=_sft_row,
    columns=("prompt", "completion"),
    verdicts="analysis verdicts",
    too_long=_too_long,
    make_trainer=_make_trainer,
    report=_report,
    length_check=analysis_budget,
)
