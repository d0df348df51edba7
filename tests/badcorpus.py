"""Broken-input corpus for the reliability suite, generated into tmp_path at test time.

A *target* is one kind of input file that a loader or a stage reads (PRM800K in both line
formats, ProcessBench, PRMBench, the Best-of-N test sets and candidate pools, StepSample,
SFTExample and PreferencePair files, ProcessBench predictions, PRMBench results, the prepared
benchmark files). Each target knows three valid records and where, in each record, a wrong
type, a missing field, an empty list and an out-of-range label go. A *breakage* turns the
valid file into a broken one and states the error it must produce: the 1-based line, the field
(None for line-level faults: bytes, JSON, size) and a fragment of the message.

`cases(target)` gives every applicable breakage of a target; `case(target, breakage)` one of
them. `Case.write(path)` writes the file. The 50 MB single line (a JSON array of small objects,
which would take well over a gigabyte to parse whole) is streamed to disk in 1 MiB chunks,
never held in memory, and is only made for the targets that ask for it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.prompts import VERDICT_NO, VERDICT_YES, student_messages

HUGE_LINE_BYTES = 50 * 1024 * 1024
DELETE = object()  # value that removes the field instead of setting it

GENERIC = ("invalid_json", "not_object", "non_utf8", "empty_file", "duplicate_id", "huge_line")
RECORD = ("wrong_type", "missing_field", "empty_list", "label_out_of_range")
BREAKAGES = GENERIC[:4] + RECORD + GENERIC[4:]


@dataclass(frozen=True)
class Case:
    """One broken file: its lines and the error it must raise."""

    target: str
    breakage: str
    lines: tuple[bytes, ...]
    line: int | None
    field: str | None
    message: str
    huge_at: int | None = None  # 0-based index of the line replaced by the 50 MB line

    @property
    def id(self) -> str:
        return f"{self.target}-{self.breakage}"

    def write(self, path: Path) -> Path:
        """Write the broken file (creating folders); return its path."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        with path.open("wb") as fh:
            for i, raw in enumerate(self.lines):
                if i == self.huge_at:
                    write_huge_line(fh)
                else:
                    fh.write(raw + b"\n")
        return path


