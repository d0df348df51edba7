"""The `sample-pairs` stage: the SFT model's own analyses become DPO preference pairs (docs/method.md §8).

For each selected labelled step sample the SFT model samples K analyses with the R-PRM student
prompt (`params.sample_pairs.sampling`, engine from `params.backend`). Each analysis is cleaned
with the official post-processing and sorted by the official rules (docs/method.md §8):

- *invalid*: no verdict string, or more than one (both verdicts included): skipped;
- it holds the verdict that agrees with the label: *chosen* only if that verdict occurs once
  and ends the analysis (`parse_verdict`), otherwise discarded;
- it holds the opposite verdict (exactly once): *rejected* (no ending check).

Pairs are chosen x rejected of the same step sample (optionally capped per step by a seeded
sample, `max_pairs_per_step`), balanced 1:1 by the chosen verdict (seeded), and split by
problem into train/validation as in docs/method.md §6 (problems shuffled with the seed; whole
problems go to validation until it holds at least `val_size` pairs). Prompts are the student
chat messages (system + filled template), the same the SFT model was trained on.

Resumable: each step sample's K generations are appended to `data/pairs/journal.jsonl` as
soon as their batch finishes. Work is batched in fixed slices of the selected samples (of
`backend.batch_size`), and a slice with any missing sample is regenerated whole (journaled
samples keep their first result), so every generation is made in the same batch, with the
same per-row seed derived from (sampling seed, sample id), as in an uninterrupted run: a
resumed run writes the same outputs. The journal's header (`components.journal`) holds a
fingerprint of what determines the generations (sampling and backend params, SFT model, step
samples); a journal written under another fingerprint is started over with a warning. Outputs are written atomically
at the end; every sampled analysis is kept in `data/pairs/critiques.jsonl`.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.backends.base import sample_seed
from components.config import Params
from components.io import DataError, content_digest, read_jsonl, write_json, write_jsonl
from components.journal import Journal, finished, open_journal
from components.paths import Layout
from components.prompts import (
    VERDICT_NO,
    VERDICT_YES,
    parse_verdict,
    postprocess_response,
    student_messages,
    student_prompt_tokens,
    verdict_for_label,
)
from components.records import ChatMessage, Critique, PreferencePair, StepSample

log = logging.getLogger(__name__)

SAMPLE_TABLE_ROWS = 50


# --------------------------------------------------------------------------------------
# Pure logic (pair rules, balance, split)
# --------------------------------------------------------------------------------------


def pair_role(text: str, label: bool) -> str | None:
    """'chosen', 'rejected' or None for one post-processed analysis (docs/method.md §8 rules)."""
    n_verdicts = text.count(VERDICT_YES) + text.count(VERDICT_NO)
    if n_verdicts != 1:
        return None
    target = VERDICT_YES if label else VERDICT_NO
    if target in text:
        return "chosen" if parse_verdict(text).verdict == verdict_for_label(label) else None
    return "rejected"


def select_samples(samples: Sequence[StepSample], max_samples: int | None, seed: int) -> list[StepSample]:
    """Labelled samples to sample analyses for: up to `max_samples`, half of each label when possible.

    Chosen verdicts follow the labels, so label-balanced samples give balanceable pairs.
    Returned in file order.
    """
    labelled = [s for s in samples if s.label is not None]
    if max_samples is None or len(labelled) <= max_samples:
        return labelled
    rng = random.Random(seed)
    pos = [s for s in labelled if s.label]
    neg = [s for s in labelled if not s.label]
    rng.shuffle(pos)
    rng.shuffle(neg)
    n_neg = min(len(neg), max_samples // 2)
    n_pos = min(len(pos), max_samples - n_neg)
    n_neg = min(len(neg), max_samples - n_pos)
    keep = {s.id for s in pos[:n_pos] + neg[:n_neg]}
    return [s for s in labelled if s.id in keep]


def build_pairs(
    sample: StepSample, critiques: Sequence[Critique], cap: int | None, seed: int
) -> list[PreferencePair]:
    """Chosen x rejected pairs of one step sample (seeded subsample of `cap` when capped)."""
    assert sample.label is not None
    chosen = [c for c in critiques if pair_role(c.text, sample.label) == "chosen"]
    rejected = [c for c in critiques if pair_role(c.text, sample.label) == "rejected"]
    combos = list(itertools.product(chosen, rejected))
    if cap is not None and len(combos) > cap:
        rng = random.Random(f"{seed}:{sample.id}")
        picked = sorted(rng.sample(range(len(combos)), cap))
        combos = [combos[i] for i in picked]
    prompt = [ChatMessage(**m) for m in student_messages(sample.question, sample.previous_steps, sample.now_step)]
    verdict = verdict_for_label(sample.label)
    return [
        PreferencePair(
            id=f"{sample.id}#{c.index}-{r.index}",
            sample_id=sample.id,
            problem_id=sample.problem_id,
            prompt=prompt,
            chosen=c.text,
            rejected=r.text,
            chosen_verdict=verdict,  # type: ignore[arg-type]
        )
        for c, r in combos
    ]


def balance_pairs(pairs: Sequence[PreferencePair], seed: int) -> list[PreferencePair]:
    """1:1 Yes-chosen / No-chosen (seeded shuffle, truncate to the smaller side), input order kept."""
    rng = random.Random(seed)
    yes = [p for p in pairs if p.chosen_verdict == "yes"]
    no = [p for p in pairs if p.chosen_verdict == "no"]
    rng.shuffle(yes)
    rng.shuffle(no)
    n = min(len(yes), len(no))
    keep = {p.id for p in yes[:n] + no[:n]}
    return [p for p in pairs if p.id in keep]


def split_by_problem(
    pairs: Sequence[PreferencePair], val_size: int, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Section 2.5 split: shuffled problems go whole to validation until it has >= val_size pairs.

    At least one problem always stays in train.
    """
    by_problem: dict[str, list[PreferencePair]] = defaultdict(list)
    for p in pairs:
        by_problem[p.problem_id].append(p)
    problems = list(by_problem)
    random.Random(seed).shuffle(problems)
    val_problems: set[str] = set()
    n_val = 0
    for pid in problems[:-1]:
        if n_val >= val_size:
            break
        val_problems.add(pid)
        n_val += len(by_problem[pid])
    train = [p for p in pairs if p.problem_id not in val_problems]
    val = [p for p in pairs if p.problem_id in val_problems]
    return train, val


