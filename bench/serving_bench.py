"""Section s: the PRM as a reward service, `mlflow models serve` under load against in-process scoring.

The same model folder, scoring params and solutions on both sides. In-process: one
`StepScorer.score` call over every solution (full scoring, the backend batches them). Served:
the model saved as the registered pyfunc (`registry.pyfunc_spec`, the code `rprm register`
logs), `mlflow models serve --env-manager local` on 127.0.0.1 (one worker), and the solutions
sent as batched requests (`batch` rows each) by 1, then N concurrent clients drawing from one
queue; the server's `CombiningBatcher` merges what arrives while a batch is being scored.
Throughput is scored solutions per second of wall time (server start-up and one warm-up
request excluded; the in-process side gets the same warm-up). Rewards are checked to agree: every solution's served step rewards against
the in-process ones (sampling is seeded per solution and step, so batching does not change
them beyond float noise).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import SectionResult
from components.config import BackendParams, Params, ScoringParams
from components.records import Solution

AGREEMENT_TOLERANCE = 1e-3  # largest |served - in-process| step reward still counted as agreeing
WARM_UP = Solution(id="warm-up", question="What is 1 + 1?", steps=["1 + 1 = 2."])  # untimed, both sides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_pyfunc(model_path: Path, scoring: ScoringParams, backend: BackendParams, dest: Path) -> Path:
    """The PRM saved as the pyfunc `rprm register` logs (same code, config and signature)."""
    import mlflow

    from components import registry

    params = Params()
    params.scoring = scoring.model_copy(deep=True)
    params.backend = backend.model_copy(deep=True)
    with warnings.catch_warnings(), registry.pyfunc_spec(params, model_path, "bench") as spec:
        # no input example on purpose, as in `rprm register`
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        mlflow.pyfunc.save_model(path=str(dest), **spec)
    return dest


class Server:
    """`mlflow models serve` of a saved pyfunc on 127.0.0.1 (context manager; stopped on exit)."""

    def __init__(self, model_dir: Path, log: Path, startup_s: float = 300.0, threads: int = 0):
        self.model_dir, self.log, self.startup_s, self.threads = model_dir, log, startup_s, threads
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_wall_s = 0.0

    def __enter__(self) -> Server:
        import httpx

        port = _free_port()
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{self.log.parent / 'mlflow.db'}"}
        if self.threads:  # the server's torch threads, as the in-process side's (OMP_NUM_THREADS)
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        t0 = time.perf_counter()
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(self.model_dir), "--env-manager",
                 "local", "-h", "127.0.0.1", "-p", str(port), "-t", "600"],
                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=self.log.parent, start_new_session=True,
            )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"server not up in {self.startup_s:g} s: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        self.startup_wall_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _records(solutions: Sequence[Solution]) -> list[dict[str, Any]]:
    return [{"id": s.id, "question": s.question, "steps": list(s.steps)} for s in solutions]


def load_test(url: str, solutions: Sequence[Solution], batch: int, clients: int) -> dict[str, Any]:
    """Send `solutions` in requests of `batch` rows from `clients` concurrent clients; time it."""
    import httpx

    work: queue.Queue[list[Solution]] = queue.Queue()
    for start in range(0, len(solutions), batch):
        work.put(list(solutions[start:start + batch]))
    requests = work.qsize()
    rewards: dict[str, list[float | None]] = {}
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                try:
                    chunk = work.get_nowait()
                except queue.Empty:
                    return
                t0 = time.perf_counter()
                r = http.post(f"{url}/invocations", json={"dataframe_records": _records(chunk)})
                took = time.perf_counter() - t0
                with lock:
                    latencies.append(took)
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                        continue
                    for pred in r.json()["predictions"]:
                        rewards[pred["id"]] = pred["step_rewards"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "clients": clients, "batch": batch, "requests": requests, "solutions": len(rewards), "errors": errors,
        "wall_s": round(wall, 3), "solutions_per_s": round(len(rewards) / wall, 3) if wall else None,
        "latency_median_s": round(latencies[len(latencies) // 2], 3) if latencies else None,
        "latency_max_s": round(latencies[-1], 3) if latencies else None,
        "rewards": rewards,
    }


def bench_serving(
    backend: Any,
    model_path: Path,
    solutions: Sequence[Solution],
    scoring: ScoringParams,
    backend_params: BackendParams,
    *,
    batch: int = 4,
    clients: Sequence[int] = (1, 4),
    threads: int = 0,
) -> SectionResult:
    """Scored solutions per second: served (batched requests, 1 and N clients) vs in-process; the
    server runs with `threads` torch threads (0: torch's default), as the in-process side."""
    from components.scoring import StepScorer

    n_steps = sum(len(s.steps) for s in solutions)
    scorer = StepScorer(backend, scoring, early_exit=False, progress=False)
    scorer.score([WARM_UP])  # as the server gets one warm-up request before it is timed
    t0 = time.perf_counter()
    local = {s.id: s.step_rewards for s in scorer.score(list(solutions))}
    inproc_wall = time.perf_counter() - t0
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rprm-serving-bench-") as tmp:
        model_dir = save_pyfunc(model_path, scoring, backend_params, Path(tmp) / "pyfunc")
        with Server(model_dir, Path(tmp) / "serve.log", threads=threads) as server:
            warm = load_test(server.url, [WARM_UP], 1, 1)
            if warm["errors"]:
                raise RuntimeError(f"warm-up request failed: {warm['errors'][0]}")
            for c in clients:
                runs.append(load_test(server.url, solutions, batch, c))
            startup = server.startup_wall_s
    worst = 0.0
    missing = 0
    for run in runs:
        for sid, want in local.items():
            got = run["rewards"].get(sid)
            if got is None or len(got) != len(want):
                missing += 1
                continue
            worst = max([worst, *(abs(a - b) for a, b in zip(got, want, strict=True) if a is not None and b is not None)])
    agree = missing == 0 and worst <= AGREEMENT_TOLERANCE and not any(r["errors"] for r in runs)
    inproc_rate = len(solutions) / inproc_wall if inproc_wall else None
    data = {
        "solutions": len(solutions), "steps": n_steps, "k": scoring.sampling.n,
        "max_new_tokens": scoring.sampling.max_new_tokens, "batch": batch,
        "in_process": {"wall_s": round(inproc_wall, 3), "solutions_per_s": round(inproc_rate or 0.0, 3)},
        "served": [{k: v for k, v in r.items() if k != "rewards"} for r in runs],
        "server_startup_s": round(startup, 1), "server_threads": threads or "torch default",
        "rewards_agree": agree, "max_reward_difference": worst, "missing_or_failed": missing,
        "tolerance": AGREEMENT_TOLERANCE,
    }
    rows = [("in-process solutions/s", f"{data['in_process']['solutions_per_s']:.2f}",
             f"{len(solutions)} solutions, {n_steps} steps, K={scoring.sampling.n}, one scorer call")]
    for r in data["served"]:
        rel = f"{r['solutions_per_s'] / inproc_rate:.2f}x in-process" if inproc_rate and r["solutions_per_s"] else ""
        rows.append((f"served solutions/s, {r['clients']} client(s)", f"{r['solutions_per_s']:.2f}",
                     f"{r['requests']} requests of {batch} rows; median latency {r['latency_median_s']} s; {rel}"))
    rows.append(("served rewards agree with in-process", "pass" if agree else "FAIL",
                 f"max |diff| {worst:.2g} (tolerance {AGREEMENT_TOLERANCE:g}); server start-up {startup:.0f} s"))
    return SectionResult("s_serving", data, rows)
