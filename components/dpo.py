"""The `dpo` stage: direct preference optimisation of models/sft (also the reference) -> models/dpo/.

What DPO adds to the shared training path of `components.training` (docs/method.md §8): its
records (`PreferencePair`: the chosen analysis ends with its verdict, the rejected one with the
opposite), TRL's `DPOTrainer` (the SFT model as reference), the held-out preference accuracy
pair by pair, and the report's reward keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.config import DPOParams, Params, TrainParams
from components.io import DataError
from components.paths import Layout
from components.prompts import VERDICT_NO, VERDICT_YES, parse_verdict
from components.records import PreferencePair
from components.training import (
    Recipe,
    StageIO,
    chat_ids,
    last_logged,
    load_model,
    peft_config,
    run_stage,
)


def run(params: Params, layout: Layout = Layout()) -> dict[str, Any]:
    """`rprm dpo`: DPO of models/sft (also the reference) on data/pairs into models/dpo (under `layout`)."""
    return run_stage(RECIPE, params, layout)


def _dpo_row(rec: PreferencePair, path: Path, line: int) -> dict[str, Any]:
    chosen = parse_verdict(rec.chosen)
    if chosen.verdict != rec.chosen_verdict:
        raise DataError(path, line, "chosen",
                        f"must end with the {rec.chosen_verdict!r} verdict, parses as {chosen.verdict!r}")
    opposite = VERDICT_NO if rec.chosen_verdict == "yes" else VERDICT_YES
    n_verdicts = rec.rejected.count(VERDICT_YES) + rec.rejected.count(VERDICT_NO)
    if n_verdicts != 1 or opposite not in rec.rejected:
        raise DataError(path, line, "rejected", "must hold exactly one verdict, the opposite of the chosen one")
    if rec.prompt[-1].role == "assistant":
        raise DataError(path, line, "prompt", "the prompt must end with the user's turn")
    prompt = [m.model_dump() for m in rec.prompt]
    return {
        "id": rec.id,
        "problem_id": rec.problem_id,
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": rec.chosen}],
        "rejected": [{"role": "assistant", "content": rec.rejected}],
        "verdict": rec.chosen_verdict,
    }


def _too_long(row: dict[str, Any], tokenizer: Any, section: TrainParams) -> bool:
    too_long = any(len(chat_ids(tokenizer, row["prompt"] + row[k])) > section.max_length
                   for k in ("chosen", "rejected"))
    limit = getattr(section, "max_prompt_length", None)
    if limit is not None and not too_long:
        too_long = len(chat_ids(tokenizer, row["prompt"], generation_prompt=True)) > limit
    return too_long


def _make_trainer(model: Any, args_kw: dict[str, Any], *, train_ds: Any, val_ds: Any, tokenizer: Any,
                  section: TrainParams, io_: StageIO, params: Params, callbacks: list[Any]) -> Any:
    from trl import DPOConfig, DPOTrainer

    assert isinstance(section, DPOParams)
    losses = [section.loss_type] + (["sft"] if section.sft_weight > 0 else [])
    weights = [1.0] + ([section.sft_weight] if section.sft_weight > 0 else [])
    args = DPOConfig(**args_kw, beta=section.beta, loss_type=losses, loss_weights=weights,
                     precompute_ref_log_probs=section.precompute_ref_log_probs)
    ref_model = None
    if not section.lora.enabled and not section.precompute_ref_log_probs:
        ref_model = load_model(io_.model_in, params)  # the SFT model, frozen
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_ds,
                      eval_dataset=val_ds, processing_class=tokenizer,
                      peft_config=peft_config(section), callbacks=callbacks)


def _sequence_logps(model: Any, batch: dict[str, Any]) -> Any:
    """Sum of the completion tokens' log-probabilities per sequence (plain forward pass)."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch["input_ids"][:, 1:]
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].to(token_logps.dtype)
    return (token_logps * mask).sum(dim=1)


def preference_accuracy(trainer: Any) -> dict[str, Any]:
    """Held-out preference accuracy, pair by pair: beta*(logratio_chosen - logratio_rejected) > 0.

    The reference is the SFT model: the trainer's frozen copy, the precomputed log-probs, or,
    with LoRA, the model with its adapter disabled. Pairs are gathered across processes.
    """
    import contextlib

    import torch

    model = trainer.model
    dataloader = trainer.get_eval_dataloader()
    correct: list[Any] = []
    margins: list[Any] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in dataloader:
                policy = _sequence_logps(model, batch).chunk(2)
                if "ref_chosen_logps" in batch:
                    ref = (batch["ref_chosen_logps"], batch["ref_rejected_logps"])
                else:
                    ref_model = trainer.ref_model or model
                    ctx = (model.disable_adapter() if trainer.ref_model is None and hasattr(model, "disable_adapter")
                           else contextlib.nullcontext())
                    with ctx:
                        ref = _sequence_logps(ref_model, batch).chunk(2)
                margin = trainer.beta * ((policy[0] - ref[0]) - (policy[1] - ref[1]))
                margin = trainer.accelerator.gather_for_metrics(margin)
                margins.append(margin.float().cpu())
                correct.append((margin > 0).float().cpu())
    finally:
        model.train(was_training)
    all_correct = torch.cat(correct) if correct else torch.zeros(0)
    all_margins = torch.cat(margins) if margins else torch.zeros(0)
    n = int(all_correct.numel())
    return {
        "pairs": n,
        "accuracy": float(all_correct.mean()) if n else None,
        "mean_margin": float(all_margins.mean()) if n else None,
        "margins": all_margins.tolist(),
    }


def _report(report: dict[str, Any], trainer: Any, eval_metrics: dict[str, float], info: dict[str, Any],
            preference: dict[str, Any] | None) -> None:
    args, history = trainer.args, trainer.state.log_history
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        report[f"eval_{key.replace('/', '_')}"] = eval_metrics.get(f"eval_{key}")
        report[f"train_{key.replace('/', '_')}"] = last_logged(history, key)
    report["preference_accuracy"] = preference["accuracy"] if preference else None
    report["preference_pairs_evaluated"] = preference["pairs"] if preference else 0
    report["mean_reward_margin"] = preference["mean_margin"] if preference else None
    verdicts = info["val_verdicts"]
    if preference and args.world_size == 1 and len(verdicts) == len(preference["margins"]):
        # pairs come back in file order with one process: accuracy per chosen verdict
        by: dict[str, list[float]] = {"yes": [], "no": []}
        for verdict, margin in zip(verdicts, preference["margins"], strict=True):
            by[verdict].append(float(margin > 0))
        report["preference_accuracy_by_chosen_verdict"] = {
            k: (sum(v) / len(v) if v else None) for k, v in by.items()}


RECIPE = Recipe(
    stage="dpo",
    record=PreferencePair,
    row=_dpo_row,
    columns=("prompt", "chosen", "rejected"),
    verdicts="chosen verdicts",
    too_long=_too_long,
    make_trainer=_make_trainer,
    report=_report,
    held_out=preference_accuracy,
)
