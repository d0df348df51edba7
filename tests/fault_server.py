"""A real OpenAI-compatible HTTP server on 127.0.0.1 that injects faults on demand (for tests).

It speaks HTTP/1.1 over a real socket (stdlib `ThreadingHTTPServer`, one thread per
connection) and answers `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`
and `GET /health`. Each POST is served as one *kind*, taken first from a FIFO script, else drawn
with probability `fault_rate` from `fault_kinds` (seeded), else `ok`:

- `ok`: a well-formed answer with at most `max_choices` choices (`transformers serve` returns
  one whatever `n` asks), optional log-probabilities (`logprobs=True`: top log-probs of " Yes"
  and " No" at the token after the verdict phrase, or `verdict_top` there to inject a top list
  that lacks one of them or spells them otherwise; `probe_top` does the same for one-token
  teacher-forced requests), vLLM's `prompt_logprobs` extension when `prompt_logprobs=True` (the
  log-probability of a prompt ending in " Yes" / " No" is log p_yes / log(1 - p_yes)), optional
  streaming (SSE) when asked;
- `500`, `503`, `429`: that status with a JSON error body (and `Retry-After` if configured;
  with `echo_auth_in_errors` the body repeats the request's Authorization header, as a careless
  proxy might, to test that clients redact it);
- `400_logprobs`: a 400 saying log-probabilities are not supported (hosted APIs do this);
- `timeout`: holds the request `hang_s` seconds before answering (the client times out first);
- `drop`: closes the connection without any response;
- `malformed`: status 200 with a body that is not JSON;
- `empty`: status 200 with `"choices": []`;
- `cut`: status 200 announcing the full Content-Length (or, when streaming, a chunked SSE
  body), sends about half of it, then closes the connection.

Every request is recorded (path, headers, JSON body, kind served) so tests can assert what the
client sent, e.g. that an API key travels only in the `Authorization` header. The default
answer text is a short R-PRM analysis whose verdict is a deterministic function of the request
`seed`, the choice index and the last user message, so seeded clients get reproducible text.

Usage::

    with FaultServer(script=["503", "drop"], logprobs=True) as server:
        params = OpenAIParams(base_url=server.base_url, ...)
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VERDICT_PREFIX = "Verification: Is the step correct (Yes/No)?"
KINDS = ("ok", "500", "503", "429", "400_logprobs", "timeout", "drop", "malformed", "empty", "cut")


@dataclass
class RecordedRequest:
    """One request as the server received it."""

    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes
    kind: str


def default_responder(body: dict, index: int) -> str:
    """A short analysis whose verdict depends only on (seed, choice index, last user message)."""
    messages = body.get("messages") or []
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), body.get("prompt", ""))
    digest = hashlib.sha256(f"{body.get('seed')}:{index}:{last}".encode()).digest()
    verdict = "Yes" if digest[0] % 3 else "No"
    return (
        "Analysis:\n**Now Step Analysis**: The Now Step is checked against the Previous Steps.\n"
        f"**Calculation Analysis**: Checked (draw {digest[1]}).\n"
        f"Conclusion: Judged by the fault server.\n{VERDICT_PREFIX} {verdict}"
    )


def _tokens(text: str) -> list[str]:
    return re.findall(r"\s*\S+|\s+", text)


class FaultServer:
    """OpenAI-compatible server with scripted or random faults; see the module docstring."""

    def __init__(
        self,
        *,
        script: Iterable[str] = (),
        fault_rate: float = 0.0,
        fault_kinds: Iterable[str] = ("500",),
        seed: int = 0,
        max_choices: int = 1,
        logprobs: bool = False,
        p_yes: float = 0.8,
        verdict_top: dict[str, float] | None = None,
        probe_top: dict[str, float] | None = None,
        prompt_logprobs: bool = False,
        responder: Callable[[dict, int], str] | None = None,
        delay_s: float = 0.0,
        hang_s: float = 5.0,
        retry_after: float | None = None,
        echo_auth_in_errors: bool = False,
    ):
        for kind in [*script, *fault_kinds]:
            if kind not in KINDS:
                raise ValueError(f"unknown fault kind {kind!r}; expected one of {KINDS}")
        self.script = list(script)
        self.fault_rate = fault_rate
        self.fault_kinds = list(fault_kinds)
        self.rng = random.Random(seed)
        self.max_choices = max_choices
        self.logprobs = logprobs
        self.p_yes = p_yes
        self.verdict_top = verdict_top
        self.probe_top = probe_top
        self.prompt_logprobs = prompt_logprobs
        self.responder = responder or default_responder
        self.delay_s = delay_s
        self.hang_s = hang_s
        self.retry_after = retry_after
        self.echo_auth_in_errors = echo_auth_in_errors
        self.requests: list[RecordedRequest] = []
        self.served: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL (ends in /v1)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FaultServer:
        """Bind 127.0.0.1 on a free port and serve in a background thread."""
        handler = type("Handler", (_Handler,), {"fault_server": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fault-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port (hanging requests are released first)."""
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- behaviour ----------------------------------------------------------------------

    def push(self, *kinds: str) -> None:
        """Append kinds to the script (served before any random fault)."""
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self.script.extend(kinds)

    def next_kind(self) -> str:
        with self._lock:
            if self.script:
                kind = self.script.pop(0)
            elif self.fault_rate and self.rng.random() < self.fault_rate:
                kind = self.rng.choice(self.fault_kinds)
            else:
                kind = "ok"
            self.served[kind] = self.served.get(kind, 0) + 1
            return kind

    def _logprob_entries(self, text: str) -> list[tuple[str, dict[str, float]]]:
        toks = _tokens(text)
        out, so_far = [], ""
        for tok in toks:
            top = {tok: -0.05}
            if so_far.endswith(VERDICT_PREFIX.split("Verification: ")[1]) and tok.strip() in ("Yes", "No"):
                top = dict(self.verdict_top) if self.verdict_top is not None else self._verdict_pair()
            out.append((tok, top))
            so_far += tok
        return out

    def _verdict_pair(self) -> dict[str, float]:
        return {" Yes": math.log(self.p_yes), " No": math.log(1.0 - self.p_yes)}

    def _prompt_logprobs(self, body: dict) -> list[dict[str, dict[str, Any]] | None]:
        """vLLM-style prompt log-probabilities: only the prompt's last token is scored here."""
        messages = body.get("messages") or []
        text = messages[-1].get("content", "") if messages else body.get("prompt", "")
        last = next((t for t in (" Yes", " No") if text.endswith(t)), _tokens(text)[-1] if text else "")
        lp = {" Yes": math.log(self.p_yes), " No": math.log(1.0 - self.p_yes)}.get(last, -0.05)
        return [None, {"1": {"logprob": lp, "rank": 1, "decoded_token": last}}]

    def answer(self, path: str, body: dict) -> dict:
        """The `ok` JSON answer to a request."""
        n = int(body.get("n") or 1)
        k = max(1, min(n, self.max_choices))
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        chat = path.endswith("/chat/completions")
        choices, total = [], 0
        for i in range(k):
            if max_tokens == 1:  # a teacher-forced verdict probe: the greedy token of its top list
                probe = self.probe_top if self.probe_top is not None else self._verdict_pair()
                text = max(probe, key=probe.__getitem__)
            else:
                text = self.responder(body, i)
            entries = self._logprob_entries(text) if max_tokens != 1 else [
                (text, dict(self.probe_top) if self.probe_top is not None else self._verdict_pair())
            ]
            total += len(entries)
            want_lp = self.logprobs and (body.get("logprobs") not in (None, False, 0))
            if chat:
                choice: dict[str, Any] = {
                    "index": i, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text},
                }
                if want_lp:
                    choice["logprobs"] = {"content": [
                        {"token": t, "logprob": top.get(t, -0.05),
                         "top_logprobs": [{"token": a, "logprob": b} for a, b in top.items()]}
                        for t, top in entries
                    ]}
            else:
                choice = {"index": i, "finish_reason": "stop", "text": text}
                if self.prompt_logprobs and body.get("prompt_logprobs") is not None:
                    choice["prompt_logprobs"] = self._prompt_logprobs(body)
                if want_lp:
                    offsets, pos = [], 0
                    for t, _ in entries:
                        offsets.append(pos)
                        pos += len(t)
                    choice["logprobs"] = {
                        "tokens": [t for t, _ in entries],
                        "token_logprobs": [top.get(t, -0.05) for t, top in entries],
                        "top_logprobs": [top for _, top in entries],
                        "text_offset": offsets,
                    }
            choices.append(choice)
        answer = {
            "id": f"cmpl-{len(self.requests)}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model", "fault-server"),
            "choices": choices,
            "usage": {"prompt_tokens": 10, "completion_tokens": total, "total_tokens": 10 + total},
        }
        if chat and self.prompt_logprobs and body.get("prompt_logprobs") is not None:
            answer["prompt_logprobs"] = self._prompt_logprobs(body)
        return answer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fault_server: FaultServer

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        return

    def _send_json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
        raw = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def _hard_close(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        if self.path.rstrip("/") in ("/health", "/v1/health"):
            self._send_json(200, {"status": "ok"})
        elif self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": "fault-server", "object": "model"}]})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        server = self.fault_server
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw.decode("utf-8")) if raw else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        path = self.path.rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})
            return
        if not isinstance(body, dict):
            self._send_json(400, {"error": {"message": "request body is not a JSON object"}})
            return
        kind = server.next_kind()
        with server._lock:
            server.requests.append(RecordedRequest(path, dict(self.headers.items()), body, raw, kind))
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            self._serve(kind, path, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            with server._lock:
                server.in_flight -= 1

    def _serve(self, kind: str, path: str, body: dict) -> None:
        server = self.fault_server
        if kind in ("500", "503", "429"):
            extra = {"Retry-After": f"{server.retry_after:g}"} if server.retry_after is not None else None
            message = f"injected {kind}"
            if server.echo_auth_in_errors:  # a careless proxy that echoes credentials back
                message += f" (you sent Authorization: {self.headers.get('Authorization')})"
            self._send_json(int(kind), {"error": {"message": message, "type": "server_error"}}, extra)
            return
        if kind == "400_logprobs":
            if body.get("logprobs") not in (None, False, 0):
                self._send_json(400, {"error": {"message": "logprobs is not supported for this model"}})
                return
            kind = "ok"
        if kind == "drop":
            self._hard_close()
            return
        if kind == "malformed":
            raw = b'{"id": "x", "choices": [{"message": {"content": "Analysis'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            return
        if kind == "empty":
            self._send_json(200, {"id": "x", "object": "chat.completion", "choices": [], "model": "fault-server"})
            return
        if kind == "timeout":
            if server._stop.wait(server.hang_s):
                self._hard_close()
                return
        elif server.delay_s:
            server._stop.wait(server.delay_s)
        answer = server.answer(path, body)
        if body.get("stream"):
            self._stream(answer, cut=kind == "cut")
            return
        raw = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if kind == "cut":
            self.wfile.write(raw[: len(raw) // 2])
            self._hard_close()
            return
        self.wfile.write(raw)

    def _stream(self, answer: dict, cut: bool) -> None:
        """Server-sent events, chunked; `cut` stops half way without the final chunk."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = []
        for choice in answer["choices"]:
            text = choice.get("message", {}).get("content", choice.get("text", ""))
            for tok in _tokens(text):
                events.append({"id": answer["id"], "object": "chat.completion.chunk", "model": answer["model"],
                               "choices": [{"index": choice["index"], "delta": {"content": tok}, "finish_reason": None}]})
            events.append({"id": answer["id"], "object": "chat.completion.chunk", "model": answer["model"],
                           "choices": [{"index": choice["index"], "delta": {}, "finish_reason": "stop"}]})
        lines = [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]
        if cut:
            lines = lines[: max(1, len(lines) // 2)]
        for line in lines:
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()
        if cut:
            self._hard_close()
            return
        self.wfile.write(b"0\r\n\r\n")

