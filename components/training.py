"""The shared path of the SFT and DPO stages (TRL): data checks, checkpoint resume, trainer arguments,
final model, report and multi-process launch (docs/method.md §7, §8).

`rprm sft` (`components/sft.py`) trains the base model on the synthesized analyses with TRL's
`SFTTrainer`; `rprm dpo` (`components/dpo.py`) trains the SFT model on its own preference pairs
with `DPOTrainer`, the SFT model being the reference. Each stage module holds what is its own
(records, trainer, report keys) in a `Recipe`; both follow the same path, here:

1. Preflight, before any training: the training files are read and validated (an empty file, a
   record whose verdict does not match its analysis, or a file whose rarer verdict is below
   `<stage>.min_verdict_share` stops the stage naming file, line and field); the input model
   folder must hold a config, a tokenizer and a chat template; the checkpoint folder is
   inspected (see *Checkpoints*).
2. Loss masking (one approach for every model): each example is a *conversational
   prompt-completion* record, prompt = [system, user] messages and completion = [assistant
   analysis]. TRL renders both with the model's own chat template and computes the loss on the
   completion only (`completion_only_loss=True`): every prompt token has label -100, the
   analysis and the end-of-turn token are trained. This needs no `{% generation %}` markers, so
   it works the same for the tiny model, SmolLM2 (GGUF) and Qwen2.5-Math. DPO uses the same
   prompt / chosen / rejected conversational form.
3. Examples longer than `max_length` tokens (DPO: prompt + either answer; or prompts longer
   than `dpo.max_prompt_length`) are dropped and counted instead of truncated, because
   truncation would cut the verdict line, the one thing the model must learn to write.
4. Training reports to MLflow (`report_to=["mlflow"]`) into the stage's run, opened with
   :func:`components.tracking.stage_run`; the report JSON is logged there too.
5. The final model is saved as a Hugging Face folder (LoRA adapters merged into the weights) to
   a temporary folder beside the target and renamed into place. Which model: the last step's with
   `<stage>.select_by: last`; otherwise every checkpoint is evaluated on the validation file and the
   Trainer loads the best one at the end (`load_best_model_at_end`, `metric_for_best_model`:
   eval_loss, or DPO's rewards/accuracies for `preference_accuracy`). The report's `selection`
   names the step, checkpoint, metric and value.

Checkpoints live in `checkpoints/<stage>/checkpoint-<step>`. When a checkpoint is fully written
(after the trainer's own save), a marker `rprm_checkpoint.json` records the run's fingerprint
(the stage's training params, the hashes of the data files and of the input model) and the size
of every file. On a rerun the stage resumes from the newest checkpoint automatically:
- a checkpoint without a marker was interrupted while saving: it is deleted with a warning and
  the previous one is used;
- a checkpoint whose fingerprint differs (params, data or input model changed) is stale: the
  folder is cleared with a warning and training starts over;
- a marked checkpoint whose files are missing, truncated or unreadable is corrupt: the stage
  stops before training with a message naming the file (delete that checkpoint to resume from
  the previous one).

Multi-process: when `<stage>.num_processes > 1` the stage relaunches itself as
`accelerate launch --config_file <accelerate_config> --num_processes N -m components.training
<stage> --params <file>`; the workers see `RPRM_TRAINING_WORKER=1` and never relaunch. The
launcher keeps the MLflow run open and hands its id to the workers (`RPRM_TRAINING_RUN_ID`); rank 0
reopens it, so its trainer logs the curves into the stage's run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components.config import Params, TrainParams, dump_params, load_params
from components.io import (
    DataError,
    head_digest,
    iter_json_lines,
    parse_record,
    read_json,
    write_json,
)
from components.model_folder import check_model_dir, torch_dtype
from components.paths import Layout
from components.prompts import VERDICT_PHRASE, parse_verdict
from components.records import Record

log = logging.getLogger(__name__)

TIMING_KEYS = ("runtime_s",)  # report keys logged to MLflow but left out of reports/<stage>.json
WORKER_ENV = "RPRM_TRAINING_WORKER"
RUN_ID_ENV = "RPRM_TRAINING_RUN_ID"  # the stage's MLflow run, reopened by rank 0 of a launch
MARKER = "rprm_checkpoint.json"
STAGES = ("sft", "dpo")
# Params that change how often things are logged or saved, never the trained weights.
_NON_TRAJECTORY_KEYS = ("logging_steps", "eval_steps", "save_steps", "save_total_limit", "accelerate_config")


class TrainingError(RuntimeError):
    """A training stage could not run (launcher failure, nothing left to train on)."""


# --------------------------------------------------------------------------------------
# What a stage adds, what it reads and writes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """What one training stage adds to the shared path (`components.sft.RECIPE`, `components.dpo.RECIPE`)."""

    stage: str  # "sft" | "dpo"
    record: type[Record]  # the training files' record model
    row: Callable[[Any, Path, int], dict[str, Any]]  # (record, file, line) -> trainer row; DataError if invalid
    columns: tuple[str, ...]  # the row keys the trainer's dataset holds
    verdicts: str  # what the balance check counts, as its message names it
    too_long: Callable[[dict[str, Any], Any, TrainParams], bool]  # (row, tokenizer, section): drop it
    # (model, trainer args, train_ds=, val_ds=, tokenizer=, section=, io_=, params=, callbacks=) -> TRL trainer
    make_trainer: Callable[..., Any]
    # (report, trainer, eval metrics, preparation info, held-out result): adds the stage's report keys
    report: Callable[[dict[str, Any], Any, dict[str, float], dict[str, Any], dict[str, Any] | None], None]
    held_out: Callable[[Any], dict[str, Any]] | None = None  # trainer -> held-out result (DPO: preference accuracy)
    # (training rows, tokenizer, params) -> report entry, before training (SFT: analysis lengths)
    length_check: Callable[[list[dict[str, Any]], Any, Params], dict[str, Any]] | None = None


@dataclass(frozen=True)
class StageIO:
    """What one training stage reads and writes."""

    stage: str
    model_in: Path
    train_file: Path
    val_file: Path
    model_out: Path
    checkpoints: Path
    report: Path


def stage_io(stage: str, layout: Layout = Layout()) -> StageIO:
    """Input/output paths of the `sft` or `dpo` stage in `layout` (see components.paths)."""
    if stage == "sft":
        return StageIO("sft", layout.base_model, layout.sft_train, layout.sft_val, layout.sft_model,
                       layout.checkpoints / "sft", layout.report("sft.json"))
    if stage == "dpo":
        return StageIO("dpo", layout.sft_model, layout.dpo_train, layout.dpo_val, layout.dpo_model,
                       layout.checkpoints / "dpo", layout.report("dpo.json"))
    raise ValueError(f"unknown training stage {stage!r} (expected one of {STAGES})")


def _section(stage: str, params: Params) -> TrainParams:
    return params.sft if stage == "sft" else params.dpo


def run_stage(recipe: Recipe, params: Params, layout: Layout = Layout()) -> dict[str, Any]:
    """Run one training stage on `layout`'s files: preflight, then train in this process or launch
    the workers; return its report."""
    from components import tracking

    stage = recipe.stage
    io_ = stage_io(stage, layout)
    section = _section(stage, params)
    data = load_stage_data(recipe, params, io_)  # bad data fails here, before MLflow or training
    check_model_dir(io_.model_in, "SFT" if stage == "dpo" else "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # only a corrupt checkpoint matters here; train() warns
        inspect_checkpoints(io_.checkpoints, fingerprint(stage, params, io_), clean=False)
    log.info("%s: %d training / %d validation examples", stage, len(data.train), len(data.val))
    with tracking.stage_run(
        stage, params, sections=[stage], inputs=[io_.model_in, io_.train_file, io_.val_file], root=layout.root,
    ) as run:
        if section.num_processes > 1 and not os.environ.get(WORKER_ENV):
            report = _launch(stage, params, run.info.run_id, layout)
        else:
            report = train(recipe, params, io_)
        tracking.log_report(report, f"{stage}.json")
    return report


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@dataclass
class StageData:
    """Validated training rows of one stage, as TRL conversational prompt-completion dicts."""

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    verdicts: dict[str, int] = field(default_factory=dict)


def read_stage_file(recipe: Recipe, path: Path, *, allow_empty: bool) -> list[dict[str, Any]]:
    """Read and validate an SFT (SFTExample) or DPO (PreferencePair) file into trainer rows."""
    model, convert = recipe.record, recipe.row
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for line, obj in iter_json_lines(path):
        rec = parse_record(model, obj, path, line)
        if rec.id in seen:
            raise DataError(path, line, "id", f"duplicate id {rec.id!r} (first on line {seen[rec.id]})")
        seen[rec.id] = line
        rows.append(convert(rec, path, line))
    if not rows and not allow_empty:
        raise DataError(path, None, None, "no records: nothing to train on")
    return rows


def check_balance(path: Path, rows: Sequence[dict[str, Any]], min_share: float, what: str) -> dict[str, int]:
    """Counts of yes/no verdicts; DataError if the rarer one is below `min_share` of the rows."""
    counts = Counter(r["verdict"] for r in rows)
    n_yes, n_no = counts.get("yes", 0), counts.get("no", 0)
    share = min(n_yes, n_no) / max(1, n_yes + n_no)
    if min_share > 0 and share < min_share:
        raise DataError(path, None, "verdict",
                        f"unbalanced {what}: {n_yes} yes vs {n_no} no (rarer verdict {share:.1%} "
                        f"< min_verdict_share {min_share:.0%}); rebalance the data or lower the param")
    return {"yes": n_yes, "no": n_no}


def load_stage_data(recipe: Recipe, params: Params, io_: StageIO | None = None) -> StageData:
    """Read, validate and balance-check the stage's train/val files (no tokenizer needed); `io_`
    defaults to the stage's files under the current directory."""
    io_ = io_ or stage_io(recipe.stage)
    section = _section(recipe.stage, params)
    train = read_stage_file(recipe, io_.train_file, allow_empty=False)
    val = read_stage_file(recipe, io_.val_file, allow_empty=True) if io_.val_file.exists() else []
    verdicts = check_balance(io_.train_file, train, section.min_verdict_share, recipe.verdicts)
    return StageData(train=train, val=val, verdicts=verdicts)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> list[int]:
    """Token ids of chat messages rendered with the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True
    )
    return list(out["input_ids"])


def filter_by_length(
    recipe: Recipe, rows: list[dict[str, Any]], tokenizer: Any, section: TrainParams
) -> tuple[list[dict[str, Any]], int]:
    """Drop rows longer than max_length (DPO: either answer; or prompt > max_prompt_length)."""
    kept: list[dict[str, Any]] = []
    for r in rows:
        if not recipe.too_long(r, tokenizer, section):
            kept.append(r)
    return kept, len(rows) - len(kept)


# --------------------------------------------------------------------------------------
# Input model and checkpoints
# --------------------------------------------------------------------------------------


def fingerprint(stage: str, params: Params, io_: StageIO | None = None) -> str:
    """Identity of a training trajectory: its params, its data and its input model."""
    io_ = io_ or stage_io(stage)
    section = _section(stage, params).model_dump(mode="json")
    for key in _NON_TRAJECTORY_KEYS:
        section.pop(key, None)
    ident = {
        "stage": stage,
        "params": section,
        "dtype": params.model.dtype,
        "train": head_digest(io_.train_file) if io_.train_file.exists() else None,
        "val": head_digest(io_.val_file) if io_.val_file.exists() else None,
        "model": head_digest(io_.model_in) if io_.model_in.exists() else None,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    if path.is_dir() and name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
        return int(name[len("checkpoint-"):])
    return None


def _check_safetensors(path: Path) -> str | None:
    """None if the safetensors header parses and the data fits in the file, else why not."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                return "header length out of range"
            header = json.loads(fh.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"unreadable header ({err})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return f"truncated ({size} bytes, tensors need {8 + n + end})"
    return None


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check a marked checkpoint against its marker; DataError naming the bad file if corrupt."""
    marker_path = ckpt / MARKER
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        files = dict(marker["files"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(marker_path, None, None, f"corrupt checkpoint marker ({err}); {_fix_hint(ckpt)}") from None
    for rel, size in files.items():
        f = ckpt / rel
        if not f.is_file():
            raise DataError(f, None, None, f"corrupt checkpoint: file missing; {_fix_hint(ckpt)}")
        if f.stat().st_size != size:
            raise DataError(f, None, None,
                            f"corrupt checkpoint: {f.stat().st_size} bytes, {size} when saved; {_fix_hint(ckpt)}")
        if f.suffix == ".safetensors":
            problem = _check_safetensors(f)
            if problem:
                raise DataError(f, None, None, f"corrupt checkpoint: {problem}; {_fix_hint(ckpt)}")
    try:
        state = read_json(ckpt / "trainer_state.json")
        int(state["global_step"])
    except (DataError, KeyError, TypeError, ValueError) as err:
        raise DataError(ckpt / "trainer_state.json", None, "global_step",
                        f"corrupt checkpoint trainer state ({err}); {_fix_hint(ckpt)}") from None
    return marker


def _fix_hint(ckpt: Path) -> str:
    return f"delete {ckpt} to resume from the previous checkpoint, or {ckpt.parent} to start over"


@dataclass
class CheckpointPlan:
    """What to do with a checkpoint folder before training."""

    resume_from: Path | None
    unfinished: list[Path] = field(default_factory=list)
    stale: list[Path] = field(default_factory=list)


def inspect_checkpoints(folder: Path, current: str, *, clean: bool) -> CheckpointPlan:
    """Find the checkpoint to resume from; with `clean`, delete unfinished and stale ones."""
    ckpts = sorted((p for p in folder.iterdir() if _checkpoint_step(p) is not None),
                   key=_checkpoint_step, reverse=True) if folder.is_dir() else []
    plan = CheckpointPlan(resume_from=None)
    for ckpt in ckpts:
        if not (ckpt / MARKER).exists():
            plan.unfinished.append(ckpt)
            continue
        marker = verify_checkpoint(ckpt)
        if marker.get("fingerprint") != current:
            plan.stale = [c for c in ckpts if c not in plan.unfinished]
            break
        plan.resume_from = ckpt
        break
    for ckpt in plan.unfinished:
        warnings.warn(f"{ckpt}: checkpoint was interrupted while saving; "
                      + ("deleted" if clean else "it will be deleted"), stacklevel=2)
    if plan.stale:
        warnings.warn(f"{folder}: checkpoints were written with other params, data or input model; "
                      + ("deleted, training starts over" if clean else "they will be deleted"), stacklevel=2)
    if clean:
        for ckpt in plan.unfinished + plan.stale:
            shutil.rmtree(ckpt, ignore_errors=True)
    return plan


def _marker_callback(fp: str) -> Any:
    from transformers import TrainerCallback

    class CheckpointMarker(TrainerCallback):
        """After the trainer has written a checkpoint, record its fingerprint and file sizes."""

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank has written its shard
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                files = {p.relative_to(ckpt).as_posix(): p.stat().st_size
                         for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MARKER}
                write_json(ckpt / MARKER, {"fingerprint": fp, "step": state.global_step, "files": files})
            return control

    return CheckpointMarker()


# --------------------------------------------------------------------------------------
# Training (one process, or every process of an accelerate launch)
# --------------------------------------------------------------------------------------


def _use_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


# select_by -> the Trainer's metric_for_best_model (it prefixes "eval_"; greater is better unless it ends in "loss")
SELECTION_METRICS = {"eval_loss": "eval_loss", "preference_accuracy": "rewards/accuracies"}


def selection_args(stage: str, section: TrainParams, io_: StageIO, has_val: bool) -> dict[str, Any]:
    """Trainer arguments of checkpoint selection: none for `last`; else evaluate at every checkpoint and
    load the best one at the end (load_best_model_at_end + metric_for_best_model)."""
    if section.select_by == "last":
        return {}
    if not has_val:
        raise DataError(io_.val_file, None, f"{stage}.select_by",
                        f"select_by {section.select_by!r} needs validation examples, and there are none "
                        "(none in the file, or all longer than max_length); use select_by: last")
    metric = SELECTION_METRICS[section.select_by]
    return {
        "eval_strategy": "steps",
        "eval_steps": section.save_steps,  # every checkpoint is evaluated, every evaluation has a checkpoint
        "save_strategy": "steps",
        "load_best_model_at_end": True,
        "metric_for_best_model": metric,
        "greater_is_better": not metric.endswith("loss"),
    }


def _common_args(stage: str, section: TrainParams, io_: StageIO, has_val: bool) -> dict[str, Any]:
    return {
        "output_dir": str(io_.checkpoints),
        "run_name": stage,
        "report_to": ["mlflow"],
        "learning_rate": section.learning_rate,
        "num_train_epochs": section.num_train_epochs,
        "max_steps": section.max_steps,
        "per_device_train_batch_size": section.per_device_train_batch_size,
        "per_device_eval_batch_size": section.per_device_train_batch_size,
        "gradient_accumulation_steps": section.gradient_accumulation_steps,
        "max_length": section.max_length,
        "warmup_steps": section.warmup_ratio,  # a float < 1 is a ratio of the total steps
        "lr_scheduler_type": section.lr_scheduler_type,
        "weight_decay": section.weight_decay,
        "seed": section.seed,
        "data_seed": section.seed,
        "logging_steps": section.logging_steps,
        "logging_first_step": True,
        "eval_strategy": ("steps" if section.eval_steps else "epoch") if has_val else "no",
        "eval_steps": section.eval_steps,
        "save_strategy": "steps",
        "save_steps": section.save_steps,
        "save_total_limit": section.save_total_limit,
        "bf16": section.bf16,
        "activation_checkpointing": section.gradient_checkpointing,
        "use_cpu": _use_cpu(),
        "dataloader_pin_memory": not _use_cpu(),
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,
    } | selection_args(stage, section, io_, has_val)


def peft_config(section: TrainParams) -> Any:
    """The LoRA config of a stage's section, None without LoRA."""
    if not section.lora.enabled:
        return None
    from peft import LoraConfig

    lora = section.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), task_type="CAUSAL_LM")


