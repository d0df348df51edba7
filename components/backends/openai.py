"""`openai` generation backend: any OpenAI-compatible server over HTTP (httpx; no SDK needed).

Works with `vllm serve`, SGLang, `transformers serve` and hosted APIs. Requests go to
`/chat/completions` (the server applies the chat template) or, with `use_chat: false`, to
`/completions` with the prompt rendered by the model's own tokenizer (loaded by name).

Robustness: at most `concurrency` requests in flight; a per-request
timeout; retries with exponential backoff (`backoff_base_s` doubling, capped at `backoff_max_s`,
jittered from a random stream seeded by the request's seed and attempt, honouring
`Retry-After`) on HTTP 5xx/429/408, timeouts, refused or dropped connections, a body cut short,
malformed JSON and empty `choices`. A request that still fails becomes generations with
`finish_reason="error"` and the error text; this backend never raises for one failed request
(the stage decides through its error budget). Other 4xx answers are not retried.

Servers differ: `transformers serve` returns one choice when asked for `n` and no
log-probabilities. So the client tops up with more requests until it has `n` choices (request
r of row i carries seed `row_seed(seeds[i], choices so far) mod 2**31-1`, so results do not
depend on batching).

Verdict probability (docs/method.md §9). In the generation pass `p_yes` is read
from the top log-probabilities of the token that starts right after the first verdict phrase:
P(" Yes") / (P(" Yes") + P(" No")), with the tokens matched exactly as the hf backend does (the
token texts " Yes" and " No", leading space included; `Yes`, `yes` or ` YES` never count). When
the server returns no log-probabilities, or either verdict token is not among the top
`TOP_LOGPROBS` at that position, `p_yes` is None and `Generation.meta["p_yes_source"]` says why;
the value is never clamped to 0 or 1. The scorer then applies `scoring.fallback` (by default
the teacher-forced pass below, then the sampled verdict).

The teacher-forced pass (`verdict_probability`) asks for one greedy token after conversation +
prefix with the top log-probabilities, and reads both verdict tokens there. If one is missing
from the top list it asks, where the server offers vLLM's `prompt_logprobs` extension, for the
log-probability of the prompt's own last token on prefix + " Yes" and on prefix + " No" (exact
whatever their rank; vLLM computes prompt log-probabilities from the raw logits in every
`--logprobs-mode`). A server without that extension gives None, and the scorer falls back to
the sampled verdict. Servers also differ in what their log-probabilities are (raw model
log-probabilities, or after temperature / top-p): see the README, "Log-probabilities by server".

The API key is read from the environment variable named by `api_key_env` and sent only in the
`Authorization` header. It is never stored on the object in the clear, never part of a repr,
a log line or an error text (server replies that echo it are redacted).
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import httpx
from tqdm.auto import tqdm

from components.backends.base import BackendError, Conversation, Generation, request_rows, row_seed
from components.config import OpenAIParams, SamplingParams
from components.prompts import NO_TOKEN_TEXT, VERDICT_PHRASE, YES_TOKEN_TEXT

log = logging.getLogger(__name__)

TOP_LOGPROBS = 20  # most OpenAI-compatible servers cap top_logprobs at 20
SEED_MODULUS = 2**31 - 1  # request seeds stay within a signed 32-bit int, which every server accepts
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class _Secret:
    """Holds a credential; its repr and str never show it."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return "_Secret('***')"

    __str__ = __repr__


