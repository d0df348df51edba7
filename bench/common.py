"""Shared bench machinery: counting backend wrapper, memory sampler, timers, inputs, seeds."""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.backends.base import Generation
from components.config import DataParams, SamplingParams
from components.records import PROCESSBENCH_SUBSETS, ProcessBenchItem, Solution

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data" / "bundled"
SHARED = (ROOT / ".." / "shared" / "data").resolve()
RESULTS = ROOT / "bench" / "results"


# --------------------------------------------------------------------------------------
# Backend wrapper: counts calls, rows and generated tokens without changing any result.
# --------------------------------------------------------------------------------------


@dataclass
class BackendCounters:
    """What a wrapped backend was asked to do."""

    generate_calls: int = 0
    generated_rows: int = 0
    generated_tokens: int = 0
    reached_verdict: int = 0
    largest_call_rows: int = 0
    verdict_probability_calls: int = 0
    verdict_probability_rows: int = 0

    def as_dict(self) -> dict[str, int]:
        """Plain dict for the JSON report."""
        return dict(self.__dict__)


class CountingBackend:
    """A GenerationBackend that forwards to `inner` and counts calls, rows and tokens."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.counters = BackendCounters()

    def reset(self) -> BackendCounters:
        """Start new counters; return the old ones."""
        old, self.counters = self.counters, BackendCounters()
        return old

    def generate(
        self,
        conversations: Sequence[list[dict[str, str]]],
        sampling: SamplingParams,
        **kwargs: Any,
    ) -> list[list[Generation]]:
        """Forward to the wrapped backend and count what came back."""
        out = self.inner.generate(conversations, sampling, **kwargs)
        c = self.counters
        rows = sum(len(gens) for gens in out)
        c.generate_calls += 1
        c.generated_rows += rows
        c.largest_call_rows = max(c.largest_call_rows, rows)
        for gens in out:
            for g in gens:
                c.generated_tokens += g.num_tokens
                c.reached_verdict += g.p_yes is not None
        return out

    def verdict_probability(
        self, conversations: Sequence[list[dict[str, str]]], prefixes: Sequence[str]
    ) -> list[float | None]:
        """Forward the teacher-forced pass and count its rows."""
        self.counters.verdict_probability_calls += 1
        self.counters.verdict_probability_rows += len(prefixes)
        return self.inner.verdict_probability(conversations, prefixes)

    def close(self) -> None:
        """Close the wrapped backend."""
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# Peaks seen before measure_memory reset the kernel's high-water mark (which getrusage reads too).
_peak_before_resets = 0


def maxrss_bytes() -> int:
    """Peak resident set size of this process so far (getrusage; kB on Linux), across resets."""
    return max(_peak_before_resets, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _hwm_bytes() -> int | None:
    """The kernel's RSS high-water mark of this process (VmHWM; None where unavailable)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0); False if not allowed."""
    global _peak_before_resets
    before = _hwm_bytes()
    if before is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    _peak_before_resets = max(_peak_before_resets, before)
    after = _hwm_bytes()
    return after is not None and after <= before


@dataclass
class MemoryReport:
    """Peak memory of one measured phase."""

    rss_start_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_peak_delta_mb: float = 0.0
    tracemalloc_peak_mb: float | None = None
    torch_peak_mb: float | None = None
    torch_peak_note: str = ""
    rss_peak_source: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for the JSON report."""
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class _RssSampler(threading.Thread):
    def __init__(self, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak = rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, rss_bytes())


def _torch_cuda() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


@contextmanager
def measure_memory(*, python_heap: bool = False, interval_s: float = 0.005) -> Iterator[MemoryReport]:
    """Peak RSS of the block; optionally trace the Python heap (slows Python).

    On Linux the kernel's own high-water mark is reset before the block and read after it
    (exact, and costs nothing while the block runs); elsewhere a thread samples RSS every
    `interval_s` (it takes the GIL that often, which slows a Python-heavy block measurably).
    The torch peak is read from the CUDA allocator when a GPU is in use; on CPU torch keeps
    no peak statistic, so RSS is the measure (it includes every tensor).
    """
    report = MemoryReport()
    torch_cuda = _torch_cuda()
    if torch_cuda is not None:
        torch_cuda.cuda.reset_peak_memory_stats()
    if python_heap:
        tracemalloc.start()
    start = rss_bytes()
    kernel_peak = _reset_hwm()
    sampler = None if kernel_peak else _RssSampler(interval_s)
    if sampler is not None:
        sampler.start()
    report.rss_peak_source = "kernel high-water mark (VmHWM)" if kernel_peak else f"sampled every {interval_s * 1000:g} ms"
    try:
        yield report
    finally:
        peak = sampler.stop() if sampler is not None else max(_hwm_bytes() or 0, rss_bytes())
        report.rss_start_mb = start / 2**20
        report.rss_peak_mb = peak / 2**20
        report.rss_peak_delta_mb = (peak - start) / 2**20
        if python_heap:
            report.tracemalloc_peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        if torch_cuda is not None:
            report.torch_peak_mb = torch_cuda.cuda.max_memory_allocated() / 2**20
            report.torch_peak_note = "torch.cuda.max_memory_allocated"
        else:
            report.torch_peak_note = "CPU: torch keeps no peak statistic; RSS includes tensors"


# --------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock and process CPU seconds of one measured block."""

    wall_s: float = 0.0
    cpu_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """Plain dict for the JSON report."""
        return {"wall_s": round(self.wall_s, 4), "cpu_s": round(self.cpu_s, 4)}


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        for kid in kids:
            out.append(kid)
            out.extend(_descendants(kid))
    return out


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def tree_cpu_seconds() -> float:
    """CPU seconds of this process, its live descendants (e.g. vLLM's engine workers) and its
    reaped children."""
    t = os.times()
    live = sum(_proc_cpu(pid) for pid in _descendants(os.getpid()))
    return time.process_time() + live + t.children_user + t.children_system