def load_model(path: Path, params: Params) -> Any:
    """The causal LM of a model folder, in the params' dtype."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(params.model.dtype))


def build_trainer(recipe: Recipe, params: Params, io_: StageIO | None = None) -> tuple[Any, dict[str, Any]]:
    """Validate inputs and build the TRL trainer of a stage; returns (trainer, preparation info)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    stage = recipe.stage
    io_ = io_ or stage_io(stage)
    section = _section(stage, params)
    data = load_stage_data(recipe, params, io_)
    check_model_dir(io_.model_in, "SFT" if stage == "dpo" else "base")
    tokenizer = AutoTokenizer.from_pretrained(str(io_.model_in))
    train_rows, dropped_train = filter_by_length(recipe, data.train, tokenizer, section)
    val_rows, dropped_val = filter_by_length(recipe, data.val, tokenizer, section)
    if not train_rows:
        raise DataError(io_.train_file, None, None,
                        f"every example is longer than {stage}.max_length={section.max_length} tokens")
    budget = recipe.length_check(train_rows, tokenizer, params) if recipe.length_check is not None else None
    columns = recipe.columns
    train_ds = Dataset.from_list([{k: r[k] for k in columns} for r in train_rows])
    val_ds = Dataset.from_list([{k: r[k] for k in columns} for r in val_rows]) if val_rows else None
    args_kw = _common_args(stage, section, io_, val_ds is not None)
    fp = fingerprint(stage, params, io_)
    callbacks = [_marker_callback(fp)]
    model = load_model(io_.model_in, params)
    trainer = recipe.make_trainer(model, args_kw, train_ds=train_ds, val_ds=val_ds, tokenizer=tokenizer,
                                  section=section, io_=io_, params=params, callbacks=callbacks)
    info = {
        "train_examples": len(train_rows),
        "val_examples": len(val_rows),
        "val_prompts": [(r["prompt"], r["verdict"]) for r in val_rows],
        "dropped_too_long": {"train": dropped_train, "val": dropped_val},
        "verdicts": data.verdicts,
        "val_verdicts": [r["verdict"] for r in val_rows],
        "fingerprint": fp,
        "analysis_tokens": budget,
    }
    return trainer, info