class _RequestFailed(Exception):
    def __init__(self, message: str, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _verdict_p_yes(top: dict[str, float]) -> tuple[float | None, str]:
    """Two-way softmax over the exact " Yes" / " No" entries of one position's top log-probs.

    Only the token texts " Yes" and " No" count (as the hf backend reads token ids of exactly
    those texts). If either is absent from the top list, the value is unknown: None, with why.
    """
    ly, ln = top.get(YES_TOKEN_TEXT), top.get(NO_TOKEN_TEXT)
    if ly is None and ln is None:
        return None, "verdict_tokens_not_in_top_logprobs"
    if ln is None:
        return None, "no_token_not_in_top_logprobs"
    if ly is None:
        return None, "yes_token_not_in_top_logprobs"
    if math.isinf(ly) and math.isinf(ln):
        return None, "verdict_tokens_impossible"
    return two_way_softmax(ly, ln), "logprobs"


def two_way_softmax(ly: float, ln: float) -> float:
    """softmax([ly, ln])[0], computed stably."""
    m = max(ly, ln)
    ey, en = math.exp(ly - m), math.exp(ln - m)
    return ey / (ey + en)


def p_yes_from_token_logprobs(
    tokens: Sequence[str], tops: Sequence[dict[str, float]]
) -> tuple[float | None, str]:
    """P(" Yes") at the token right after the first verdict phrase, and how it was obtained."""
    text, starts = "", []
    for tok in tokens:
        starts.append(len(text))
        text += tok
    pos = text.find(VERDICT_PHRASE)
    if pos < 0:
        return None, "verdict_not_reached"
    end = pos + len(VERDICT_PHRASE)
    for k, start in enumerate(starts):
        if start == end:
            return _verdict_p_yes(tops[k])
        if start > end:
            break
        if start < end < start + len(tokens[k]):
            return None, "verdict_token_merged"
    return None, "verdict_not_generated"


def _chat_tokens(logprobs: Any) -> tuple[list[str], list[dict[str, float]]] | None:
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content:
        return None
    tokens, tops = [], []
    for entry in content:
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            return None
        tokens.append(entry["token"])
        top = {t["token"]: float(t["logprob"]) for t in entry.get("top_logprobs") or []
               if isinstance(t, dict) and isinstance(t.get("token"), str) and t.get("logprob") is not None}
        if entry.get("logprob") is not None:
            top.setdefault(entry["token"], float(entry["logprob"]))
        tops.append(top)
    return tokens, tops


def _completion_tokens(logprobs: Any) -> tuple[list[str], list[dict[str, float]]] | None:
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("tokens"), list):
        return None
    tokens = [t for t in logprobs["tokens"] if isinstance(t, str)]
    raw_tops = logprobs.get("top_logprobs") or []
    tops = [{k: float(v) for k, v in (t or {}).items()} if isinstance(t, dict) else {} for t in raw_tops]
    if len(tokens) != len(logprobs["tokens"]) or not tokens:
        return None
    tops += [{}] * (len(tokens) - len(tops))
    for k, lp in enumerate(logprobs.get("token_logprobs") or []):
        if k < len(tokens) and lp is not None:
            tops[k].setdefault(tokens[k], float(lp))
    return tokens, tops


