"""Sections a, b and m: step-scoring throughput against a naive baseline, early exit against full
scoring, and memory on the longest ProcessBench solutions.

The naive baseline is what the official code does, one step and one analysis at a time: one
`generate` call with n=1 per analysis, then a second teacher-forced forward pass per analysis to
read P(" Yes") (docs/method.md §9.2). It asks for exactly the random streams the
batched scorer uses (analysis j of step i of solution s is stream row_seed(step_seed(seed, s, i),
j)), so both see the same analyses and must give the same step rewards; the bench checks it.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    CountingBackend,
    SectionResult,
    Timing,
    measure_memory,
    median,
    ratio,
    timed,
)
from components import prompts
from components.backends.base import Generation, row_seed, single_sample_seed, step_seed
from components.config import ScoringParams
from components.records import Solution
from components.scoring import (
    StepScorer,
    _fallback_prefix,
    mean_reward,
    sampled_verdict_value,
    step_conversation,
)


class RecordingBackend(CountingBackend):
    """A counting backend that also keeps each sampled text by (prompt, random stream)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.texts: dict[tuple[str, int], Generation] = {}

    def generate(self, conversations, sampling, **kwargs):  # noqa: ANN001, ANN201 (protocol)
        """Forward, count, and remember every text under (prompt, row seed)."""
        out = super().generate(conversations, sampling, **kwargs)
        seeds = kwargs.get("seeds") or [sampling.seed + i for i in range(len(conversations))]
        for conv, seed, gens in zip(conversations, seeds, out, strict=True):
            key = json.dumps(conv, ensure_ascii=False)
            for j, g in enumerate(gens):
                self.texts[(key, row_seed(seed, j))] = g
        return out


def canonical_tokens(backend: Any, gen: Generation) -> bool | None:
    """Whether re-encoding the analysis gives as many tokens as were sampled (None: unknown).

    The one-pass verdict probability is read on the sampled token sequence; the official
    second pass re-tokenizes the text. When the model sampled a non-canonical split (e.g.
    "l" + "l" where the tokenizer merges "ll"), the two passes see different inputs.
    """
    tok = getattr(backend, "tokenizer", None)
    if tok is None or not gen.num_tokens:
        return None
    content = gen.num_tokens - (1 if gen.finish_reason == "stop" else 0)
    return len(tok(gen.text, add_special_tokens=False).input_ids) == content


@dataclass
class NaiveResult:
    """Per-analysis values and step rewards of the naive baseline."""

    values: list[list[list[float | None]]]  # solution -> step -> analysis
    rewards: list[list[float]]


def naive_score(backend: Any, solutions: Sequence[Solution], scoring: ScoringParams) -> NaiveResult:
    """Official-style scoring: per step, per analysis: generate(n=1), then a teacher-forced pass."""
    one = scoring.sampling.model_copy(update={"n": 1})
    k = scoring.sampling.n
    all_values: list[list[list[float | None]]] = []
    all_rewards: list[list[float]] = []
    for sol in solutions:
        sol_values: list[list[float | None]] = []
        for i in range(len(sol.steps)):
            conv = step_conversation(sol, i)
            seed = step_seed(scoring.sampling.seed, sol.id, i)
            vals: list[float | None] = []
            for j in range(k):
                gen = backend.generate([conv], one, seeds=[single_sample_seed(seed, j)])[0][0]
                if gen.error:
                    raise RuntimeError(f"naive baseline: {sol.id} step {i} analysis {j}: {gen.error}")
                prefix = prompts.cut_at_verdict(prompts.postprocess_response(gen.text))[0]
                p = backend.verdict_probability([conv], [prefix])[0]
                vals.append(float(p) if p is not None else sampled_verdict_value(gen.text))
            sol_values.append(vals)
        all_values.append(sol_values)
        all_rewards.append([mean_reward(v) for v in sol_values])
    return NaiveResult(all_values, all_rewards)