def train(recipe: Recipe, params: Params, io_: StageIO | None = None) -> dict[str, Any]:
    """Train one stage in this process (or as one rank of a launch); write model and report."""
    stage = recipe.stage
    io_ = io_ or stage_io(stage)
    section = _section(stage, params)
    trainer, info = build_trainer(recipe, params, io_)
    args = trainer.args
    with args.main_process_first(desc="checkpoint inspection"):
        plan = inspect_checkpoints(io_.checkpoints, info["fingerprint"], clean=args.process_index == 0)
    if plan.resume_from is not None:
        log.warning("%s: resuming from %s", stage, plan.resume_from)
    result = trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    selection = selection_report(trainer)  # before the final evaluation (of the selected model) is logged
    eval_metrics: dict[str, float] = trainer.evaluate() if trainer.eval_dataset is not None else {}
    preference = recipe.held_out(trainer) if recipe.held_out is not None and trainer.eval_dataset is not None else None
    save_final_model(trainer, io_.model_out, lora=section.lora.enabled, params=params)
    report = _report(recipe, trainer, result, eval_metrics, info, plan, preference)
    report["selection"] = selection
    if trainer.is_world_process_zero():
        report["generation_check"] = generation_check(io_.model_out, info["val_prompts"], section, params)
        # the file holds what the run computed; the wall-clock (runtime_s) goes to MLflow only, so
        # that a rerun with the same params, data, seed and thread count writes the same bytes
        write_json(io_.report, {k: v for k, v in report.items() if k not in TIMING_KEYS})
    return report


