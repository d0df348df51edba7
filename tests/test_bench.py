"""Smoke test of the benchmark harness (bench/run.py) on a tiny input with tiny K.

It runs the real command end to end (every section, the tiny verdict model, a few steps, short
analyses) into a temporary folder and checks the report's structure and its correctness checks:
the naive baseline sees the same analyses and gives the same step rewards as the scorer, early
exit gives the same predictions, the teacher runs without errors. No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.backends.base import row_seed, single_sample_seed

ROOT = Path(__file__).resolve().parents[1]


def test_single_sample_seed_maps_onto_the_scorers_streams() -> None:
    for seed in (0, 1, 12345, 2**31 - 2):
        for j in range(6):
            assert row_seed(single_sample_seed(seed, j), 0) == row_seed(seed, j)
    assert single_sample_seed(7, 0) == 7


def test_auto_threads_follow_what_other_processes_use_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--threads auto` pins one thread while another process spins, torch's default otherwise."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.run import busy_cores, choose_threads

    assert choose_threads(3, None) == (3, "--threads")
    assert choose_threads("auto", 0.1, "x")[0] == 0 and choose_threads("auto", None)[0] == 0
    assert choose_threads("auto", 0.9, "x")[0] == 1
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 30\nwhile time.time() < t: pass"])
    try:
        time.sleep(0.3)
        busy, source = busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert source.startswith("/proc/stat") and busy is not None and busy >= 0.8


@pytest.mark.slow
def test_bench_runs_every_section_on_a_tiny_input(verdict_model_dir: Path, tmp_path: Path) -> None:
    """The smallest input every section accepts (one solution, one repeat, two synthesized
    analyses, one no-op `dvc repro`, two solutions served one per request), so it ends well inside its limit on a busy 2-core machine."""
    out = tmp_path / "results"
    cmd = [
        sys.executable, str(ROOT / "bench" / "run.py"),
        "--model", str(verdict_model_dir), "--backend", "hf", "--k", "2", "--threads", "1",
        "--solutions", "1", "--ee-solutions", "1", "--mem-solutions", "1", "--mem-source", "bundled",
        "--max-new-tokens", "48", "--synth-samples", "1", "--synth-n", "2", "--concurrency", "2",
        "--latency", "0", "--dvc-repeats", "1", "--repeats", "1", "--serve-solutions", "2", "--serve-batch", "1",
        "--serve-clients", "1,2", "--out", str(out),
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"bench smoke run: {time.monotonic() - start:.0f} s")
    report = json.loads((out / "bench.json").read_text())
    assert report["errors"] == {}
    sections = report["sections"]
    assert set(sections) == {"a_throughput", "b_early_exit", "c_orchestration", "d_synthesis", "m_memory", "s_serving"}

    a = sections["a_throughput"]
    assert a["k"] == 2 and a["scored_steps"] > 0
    assert a["repeats"] == 1 and a["reproducible_across_repeats"] is True
    assert all(len(runs) == 1 for runs in a["runs_wall_s"].values())
    for side in ("ours", "naive"):  # medians and spread of the interleaved runs
        assert a[side]["min_wall_s"] <= a[side]["median_wall_s"] <= a[side]["max_wall_s"]
    assert a["speedup_basis"].startswith("ratio of medians") and a["target_speedup"] == 10.0
    assert a["fallback_from_decoding_kv"] >= 0
    assert a["identical_analyses"] == a["analyses"] == 2 * a["scored_steps"]
    # Equal step rewards; an analysis may differ only when it was sampled as a non-canonical
    # token split (the one-pass value reads the sampled tokens, the reference re-tokenizes).
    assert a["rewards_check"] == "pass", a["worst_differences"]
    assert all(m["canonical_tokens"] is False for m in a["worst_differences"])
    assert a["naive"]["backend_calls"]["generate_calls"] == a["analyses"]
    assert a["naive"]["backend_calls"]["verdict_probability_calls"] == a["analyses"]
    assert a["ours"]["backend_calls"]["generate_calls"] < a["naive"]["backend_calls"]["generate_calls"]

    b = sections["b_early_exit"]
    assert b["identical_predictions"] is True
    assert b["generations_early_exit"] <= b["generations_full"]

    c = sections["c_orchestration"]
    assert c["dvc"]["noop_repro_median_s"] > 0 and c["prefect"]["flow_s"]

    d = sections["d_synthesis"]
    assert d["sequential"]["errors"] == d["concurrent"]["errors"] == 0
    assert d["sequential"]["analyses"] == d["concurrent"]["analyses"] == 1 * 2
    assert d["concurrent"]["max_in_flight"] <= 2

    m = sections["m_memory"]
    assert m["scored"] == 1 and m["memory"]["rss_peak_mb"] > 0
    assert m["memory"]["rss_peak_source"]  # the kernel's high-water mark on Linux, else sampled

    s = sections["s_serving"]
    assert s["solutions"] == 2 and s["in_process"]["solutions_per_s"] > 0
    assert [r["clients"] for r in s["served"]] == [1, 2]
    assert all(r["errors"] == [] and r["solutions"] == 2 and r["requests"] == 2 for r in s["served"])
    assert s["rewards_agree"] is True, s

    table = (out / "bench.md").read_text()
    assert table.count("\n| ") >= 8 and "FAILED" not in table