def balance_and_split(
    candidates: Sequence[PreferencePair], balance: bool, val_size: int, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair], list[PreferencePair]]:
    """(balanced, train, val): balance 1:1 by chosen verdict, split by problem, rebalance val.

    Whole problems rarely split 1:1; when validation holds both verdicts it is balanced again, so
    0.5 is the held-out accuracy of any constant verdict bias and more means real discrimination.
    """
    balanced = balance_pairs(candidates, seed) if balance else list(candidates)
    train, val = split_by_problem(balanced, val_size, seed)
    if balance and {p.chosen_verdict for p in val} == {"yes", "no"}:
        val = balance_pairs(val, seed)
    return balanced, train, val


# --------------------------------------------------------------------------------------
# Sampling with a journal
# --------------------------------------------------------------------------------------


def generation_settings(params: Params, model_dir: Path, steps_file: Path) -> dict[str, Any]:
    """What determines the sampled analyses: sampling + backend params (and the hf sampler), model, step samples."""
    from components.backends.sampler import SAMPLER as hf_sampler

    ident = {
        "sampling": params.sample_pairs.sampling.model_dump(mode="json"),
        "backend": params.backend.model_dump(mode="json"),
        "sampler": hf_sampler if params.backend.kind == "hf" else None,
        "model": content_digest(model_dir),
        "steps": content_digest(steps_file),
    }
    return ident


def sample_analyses(
    params: Params, samples: Sequence[StepSample], model_dir: Path, journal: Journal
) -> dict[str, dict[str, Any]]:
    """Sample K analyses for every sample not yet journaled; return journal records by sample id."""
    from tqdm import tqdm

    sampling = params.sample_pairs.sampling
    size = params.backend.batch_size
    chunks = [list(samples[i : i + size]) for i in range(0, len(samples), size)]
    todo = [c for c in chunks if any(s.id not in journal for s in c)]
    done = sum(1 for s in samples if s.id in journal)
    if todo:
        from components.backends import load_backend

        backend = load_backend(params.backend, str(model_dir), dtype=params.model.dtype)
        try:
            with tqdm(total=len(samples), initial=done, desc="sample-pairs", unit="step") as bar:
                for chunk in todo:
                    convs = [student_messages(s.question, s.previous_steps, s.now_step) for s in chunk]
                    seeds = [sample_seed(sampling.seed, s.id) for s in chunk]
                    outputs = backend.generate(convs, sampling, seeds=seeds)
                    for s, seed, gens in zip(chunk, seeds, outputs, strict=True):
                        if s.id in journal:
                            continue  # finished before an interruption: keep the first result
                        journal.append({
                            "sample_id": s.id,
                            "seed": seed,
                            "generator": backend.name,
                            "generations": [
                                {"text": g.text, "p_yes": g.p_yes, "num_tokens": g.num_tokens,
                                 "finish_reason": g.finish_reason, "error": g.error}
                                for g in gens
                            ],
                        })
                        bar.update(1)
        finally:
            backend.close()
    return finished(journal)