def generation_check(model_dir: Path, prompts: Sequence[tuple[list[dict[str, str]], str]],
                     section: TrainParams, params: Params) -> dict[str, Any]:
    """Sample one analysis per held-out prompt from the trained model: how many reach the verdict
    phrase (the regression a preference accuracy hides) and agree with the verdict the data wants."""
    from components.backends import load_backend
    from components.config import SamplingParams

    check = section.generation_check
    unique = list({json.dumps(p, sort_keys=True): (p, v) for p, v in prompts}.values())[: check.max_prompts]
    if not unique:
        return {"prompts": 0, "verdict_reach_rate": None, "verdict_agreement": None}
    sampling = SamplingParams(n=1, temperature=check.temperature, top_p=0.95,
                              max_new_tokens=check.max_new_tokens, seed=check.seed)
    backend = load_backend(params.backend, model_dir, dtype=params.model.dtype)
    try:
        gens = backend.generate([p for p, _ in unique], sampling)
    finally:
        backend.close()
    texts = [g[0].text for g in gens]
    verdicts = [parse_verdict(t).verdict for t in texts]
    return {
        "prompts": len(unique),
        "max_new_tokens": check.max_new_tokens,
        "verdict_reach_rate": sum(VERDICT_PHRASE in t for t in texts) / len(texts),
        "valid_verdict_rate": sum(v != "invalid" for v in verdicts) / len(texts),
        "verdict_agreement": sum(v == want for v, (_, want) in zip(verdicts, unique, strict=True)) / len(texts),
        "mean_tokens": sum(g[0].num_tokens for g in gens) / len(gens),
    }


