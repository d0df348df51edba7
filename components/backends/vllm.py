"""The `vllm` generation backend: an in-process `vllm.LLM` with prefix caching (the `gpu` extra).

Each sample is its own request (`n=1`, `seed=row_seed(seeds[i], j)`), so sample j of a
conversation depends only on its seed and index, as with the `hf` backend; prefix caching
makes the K requests of one prompt share its encoding. Prompts are rendered with the model's
chat template and passed as token ids (no extra BOS).

The verdict probability is read from the log-probabilities vLLM returns with each generated
token. vLLM computes them from the raw logits (`logprobs_mode="raw_logprobs"`, before
temperature and top-p), so at the first position whose text ends with
`Is the step correct (Yes/No)?`, P(Yes) = softmax([logprob(" Yes"), logprob(" No")])[0] equals
the softmax of the two raw logits. Where vLLM supports `logprob_token_ids`, both ids are
requested explicitly; otherwise they must be among the top `backend.vllm.logprobs`, and a
position where one is missing yields `p_yes=None` (scoring then falls back). The
teacher-forced path is a `max_tokens=1` request on prompt + prefix that reads the same pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.backends.base import BackendError, Conversation, Generation, request_rows, row_seed
from components.backends.verdict import VerdictLocator
from components.config import BackendParams, SamplingParams
from components.prompts import NO_TOKEN_TEXT, YES_TOKEN_TEXT


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise BackendError(
            "backend.kind=vllm needs vLLM, which is not installed: install the `gpu` extra "
            "(pip install -e '.[gpu]') on a CUDA machine, or use backend.kind=hf / openai"
        ) from err
    return vllm


class VLLMBackend:
    """Generation backend on an in-process `vllm.LLM` (see module docstring)."""

    name = "vllm"
    sampler: str | None = None  # vLLM's own sampler
    forced_in_generation = False

    def __init__(self, model_path: str | Path, params: BackendParams, dtype: str = "float32"):
        from components.model_folder import check_tokenizer_folder

        vllm = _import_vllm()
        check_tokenizer_folder(model_path)
        self.params = params
        self._vllm = vllm
        opts = params.vllm
        kwargs: dict[str, Any] = {
            "model": str(model_path),
            "dtype": dtype,
            "tensor_parallel_size": opts.tensor_parallel_size,
            "gpu_memory_utilization": opts.gpu_memory_utilization,
            "enable_prefix_caching": opts.enable_prefix_caching,
            "max_logprobs": max(20, opts.logprobs),
            "logprobs_mode": "raw_logprobs",
        }
        if opts.max_model_len is not None:
            kwargs["max_model_len"] = opts.max_model_len
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # Seeded requests + chunked prefill crash the CPU build ("CPU Generator does not
            # use offset": vLLM rewinds the generator of a request whose prefill was split).
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(32768, opts.max_model_len or 0)
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        if not getattr(self.tokenizer, "chat_template", None):
            raise BackendError(f"{model_path}: tokenizer has no chat template")
        self.yes_id = self.tokenizer.encode(YES_TOKEN_TEXT, add_special_tokens=False)[0]
        self.no_id = self.tokenizer.encode(NO_TOKEN_TEXT, add_special_tokens=False)[0]
        self.verdict = VerdictLocator(self.tokenizer)
        fields = getattr(vllm.SamplingParams, "__struct_fields__", ())
        self._token_ids_supported = "logprob_token_ids" in fields

    def render(self, conversation: Conversation, prefix: str = "") -> list[int]:
        """Token ids of the chat prompt (generation prompt added) plus an assistant prefix."""
        text = self.tokenizer.apply_chat_template(
            list(conversation), tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(text + prefix, add_special_tokens=False).input_ids)

    def _logprob_kwargs(self) -> dict[str, Any]:
        if self._token_ids_supported:
            # vLLM requires logprobs == len(logprob_token_ids) when both are given.
            return {"logprobs": 2, "logprob_token_ids": [self.yes_id, self.no_id]}
        return {"logprobs": self.params.vllm.logprobs}

    def _p_yes(self, entry: Any) -> float | None:
        """P(Yes) from one position's log-probabilities (dict token id -> Logprob), if both present."""
        if not entry or self.yes_id not in entry or self.no_id not in entry:
            return None
        ly, ln = float(entry[self.yes_id].logprob), float(entry[self.no_id].logprob)
        if math.isinf(ly) and math.isinf(ln):
            return None
        m = max(ly, ln)
        ey, en = math.exp(ly - m), math.exp(ln - m)
        return ey / (ey + en)

    def verdict_probability(
        self, conversations: Sequence[Conversation], prefixes: Sequence[str]
    ) -> list[float | None]:
        """Teacher-forced P(Yes): a one-token request on prompt + prefix, its first log-probs."""
        if len(conversations) != len(prefixes):
            raise ValueError("conversations and prefixes differ in length")
        sp = self._vllm.SamplingParams(n=1, temperature=0.0, max_tokens=1, **self._logprob_kwargs())
        prompts = [{"prompt_token_ids": self.render(c, p)} for c, p in zip(conversations, prefixes, strict=True)]
        outputs = self.llm.generate(prompts, sp, use_tqdm=False)
        result: list[float | None] = []
        for out in outputs:
            lps = out.outputs[0].logprobs
            result.append(self._p_yes(lps[0]) if lps else None)
        return result

    def generate(
        self,
        conversations: Sequence[Conversation],
        sampling: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
        assistant_prefixes: Sequence[str] | None = None,
        stop: Sequence[str] | None = None,
        progress: bool = False,
    ) -> list[list[Generation]]:
        """`sampling.n` seeded samples per conversation, with one-pass verdict probabilities."""
        n_conv = len(conversations)
        seeds, prefixes = request_rows(n_conv, sampling, seeds, assistant_prefixes)
        stop_list = [s for s in (stop or []) if s]
        prompts, params = [], []
        for i, conv in enumerate(conversations):
            ids = self.render(conv, prefixes[i])
            for j in range(sampling.n):
                prompts.append({"prompt_token_ids": ids})
                params.append(
                    self._vllm.SamplingParams(
                        n=1,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                        max_tokens=sampling.max_new_tokens,
                        seed=row_seed(seeds[i], j),
                        stop=stop_list or None,
                        skip_special_tokens=True,
                        **self._logprob_kwargs(),
                    )
                )
        outputs = self.llm.generate(prompts, params, use_tqdm=progress)
        results: list[list[Generation]] = []
        for i in range(n_conv):
            per: list[Generation] = []
            for j in range(sampling.n):
                out = outputs[i * sampling.n + j].outputs[0]
                token_ids = list(out.token_ids)
                p_yes = None
                k = self.verdict.first_position(prefixes[i], token_ids)
                if k is not None and out.logprobs is not None and k < len(out.logprobs):
                    p_yes = self._p_yes(out.logprobs[k])
                finish = out.finish_reason if out.finish_reason in ("stop", "length") else "stop"
                per.append(
                    Generation(text=out.text, p_yes=p_yes, num_tokens=len(token_ids), finish_reason=finish)
                )
            results.append(per)
        return results

    def close(self) -> None:
        """Shut the engine down and free GPU memory."""
        import gc

        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(getattr(llm, "llm_engine", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