@contextmanager
def timed() -> Iterator[Timing]:
    """Measure wall time and CPU time of this process tree (CPU time is steadier on a shared
    machine; it includes engine worker processes such as vLLM's)."""
    t = Timing()
    w0, c0 = time.perf_counter(), tree_cpu_seconds()
    try:
        yield t
    finally:
        t.wall_s = time.perf_counter() - w0
        t.cpu_s = tree_cpu_seconds() - c0


def ratio(a: float, b: float) -> float | None:
    """a / b, or None when b is zero."""
    return round(a / b, 3) if b else None


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return statistics.median(values)


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def to_solution(item: ProcessBenchItem) -> Solution:
    """A ProcessBench item as a Solution to score (first_error = the gold label)."""
    return Solution(
        id=item.id, question=item.problem, steps=item.steps, first_error=item.label, subset=item.subset
    )


def load_processbench(
    folder: str | Path, subsets: Sequence[str] = PROCESSBENCH_SUBSETS
) -> list[ProcessBenchItem]:
    """Every ProcessBench item of `subsets` in `folder` (laid out like data/bundled), validated."""
    from components import data

    folder = Path(folder)
    params = DataParams(source="dir", dir=str(folder), bundled_dir=str(folder))
    present = [s for s in subsets if (folder / "processbench" / f"{s}.jsonl").exists()]
    return data.load_processbench(params, present, source="dir") if present else []


def round_robin(items: Sequence[ProcessBenchItem], count: int) -> list[ProcessBenchItem]:
    """`count` items taken in turn from each subset (file order within a subset)."""
    by_subset: dict[str, list[ProcessBenchItem]] = {}
    for item in items:
        by_subset.setdefault(item.subset, []).append(item)
    out: list[ProcessBenchItem] = []
    queues = [list(v) for v in by_subset.values()]
    while len(out) < count and any(queues):
        for q in queues:
            if q and len(out) < count:
                out.append(q.pop(0))
    return out


def stratified_sample(items: Sequence[ProcessBenchItem], count: int, seed: int = 0) -> list[ProcessBenchItem]:
    """About `count` items, an equal seeded random share of each subset (file order kept)."""
    import random

    by_subset: dict[str, list[ProcessBenchItem]] = {}
    for item in items:
        by_subset.setdefault(item.subset, []).append(item)
    per = max(1, count // max(1, len(by_subset)))
    out: list[ProcessBenchItem] = []
    for subset, group in by_subset.items():
        rng = random.Random(f"{seed}:{subset}")
        picked = sorted(rng.sample(range(len(group)), min(per, len(group))))
        out.extend(group[i] for i in picked)
    return out[:count]


def oracle_early_exit_savings(items: Sequence[ProcessBenchItem]) -> dict[str, float]:
    """Share of step scorings early exit saves when predictions equal the gold first error
    (steps 0..label of an erroneous solution, every step of a correct one), per subset and all."""
    steps: dict[str, int] = {}
    used: dict[str, int] = {}
    for item in items:
        for key in (item.subset, "all"):
            steps[key] = steps.get(key, 0) + len(item.steps)
            used[key] = used.get(key, 0) + (item.label + 1 if item.label != -1 else len(item.steps))
    return {k: round(100 * (1 - used[k] / steps[k]), 2) for k in steps if steps[k]}


def solution_chars(item: ProcessBenchItem) -> int:
    """Length of the longest prompt a solution produces (question plus every step)."""
    return len(item.problem) + sum(len(s) for s in item.steps)


def longest(items: Sequence[ProcessBenchItem], count: int) -> list[ProcessBenchItem]:
    """The `count` items with the longest text (the last step's prompt is the longest)."""
    return sorted(items, key=solution_chars, reverse=True)[:count]


@dataclass
class SectionResult:
    """One bench section: its numbers and the markdown rows that summarise it."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # metric, value, target/note