def all_steps_at_once(backend: Any, solutions: Sequence[Solution], scoring: ScoringParams) -> list[list[float]]:
    """Full scoring as ONE generate call over every step (full scoring's schedule, in one call),
    fallback values as the scorer gets them (from the decoding KV where the backend offers it,
    else one batched teacher-forced pass); step rewards per solution."""
    pairs = [(sol, i) for sol in solutions for i in range(len(sol.steps))]
    convs = [step_conversation(sol, i) for sol, i in pairs]
    seeds = [step_seed(scoring.sampling.seed, sol.id, i) for sol, i in pairs]
    extra = {"teacher_forced": _fallback_prefix} if backend.forced_in_generation else {}
    outputs = backend.generate(convs, scoring.sampling, seeds=seeds, **extra)
    values = [[g.p_yes if g.p_yes is not None else g.forced_p_yes for g in gens] for gens in outputs]
    forced = [(r, j, g.text) for r, gens in enumerate(outputs) for j, g in enumerate(gens) if values[r][j] is None]
    if forced:
        prefixes = [prompts.cut_at_verdict(prompts.postprocess_response(t))[0] for _, _, t in forced]
        probs = backend.verdict_probability([convs[r] for r, _, _ in forced], prefixes)
        for (r, j, t), p in zip(forced, probs, strict=True):
            values[r][j] = float(p) if p is not None else sampled_verdict_value(t)
    rewards: list[list[float]] = []
    it = iter(values)
    for sol in solutions:
        rewards.append([mean_reward(next(it)) for _ in sol.steps])
    return rewards


def _seconds(runs: Sequence[Timing]) -> str:
    return "/".join(f"{t.wall_s:.2f}" for t in runs) + " s"


TARGET_SPEEDUP = 10.0


def _summary(runs: Sequence[Timing], n_steps: int) -> dict[str, Any]:
    """Median and spread (min, max) of a side's interleaved runs, wall and CPU seconds."""
    walls, cpus = [t.wall_s for t in runs], [t.cpu_s for t in runs]
    med_wall, med_cpu = median(walls), median(cpus)
    return {
        "median_wall_s": round(med_wall, 4),
        "min_wall_s": round(min(walls), 4),
        "max_wall_s": round(max(walls), 4),
        "median_cpu_s": round(med_cpu, 4),
        "min_cpu_s": round(min(cpus), 4),
        "max_cpu_s": round(max(cpus), 4),
        "steps_per_s": round(n_steps / med_wall, 3),
        "steps_per_s_spread": [round(n_steps / max(walls), 3), round(n_steps / min(walls), 3)],
        "steps_per_cpu_s": round(n_steps / med_cpu, 3) if med_cpu else None,
    }


def _max_abs_diff(a: Sequence[Sequence[float | None]], b: Sequence[Sequence[float | None]]) -> float:
    worst = 0.0
    for xs, ys in zip(a, b, strict=True):
        for x, y in zip(xs, ys, strict=True):
            if (x is None) != (y is None):
                return float("inf")
            if x is not None and y is not None:
                worst = max(worst, abs(x - y))
    return worst


def warm_up(backend: Any, scoring: ScoringParams) -> None:
    """One tiny generation and one teacher-forced pass, so neither side pays first-call costs."""
    conv = prompts.student_messages("What is 1 + 1?", [], "1 + 1 = 2.")
    few = scoring.sampling.model_copy(update={"n": 1, "max_new_tokens": 4})
    backend.generate([conv], few, seeds=[0])
    backend.verdict_probability([conv], ["Analysis: fine. " + prompts.VERDICT_PHRASE])


def reset_engine_caches(backend: Any) -> None:
    """Empty engine-side prefix caches (vLLM's, the hf backend's) so no timed run reuses an
    earlier one's work."""
    inner = getattr(backend, "inner", backend)
    for owner in (getattr(inner, "llm", None), inner):
        reset = getattr(owner, "reset_prefix_cache", None)
        if callable(reset):
            reset()


def _profile_text(profiler: cProfile.Profile, limit: int = 30) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf)
    stats.sort_stats("cumulative").print_stats(limit)
    stats.sort_stats("tottime").print_stats(limit)
    return buf.getvalue()