def last_logged(history: list[dict[str, Any]], key: str) -> float | None:
    """The last value of `key` in the trainer's log history, None if never logged."""
    for entry in reversed(history):
        if key in entry:
            return float(entry[key])
    return None


def _report(
    recipe: Recipe,
    trainer: Any,
    result: Any,
    eval_metrics: dict[str, float],
    info: dict[str, Any],
    plan: CheckpointPlan,
    preference: dict[str, Any] | None,
) -> dict[str, Any]:
    import torch

    args, state = trainer.args, trainer.state
    history = state.log_history
    report: dict[str, Any] = {
        "stage": recipe.stage,
        "train_examples": info["train_examples"],
        "val_examples": info["val_examples"],
        "dropped_too_long": info["dropped_too_long"],
        "verdicts": info["verdicts"],
        **({"analysis_tokens": info["analysis_tokens"]} if info["analysis_tokens"] else {}),
        "global_step": state.global_step,
        "epochs": state.epoch,
        "world_size": args.world_size,
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "train_loss": result.training_loss,  # mean over this session's steps (as TRL reports it)
        "final_train_loss": last_logged(history, "loss"),
        "eval_loss": eval_metrics.get("eval_loss"),
        "runtime_s": result.metrics.get("train_runtime"),
        # reruns are bitwise identical at the same thread count (README, "Reproducibility")
        "torch_threads": torch.get_num_threads(),
        "resumed_from": plan.resume_from.name if plan.resume_from else None,
        "checkpoints_deleted": {"unfinished": len(plan.unfinished), "stale": len(plan.stale)},
    }
    recipe.report(report, trainer, eval_metrics, info, preference)
    return report


