"""Generation backends (hf, vllm, openai) behind one interface; see `base.py` for the contract."""

from __future__ import annotations

from pathlib import Path

from components.backends.base import (
    BackendError,
    Conversation,
    Generation,
    GenerationBackend,
    StreamingBackend,
    row_seed,
)
from components.config import BackendParams

__all__ = [
    "BackendError",
    "Conversation",
    "Generation",
    "GenerationBackend",
    "StreamingBackend",
    "load_backend",
    "row_seed",
]


def load_backend(
    backend_params: BackendParams, model_path: str | Path, dtype: str = "float32"
) -> GenerationBackend:
    """Build the backend named by `backend_params.kind` on `model_path` (a folder or hub id; for
    `openai`, the model name asked of the server, falling back to `backend_params.openai.model`)."""
    kind = backend_params.kind
    if kind == "hf":
        from components.backends.hf import HFBackend

        return HFBackend(model_path, backend_params, dtype=dtype)
    if kind == "vllm":
        from components.backends.vllm import VLLMBackend

        return VLLMBackend(model_path, backend_params, dtype=dtype)
    if kind == "openai":
        from components.backends.openai import OpenAIBackend

        return OpenAIBackend(backend_params.openai, str(model_path) if model_path else None)
    raise BackendError(f"unknown backend kind {kind!r} (hf, vllm, openai)")