def bench_throughput(
    backend: Any,
    solutions: Sequence[Solution],
    scoring: ScoringParams,
    *,
    profile_to: Path | None = None,
    repeats: int = 5,
) -> SectionResult:
    """Section a: our StepScorer (full scoring) against the naive baseline on the same inputs.

    Each side runs `repeats` times, interleaved (ours, naive, all-at-once, then again), every
    run from empty engine caches; each side's throughput is its median run, reported with the
    spread (fastest and slowest run), and the speedup is the ratio of the medians (the fastest
    runs' ratio is kept as `speedup_fastest_runs`). Every run must reproduce the first one's
    step rewards.
    """
    res = SectionResult("a_throughput")
    rec = RecordingBackend(backend)
    warm_up(rec, scoring)
    rec.reset()
    rec.texts.clear()
    n_steps = sum(len(s.steps) for s in solutions)
    k = scoring.sampling.n
    runs: dict[str, list[Timing]] = {"ours": [], "naive": [], "once": []}
    reproducible = True
    detailed: list[Any] = []
    naive: NaiveResult | None = None
    once_rewards: list[list[float]] = []
    for rep in range(max(1, repeats)):
        scorer = StepScorer(rec, scoring, early_exit=False, progress=False)
        reset_engine_caches(backend)
        profiler = cProfile.Profile() if profile_to is not None and rep == 0 else None
        with measure_memory() as mem, timed() as t:
            if profiler is not None:
                profiler.enable()
            got = scorer.score_detailed(solutions)
            if profiler is not None:
                profiler.disable()
        runs["ours"].append(t)
        if rep == 0:
            detailed, mem_ours, ours_counts = got, mem, rec.reset()
            ours_texts, rec.texts = rec.texts, {}
            if profiler is not None and profile_to is not None:
                profile_to.parent.mkdir(parents=True, exist_ok=True)
                profile_to.write_text(_profile_text(profiler), encoding="utf-8")
        else:
            reproducible &= [s.rewards(k) for s in got] == [s.rewards(k) for s in detailed]
            rec.reset()
            rec.texts.clear()

        reset_engine_caches(backend)
        with measure_memory() as mem, timed() as t:
            got_naive = naive_score(rec, solutions, scoring)
        runs["naive"].append(t)
        if naive is None:
            naive, mem_naive, naive_counts = got_naive, mem, rec.reset()
            naive_texts, rec.texts = rec.texts, {}
        else:
            reproducible &= got_naive.rewards == naive.rewards
            rec.reset()
            rec.texts.clear()

        reset_engine_caches(backend)
        with timed() as t:
            got_once = all_steps_at_once(rec, solutions, scoring)
        runs["once"].append(t)
        if rep == 0:
            once_rewards, once_counts = got_once, rec.reset()
        else:
            reproducible &= got_once == once_rewards
            rec.reset()
        rec.texts.clear()
    assert naive is not None
    summary = {key: _summary(runs[key], n_steps) for key in runs}
    t_ours, t_naive, t_once = (Timing(summary[key]["median_wall_s"], summary[key]["median_cpu_s"])
                               for key in ("ours", "naive", "once"))
    cpu_ours, cpu_naive, cpu_once = t_ours.cpu_s, t_naive.cpu_s, t_once.cpu_s
    fastest = {key: min(x.wall_s for x in runs[key]) for key in runs}

    ours_values = [v for s in detailed for v in s.values]
    naive_values = [v for sol in naive.values for v in sol]
    ours_rewards = [s.rewards(k) for s in detailed]
    value_diff = _max_abs_diff(ours_values, naive_values)
    reward_diff = _max_abs_diff(ours_rewards, naive.rewards)
    mismatches = sorted(
        (
            {"solution": sol.id, "step": i, "analysis": j, "fallback": det.fallback[i][j],
             "ours": x, "naive": y, "abs_diff": abs(x - y)}
            for sol, det, nvals in zip(solutions, detailed, naive.values, strict=True)
            for i, (xs, ys) in enumerate(zip(det.values, nvals, strict=True))
            for j, (x, y) in enumerate(zip(xs, ys, strict=True))
            if x is not None and y is not None and abs(x - y) > 1e-4
        ),
        key=lambda m: -m["abs_diff"],
    )
    for m in mismatches:
        sol = next(x for x in solutions if x.id == m["solution"])
        key = (json.dumps(step_conversation(sol, m["step"]), ensure_ascii=False),
               row_seed(step_seed(scoring.sampling.seed, sol.id, m["step"]), m["analysis"]))
        m["canonical_tokens"] = canonical_tokens(backend, ours_texts[key]) if key in ours_texts else None
    explained = all(m["canonical_tokens"] is False for m in mismatches)
    same_texts = sum(naive_texts[key].text == g.text for key, g in ours_texts.items() if key in naive_texts)
    ours_sps, naive_sps = n_steps / t_ours.wall_s, n_steps / t_naive.wall_s
    ours_cpu_sps, naive_cpu_sps = n_steps / cpu_ours, n_steps / cpu_naive
    speedup = ratio(ours_sps, naive_sps)
    speedup_range = (ratio(n_steps / summary["ours"]["max_wall_s"], n_steps / summary["naive"]["min_wall_s"]),
                     ratio(n_steps / summary["ours"]["min_wall_s"], n_steps / summary["naive"]["max_wall_s"]))
    res.data = {
        "solutions": [s.id for s in solutions],
        "scored_steps": n_steps,
        "k": k,
        "sampling": scoring.sampling.model_dump(mode="json"),
        "ours": {
            **t_ours.as_dict(),
            **summary["ours"],
            "generated_tokens_per_s": round(ours_counts.generated_tokens / t_ours.wall_s, 1),
            "backend_calls": ours_counts.as_dict(),
            "memory": mem_ours.as_dict(),
        },
        "naive": {
            **t_naive.as_dict(),
            **summary["naive"],
            "generated_tokens_per_s": round(naive_counts.generated_tokens / t_naive.wall_s, 1),
            "backend_calls": naive_counts.as_dict(),
            "memory": mem_naive.as_dict(),
        },
        "all_steps_one_call": {
            **t_once.as_dict(),
            **summary["once"],
            "speedup_vs_naive": ratio(n_steps / t_once.wall_s, naive_sps),
            "speedup_vs_naive_cpu": ratio(n_steps / cpu_once, naive_cpu_sps),
            "max_abs_diff_step_reward_vs_ours": _max_abs_diff(once_rewards, ours_rewards),
            "backend_calls": once_counts.as_dict(),
        },
        "repeats": len(runs["ours"]),
        "runs_wall_s": {key: [round(x.wall_s, 4) for x in ts] for key, ts in runs.items()},
        "runs_cpu_s": {key: [round(x.cpu_s, 4) for x in ts] for key, ts in runs.items()},
        "reproducible_across_repeats": reproducible,
        "speedup_steps_per_s": speedup,  # ratio of the medians
        "speedup_cpu": ratio(ours_cpu_sps, naive_cpu_sps),
        "speedup_worst_best": list(speedup_range),  # slowest ours vs fastest naive, and the reverse
        "speedup_fastest_runs": ratio(fastest["naive"], fastest["ours"]),
        "speedup_basis": f"ratio of medians of {len(runs['ours'])} interleaved runs per side",
        "target_speedup": TARGET_SPEEDUP,
        "target_met": bool(speedup is not None and speedup >= TARGET_SPEEDUP),
        "identical_analyses": same_texts,
        "analyses": len(ours_texts),
        "max_abs_diff_analysis_p_yes": value_diff,
        "max_abs_diff_step_reward": reward_diff,
        "rewards_match_1e-4": reward_diff <= 1e-4,
        "analyses_differing_over_1e-4": len(mismatches),
        "differences_all_non_canonical_tokens": explained,
        "rewards_check": "pass" if (reward_diff <= 1e-4 or explained) and reproducible else "FAIL",
        "worst_differences": mismatches[:5],
        "one_pass_share": round(ours_counts.reached_verdict / max(1, ours_counts.generated_rows), 4),
        "fallback_from_decoding_kv": sum(g.p_yes is None and g.forced_p_yes is not None for g in ours_texts.values()),
        "profile": str(profile_to) if profile_to is not None else None,
    }
    res.rows = [
        ("scorer steps/s (ours vs naive), medians", f"{ours_sps:.2f} vs {naive_sps:.2f}",
         f"**{speedup}x** wall, ratio of medians ({res.data['speedup_cpu']}x CPU; "
         f"{speedup_range[0]}-{speedup_range[1]}x worst to best pairing) of {len(runs['ours'])} interleaved "
         f"runs each (ours {_seconds(runs['ours'])}, spread {summary['ours']['min_wall_s']:.2f}-"
         f"{summary['ours']['max_wall_s']:.2f} s; naive {_seconds(runs['naive'])}, spread "
         f"{summary['naive']['min_wall_s']:.2f}-{summary['naive']['max_wall_s']:.2f} s); "
         f"target >= {TARGET_SPEEDUP:g}x: " + ("met" if res.data["target_met"] else "MISSED")),
        ("generated tokens/s (ours vs naive)",
         f"{res.data['ours']['generated_tokens_per_s']:.0f} vs {res.data['naive']['generated_tokens_per_s']:.0f}",
         f"{ours_counts.generated_tokens} vs {naive_counts.generated_tokens} tokens"),
        ("backend calls (generate / teacher-forced)",
         f"{ours_counts.generate_calls}/{ours_counts.verdict_probability_calls} vs "
         f"{naive_counts.generate_calls}/{naive_counts.verdict_probability_calls}",
         f"{n_steps} steps x K={k}; one-pass verdicts {res.data['one_pass_share']:.0%}; "
         f"fallback values read from the decoding KV {res.data['fallback_from_decoding_kv']}"),
        ("same step rewards (max abs diff)", f"{reward_diff:.2e}",
         f"check {res.data['rewards_check']}; analyses identical: {same_texts}/{len(ours_texts)}; "
         f"{'same rewards in every repeat' if reproducible else 'REPEATS DIFFER'}; "
         f"{len(mismatches)} analyses differ > 1e-4 (max {value_diff:.2e})"
         + (", all sampled as non-canonical token splits (one pass reads the sampled tokens, "
            "the second pass re-tokenizes)" if mismatches and explained else "")),
        ("all steps in one backend call (full scoring's schedule)",
         f"{res.data['all_steps_one_call']['steps_per_s']:.2f} steps/s",
         f"{res.data['all_steps_one_call']['speedup_vs_naive']}x naive wall "
         f"({res.data['all_steps_one_call']['speedup_vs_naive_cpu']}x CPU); rewards vs ours "
         f"{res.data['all_steps_one_call']['max_abs_diff_step_reward_vs_ours']:.1e}"),
        ("peak RSS delta (ours / naive)", f"{mem_ours.rss_peak_delta_mb:.0f} / {mem_naive.rss_peak_delta_mb:.0f} MiB",
         f"RSS peak {mem_ours.rss_peak_mb:.0f} / {mem_naive.rss_peak_mb:.0f} MiB"),
    ]
    return res