def selection_report(trainer: Any) -> dict[str, Any]:
    """Which checkpoint became the model and by what: the last step, or the best evaluated checkpoint."""
    args, state = trainer.args, trainer.state
    if not args.load_best_model_at_end:
        return {"select_by": "last", "step": state.global_step, "checkpoint": None, "metric": None, "value": None}
    metric = args.metric_for_best_model
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    evaluated = {int(e["step"]): float(e[key]) for e in state.log_history if key in e and "step" in e}
    best = state.best_model_checkpoint
    return {
        "select_by": {"eval_loss": "eval_loss", "rewards/accuracies": "preference_accuracy"}.get(metric, metric),
        "metric": key,
        "greater_is_better": bool(args.greater_is_better),
        "step": state.best_global_step,
        "checkpoint": Path(best).name if best else None,
        "value": state.best_metric,
        "last_step": state.global_step,
        "evaluated": {str(k): v for k, v in sorted(evaluated.items())},
    }


def _replace_dir(src: Path, dst: Path) -> None:
    old = dst.parent / f".{dst.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def save_final_model(trainer: Any, out: Path, *, lora: bool, params: Params) -> None:
    """Save the trained model as a HF folder at `out` (LoRA merged), via a temporary folder."""
    tmp = out.parent / f".{out.name}.partial"
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))  # every rank: FSDP / ZeRO-3 gather the full state dict
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        if lora:
            from peft import AutoPeftModelForCausalLM

            merged = AutoPeftModelForCausalLM.from_pretrained(
                str(tmp), dtype=torch_dtype(params.model.dtype)
            ).merge_and_unload()
            shutil.rmtree(tmp)
            merged.save_pretrained(str(tmp))
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(tmp))
        config.use_cache = True  # gradient checkpointing turns it off while training
        config.save_pretrained(str(tmp))
        trainer.processing_class.save_pretrained(str(tmp))
        for stray in ("training_args.bin", "README.md"):
            (tmp / stray).unlink(missing_ok=True)
        _replace_dir(tmp, out)
    trainer.accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------