class OpenAIBackend:
    """Generation backend for an OpenAI-compatible endpoint (see the module docstring)."""

    sampler: str | None = None  # the server's own sampler
    forced_in_generation = False

    def __init__(self, openai_params: OpenAIParams, model: str | None = None):
        self.params = openai_params
        self.model = model or openai_params.model
        self.name = f"openai:{self.model}"
        key = os.environ.get(openai_params.api_key_env) if openai_params.api_key_env else None
        self._secrets: tuple[_Secret, ...] = (_Secret(key),) if key else ()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(
            base_url=openai_params.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(openai_params.timeout_s),
            limits=httpx.Limits(
                max_connections=openai_params.concurrency,
                max_keepalive_connections=openai_params.concurrency,
            ),
            follow_redirects=False,
        )
        self._logprobs = True  # switched off once the server rejects log-probability requests
        self._prompt_logprobs = True  # switched off once the server returns no prompt_logprobs
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"OpenAIBackend(base_url={self.params.base_url!r}, model={self.model!r}, "
            f"concurrency={self.params.concurrency})"
        )

    # ----------------------------------------------------------------------------------
    # HTTP with retries
    # ----------------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret.value, "[redacted]")
        return text

    def _backoff(self, seed: int, attempt: int, retry_after: float | None) -> float:
        base = min(self.params.backoff_max_s, self.params.backoff_base_s * (2**attempt))
        delay = base * random.Random(f"{seed}:{attempt}").uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.params.backoff_max_s)

    def _attempt(self, path: str, body: dict, validate: Callable[[Any], str | None]) -> dict:
        try:
            resp = self._client.post(path, json=body)
        except httpx.TimeoutException:
            raise _RequestFailed(f"timeout after {self.params.timeout_s:g}s", True) from None
        except httpx.TransportError as err:  # refused, dropped, body cut short, ...
            raise _RequestFailed(f"{type(err).__name__}: {err}", True) from None
        if resp.status_code >= 400:
            detail = resp.text[:300].replace("\n", " ")
            raise _RequestFailed(
                f"HTTP {resp.status_code}: {detail}",
                resp.status_code in _RETRY_STATUS or resp.status_code >= 500,
                _retry_after(resp),
            )
        try:
            data = resp.json()
        except ValueError:
            raise _RequestFailed(f"malformed JSON in the response ({len(resp.content)} bytes)", True) from None
        problem = validate(data)
        if problem:
            raise _RequestFailed(problem, True)
        return data

    def _post(self, path: str, body: dict, seed: int) -> tuple[dict | None, str | None, int]:
        """POST with retries: (response, None, attempts) or (None, error text, attempts)."""
        validate = _validate_chat if path.startswith("chat") else _validate_completion
        error = "no attempt made"
        attempt = 0
        while True:
            try:
                return self._attempt(path, body, validate), None, attempt + 1
            except _RequestFailed as failure:
                error = self._redact(str(failure))
                if (
                    not failure.retryable
                    and self._logprobs
                    and ("logprobs" in body or "top_logprobs" in body)
                    and "logprob" in error.lower()
                ):
                    with self._lock:
                        self._logprobs = False  # the server refuses log-probs: ask without them
                    log.warning("%s rejects log-probability requests; continuing without them", self.name)
                    body = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
                    continue
                if not failure.retryable or attempt >= self.params.max_retries:
                    return None, f"{error} (after {attempt + 1} attempt(s))", attempt + 1
                delay = self._backoff(seed, attempt, failure.retry_after)
                log.warning(
                    "%s request failed (%s); retry %d/%d in %.2fs",
                    self.name, error[:120], attempt + 1, self.params.max_retries, delay,
                )
                time.sleep(delay)
                attempt += 1

    # ----------------------------------------------------------------------------------
    # Request bodies
    # ----------------------------------------------------------------------------------

    def _render(self, conversation: Conversation, prefix: str) -> str:
        """Prompt text for /completions: the model's chat template, then the assistant prefix."""
        with self._lock:
            if self._tokenizer is None:
                try:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(self.model)
                except Exception as err:
                    raise BackendError(
                        f"use_chat=false needs the chat template of {self.model!r} to render "
                        f"prompts for /completions, and its tokenizer could not be loaded: {err}"
                    ) from None
        text = self._tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return text + prefix

    def _body(
        self,
        conversation: Conversation,
        prefix: str,
        sampling: SamplingParams,
        n: int,
        seed: int,
        stop: Sequence[str] | None,
        max_tokens: int,
        logprobs: bool,
    ) -> tuple[str, dict]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": seed,
        }
        if n > 1:
            body["n"] = n
        if stop:
            body["stop"] = list(stop)
        if self.params.use_chat:
            messages = list(conversation)
            if prefix:
                messages.append({"role": "assistant", "content": prefix})
                body["continue_final_message"] = True  # vLLM / SGLang extension
                body["add_generation_prompt"] = False
            body["messages"] = messages
            if logprobs:
                body["logprobs"] = True
                body["top_logprobs"] = TOP_LOGPROBS
            return "chat/completions", body
        body["prompt"] = self._render(conversation, prefix)
        if logprobs:
            body["logprobs"] = TOP_LOGPROBS
        return "completions", body

    def _generation(self, choice: dict, usage_tokens: int | None, n_choices: int, seed: int, attempts: int) -> Generation:
        if self.params.use_chat:
            text = choice["message"]["content"]
            parsed = _chat_tokens(choice.get("logprobs"))
        else:
            text = choice["text"]
            parsed = _completion_tokens(choice.get("logprobs"))
        meta: dict[str, Any] = {"seed": seed, "attempts": attempts}
        if parsed is None:
            p_yes, how = None, "no_logprobs_from_server"
            num_tokens = usage_tokens // max(n_choices, 1) if usage_tokens else 0
        else:
            p_yes, how = p_yes_from_token_logprobs(*parsed)
            num_tokens = len(parsed[0])
        meta["p_yes_source"] = how
        finish = choice.get("finish_reason") or "stop"
        return Generation(text=text, p_yes=p_yes, num_tokens=num_tokens, finish_reason=str(finish), meta=meta)

    # ----------------------------------------------------------------------------------
    # GenerationBackend protocol
    # ----------------------------------------------------------------------------------

    def _generate_row(
        self,
        conversation: Conversation,
        prefix: str,
        sampling: SamplingParams,
        seed: int,
        stop: Sequence[str] | None,
    ) -> list[Generation]:
        gens: list[Generation] = []
        requests = 0
        while len(gens) < sampling.n:
            want = sampling.n - len(gens)
            request_seed = row_seed(seed, len(gens)) % SEED_MODULUS
            path, body = self._body(
                conversation, prefix, sampling, want, request_seed, stop, sampling.max_new_tokens, self._logprobs
            )
            data, error, attempts = self._post(path, body, request_seed)
            requests += 1
            if data is None:
                gens.extend(
                    Generation(text="", finish_reason="error", error=error, meta={"seed": request_seed, "attempts": attempts})
                    for _ in range(want)
                )
                break
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0)[:want]
            usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
            usage_tokens = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else None
            for choice in choices:
                gens.append(self._generation(choice, usage_tokens, len(choices), request_seed, attempts))
        for g in gens:
            g.meta["requests"] = requests
        return gens

    def generate_iter(
        self,
        conversations: Sequence[Conversation],
        sampling: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
        assistant_prefixes: Sequence[str] | None = None,
        stop: Sequence[str] | None = None,
    ) -> Iterator[tuple[int, list[Generation]]]:
        """Yield (row, its `sampling.n` generations) as each conversation finishes.

        At most `concurrency` requests are in flight and a few rows are queued ahead; closing
        the iterator early cancels the queued rows (running requests finish first).
        """
        rows = len(conversations)
        seeds, prefixes = request_rows(rows, sampling, seeds, assistant_prefixes)
        if rows == 0:
            return
        window = 4 * self.params.concurrency
        pool = ThreadPoolExecutor(max_workers=min(self.params.concurrency, rows))
        pending: dict[Future, int] = {}
        nxt = 0
        try:
            while nxt < rows or pending:
                while nxt < rows and len(pending) < window:
                    future = pool.submit(self._generate_row, conversations[nxt], prefixes[nxt], sampling, seeds[nxt], stop)
                    pending[future] = nxt
                    nxt += 1
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=pending.__getitem__):
                    yield pending.pop(future), future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

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
        """`sampling.n` generations per conversation, topped up until n; failures as error generations."""
        out: list[list[Generation]] = [[] for _ in conversations]
        with tqdm(total=len(conversations), desc=f"{self.name} generate", unit="prompt", disable=not progress) as bar:
            for i, gens in self.generate_iter(
                conversations, sampling, seeds=seeds, assistant_prefixes=assistant_prefixes, stop=stop
            ):
                out[i] = gens
                bar.update(1)
        return out

    def _verdict_row(self, conversation: Conversation, prefix: str) -> float | None:
        greedy = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=1, seed=0)
        path, body = self._body(conversation, prefix, greedy, 1, 0, None, 1, True)
        data, _error, _attempts = self._post(path, body, 0)
        if data is None:
            return None
        choice = data["choices"][0]
        parsed = _chat_tokens(choice.get("logprobs")) if self.params.use_chat else _completion_tokens(choice.get("logprobs"))
        if parsed is not None:
            p_yes, how = _verdict_p_yes(parsed[1][0])
            if p_yes is not None or how == "verdict_tokens_impossible":
                return p_yes
        return self.exact_verdict_probability(conversation, prefix)

    def _last_prompt_logprob(self, conversation: Conversation, text: str, token_text: str) -> float | None:
        """Log-probability of the last prompt token of conversation + `text` (vLLM's
        `prompt_logprobs`), if the server returns it and that token's text is `token_text`."""
        greedy = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=1, seed=0)
        path, body = self._body(conversation, text, greedy, 1, 0, None, 1, False)
        body["prompt_logprobs"] = 0
        data, error, _attempts = self._post(path, body, 0)
        if data is None:
            if error is not None and error.startswith("HTTP 4"):  # the server refuses the extension
                with self._lock:
                    self._prompt_logprobs = False
            return None
        holder = data if self.params.use_chat else data["choices"][0]
        entries = holder.get("prompt_logprobs")
        if not isinstance(entries, list) or not entries or not isinstance(entries[-1], dict):
            with self._lock:
                self._prompt_logprobs = False
            log.warning("%s returns no prompt_logprobs; teacher-forced P(Yes) needs both verdict tokens "
                        "in the top %d log-probabilities", self.name, TOP_LOGPROBS)
            return None
        for entry in entries[-1].values():
            if isinstance(entry, dict) and entry.get("decoded_token") == token_text:
                value = entry.get("logprob")
                return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        return None  # the server tokenized the verdict token differently (merged with the text before)

    def exact_verdict_probability(self, conversation: Conversation, prefix: str) -> float | None:
        """Teacher-forced P(Yes) from the log-probabilities of prefix + " Yes" and prefix + " No" as
        prompts (vLLM's `prompt_logprobs`; exact whatever their rank). None where unsupported."""
        if not self._prompt_logprobs:
            return None
        ly = self._last_prompt_logprob(conversation, prefix + YES_TOKEN_TEXT, YES_TOKEN_TEXT)
        if ly is None:
            return None
        ln = self._last_prompt_logprob(conversation, prefix + NO_TOKEN_TEXT, NO_TOKEN_TEXT)
        if ln is None or (math.isinf(ly) and math.isinf(ln)):
            return None
        return two_way_softmax(ly, ln)

    def verdict_probability(
        self, conversations: Sequence[Conversation], prefixes: Sequence[str]
    ) -> list[float | None]:
        """Teacher-forced P(Yes) of the first token after conversation + prefix; None if unsupported."""
        if len(prefixes) != len(conversations):
            raise ValueError("one prefix per conversation")
        if not conversations:
            return []
        with ThreadPoolExecutor(max_workers=min(self.params.concurrency, len(conversations))) as pool:
            return list(pool.map(self._verdict_row, conversations, prefixes))

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()


def _validate_choices(data: Any, field: Callable[[dict], Any]) -> str | None:
    if not isinstance(data, dict):
        return "malformed response: not a JSON object"
    if "error" in data and not data.get("choices"):
        return f"server error object: {str(data['error'])[:200]}"
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        return "empty choices in the response"
    for c in choices:
        if not isinstance(c, dict) or not isinstance(field(c), str):
            return "malformed choice in the response"
    return None


def _validate_chat(data: Any) -> str | None:
    return _validate_choices(data, lambda c: (c.get("message") or {}).get("content") if isinstance(c.get("message"), dict) else None)


def _validate_completion(data: Any) -> str | None:
    return _validate_choices(data, lambda c: c.get("text"))