def bench_early_exit(
    backend: Any,
    solutions: Sequence[Solution],
    scoring: ScoringParams,
    *,
    source: str = "",
    oracle: dict[str, float] | None = None,
    oracle_source: str = "",
) -> SectionResult:
    """Section b: early exit against full scoring: generations saved and identical predictions.

    `oracle` gives the savings a PRM whose predictions equal the gold labels would reach
    (model-independent; on the full benchmark when available).
    """
    res = SectionResult("b_early_exit")
    counted = CountingBackend(backend)
    reset_engine_caches(backend)
    with timed() as t_full:
        full = StepScorer(counted, scoring, early_exit=False, progress=False).score(solutions)
    full_counts = counted.reset()
    reset_engine_caches(backend)
    with timed() as t_early:
        early = StepScorer(counted, scoring, early_exit=True, progress=False).score(solutions)
    early_counts = counted.reset()
    gen_full = sum(s.generations for s in full)
    gen_early = sum(s.generations for s in early)
    saved = 1 - gen_early / gen_full if gen_full else 0.0
    same = [a.first_error == b.first_error for a, b in zip(full, early, strict=True)]
    gold = [s.first_error for s in solutions]
    res.data = {
        "source": source,
        "solutions": len(solutions),
        "steps": sum(len(s.steps) for s in solutions),
        "k": scoring.sampling.n,
        "threshold": scoring.threshold,
        "generations_full": gen_full,
        "generations_early_exit": gen_early,
        "generations_saved_pct": round(100 * saved, 2),
        "generated_tokens_full": full_counts.generated_tokens,
        "generated_tokens_early_exit": early_counts.generated_tokens,
        "identical_predictions": all(same),
        "identical_count": sum(same),
        "full": t_full.as_dict(),
        "early_exit": t_early.as_dict(),
        "wall_speedup": ratio(t_full.wall_s, t_early.wall_s),
        "predicted_erroneous": sum(s.first_error != -1 for s in full),
        "gold_erroneous": sum(g not in (None, -1) for g in gold),
        "prediction_matches_gold": sum(s.first_error == g for s, g in zip(full, gold, strict=True)),
        "target_saved_pct": 20.0,
        "target_met": bool(all(same) and saved >= 0.2),
        "oracle_saved_pct": oracle or {},
        "oracle_source": oracle_source,
    }
    res.rows = [
        ("early exit: generations saved", f"{100 * saved:.1f}%",
         f"{gen_early} vs {gen_full} analyses; target >= 20%: {'met' if res.data['target_met'] else 'MISSED'}"),
        ("early exit: identical predictions", f"{sum(same)}/{len(same)}",
         f"wall {t_early.wall_s:.1f}s vs {t_full.wall_s:.1f}s full ({res.data['wall_speedup']}x); "
         f"this model predicts an error in {res.data['predicted_erroneous']}/{len(same)} "
         f"(gold: {res.data['gold_erroneous']}); {source}"),
    ]
    if oracle:
        res.rows.append((
            "early exit with gold-exact predictions (model-independent)", f"{oracle.get('all', 0):.1f}% saved",
            ", ".join(f"{k} {v:.1f}%" for k, v in oracle.items() if k != "all") + f" ({oracle_source})",
        ))
    return res


