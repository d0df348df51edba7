"""The `openai` backend against real HTTP servers on 127.0.0.1.

- `tests/fault_server.py`: a real OpenAI-compatible server that injects every fault of issue 8
  point 2 (500, 503, 429, timeouts, dropped connections, malformed JSON, empty `choices`, a body
  cut short) and records what the client sent.
- `transformers serve` (transformers 5.24 CLI, offline, holding the tiny model): a real
  OpenAI-compatible server that returns one choice whatever `n` asks and no log-probabilities.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fault_server import FaultServer

from components.backends.base import BackendError, GenerationBackend, StreamingBackend, row_seed
from components.backends.openai import OpenAIBackend, p_yes_from_token_logprobs
from components.config import OpenAIParams, SamplingParams
from components.prompts import VERDICT_PHRASE, parse_verdict, student_messages

KEY_ENV = "RPRM_TEST_OPENAI_KEY"
KEY = "sk-test-7f3a9c1e5b2d4f60a8e1-do-not-leak"
CONV = [{"role": "user", "content": "Is 2 + 2 = 4?"}]


def sampling(n: int = 1, **kw) -> SamplingParams:
    return SamplingParams(n=n, temperature=kw.get("temperature", 0.7), top_p=0.95, max_new_tokens=kw.get("max_new_tokens", 32), seed=0)


def backend(server: FaultServer, **kw) -> OpenAIBackend:
    params = OpenAIParams(
        base_url=kw.pop("base_url", server.base_url),
        model=kw.pop("model", "fault-model"),
        api_key_env=kw.pop("api_key_env", None),
        concurrency=kw.pop("concurrency", 4),
        timeout_s=kw.pop("timeout_s", 2.0),
        max_retries=kw.pop("max_retries", 3),
        backoff_base_s=kw.pop("backoff_base_s", 0.01),
        backoff_max_s=kw.pop("backoff_max_s", 0.05),
        use_chat=kw.pop("use_chat", True),
    )
    assert not kw
    return OpenAIBackend(params)


def test_implements_the_generation_backend_protocol() -> None:
    with FaultServer() as server:
        b = backend(server)
        assert isinstance(b, GenerationBackend) and isinstance(b, StreamingBackend)
        b.close()


# --------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["500", "503", "429", "timeout", "drop", "malformed", "empty", "cut"])
def test_each_fault_is_retried_then_succeeds(fault: str) -> None:
    with FaultServer(script=[fault, fault], hang_s=3.0) as server:
        b = backend(server, timeout_s=0.5)
        (row,) = b.generate([CONV], sampling(1), seeds=[3])
        b.close()
    (g,) = row
    assert g.error is None and g.finish_reason == "stop"
    assert parse_verdict(g.text).valid
    assert g.meta["attempts"] == 3
    assert [r.kind for r in server.requests] == [fault, fault, "ok"]
    assert len({r.raw for r in server.requests}) == 1  # a retry resends the same request


def test_streamed_cut_is_also_a_fault_the_server_can_produce() -> None:
    """The fault server cuts SSE streams too (for streaming clients of other stages)."""
    with FaultServer(script=["cut"]) as server:
        body = {"model": "m", "messages": CONV, "stream": True, "max_tokens": 16}
        with pytest.raises(httpx.RemoteProtocolError), httpx.Client() as client:
            with client.stream("POST", f"{server.base_url}/chat/completions", json=body) as resp:
                for _ in resp.iter_bytes():
                    pass


def test_exhausted_retries_become_error_generations_not_exceptions() -> None:
    with FaultServer(script=["503"] * 3, retry_after=0.01) as server:
        b = backend(server, max_retries=2, concurrency=1)
        rows = b.generate([CONV, CONV], sampling(2), seeds=[1, 2])
        b.close()
    failed, ok = rows
    assert [g.finish_reason for g in failed] == ["error", "error"]
    assert all("HTTP 503" in g.error and "after 3 attempt(s)" in g.error for g in failed)
    assert [g.error for g in ok] == [None, None]


def test_connection_refused_is_an_error_generation() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    with FaultServer() as server:
        b = backend(server, base_url=f"http://127.0.0.1:{port}/v1", max_retries=1)
    (row,) = b.generate([CONV], sampling(1))
    b.close()
    assert row[0].finish_reason == "error" and "ConnectError" in row[0].error


def test_client_errors_are_not_retried() -> None:
    with FaultServer() as server:
        b = backend(server, base_url=server.base_url.replace("/v1", "/nope/v1"))
        (row,) = b.generate([CONV], sampling(1))
        b.close()
        assert len(server.requests) == 0  # 404 is answered before a request is recorded
    assert row[0].finish_reason == "error" and "HTTP 404" in row[0].error and "after 1 attempt" in row[0].error


def test_backoff_doubles_is_capped_jittered_and_seeded() -> None:
    with FaultServer() as server:
        b = backend(server, backoff_base_s=1.0, backoff_max_s=8.0)
    delays = [b._backoff(42, attempt, None) for attempt in range(6)]
    assert delays == [b._backoff(42, attempt, None) for attempt in range(6)]  # seeded
    for attempt, d in enumerate(delays):
        full = min(8.0, 2.0**attempt)
        assert full / 2 <= d <= full
    assert b._backoff(43, 2, None) != b._backoff(42, 2, None)
    assert b._backoff(42, 0, retry_after=5.0) == 5.0  # Retry-After honoured
    assert b._backoff(42, 0, retry_after=60.0) == 8.0  # ... within the cap
    b.close()


def test_concurrency_is_bounded() -> None:
    with FaultServer(delay_s=0.2) as server:
        b = backend(server, concurrency=2)
        rows = b.generate([CONV] * 6, sampling(1), seeds=range(6))
        b.close()
    assert all(r[0].error is None for r in rows)
    assert server.max_in_flight == 2


# --------------------------------------------------------------------------------------
# n, seeds, log-probabilities
# --------------------------------------------------------------------------------------


def test_tops_up_until_n_with_row_seeds() -> None:
    with FaultServer(max_choices=1) as server:
        b = backend(server)
        (row,) = b.generate([CONV], sampling(3), seeds=[2**40 + 17])
        b.close()
    assert len(row) == 3 and all(g.error is None for g in row)
    assert [r.body.get("n", 1) for r in server.requests] == [3, 2, 1]
    expected = [row_seed(2**40 + 17, j) % (2**31 - 1) for j in range(3)]
    assert all(0 <= s < 2**31 for s in expected) and expected != [row_seed(2**40 + 17, j) for j in range(3)]
    assert [r.body["seed"] for r in server.requests] == expected
    assert [g.meta["seed"] for g in row] == expected
    with FaultServer(max_choices=8) as server:
        b = backend(server)
        (row,) = b.generate([CONV], sampling(3), seeds=[17])
        b.close()
    assert len(row) == 3 and len(server.requests) == 1 and server.requests[0].body["n"] == 3


def test_results_do_not_depend_on_batching() -> None:
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]
    with FaultServer(max_choices=1) as server:
        b = backend(server, concurrency=3)
        batched = b.generate(convs, sampling(2), seeds=[10, 11, 12, 13, 14])
        single = [b.generate([c], sampling(2), seeds=[s])[0] for c, s in zip(convs, [10, 11, 12, 13, 14], strict=True)]
        b.close()
    assert [[g.text for g in r] for r in batched] == [[g.text for g in r] for r in single]


def test_p_yes_from_logprobs_and_recorded_when_missing() -> None:
    with FaultServer(logprobs=True, p_yes=0.8) as server:
        b = backend(server)
        (row,) = b.generate([CONV], sampling(1))
        b.close()
    assert row[0].p_yes == pytest.approx(0.8)
    assert row[0].meta["p_yes_source"] == "logprobs"
    assert server.requests[0].body["logprobs"] is True and server.requests[0].body["top_logprobs"] == 20
    with FaultServer(logprobs=False) as server:
        b = backend(server)
        (row,) = b.generate([CONV], sampling(1))
        b.close()
    assert row[0].p_yes is None and row[0].meta["p_yes_source"] == "no_logprobs_from_server"


def test_server_that_rejects_logprobs_is_asked_without_them() -> None:
    with FaultServer(script=["400_logprobs"]) as server:
        b = backend(server, concurrency=1)
        rows = b.generate([CONV, CONV], sampling(1), seeds=[1, 2])
        b.close()
    assert all(r[0].error is None and r[0].p_yes is None for r in rows)
    assert "logprobs" in server.requests[0].body
    assert all("logprobs" not in r.body for r in server.requests[1:])


@pytest.mark.parametrize(
    ("tokens", "tops", "expected"),
    [
        (["Ok.", " Verification:", " Is the step correct (Yes/No)?", " Yes"],
         [{}, {}, {}, {" Yes": -0.1, " No": -2.4}], (pytest.approx(0.909, abs=1e-3), "logprobs")),
        # one verdict token below the top-k: unknown (never clamped to 0 or 1)
        (["Is the step correct (Yes/No)?", " No"], [{}, {" No": -0.5}], (None, "yes_token_not_in_top_logprobs")),
        (["Is the step correct (Yes/No)?", " Yes"], [{}, {" Yes": -0.01, " Maybe": -5.0}],
         (None, "no_token_not_in_top_logprobs")),
        # only the exact token texts " Yes" / " No" count, as in the hf backend
        (["Is the step correct (Yes/No)?", " Yes"], [{}, {" Yes": -0.1, "No": -2.4, " no": -3.0}],
         (None, "no_token_not_in_top_logprobs")),
        (["Is the step correct (Yes/No)?", "Yes"], [{}, {"Yes": -0.1, "No": -2.4, " YES": -3.0}],
         (None, "verdict_tokens_not_in_top_logprobs")),
        (["no verdict here"], [{}], (None, "verdict_not_reached")),
        (["Is the step correct (Yes/No", ")? Yes"], [{}, {}], (None, "verdict_token_merged")),
        (["Is the step correct (Yes/No)?"], [{}], (None, "verdict_not_generated")),
        (["Is the step correct (Yes/No)?", " maybe"], [{}, {" maybe": -0.1}], (None, "verdict_tokens_not_in_top_logprobs")),
    ],
)
def test_p_yes_from_token_logprobs(tokens, tops, expected) -> None:
    assert p_yes_from_token_logprobs(tokens, tops) == expected


def says_yes(body: dict, index: int) -> str:
    """An analysis that always samples " Yes" at the verdict (so " No" is known only from the top-k)."""
    return "Analysis:\n**Calculation Analysis**: 2 + 2 = 4, correct.\nConclusion: correct.\nVerification: " + VERDICT_PHRASE + " Yes"


def _scorer(backend: OpenAIBackend, fallback: str = "teacher_forced"):
    from components.config import ScoringParams
    from components.scoring import StepScorer

    params = ScoringParams(sampling=SamplingParams(n=2, temperature=0.95, top_p=0.95, max_new_tokens=64, seed=0),
                           fallback=fallback)
    return StepScorer(backend, params, early_exit=False, progress=False)


def _solution():
    from components.records import Solution

    return Solution(id="s0", question="What is 2 + 2?", steps=["2 + 2 = 4."])


def test_missing_verdict_token_is_not_clamped_but_teacher_forced(tmp_path: Path) -> None:
    """" No" below the top-k in the generation pass: p_yes None, then the teacher-forced pass."""
    with FaultServer(logprobs=True, p_yes=0.3, verdict_top={" Yes": -0.01, " Maybe": -4.0},
                     responder=says_yes) as server:
        b = backend(server)
        (row,) = b.generate([CONV], sampling(2))
        assert [g.p_yes for g in row] == [None, None]
        assert {g.meta["p_yes_source"] for g in row} == {"no_token_not_in_top_logprobs"}
        (scored,) = _scorer(b).score_detailed([_solution()])
        b.close()
    # the teacher-forced probe (both tokens in its top list) gives P(Yes) = 0.3 for both analyses
    assert scored.values == [[pytest.approx(0.3), pytest.approx(0.3)]] and scored.fallback == [[True, True]]
    probes = [r.body for r in server.requests if r.body.get("max_tokens") == 1]
    assert len(probes) == 2
    for body in probes:  # each cut after the verdict phrase of the (post-processed) analysis
        assert body["messages"][-1]["role"] == "assistant"
        assert body["messages"][-1]["content"].endswith("Verification: " + VERDICT_PHRASE)


def test_teacher_forced_reads_exact_values_through_prompt_logprobs() -> None:
    """Both passes miss " No" in the top-k: vLLM's prompt_logprobs give the exact pair."""
    prefix = "Analysis: fine.\nVerification: " + VERDICT_PHRASE
    only_yes = {" Yes": -0.01, " Maybe": -4.0}
    with FaultServer(logprobs=True, p_yes=0.3, verdict_top=only_yes, probe_top=only_yes, prompt_logprobs=True,
                     responder=says_yes) as server:
        b = backend(server)
        assert b.verdict_probability([CONV], [prefix]) == [pytest.approx(0.3)]
        first, yes, no = (r.body for r in server.requests)
        assert first["max_tokens"] == 1 and "prompt_logprobs" not in first
        assert yes["prompt_logprobs"] == 0 and yes["messages"][-1]["content"] == prefix + " Yes"
        assert no["prompt_logprobs"] == 0 and no["messages"][-1]["content"] == prefix + " No"
        assert yes["continue_final_message"] is True and "logprobs" not in yes
        (scored,) = _scorer(b).score_detailed([_solution()])
        b.close()
    assert scored.values == [[pytest.approx(0.3), pytest.approx(0.3)]] and scored.fallback == [[True, True]]


