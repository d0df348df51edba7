"""Model folders in one place: what a usable one holds, its tokenizer files, and the weights dtypes.

Stages check their input model with `check_model_dir` (a DataError naming the folder: config,
tokenizer, chat template; training, synthesis, pairs); the base-model stage and the hf / vllm
backends check a local folder with `check_tokenizer_folder` before loading it (BaseModelError).
`torch_dtype` maps the params' dtype names (`model.dtype`, `teacher.dtype`) to torch dtypes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.io import DataError

# Files a saved tokenizer leaves in its folder: any one passes `check_tokenizer_folder` ...
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# ... and those holding its vocabulary, one of which `check_model_dir` asks for before loading it
VOCABULARY_FILES = tuple(name for name in TOKENIZER_FILES if name != "tokenizer_config.json")


class BaseModelError(RuntimeError):
    """The base model cannot be built or materialised (missing package, file or tokenizer)."""


def torch_dtype(name: str) -> Any:
    """torch dtype of a params dtype name (float32, bfloat16, float16); KeyError for another."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_tokenizer_folder(path: str | Path) -> None:
    """Raise BaseModelError if a local model folder has no tokenizer files."""
    folder = Path(path)
    names = TOKENIZER_FILES
    if folder.is_dir() and not any((folder / n).exists() for n in names):
        raise BaseModelError(
            f"{folder}: no tokenizer files (expected one of {', '.join(names)}); save the "
            "tokenizer with the model (tokenizer.save_pretrained)"
        )


def check_model_dir(path: Path, what: str) -> None:
    """The input model folder must hold a config, a tokenizer and a chat template."""
    hint = "run `rprm base-model`" if what == "base" else "run `rprm sft`"
    if not path.is_dir():
        raise DataError(path, None, None, f"{what} model folder not found ({hint})")
    if not (path / "config.json").is_file():
        raise DataError(path, None, "config.json", f"not a Hugging Face model folder ({hint})")
    if not any((path / f).is_file() for f in VOCABULARY_FILES):
        raise DataError(path, None, "tokenizer",
                        f"{what} model folder has no tokenizer ({' / '.join(VOCABULARY_FILES)}); {hint}")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001 - any load failure is reported the same way
        raise DataError(path, None, "tokenizer", f"tokenizer does not load: {err}") from None
    if not getattr(tok, "chat_template", None):
        raise DataError(path, None, "chat_template",
                        f"{what} model's tokenizer has no chat template (needed for the chat examples)")