def bench_memory(
    backend: Any, solutions: Sequence[Solution], scoring: ScoringParams, prompt_tokens: Sequence[int], source: str
) -> SectionResult:
    """Section m: full scoring of the longest solutions; peak memory with the batch capped by the budget."""
    res = SectionResult("m_memory")
    counted = CountingBackend(backend)
    if hasattr(backend, "peak_batch"):  # the hf backend's largest decoding batch (prompts, KV tokens)
        backend.peak_batch = (0, 0)
    with measure_memory(python_heap=True) as mem, timed() as t:
        scores = StepScorer(counted, scoring, early_exit=False, progress=False).score(solutions)
    counts = counted.reset()
    budget = getattr(backend, "token_budget", None)
    if budget is None:
        budget = getattr(getattr(backend, "params", None), "token_budget", None)
    res.data = {
        "source": source,
        "solutions": [s.id for s in solutions],
        "steps": sum(len(s.steps) for s in solutions),
        "longest_prompt_tokens": max(prompt_tokens) if prompt_tokens else None,
        "k": scoring.sampling.n,
        "max_new_tokens": scoring.sampling.max_new_tokens,
        "token_budget": budget,
        "largest_wave_rows": counts.largest_call_rows,
        "largest_wave_tokens_upper_bound": (
            counts.largest_call_rows * (max(prompt_tokens) + scoring.sampling.max_new_tokens)
            if prompt_tokens else None
        ),
        "largest_backend_batch": (
            dict(zip(("prompts", "kv_tokens"), backend.peak_batch, strict=True))
            if hasattr(backend, "peak_batch") else None
        ),
        "scored": len(scores),
        **t.as_dict(),
        "memory": mem.as_dict(),
    }
    bound = res.data["largest_wave_tokens_upper_bound"]
    peak = res.data["largest_backend_batch"]
    batch_note = (
        f"largest backend batch {peak['prompts']} prompts holding <= {peak['kv_tokens']} KV tokens"
        if peak else "batched by the backend"
    )
    res.rows = [
        ("longest solutions: peak RSS", f"{mem.rss_peak_mb:.0f} MiB (+{mem.rss_peak_delta_mb:.0f})",
         f"{len(solutions)} longest from {source}; longest prompt {res.data['longest_prompt_tokens']} tokens; "
         f"largest scorer wave {counts.largest_call_rows} rows (<= {bound} tokens); {batch_note} "
         f"under token_budget {budget}; no OOM"),
        ("longest solutions: Python heap peak (tracemalloc)", f"{mem.tracemalloc_peak_mb:.1f} MiB",
         mem.torch_peak_note if mem.torch_peak_mb is None else f"torch peak {mem.torch_peak_mb:.0f} MiB"),
    ]
    return res