def test_without_prompt_logprobs_the_documented_fallback_applies() -> None:
    """A server without the extension: the teacher-forced value is unknown, the sampled verdict is used."""
    only_yes = {" Yes": -0.01}
    with FaultServer(logprobs=True, p_yes=0.3, verdict_top=only_yes, probe_top=only_yes, responder=says_yes) as server:
        b = backend(server)
        (scored,) = _scorer(b).score_detailed([_solution()])
        asked = sum("prompt_logprobs" in r.body for r in server.requests)
        assert b.verdict_probability([CONV], ["Analysis.\nVerification: " + VERDICT_PHRASE]) == [None]
        asked_after = sum("prompt_logprobs" in r.body for r in server.requests)
        b.close()
    assert scored.values == [[1.0, 1.0]] and scored.fallback == [[True, True]]  # the sampled " Yes"
    # asked (once per analysis in flight); the server returned none, so the client stopped asking
    assert 1 <= asked <= 2 and asked_after == asked
    with FaultServer(logprobs=True, verdict_top=only_yes, responder=says_yes) as server:
        b = backend(server)
        (scored,) = _scorer(b, fallback="drop").score_detailed([_solution()])
        b.close()
    assert scored.values == [[None, None]] and scored.reward(0) == 0.5  # nothing clamped, nothing kept