# Multi-process launch
# --------------------------------------------------------------------------------------


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def resolve_accelerate_config(section: TrainParams) -> Path:
    """The accelerate config file: the param (cwd, then repository relative), else DDP by device."""
    if section.accelerate_config is None:
        name = "ddp_cpu.yaml" if _use_cpu() else "ddp_gpu.yaml"
        return _repo_root() / "configs" / "accelerate" / name
    p = Path(section.accelerate_config)
    for candidate in (p, _repo_root() / p):
        if candidate.is_file():
            return candidate
    raise DataError(p, None, "accelerate_config", "accelerate config file not found")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(stage: str, section: TrainParams, params_file: Path, root: Path = Path(".")) -> list[str]:
    """`accelerate launch ... -m components.training <stage> --params <file> --root <root>` for this stage."""
    config = resolve_accelerate_config(section)
    accel = Path(sys.executable).parent / "accelerate"
    cmd = [str(accel), "launch"] if accel.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    cmd += ["--config_file", str(config), "--num_processes", str(section.num_processes)]
    cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    single_node = int(cfg.get("num_machines", 1) or 1) == 1
    if single_node and not cfg.get("main_process_port") and not os.environ.get("MASTER_PORT"):
        cmd += ["--main_process_port", str(_free_port())]  # never collide with another local run
    cmd += ["-m", "components.training", stage, "--params", str(params_file), "--root", str(root)]
    return cmd