def critiques_of(sample: StepSample, record: dict[str, Any], params: Params) -> list[Critique]:
    """Post-processed, parsed critiques of one sample from its journal record."""
    sampling = params.sample_pairs.sampling
    assert sample.label is not None
    out = []
    for i, g in enumerate(record["generations"]):
        text = postprocess_response(g["text"] or "")
        parsed = parse_verdict(text)
        p_yes = g.get("p_yes")
        out.append(Critique(
            sample_id=sample.id,
            text=text,
            verdict=parsed.verdict,
            p_yes=None if p_yes is None else min(1.0, max(0.0, float(p_yes))),
            generator=str(record.get("generator", "")),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=record.get("seed"),
            index=i,
            invalid_reason=parsed.reason if not g.get("error") else "generation_error",
            agrees=parsed.verdict == verdict_for_label(sample.label),
            kept=False,
            error=g.get("error"),
        ))
    return out


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


@dataclass
class PairsResult:
    """Everything the stage writes."""

    critiques: list[Critique]
    train: list[PreferencePair]
    val: list[PreferencePair]
    report: dict[str, Any]


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def assemble(params: Params, samples: Sequence[StepSample], records: dict[str, dict[str, Any]]) -> PairsResult:
    """Critiques, pairs (cap, balance, split) and the report from journaled generations."""
    sp = params.sample_pairs
    critiques: list[Critique] = []
    candidates: list[PreferencePair] = []
    roles: Counter[str] = Counter()
    steps_with_pairs = 0
    agree_by_label: dict[str, list[int]] = {"positive": [0, 0], "negative": [0, 0]}
    pairs_before_cap = 0
    for s in samples:
        assert s.label is not None
        crits = critiques_of(s, records[s.id], params)
        critiques.extend(crits)
        for c in crits:
            roles[pair_role(c.text, s.label) or "unused"] += 1
            bucket = agree_by_label["positive" if s.label else "negative"]
            bucket[0] += int(bool(c.agrees))
            bucket[1] += 1
        n_chosen = sum(1 for c in crits if pair_role(c.text, s.label) == "chosen")
        n_rejected = sum(1 for c in crits if pair_role(c.text, s.label) == "rejected")
        pairs_before_cap += n_chosen * n_rejected
        pairs = build_pairs(s, crits, sp.max_pairs_per_step, sp.seed)
        steps_with_pairs += bool(pairs)
        candidates.extend(pairs)
    balanced, train, val = balance_and_split(candidates, sp.balance, sp.val_size, sp.seed)
    used = {(p.sample_id, idx) for p in train + val
            for idx in (int(x) for x in p.id.rsplit("#", 1)[1].split("-"))}
    for c in critiques:
        c.kept = (c.sample_id, c.index) in used

    n = len(critiques)
    errors = sum(1 for c in critiques if c.error)
    valid = sum(1 for c in critiques if c.verdict != "invalid")
    agreeing = sum(1 for c in critiques if c.agrees)
    reasons = Counter(c.invalid_reason for c in critiques if c.verdict == "invalid")
    report: dict[str, Any] = {
        "step_samples": len(samples),
        "labels": {"positive": sum(1 for s in samples if s.label), "negative": sum(1 for s in samples if not s.label)},
        "analyses": n,
        "generation_errors": errors,
        "valid": valid,
        "valid_rate": _rate(valid, n),
        "invalid_reasons": dict(sorted(reasons.items())),
        "verdicts": {"yes": sum(1 for c in critiques if c.verdict == "yes"),
                     "no": sum(1 for c in critiques if c.verdict == "no")},
        "agreeing": agreeing,
        "agreement_rate": _rate(agreeing, n),
        "agreement_rate_valid": _rate(agreeing, valid),
        "agreement_by_label": {k: _rate(v[0], v[1]) for k, v in agree_by_label.items()},
        "roles": {"chosen": roles["chosen"], "rejected": roles["rejected"], "unused": roles["unused"]},
        "pair_yield": {
            "steps_with_pairs": steps_with_pairs,
            "steps_with_pairs_rate": _rate(steps_with_pairs, len(samples)),
            "pairs_per_step": _rate(pairs_before_cap, len(samples)),
            "pairs_per_step_capped": _rate(len(candidates), len(samples)),
        },
        "pairs": {"candidates": pairs_before_cap, "after_cap": len(candidates),
                  "after_balance": len(balanced), "train": len(train), "val": len(val)},
        "balance": {
            "candidates": dict(Counter(p.chosen_verdict for p in candidates)),
            "train": dict(Counter(p.chosen_verdict for p in train)),
            "val": dict(Counter(p.chosen_verdict for p in val)),
        },
        "problems": {"train": len({p.problem_id for p in train}), "val": len({p.problem_id for p in val})},
    }
    return PairsResult(critiques=critiques, train=train, val=val, report=report)