def test_verdict_probability_chat_and_completions(tiny_model_dir: Path, tmp_path: Path) -> None:
    prefix = "Analysis: fine.\nVerification: " + VERDICT_PHRASE
    with FaultServer(logprobs=True, p_yes=0.3) as server:
        chat = backend(server)
        assert chat.verdict_probability([CONV], [prefix]) == [pytest.approx(0.3)]
        body = server.requests[-1].body
        assert body["max_tokens"] == 1 and body["continue_final_message"] is True
        assert body["messages"][-1] == {"role": "assistant", "content": prefix}
        chat.close()
        completions = backend(server, use_chat=False, model=str(tiny_model_dir))
        assert completions.verdict_probability([CONV], [prefix]) == [pytest.approx(0.3)]
        body = server.requests[-1].body
        assert server.requests[-1].path == "/v1/completions"
        assert body["prompt"].endswith("<|im_start|>assistant\n" + prefix) and body["max_tokens"] == 1
        completions.close()
    with FaultServer(logprobs=False) as server:
        b = backend(server)
        assert b.verdict_probability([CONV], [prefix]) == [None]
        b.close()
    with FaultServer() as server:
        b = backend(server, use_chat=False, model=str(tmp_path))  # a folder without a tokenizer
        with pytest.raises(BackendError, match="chat template"):
            b.generate([CONV], sampling(1))
        b.close()