def _launch(stage: str, params: Params, run_id: str, layout: Layout) -> dict[str, Any]:
    from components import tracking

    section = _section(stage, params)
    io_ = stage_io(stage, layout)
    with tempfile.TemporaryDirectory(prefix=f"rprm-{stage}-") as tmp:
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(dump_params(params), encoding="utf-8")
        cmd = launch_command(stage, section, params_file, layout.root)
        env = dict(os.environ)
        env[WORKER_ENV] = "1"
        env[RUN_ID_ENV] = run_id
        env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(params)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_repo_root()), env.get("PYTHONPATH")]))
        log.info("launching: %s", " ".join(cmd))
        proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0:
        raise TrainingError(f"{stage}: accelerate launch exited with code {proc.returncode}; "
                            f"rerun `rprm {stage}` to resume from the last checkpoint")
    return read_json(io_.report)


def main(argv: Sequence[str] | None = None) -> None:
    """Worker entry point for `accelerate launch -m components.training <stage> --params <file> --root <dir>`."""
    parser = argparse.ArgumentParser(prog="components.training", description=main.__doc__)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--root", default=Path("."), type=Path, help="the project layout's root")
    ns = parser.parse_args(argv)
    os.environ[WORKER_ENV] = "1"
    logging.basicConfig(level=logging.INFO)
    params = load_params(ns.params)
    # The recipe of the stage's own module (components.sft or components.dpo: the one that launched
    # this worker), imported by name so that a stage's code is its module and this one only.
    recipe = importlib.import_module(f"components.{ns.stage}").RECIPE
    io_ = stage_io(ns.stage, Layout(ns.root))
    run_id = os.environ.get(RUN_ID_ENV)
    if run_id and os.environ.get("RANK", "0") == "0":
        from components import tracking

        # Rank 0 reopens the launcher's run, so the trainer's MLflow callback logs into it.
        with tracking.resume_run(run_id):
            train(recipe, params, io_)
    else:
        train(recipe, params, io_)


if __name__ == "__main__":
    main()

