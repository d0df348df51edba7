"""`rprm synthesize`: teacher analyses of labelled steps -> agreement filter -> balanced SFT data.

Method (docs/method.md §6):

1. The teacher (`teacher.kind`: the offline calculation checker, or a model behind the hf, vllm
   or openai backend) writes K = `teacher.sampling.n` analyses per labelled step sample (all of
   them, or a seeded `synthesize.max_samples` drawn from both files in proportion). The label is
   never shown to it.
2. Each analysis is cleaned (`postprocess_response`) and parsed (`parse_verdict`: exactly one
   verdict, at the end). It *agrees* when its verdict matches the human label. Per step sample
   the LAST agreeing analysis is kept (the official `target_list[-1]`).
3. Yes and No examples are balanced 1:1 within each source file's candidates (seeded shuffle,
   truncate to the smaller side).
4. Split by problem: SFT train comes from `steps_train` problems; SFT validation takes whole
   problems of `steps_val` (prepare's held-out problems, seeded order) until it holds at least
   `synthesize.val_size` records, so no problem ever crosses the split, here or downstream.
   (If `steps_val` is empty, the held-out problems are drawn from the train problems, exactly as
   the official split does.)
5. Output: chat SFT examples (system "You are a helpful assistant.", user = the R-PRM
   template, assistant = the analysis), every raw analysis with its verdict and fate in
   `data/synth/critiques.jsonl`, `reports/synthesis.json` and an MLflow run.

Resumable: each step sample's K analyses are appended to `data/synth/journal.jsonl` (fsynced)
as soon as they finish; a rerun after a crash or `kill -9` skips them. Sampling is seeded per
row from `synthesize.seed` and the sample id, never from batch position, so a resumed run ends
with exactly the outputs of an uninterrupted one. Samples whose generation hit a teacher error
are not journaled, so a rerun retries them. The journal (`components.journal`) records the
teacher settings it was written with and is started over if they change. Final outputs are written atomically at the end;
if teacher errors exceed `synthesize.max_error_rate` of the planned analyses the stage stops
with a clear message and writes no final output.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from components import paths
from components.backends.base import BackendError, Generation, row_seed, sample_seed
from components.config import Params, TeacherParams
from components.io import DataError, read_jsonl, write_json, write_jsonl
from components.journal import finished, open_journal
from components.paths import Layout
from components.prompts import (
    parse_verdict,
    postprocess_response,
    student_messages,
    student_prompt_tokens,
    verdict_for_label,
)
from components.records import Critique, SFTExample, StepSample
from components.teachers import Teacher, load_teacher

log = logging.getLogger(__name__)

REPORT = paths.REPORTS / "synthesis.json"
DROP_REASONS = (
    "teacher_error", "no_verdict", "several_verdicts", "not_at_end", "disagrees",
    "not_last_agreeing", "balanced_out", "val_unused",
)


class TeacherErrorBudgetExceeded(BackendError):
    """Teacher errors exceeded `synthesize.max_error_rate` of the planned analyses."""


@dataclass
class _Item:
    sample: StepSample
    split: str  # "train" | "val": the prepared file it came from


def teacher_settings(teacher: TeacherParams, seed: int) -> dict[str, Any]:
    """Every setting that changes what the teacher writes (not speed knobs): the journal's fingerprint."""
    b = teacher.backend
    relevant = {
        "kind": teacher.kind,
        "model": teacher.model,
        "dtype": teacher.dtype,
        "sampling": teacher.sampling.model_dump(mode="json"),
        "seed": seed,
    }
    if teacher.kind == "backend":
        relevant["backend"] = {"kind": b.kind, "openai_model": b.openai.model, "use_chat": b.openai.use_chat}
    return relevant


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def _read_inputs(train_path: Path, val_path: Path) -> tuple[list[StepSample], list[StepSample]]:
    train = read_jsonl(train_path, StepSample, key=lambda r: r.id)
    val = read_jsonl(val_path, StepSample, key=lambda r: r.id, allow_empty=True) if val_path.exists() else []
    ids = {s.id for s in train}
    train_problems = {s.problem_id for s in train}
    for i, s in enumerate(val, start=1):
        if s.id in ids:
            raise DataError(val_path, i, "id", f"id {s.id!r} also appears in {train_path}")
        if s.problem_id in train_problems:
            raise DataError(val_path, i, "problem_id", f"problem {s.problem_id!r} also appears in {train_path}")
    return train, val


