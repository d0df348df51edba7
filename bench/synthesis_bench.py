"""Section d: synthesis throughput of the `openai` teacher, concurrent against sequential.

Both runs go through the synthesis stage's own teacher loop (`synthesis.generate_analyses`,
journal included) with a `BackendTeacher` over the `openai` backend, against a real
OpenAI-compatible HTTP server on 127.0.0.1: tests/fault_server.py in no-fault mode with a fixed
per-request latency standing in for a model server's time per request.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from bench.common import ROOT, SectionResult, ratio, timed
from components import synthesis
from components.backends.openai import OpenAIBackend
from components.config import load_params
from components.records import Solution, StepSample
from components.teachers import BackendTeacher

FAULT_SERVER = ROOT / "tests" / "fault_server.py"


def _fault_server() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rprm_tests_fault_server", FAULT_SERVER)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{FAULT_SERVER}: the local OpenAI-compatible server is missing")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def step_samples(solutions: list[Solution], count: int) -> list[StepSample]:
    """`count` labelled step samples cut from ProcessBench solutions (label from the first error)."""
    out: list[StepSample] = []
    for sol in solutions:
        for i, step in enumerate(sol.steps):
            if len(out) == count:
                return out
            first = sol.first_error if sol.first_error is not None else -1
            if first == -1 or i < first:
                label: bool | None = True
            elif i == first:
                label = False
            else:
                label = None  # after the first error ProcessBench says nothing
            out.append(StepSample(
                id=f"{sol.id}-{i}", problem_id=sol.id, question=sol.question,
                previous_steps=sol.steps[:i], now_step=step, step_index=i, label=label,
                source="processbench",
            ))
    return out


def bench_synthesis(
    solutions: list[Solution], *, samples: int, n: int, concurrency: int, latency_s: float
) -> SectionResult:
    """Time the teacher loop at concurrency 1 and `concurrency` on the same step samples."""
    res = SectionResult("d_synthesis")
    fs = _fault_server()
    labelled = [s for s in step_samples(solutions, samples * 2) if s.label is not None][:samples]
    items = synthesis.select_samples(labelled, [], None, 42)
    runs: dict[int, dict] = {}
    with fs.FaultServer(max_choices=n, logprobs=False, delay_s=latency_s) as server:
        for conc in (1, concurrency):
            params = load_params(ROOT / "params.yaml")
            params.teacher.kind = "backend"
            params.teacher.backend.kind = "openai"
            params.teacher.sampling.n = n
            o = params.teacher.backend.openai
            o.base_url, o.concurrency, o.api_key_env, o.model = server.base_url, conc, None, "bench-teacher"
            before = len(server.requests)
            server.max_in_flight = 0
            teacher = BackendTeacher(OpenAIBackend(o))
            with tempfile.TemporaryDirectory(prefix="rprm-bench-synth-") as tmp, timed() as t:
                results, _ = synthesis.generate_analyses(items, teacher, params, Path(tmp) / "journal.jsonl")
            teacher.close()
            analyses = sum(len(v) for v in results.values())
            errors = sum(1 for v in results.values() for g in v if g.get("error"))
            runs[conc] = {
                **t.as_dict(),
                "analyses": analyses,
                "errors": errors,
                "requests": len(server.requests) - before,
                "max_in_flight": server.max_in_flight,
                "analyses_per_s": round(analyses / t.wall_s, 2),
                "steps_per_s": round(len(items) / t.wall_s, 2),
            }
    seq, par = runs[1], runs[concurrency]
    speedup = ratio(par["analyses_per_s"], seq["analyses_per_s"])
    res.data = {
        "server": "tests/fault_server.py FaultServer, no faults, 127.0.0.1",
        "per_request_latency_s": latency_s,
        "step_samples": len(items),
        "n": n,
        "concurrency": concurrency,
        "sequential": seq,
        "concurrent": par,
        "speedup": speedup,
        "ideal_speedup": float(concurrency),
    }
    res.rows = [
        (f"openai teacher: analyses/s (concurrency {concurrency} vs 1)",
         f"{par['analyses_per_s']:.1f} vs {seq['analyses_per_s']:.1f}",
         f"**{speedup}x** (ideal {concurrency}x); {len(items)} steps x n={n}; {latency_s * 1000:.0f} ms per request; "
         f"max in flight {par['max_in_flight']}; errors {par['errors'] + seq['errors']}"),
    ]
    return res