def write_huge_line(fh: Any, size: int = HUGE_LINE_BYTES) -> None:
    """Stream one ~`size`-byte line, a JSON array of small objects, then a newline."""
    unit = b'{"a":1},'
    chunk = unit * (1024 * 1024 // len(unit))
    fh.write(b"[")
    written = 1
    while written + len(chunk) < size:
        fh.write(chunk)
        written += len(chunk)
    fh.write(b'{"a":1}]\n')


@dataclass(frozen=True)
class Target:
    """A kind of input file: valid records and where each record-level breakage goes.

    Each record-level entry is (dotted path to change, value or DELETE, field the error names,
    message fragment). `key` is the field that must be unique (None: duplicates are legitimate
    or impossible, with `key_reason` saying why). `empty_message` is the error of a file with no
    record (naming `empty_field`). `skip` names breakages that do not apply, with the reason.
    """

    name: str
    records: Callable[[], list[dict[str, Any]]]
    record_breaks: dict[str, tuple[str, Any, str, str]]
    key: str | None = "id"
    empty_message: str = "no records"
    empty_field: str | None = None
    huge: bool = False
    skip: dict[str, str] = field(default_factory=dict)


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _set(obj: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        obj = obj[int(p)] if isinstance(obj, list) else obj[p]
    if isinstance(obj, list):
        obj[int(last)] = value
    elif value is DELETE:
        del obj[last]
    else:
        obj[last] = value


def mutated(record: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of `record` with the field at `dotted` set to `value` (or removed)."""
    out = copy.deepcopy(record)
    _set(out, dotted, value)
    return out


def cases(target: str | Target) -> list[Case]:
    """Every applicable breakage of a target, in BREAKAGES order."""
    t = TARGETS[target] if isinstance(target, str) else target
    recs = t.records()
    good = [_dump(r) for r in recs]
    out: list[Case] = []
    for b in BREAKAGES:
        if b in t.skip or (b == "huge_line" and not t.huge) or (b == "duplicate_id" and t.key is None):
            continue
        if b == "invalid_json":
            out.append(Case(t.name, b, (good[0], good[1][:-7], good[2]), 2, None, "invalid JSON"))
        elif b == "not_object":
            out.append(Case(t.name, b, (good[0], b"[1, 2, 3]", good[2]), 2, None, "expected a JSON object"))
        elif b == "non_utf8":
            # Latin-1 bytes inside the first key: the JSON structure is intact, the bytes are not UTF-8
            raw = good[1][:2] + b"caf\xe9\xff" + good[1][2:]
            out.append(Case(t.name, b, (good[0], raw, good[2]), 2, None, "UTF-8"))
        elif b == "empty_file":
            out.append(Case(t.name, b, (b"", b"  "), None, t.empty_field, t.empty_message))
        elif b == "duplicate_id":
            out.append(Case(t.name, b, (good[0], good[1], good[0]), 3, t.key, "duplicate"))
        elif b == "huge_line":
            out.append(Case(t.name, b, (good[0], b"", good[2]), 2, None, "longer than", huge_at=1))
        else:
            dotted, value, fld, msg = t.record_breaks[b]
            bad = _dump(mutated(recs[1], dotted, value))
            out.append(Case(t.name, b, (good[0], bad, good[2]), 2, fld, msg))
    return out


def case(target: str, breakage: str) -> Case:
    """One breakage of one target."""
    for c in cases(target):
        if c.breakage == breakage:
            return c
    raise KeyError(f"{target} has no breakage {breakage!r}")


# --------------------------------------------------------------------------------------
# Valid records of every target
# --------------------------------------------------------------------------------------


def prm800k_step_records() -> list[dict[str, Any]]:
    """Per-step PRM800K solutions (the layout of ../shared/data/prm800k)."""
    out = []
    for i in range(3):
        out.append({
            "id": f"sol-{i}",
            "problem": f"What is {i} + 2?",
            "steps": [
                {"completions": [{"text": "We add the numbers.", "rating": 1}], "human_completion": None,
                 "chosen_completion": 0, "chose_human_completion": False},
                {"completions": [{"text": f"{i} + 2 = {i + 2}.", "rating": 1},
                                 {"text": f"{i} + 2 = {i + 3}.", "rating": -1}],
                 "human_completion": None, "chosen_completion": 0, "chose_human_completion": False},
            ],
        })
    return out


def prm800k_official_records() -> list[dict[str, Any]]:
    """The same solutions in PRM800K's official line format."""
    out = []
    for sol in prm800k_step_records():
        steps = [{"completions": [{**c, "flagged": None} for c in st["completions"]],
                  "human_completion": None, "chosen_completion": st["chosen_completion"]}
                 for st in sol["steps"]]
        out.append({
            "labeler": "x", "timestamp": "2023-01-22T04:34:27", "generation": None,
            "is_quality_control_question": False, "is_initial_screening_question": False,
            "question": {"problem": sol["problem"], "ground_truth_answer": "2"},
            "label": {"steps": steps, "total_time": 1000, "finish_reason": "solution"},
        })
    return out


def processbench_records(subset: str = "gsm8k") -> list[dict[str, Any]]:
    """Official ProcessBench rows (first error at step 1, none, step 0)."""
    return [
        {"id": f"{subset}-{i}", "generator": "g", "problem": f"Problem {i}?", "steps": ["a", "b", "c"],
         "final_answer_correct": label == -1, "label": label}
        for i, label in enumerate([1, -1, 0])
    ]


def prepared_processbench_records() -> list[dict[str, Any]]:
    """ProcessBench items as `prepare` writes them (with the subset)."""
    return [{**r, "subset": "gsm8k"} for r in processbench_records()]


def prmbench_records() -> list[dict[str, Any]]:
    """PRMBench preview rows (error_steps 1-based)."""
    return [
        {"idx": f"circular_{i}", "classification": "circular", "modified_question": f"Question {i}?",
         "modified_process": ["s1", "s2", "s3"], "error_steps": [2] if i != 1 else [],
         "original_process": ["s1", "s2", "s3"]}
        for i in range(3)
    ]


def prepared_prmbench_records() -> list[dict[str, Any]]:
    """PRMBench items as `prepare` writes them (with the position)."""
    return [{k: v for k, v in r.items() if k != "original_process"} | {"position": i}
            for i, r in enumerate(prmbench_records())]


def bon_records() -> list[dict[str, Any]]:
    """A Best-of-N test set (AMC23-like: `answer` is the gold)."""
    return [{"id": f"amc-{i}", "problem": f"Compute {i} * 3.", "answer": str(3 * i)} for i in range(3)]


def bon_olympiad_records() -> list[dict[str, Any]]:
    """OlympiadBench: the gold is the list `meta.final_answer`."""
    return [{"id": f"ob-{i}", "problem": f"Find {i}.", "meta": {"final_answer": [str(i)]}} for i in range(3)]


def pool_records() -> list[dict[str, Any]]:
    """A real candidate pool: N sampled responses per problem."""
    return [
        {"id": f"ob-{i}", "problem": f"Find {i}.", "answer": [str(i)],
         "candidates": [{"response": f"Step one.\n\nSo \\boxed{{{i}}}.", "correct": True},
                        {"response": "Guess.\n\n\\boxed{7}", "correct": False}]}
        for i in range(3)
    ]


def step_sample_records() -> list[dict[str, Any]]:
    """StepSamples as `prepare` writes them (both labels, two problems)."""
    return [
        {"id": f"sol-{i}-s1-c0", "problem_id": f"p{i % 2}", "question": f"What is {i} + 2?",
         "previous_steps": ["We add the numbers."], "now_step": f"{i} + 2 = {i + 2 + (i == 1)}.",
         "step_index": 1, "label": i != 1, "source": "prm800k/x.jsonl"}
        for i in range(3)
    ]


def sft_records() -> list[dict[str, Any]]:
    """SFT chat examples whose analysis really ends with the verdict they claim."""
    out = []
    for i, verdict in enumerate(["yes", "no", "yes"]):
        msgs = student_messages(f"What is {i} + 2?", ["We add."], f"{i} + 2 = {i + 2}.")
        analysis = "Analysis: checked.\n" + (VERDICT_YES if verdict == "yes" else VERDICT_NO)
        out.append({"id": f"sft-{i}", "problem_id": f"p{i}", "verdict": verdict,
                    "messages": [*msgs, {"role": "assistant", "content": analysis}]})
    return out


def pair_records() -> list[dict[str, Any]]:
    """DPO preference pairs: chosen ends with the agreeing verdict, rejected with the other."""
    out = []
    for i, verdict in enumerate(["yes", "no", "yes"]):
        yes, no = "Analysis: fine.\n" + VERDICT_YES, "Analysis: wrong.\n" + VERDICT_NO
        out.append({"id": f"pair-{i}", "sample_id": f"s{i}", "problem_id": f"p{i}",
                    "prompt": student_messages(f"What is {i} + 2?", [], f"{i} + 2 = {i + 2}."),
                    "chosen": yes if verdict == "yes" else no, "rejected": no if verdict == "yes" else yes,
                    "chosen_verdict": verdict})
    return out


def processbench_prediction_records() -> list[dict[str, Any]]:
    """Predictions for processbench_records(): step rewards per step."""
    return [{"id": f"gsm8k-{i}", "step_rewards": [0.9, 0.2, 0.8]} for i in range(3)]


def prmbench_result_records() -> list[dict[str, Any]]:
    """Official-format PRMBench results for prmbench_records()."""
    return [{"idx": f"circular_{i}", "scores": {"step_level_validity_scores": [0.9, 0.1, 0.8]}} for i in range(3)]


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("prm800k_steps", prm800k_step_records, {
        "wrong_type": ("problem", 7, "problem", "string"),
        "missing_field": ("steps", DELETE, "steps", "missing"),
        "empty_list": ("steps", [], "steps", "empty step list"),
        "label_out_of_range": ("steps.1.completions.1.rating", 5, "steps.1.completions.1.rating", "less than or equal"),
    }, huge=True),
    Target("prm800k_official", prm800k_official_records, {
        "wrong_type": ("question.problem", ["x"], "question.problem", "string"),
        "missing_field": ("label.steps", DELETE, "label.steps", "missing"),
        "empty_list": ("label.steps", [], "label.steps", "empty step list"),
        "label_out_of_range": ("label.steps.0.completions.0.rating", -2, "label.steps.0.completions.0.rating",
                               "greater than or equal"),
    }, key=None, skip={"duplicate_id": "ids are <file>-<line>: unique by construction"}),
    Target("processbench", processbench_records, {
        "wrong_type": ("label", "1", "label", "integer"),
        "missing_field": ("problem", DELETE, "problem", "missing"),
        "empty_list": ("steps", [], "steps", "empty step list"),
        "label_out_of_range": ("label", 3, "label", "out of range"),
    }),
    Target("prepared_processbench", prepared_processbench_records, {
        "wrong_type": ("steps", "a b c", "steps", "list"),
        "missing_field": ("label", DELETE, "label", "missing"),
        "empty_list": ("steps", [], "steps", "at least 1"),
        "label_out_of_range": ("label", 3, "label", "out of range"),
    }),
    Target("prmbench", prmbench_records, {
        "wrong_type": ("modified_process", "s1 s2", "modified_process", "list"),
        "missing_field": ("classification", DELETE, "classification", "missing"),
        "empty_list": ("modified_process", [], "modified_process", "empty step list"),
        "label_out_of_range": ("error_steps", [0], "error_steps.0", "out of range"),
    }, key=None, skip={"duplicate_id": "PRMBench repeats idx by design (position disambiguates)"}),
    Target("prepared_prmbench", prepared_prmbench_records, {
        "wrong_type": ("error_steps", "2", "error_steps", "list"),
        "missing_field": ("modified_question", DELETE, "modified_question", "missing"),
        "empty_list": ("modified_process", [], "modified_process", "at least 1"),
        "label_out_of_range": ("error_steps", [0], "error_steps.0", "out of range (1-based)"),
    }, key=None, skip={"duplicate_id": "PRMBench repeats idx by design (position disambiguates)"}),
    Target("bon_testset", bon_records, {
        "wrong_type": ("answer", 27, "answer", "string"),
        "missing_field": ("problem", DELETE, "problem", "missing"),
        "empty_list": ("answer", "", "answer", "empty"),
    }, skip={"label_out_of_range": "a test set has no numeric label"}),
    Target("bon_olympiadbench", bon_olympiad_records, {
        "wrong_type": ("meta.final_answer", "3", "meta.final_answer", "list"),
        "missing_field": ("meta", DELETE, "meta.final_answer", "missing"),
        "empty_list": ("meta.final_answer", [], "meta.final_answer", "non-empty"),
    }, skip={"label_out_of_range": "a test set has no numeric label"}),
    Target("candidate_pool", pool_records, {
        "wrong_type": ("candidates.0.correct", "yes", "candidates.0.correct", "bool"),
        "missing_field": ("candidates", DELETE, "candidates", "missing"),
        "empty_list": ("candidates", [], "candidates", "empty"),
    }, skip={"label_out_of_range": "a pool has no numeric label (`correct` is a bool: see wrong_type)"}),
    Target("step_samples", step_sample_records, {
        "wrong_type": ("previous_steps", "We add.", "previous_steps", "list"),
        "missing_field": ("now_step", DELETE, "now_step", "missing"),
        "empty_list": ("question", "", "question", "at least 1"),
        "label_out_of_range": ("label", 2, "label", "boolean"),
    }, huge=True),
    Target("sft_examples", sft_records, {
        "wrong_type": ("messages", "hello", "messages", "list"),
        "missing_field": ("verdict", DELETE, "verdict", "missing"),
        "empty_list": ("messages", [], "messages", "at least 3"),
        "label_out_of_range": ("verdict", "maybe", "verdict", "'yes' or 'no'"),
    }),
    Target("preference_pairs", pair_records, {
        "wrong_type": ("chosen", 5, "chosen", "string"),
        "missing_field": ("rejected", DELETE, "rejected", "missing"),
        "empty_list": ("prompt", [], "prompt", "at least 1"),
        "label_out_of_range": ("chosen_verdict", "maybe", "chosen_verdict", "'yes' or 'no'"),
    }),
    Target("processbench_predictions", processbench_prediction_records, {
        "wrong_type": ("step_rewards", "high", "step_rewards", "expected a list"),
        "missing_field": ("id", DELETE, "id", "missing"),
        "empty_list": ("step_rewards", [], "step_rewards", "0 step scores"),
        "label_out_of_range": ("step_rewards.1", 1.5, "step_rewards[1]", "outside [0, 1]"),
    }, empty_message="no prediction", empty_field="id"),
    Target("prmbench_results", prmbench_result_records, {
        "wrong_type": ("scores", [0.9, 0.1, 0.8], "scores", "expected an object"),
        "missing_field": ("idx", DELETE, "idx", "missing"),
        "empty_list": ("scores.step_level_validity_scores", [], "scores.step_level_validity_scores", "0 step scores"),
        "label_out_of_range": ("scores.step_level_validity_scores.0", -0.5,
                               "scores.step_level_validity_scores[0]", "outside [0, 1]"),
    }, key="idx", empty_message="no result", empty_field="idx"),
]}


# --------------------------------------------------------------------------------------
# Params files (validate-params and every stage's -p)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamsCase:
    """A broken params file: text edits of a valid one and what the error must name."""

    breakage: str
    edit: Callable[[bytes], bytes]
    needles: tuple[str, ...]  # every one must appear in the error (dotted key, line, reason)
    folder: bool = False  # the params path is a folder

    @property
    def id(self) -> str:
        return f"params-{self.breakage}"

    def write(self, path: Path, valid: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.folder:
            path.mkdir()
        else:
            path.write_bytes(self.edit(valid))
        return path


def _sub(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def edit(text: bytes) -> bytes:
        assert text.count(old) == 1, old
        return text.replace(old, new)
    return edit


PARAMS_CASES: list[ParamsCase] = [
    ParamsCase("invalid_yaml", _sub(b"  val_fraction: 0.1\n", b"  val_fraction: [0.1\n"), ("invalid YAML", "line")),
    ParamsCase("non_utf8", _sub(b"  experiment: r-prm\n", b"  experiment: r-prm\xe9\xff\n"), ("UTF-8",)),
    ParamsCase("wrong_type", _sub(b"  val_fraction: 0.1\n", b"  val_fraction: a tenth\n"),
               ("prepare.val_fraction", "number")),
    ParamsCase("missing_field", _sub(b"  val_fraction: 0.1\n", b""), ("prepare.val_fraction", "missing key")),
    ParamsCase("unknown_field", _sub(b"  val_fraction: 0.1\n", b"  val_fraction: 0.1\n  val_fractoin: 0.2\n"),
               ("prepare.val_fractoin", "unknown key")),
    ParamsCase("empty_list", _sub(b"  prm800k_files:\n  - prm800k/phase1_train_plus.solutions.jsonl\n"
                                  b"  - prm800k/phase1_test.solutions.jsonl\n", b"  prm800k_files: []\n"),
               ("data.prm800k_files", "at least 1")),
    ParamsCase("label_out_of_range", _sub(b"  val_fraction: 0.1\n", b"  val_fraction: 1.5\n"),
               ("prepare.val_fraction", "less than 1")),
    ParamsCase("duplicate_id", _sub(b"  val_fraction: 0.1\n", b"  val_fraction: 0.1\n  val_fraction: 0.3\n"),
               ("duplicate key 'val_fraction'", "line")),
    ParamsCase("empty_file", lambda _: b"", ("top level must be a mapping",)),
    ParamsCase("folder", lambda t: t, ("cannot read params file",), folder=True),
]