def prompt_tokens(tokenizer: Any, sample: StepSample) -> int:
    """Length in tokens of a sample's student prompt, chat template and generation prompt included."""
    return student_prompt_tokens(tokenizer, sample.question, sample.previous_steps, sample.now_step)


def load_step_samples(params: Params, model_dir: Path, steps_file: Path) -> tuple[list[StepSample], int]:
    """The labelled training step samples of `steps_file` the SFT model will analyse, and how many
    were too long."""
    samples = read_jsonl(steps_file, StepSample, key=lambda s: s.id)
    limit = params.sample_pairs.max_prompt_tokens
    too_long = 0
    if limit is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        fitting = [s for s in samples if s.label is None or prompt_tokens(tokenizer, s) <= limit]
        too_long = len(samples) - len(fitting)
        samples = fitting
    selected = select_samples(samples, params.sample_pairs.max_samples, params.sample_pairs.seed)
    if not selected:
        why = f" within sample_pairs.max_prompt_tokens={limit}" if limit is not None else ""
        raise DataError(steps_file, None, "label", f"no labelled step samples{why} to build pairs from")
    return selected, too_long


def run(params: Params, layout: Layout = Layout()) -> dict[str, Any]:
    """`rprm sample-pairs`: sample, pair, balance and split; write the layout's data/pairs and
    reports/pairs.json."""
    from components import tracking
    from components.model_folder import check_model_dir

    model_dir, steps_file = layout.sft_model, layout.steps_train
    check_model_dir(model_dir, "SFT")
    samples, too_long = load_step_samples(params, model_dir, steps_file)
    settings = generation_settings(params, model_dir, steps_file)
    with tracking.stage_run("sample-pairs", params, sections=["backend", "sample_pairs"],
                            inputs=[model_dir, steps_file], root=layout.root):
        with open_journal(layout.pairs_journal, settings, key="sample_id") as journal:
            records = sample_analyses(params, samples, model_dir, journal)
        result = assemble(params, samples, records)
        report = {**result.report, "skipped_long_prompts": too_long}
        tracking.log_report(report, "pairs.json")
        tracking.log_table(
            [{"sample_id": p.sample_id, "chosen_verdict": p.chosen_verdict, "chosen": p.chosen,
              "rejected": p.rejected} for p in result.train[:SAMPLE_TABLE_ROWS]],
            "pairs_sample.json",
        )
        if not result.train:
            raise DataError(layout.pairs_critiques, None, None,
                            "no preference pairs: the SFT model never produced both an agreeing and an "
                            f"opposite valid analysis for a step (valid rate {report['valid_rate']}, "
                            f"verdicts {report['verdicts']}); train SFT longer or raise sampling.n/temperature")
        write_jsonl(layout.pairs_critiques, result.critiques)
        write_jsonl(layout.dpo_train, result.train)
        write_jsonl(layout.dpo_val, result.val)
        write_json(layout.report("pairs.json"), report)
    log.info("sample-pairs: %d train / %d val pairs, valid rate %s",
             len(result.train), len(result.val), report["valid_rate"])
    return report