# --------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------


def test_api_key_only_in_authorization_header(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)
    with FaultServer(script=["500", "500", "500"], echo_auth_in_errors=True) as server:
        b = backend(server, api_key_env=KEY_ENV, max_retries=2, concurrency=1)
        rows = b.generate([CONV, CONV], sampling(1), seeds=[1, 2])
        text = repr(b) + str(vars(b))
        b.close()
    for req in server.requests:
        assert req.headers["Authorization"] == f"Bearer {KEY}"
        assert KEY.encode() not in req.raw
    failed = [r[0] for r in rows if r[0].error]
    assert failed and all("[redacted]" in g.error and KEY not in g.error for g in failed)
    assert KEY not in text
    assert KEY not in caplog.text


# --------------------------------------------------------------------------------------
# A real server: `transformers serve`
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def transformers_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`transformers serve` holding the tiny model, offline, on 127.0.0.1."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("tserve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cli = Path(sys.executable).with_name("transformers")
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [str(cli), "serve", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not come up: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", str(tiny_model_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_against_transformers_serve(transformers_server) -> None:
    base_url, model = transformers_server
    params = OpenAIParams(base_url=base_url, model=model, api_key_env=None, concurrency=2, timeout_s=120.0,
                          max_retries=1, backoff_base_s=0.1, backoff_max_s=1.0, use_chat=True)
    b = OpenAIBackend(params)
    convs = [
        student_messages("How many seconds are in 7.8 minutes?", [], "7.8 minutes is 7 minutes and 0.8 minutes."),
        student_messages("What is 3 + 4?", ["We add 3 and 4."], "3 + 4 = 7."),
    ]
    s = sampling(2, max_new_tokens=12)
    rows = b.generate(convs, s, seeds=[1, 2])
    again = b.generate(convs, s, seeds=[1, 2])
    b.close()
    for row in rows:
        assert len(row) == 2
        for g in row:
            assert g.error is None, g.error
            # transformers serve answers one choice per request and no log-probabilities
            assert g.meta["requests"] == 2
            assert g.p_yes is None and g.meta["p_yes_source"] == "no_logprobs_from_server"
            assert 0 < g.num_tokens <= 12 and g.finish_reason in ("length", "stop")
    assert [[g.text for g in r] for r in rows] == [[g.text for g in r] for r in again]