def _take(samples: list[StepSample], n: int, rng: random.Random) -> list[StepSample]:
    """A seeded uniform sample of n step samples, in file order (spread over all problems)."""
    if n >= len(samples):
        return list(samples)
    return [samples[i] for i in sorted(rng.sample(range(len(samples)), n))]


def select_samples(
    train: list[StepSample], val: list[StepSample], max_samples: int | None, seed: int
) -> list[_Item]:
    """Labelled samples sent to the teacher: all, or a seeded `max_samples` in proportion to the files."""
    train = [s for s in train if s.label is not None]
    val = [s for s in val if s.label is not None]
    if max_samples is not None and max_samples < len(train) + len(val):
        rng = random.Random(f"{seed}:select")
        n_val = min(len(val), round(max_samples * len(val) / (len(train) + len(val))))
        n_train = min(len(train), max_samples - n_val)
        train = _take(train, n_train, rng)
        val = _take(val, n_val, rng)
    return [_Item(s, "train") for s in train] + [_Item(s, "val") for s in val]


# --------------------------------------------------------------------------------------
# Teacher loop (journaled)
# --------------------------------------------------------------------------------------


def _gen_to_dict(g: Generation, seed: int) -> dict[str, Any]:
    return {
        "text": g.text,
        "p_yes": g.p_yes,
        "num_tokens": g.num_tokens,
        "finish_reason": g.finish_reason,
        "error": g.error,
        "seed": g.meta.get("seed", seed),
        "meta": {k: v for k, v in g.meta.items() if isinstance(v, (str, int, float, bool)) or v is None},
    }


def generate_analyses(
    items: Sequence[_Item],
    teacher: Teacher,
    params: Params,
    journal_path: Path,
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Every selected sample's K analyses (journal first, then the teacher); (by id, resumed)."""
    sampling = params.teacher.sampling
    seed = params.synthesize.seed
    k = sampling.n
    planned = len(items) * k
    budget = params.synthesize.max_error_rate * planned
    results: dict[str, list[dict[str, Any]]] = {}
    errors = 0
    first_errors: list[str] = []
    with open_journal(journal_path, teacher_settings(params.teacher, seed)) as journal:
        done = finished(journal)
        for it in items:
            rec = done.get(it.sample.id)
            if rec is not None and len(rec["generations"]) == k:
                results[it.sample.id] = rec["generations"]
        resumed = len(results)
        todo = [it for it in items if it.sample.id not in results]
        if resumed:
            print(f"synthesize: resuming, {resumed}/{len(items)} step samples already journaled")
        by_index = {i: it for i, it in enumerate(todo)}
        seeds = [sample_seed(seed, it.sample.id) for it in todo]
        with tqdm(total=len(items), initial=resumed, desc="synthesize", unit="step", dynamic_ncols=True) as bar:
            stream = teacher.analyze_iter([it.sample for it in todo], sampling, seeds)
            try:
                for i, gens in stream:
                    it, s = by_index.pop(i), seeds[i]
                    gens = list(gens)[:k]
                    missing = f"teacher returned {len(gens)} analyses, expected {k}"
                    while len(gens) < k:
                        gens.append(Generation(text="", finish_reason="error", error=missing))
                    recs = [_gen_to_dict(g, row_seed(s, j)) for j, g in enumerate(gens)]
                    n_err = sum(g.error is not None or g.finish_reason == "error" for g in gens)
                    results[it.sample.id] = recs
                    if n_err:
                        errors += n_err
                        first_errors.extend(str(g.error) for g in gens if g.error)
                        first_errors = list(dict.fromkeys(first_errors))[:3]
                    else:
                        journal.append({"key": it.sample.id, "generations": recs})
                    bar.update(1)
                    if n_err:
                        bar.set_postfix(errors=errors)
                    if errors > budget:
                        raise TeacherErrorBudgetExceeded(
                            f"teacher errors exceed synthesize.max_error_rate={params.synthesize.max_error_rate:g}: "
                            f"{errors} failed analyses of {planned} planned (budget {budget:g}). First errors: "
                            + "; ".join(first_errors)
                            + f". Finished analyses are journaled in {journal_path}; fix the teacher and rerun "
                            "`rprm synthesize` to resume. No final output was written."
                        )
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
        if by_index:
            raise BackendError(f"the teacher returned no analyses for {len(by_index)} step samples")
    return results, resumed


# --------------------------------------------------------------------------------------
# Filter, balance, split
# --------------------------------------------------------------------------------------


def _critiques(
    items: Sequence[_Item], analyses: dict[str, list[dict[str, Any]]], params: Params, generator: str
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One row per analysis (Critique fields + status), and the last agreeing index per sample."""
    sampling = params.teacher.sampling
    rows: list[dict[str, Any]] = []
    chosen: dict[str, int] = {}
    for it in items:
        target = verdict_for_label(bool(it.sample.label))
        for j, g in enumerate(analyses[it.sample.id]):
            if g["error"] is not None or g["finish_reason"] == "error":
                text, verdict, reason, agrees = "", "invalid", "teacher_error", False
            else:
                text = postprocess_response(g["text"])
                parsed = parse_verdict(text)
                verdict, reason = parsed.verdict, parsed.reason
                agrees = parsed.valid and parsed.verdict == target
            row = {
                "sample_id": it.sample.id,
                "text": text,
                "verdict": verdict,
                "p_yes": g["p_yes"],
                "generator": generator,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "seed": g["seed"],
                "index": j,
                "invalid_reason": reason,
                "agrees": agrees,
                "kept": False,
                "error": g["error"],
                # not part of the Critique record:
                "_status": reason or ("agrees" if agrees else "disagrees"),
                "_label": it.sample.label,
                "_split": it.split,
                "_meta": g.get("meta") or {},
            }
            if agrees:
                chosen[it.sample.id] = len(rows)  # the LAST agreeing analysis wins
            rows.append(row)
    for i, r in enumerate(rows):
        if r["_status"] == "agrees":
            r["_status"] = "candidate" if chosen[r["sample_id"]] == i else "not_last_agreeing"
    return rows, chosen


def _balance(cands: list[int], rows: list[dict[str, Any]], rng: random.Random) -> list[int]:
    yes = [c for c in cands if rows[c]["verdict"] == "yes"]
    no = [c for c in cands if rows[c]["verdict"] == "no"]
    rng.shuffle(yes)
    rng.shuffle(no)
    n = min(len(yes), len(no))
    return sorted(yes[:n] + no[:n])


def _held_out(cands: list[int], rows: list[dict[str, Any]], problem_of: dict[str, str], size: int, rng: random.Random) -> set[int]:
    """Whole problems, in seeded order, until at least `size` records (docs/method.md §6)."""
    by_problem: dict[str, list[int]] = defaultdict(list)
    for c in cands:
        by_problem[problem_of[rows[c]["sample_id"]]].append(c)
    problems = sorted(by_problem)
    rng.shuffle(problems)
    out: set[int] = set()
    for p in problems:
        if len(out) >= size:
            break
        out.update(by_problem[p])
    return out


def _sft(row: dict[str, Any], sample: StepSample) -> SFTExample:
    messages = student_messages(sample.question, list(sample.previous_steps), sample.now_step)
    messages.append({"role": "assistant", "content": row["text"]})
    return SFTExample.model_validate(
        {"id": sample.id, "problem_id": sample.problem_id, "messages": messages, "verdict": row["verdict"]}
    )


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 6) if den else None


def build_outputs(
    items: Sequence[_Item], analyses: dict[str, list[dict[str, Any]]], params: Params, generator: str
) -> tuple[list[Critique], list[SFTExample], list[SFTExample], dict[str, Any], list[dict[str, Any]]]:
    """Filter, balance and split; (critiques, sft train, sft val, report, sample table rows)."""
    syn = params.synthesize
    rows, chosen = _critiques(items, analyses, params, generator)
    by_id = {it.sample.id: it for it in items}
    problem_of = {it.sample.id: it.sample.problem_id for it in items}
    rng = random.Random(syn.seed)
    cands = {split: [chosen[it.sample.id] for it in items if it.split == split and it.sample.id in chosen]
             for split in ("train", "val")}
    balanced = {}
    for split in ("train", "val"):
        balanced[split] = _balance(cands[split], rows, rng) if syn.balance else sorted(cands[split])
        for c in set(cands[split]) - set(balanced[split]):
            rows[c]["_status"] = "balanced_out"
    split_rng = random.Random(f"{syn.seed}:split")
    if any(it.split == "val" for it in items):
        val_set = _held_out(balanced["val"], rows, problem_of, syn.val_size, split_rng)
        train_set = set(balanced["train"])
        for c in set(balanced["val"]) - val_set:
            rows[c]["_status"] = "val_unused"
    else:  # no held-out file: hold out whole train problems (docs/method.md §6)
        val_set = _held_out(balanced["train"], rows, problem_of, syn.val_size, split_rng)
        train_set = set(balanced["train"]) - val_set
    for c in train_set | val_set:
        rows[c]["_status"] = "kept"
        rows[c]["kept"] = True
    sft_train = [_sft(rows[c], by_id[rows[c]["sample_id"]].sample) for c in sorted(train_set)]
    sft_val = [_sft(rows[c], by_id[rows[c]["sample_id"]].sample) for c in sorted(val_set)]
    critiques = [Critique.model_validate({k: v for k, v in r.items() if not k.startswith("_")}) for r in rows]
    report = _report(items, rows, sft_train, sft_val, generator, params)
    return critiques, sft_train, sft_val, report, _table(rows, syn.sample_table_size, syn.seed)


def _report(
    items: Sequence[_Item], rows: list[dict[str, Any]], sft_train: list[SFTExample], sft_val: list[SFTExample],
    generator: str, params: Params,
) -> dict[str, Any]:
    status = Counter(r["_status"] for r in rows)
    generated = len(rows)
    errors = status["teacher_error"]
    answered = generated - errors
    valid = sum(r["verdict"] != "invalid" for r in rows)
    agreeing = sum(bool(r["agrees"]) for r in rows)
    by_label: dict[str, Any] = {}
    for name, label in (("positive", True), ("negative", False)):
        rs = [r for r in rows if r["_label"] is label and r["_status"] != "teacher_error"]
        steps = {r["sample_id"] for r in rs}
        steps_agree = {r["sample_id"] for r in rs if r["agrees"]}
        by_label[name] = {
            "steps": len(steps),
            "analyses": len(rs),
            "agreeing": sum(bool(r["agrees"]) for r in rs),
            "agreement_rate": _rate(sum(bool(r["agrees"]) for r in rs), len(rs)),
            "step_agreement_rate": _rate(len(steps_agree), len(steps)),
        }
    steps_with_agreeing = len({r["sample_id"] for r in rows if r["agrees"]})
    decided = Counter(str(r["_meta"].get("decided_by")) for r in rows if "decided_by" in r["_meta"])
    decided_agree = Counter(str(r["_meta"].get("decided_by")) for r in rows if r["agrees"] and "decided_by" in r["_meta"])
    p_yes_sources = Counter(str(r["_meta"].get("p_yes_source")) for r in rows if "p_yes_source" in r["_meta"])
    yes_no = {
        "sft_train": dict(Counter(e.verdict for e in sft_train)),
        "sft_val": dict(Counter(e.verdict for e in sft_val)),
    }
    for v in yes_no.values():
        v.setdefault("yes", 0)
        v.setdefault("no", 0)
    report: dict[str, Any] = {
        "teacher": generator,
        "samples_per_step": params.teacher.sampling.n,
        "steps_attempted": len(items),
        "steps_from_train_file": sum(it.split == "train" for it in items),
        "steps_from_val_file": sum(it.split == "val" for it in items),
        "analyses_generated": generated,
        "teacher_errors": errors,
        "teacher_error_rate": _rate(errors, generated),
        "valid": valid,
        "valid_rate": _rate(valid, answered),
        "agreeing": agreeing,
        "agreement_rate": _rate(agreeing, answered),
        "agreement_by_label": by_label,
        "steps_with_agreeing_analysis": steps_with_agreeing,
        "step_agreement_rate": _rate(steps_with_agreeing, len(items)),
        "kept": len(sft_train) + len(sft_val),
        "sft_train": len(sft_train),
        "sft_val": len(sft_val),
        "sft_val_problems": len({e.problem_id for e in sft_val}),
        "balance": yes_no,
        "drops": {reason: status[reason] for reason in DROP_REASONS},
    }
    if decided:
        report["decided_by"] = {
            k: {"analyses": n, "agreement_rate": _rate(decided_agree[k], n)} for k, n in sorted(decided.items())
        }
    if p_yes_sources:
        report["p_yes_source"] = dict(sorted(p_yes_sources.items()))
    return report


def _table(rows: list[dict[str, Any]], size: int, seed: int) -> list[dict[str, Any]]:
    """A seeded sample of kept and dropped analyses (half each, when there are enough)."""
    kept = [r for r in rows if r["_status"] == "kept"]
    dropped = [r for r in rows if r["_status"] != "kept"]
    rng = random.Random(f"{seed}:table")
    n_kept = min(len(kept), max(size // 2, size - len(dropped)))
    pick = rng.sample(kept, n_kept) + rng.sample(dropped, min(len(dropped), size - n_kept))
    return [
        {
            "sample_id": r["sample_id"],
            "label": "positive" if r["_label"] else "negative",
            "index": r["index"],
            "verdict": r["verdict"],
            "status": r["_status"],
            "text": r["text"][:2000],
            "error": r["error"],
        }
        for r in pick
    ]


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def fitting_samples(
    train: list[StepSample], val: list[StepSample], limit: int, model_dir: Path
) -> tuple[list[StepSample], list[StepSample], int]:
    """The labelled samples whose student prompt has at most `limit` tokens (the student's
    tokenizer in `model_dir`), and how many labelled samples were too long."""
    from transformers import AutoTokenizer

    from components.model_folder import check_model_dir

    check_model_dir(model_dir, "base")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    def fits(s: StepSample) -> bool:
        return s.label is None or student_prompt_tokens(tokenizer, s.question, s.previous_steps, s.now_step) <= limit

    kept_train, kept_val = [s for s in train if fits(s)], [s for s in val if fits(s)]
    labelled = sum(s.label is not None for s in train + val)
    return kept_train, kept_val, labelled - sum(s.label is not None for s in kept_train + kept_val)


def _remove(paths_: Iterable[Path]) -> None:
    for p in paths_:
        p.unlink(missing_ok=True)


def run(params: Params, layout: Layout = Layout(), teacher: Teacher | None = None) -> dict[str, Any]:
    """`rprm synthesize`: K teacher analyses per labelled step, filter, balance, split; the report
    (inputs and outputs in `layout`).

    `teacher` overrides the one params name (programmatic use); it is closed at the end.
    """
    from components import tracking

    train, val = _read_inputs(layout.steps_train, layout.steps_val)
    limit = params.synthesize.max_prompt_tokens
    too_long = 0
    if limit is not None:
        train, val, too_long = fitting_samples(train, val, limit, layout.base_model)
    items = select_samples(train, val, params.synthesize.max_samples, params.synthesize.seed)
    if not items:
        why = f" within synthesize.max_prompt_tokens={limit}" if limit is not None else ""
        raise DataError(layout.steps_train, None, "label", f"no labelled step samples{why} to synthesize from")
    report_path = layout.root / REPORT
    outputs = (layout.synth_critiques, layout.sft_train, layout.sft_val, report_path)
    _remove(outputs)  # a failed run must not leave an older run's outputs looking current
    with tracking.stage_run(
        "synthesize", params, sections=["teacher", "synthesize"], inputs=[layout.steps_train, layout.steps_val],
        root=layout.root,
    ):
        teacher = teacher if teacher is not None else load_teacher(params.teacher)
        try:
            analyses, resumed = generate_analyses(items, teacher, params, layout.synth_journal)
        finally:
            teacher.close()
        critiques, sft_train, sft_val, report, table = build_outputs(items, analyses, params, teacher.name)
        report["skipped_long_prompts"] = too_long
        write_jsonl(layout.synth_critiques, critiques)
        write_jsonl(layout.sft_train, sft_train)
        write_jsonl(layout.sft_val, sft_val)
        write_json(report_path, report)
        tracking.log_report({**report, "resumed_steps": resumed}, "synthesis.json")
        tracking.log_table(table, "synthesis_samples.json")
    b = report["balance"]["sft_train"]
    print(
        f"synthesize: {report['steps_attempted']} steps x {report['samples_per_step']} analyses; "
        f"valid {report['valid']}, agreeing {report['agreeing']} (agreement rate {report['agreement_rate']}); "
        f"kept {report['kept']} -> sft_train {report['sft_train']} (yes {b['yes']}/no {b['no']}), "
        f"sft_val {report['sft_val']}; teacher errors {report['teacher_errors']}"
    )
    return report
