"""Data layer: loaders for PRM800K, ProcessBench, PRMBench, the Best-of-N test sets and pools.

One record type per kind (components/records.py). Three sources, chosen by `data.source`:

- `bundled`: the small real subsets in `data.bundled_dir` (shipped in git; see its README);
- `dir`: a folder laid out like `../shared/data` (`data.dir`): full-size copies;
- `hub`: the Hugging Face datasets through `datasets` (`Qwen/ProcessBench`,
  `hitsmy/PRMBench_Preview`, PRM800K's line files). A hub name may also be a local folder:
  one written by `Dataset.save_to_disk` is read with `load_from_disk`, any other folder of
  data files with `load_dataset(folder, data_files=...)` -- the same code path as the hub.
  The Best-of-N test sets and candidate pools are not on the hub: with `hub` they are read
  from the bundled folder (the six test sets are bundled complete, the pools as subsets).

Every loader validates at the boundary: bad JSON, non-UTF-8 bytes, a missing field, a wrong
type, an empty step list, a rating or label out of range or a duplicate id raises
:class:`components.io.DataError` naming the file (or `hub:<name>[<split>]`), the 1-based
line (row) and the field. Nothing is coerced silently (validation is strict: "3" is not 3).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from components.config import DataParams
from components.io import (
    DataError,
    iter_json_lines,
    parse_record,
    read_json,
    read_jsonl,
    unique_records,
)
from components.paths import PRMBENCH_FILE, PROCESSBENCH_IDS_FILE
from components.records import (
    PRMBENCH_CLASSES,
    PROCESSBENCH_SUBSETS,
    BonProblem,
    Candidate,
    CandidatePool,
    PRM800KCompletion,
    PRM800KSolution,
    PRM800KStep,
    PRMBenchItem,
    ProcessBenchItem,
    processbench_subset,
    split_steps,
)

Source = Literal["bundled", "dir", "hub"]

# Best-of-N test set name -> file under bon/testsets/ (the names best_of_n.datasets uses).
BON_TESTSETS: dict[str, str] = {
    "aime24": "aime24.jsonl",
    "amc23": "amc23.jsonl",
    "math500": "math500.jsonl",
    "minerva_math": "minerva_math.jsonl",
    "olympiadbench": "olympiadbench_200.jsonl",
    "college_math": "college_math_200.jsonl",
    "olympiadbench_675": "full/olympiadbench_675.jsonl",
    "college_math_2818": "full/college_math_2818.jsonl",
}
# Candidate pool name -> file under bon/candidates/, and the test set its problems belong to.
CANDIDATE_POOLS: dict[str, tuple[str, str]] = {
    "olympiadbench": ("olympiadbench_200.qwen2.5-7b-instruct.t1.n8.jsonl", "olympiadbench"),
    "math_cot_100": ("qwen25math_eval_rm_maj_example.math_cot_100.jsonl", "math"),
}


# --------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------


def normalize_problem(text: str) -> str:
    """Problem text compared across datasets: whitespace runs collapsed, case folded."""
    return " ".join(text.split()).casefold()


def problem_id(text: str) -> str:
    """Stable id of a problem: the same normalised text in any file gives the same id."""
    return hashlib.sha1(normalize_problem(text).encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


def source_root(data: DataParams, source: Source | None = None) -> Path:
    """Folder read for `source` (default data.source); the bundled folder stands in for `hub`."""
    source = source or data.source
    return Path(data.dir if source == "dir" else data.bundled_dir)


def hub_rows(
    name: str, *, split: str = "train", data_files: Sequence[str] | None = None
) -> tuple[str, Iterator[tuple[int, dict[str, Any]]]]:
    """Rows of a hub dataset split as (1-based row, dict), with the label used in errors.

    `name` is a hub id, a folder written by `save_to_disk` (read with `load_from_disk`) or a
    local folder of data files (`load_dataset(folder, data_files=...)`, as for the hub).
    """
    import datasets

    label = f"hub:{name}" + (f"/{','.join(data_files)}" if data_files else "") + f"[{split}]"
    local = Path(name)
    try:
        if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(label, None, None, f"no split {split!r} (has {sorted(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(
                name, data_files=list(data_files) if data_files else None, split=split
            )
    except DataError:
        raise
    except (OSError, ValueError, KeyError, datasets.exceptions.DatasetsError) as err:
        # not found, offline, unknown split, a file `datasets` cannot turn into a table
        raise DataError(label, None, None, f"cannot load: {type(err).__name__}: {err}") from None

    return label, enumerate(ds, start=1)


def _rows(
    data: DataParams,
    source: Source,
    rel_path: str,
    *,
    hub_name: str | None = None,
    hub_split: str = "train",
    hub_files: Sequence[str] | None = None,
) -> tuple[str, Iterator[tuple[int, Any]]]:
    """(label, rows) of one file of a source; `hub` reads `hub_name` when given."""
    if source == "hub" and hub_name is not None:
        return hub_rows(hub_name, split=hub_split, data_files=hub_files)
    path = source_root(data, source) / rel_path
    return str(path), iter_json_lines(path)


def _pick(obj: Any, fields: Sequence[str], label: str, line: int) -> dict[str, Any]:
    """The known fields of a record (extras in the source are ignored, missing ones reported)."""
    if not isinstance(obj, dict):
        raise DataError(label, line, None, f"expected a JSON object, got {type(obj).__name__}")
    return {k: obj[k] for k in fields if k in obj}


def _require(rec: dict[str, Any], fields: Sequence[str], steps_field: str, label: str, line: int) -> None:
    """Missing fields and an empty step list, reported before type validation."""
    for f in fields:
        if f not in rec:
            raise DataError(label, line, f, "missing field")
    if rec[steps_field] == []:
        raise DataError(label, line, steps_field, "empty step list")


def _check_steps(steps: list[str], label: str, line: int, field: str, *, allow_blank: bool = False) -> None:
    if not steps:
        raise DataError(label, line, field, "empty step list")
    if not allow_blank:
        for i, s in enumerate(steps):
            if not s.strip():
                raise DataError(label, line, f"{field}.{i}", "empty step")


# --------------------------------------------------------------------------------------
# PRM800K
# --------------------------------------------------------------------------------------


class _Raw(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _RawCompletion(_Raw):
    text: str
    rating: int | None = Field(ge=-1, le=1)


class _RawHuman(_Raw):
    text: str


class _RawSharedStep(_Raw):
    completions: list[_RawCompletion]
    human_completion: str | None
    chosen_completion: int | None = Field(ge=0)
    chose_human_completion: bool = False


class _RawShared(_Raw):
    """The per-step structure of ../shared/data/prm800k/*.solutions.jsonl."""

    id: str = Field(min_length=1)
    problem: str
    steps: list[_RawSharedStep]


class _RawOfficialStep(_Raw):
    completions: list[_RawCompletion] | None
    human_completion: _RawHuman | str | None = None
    chosen_completion: int | None = Field(ge=0)


class _RawQuestion(_Raw):
    problem: str


class _RawLabel(_Raw):
    steps: list[_RawOfficialStep]
    finish_reason: str | None = None


class _RawOfficial(_Raw):
    """The official PRM800K line format (github.com/openai/prm800k, data/*.jsonl)."""

    question: _RawQuestion
    label: _RawLabel


# Official lines whose labeler gave up or flagged the problem may carry no step at all.
_UNLABELLED_FINISH = {"give_up", "bad_problem"}


def _prm800k_steps(
    raw_steps: Sequence[_RawSharedStep | _RawOfficialStep], label: str, line: int, prefix: str
) -> list[PRM800KStep]:
    steps: list[PRM800KStep] = []
    for k, st in enumerate(raw_steps):
        where = f"{prefix}.{k}"
        comps = st.completions or []
        for c, comp in enumerate(comps):
            if not comp.text.strip():
                raise DataError(label, line, f"{where}.completions.{c}.text", "empty step text")
        human = st.human_completion
        if isinstance(human, _RawHuman):
            human = human.text
        chose_human = getattr(st, "chose_human_completion", False) or (
            st.chosen_completion is None and human is not None
        )
        if st.chosen_completion is not None and st.chosen_completion >= len(comps):
            raise DataError(
                label, line, f"{where}.chosen_completion",
                f"index {st.chosen_completion} out of range ({len(comps)} completions)",
            )
        if chose_human and (human is None or not human.strip()):
            raise DataError(label, line, f"{where}.human_completion", "chosen but missing or empty")
        if not comps and human is None:
            raise DataError(label, line, f"{where}.completions", "step has neither completions nor a human completion")
        steps.append(
            PRM800KStep(
                completions=[PRM800KCompletion(text=c.text, rating=c.rating) for c in comps],
                human_completion=human,
                chosen_completion=None if chose_human else st.chosen_completion,
                chose_human_completion=chose_human,
            )
        )
    return steps


def parse_prm800k_line(obj: Any, label: str, line: int, source: str) -> PRM800KSolution | None:
    """One PRM800K line in either format (detected per line) -> solution; None if unlabelled.

    Per-step format: `id`, `problem`, `steps[{completions, human_completion,
    chosen_completion, chose_human_completion}]`. Official format: `question.problem`,
    `label.steps[...]` (human_completion an object with `text`), `label.finish_reason`; its
    id is `<file stem>-<line>`. An official line finished `give_up`/`bad_problem` with no
    step is skipped (None); any other empty step list is an error.
    """
    if not isinstance(obj, dict):
        raise DataError(label, line, None, f"expected a JSON object, got {type(obj).__name__}")
    if "question" in obj or "label" in obj:
        raw = parse_record(_RawOfficial, obj, label, line, strict=True)
        problem, field = raw.question.problem, "question.problem"
        finish = raw.label.finish_reason
        if not raw.label.steps:
            if finish in _UNLABELLED_FINISH:
                return None
            raise DataError(label, line, "label.steps", "empty step list")
        steps = _prm800k_steps(raw.label.steps, label, line, "label.steps")
        sol_id = f"{Path(source).name.split('.')[0]}-{line:06d}"
    elif "problem" in obj or "steps" in obj or "id" in obj:
        raw_s = parse_record(_RawShared, obj, label, line, strict=True)
        problem, field, finish = raw_s.problem, "problem", None
        if not raw_s.steps:
            raise DataError(label, line, "steps", "empty step list")
        steps = _prm800k_steps(raw_s.steps, label, line, "steps")
        sol_id = raw_s.id
    else:
        raise DataError(
            label, line, "problem",
            "missing field (neither the per-step layout `problem`/`steps` nor the official "
            "`question`/`label` layout)",
        )
    if not problem.strip():
        raise DataError(label, line, field, "empty problem text")
    return PRM800KSolution(id=sol_id, problem=problem, steps=steps, finish_reason=finish, source=source)


def load_prm800k(
    data: DataParams, files: Sequence[str] | None = None, *, source: Source | None = None
) -> list[PRM800KSolution]:
    """PRM800K solutions from `files` (default data.prm800k_files) of the source; ids unique.

    Files are paths relative to the data folder (bundled/dir) or data files inside the hub
    dataset `data.hub_prm800k` (hub). Lines may mix the two line formats.
    """
    source = source or data.source
    out: list[PRM800KSolution] = []
    seen: dict[str, str] = {}
    for rel in files if files is not None else data.prm800k_files:
        label, rows = _rows(data, source, rel, hub_name=data.hub_prm800k, hub_files=[rel])
        src = f"{data.hub_prm800k}/{rel}" if source == "hub" else rel
        n_rows = 0
        for line, obj in tqdm(rows, desc=f"read {rel}", unit=" lines", disable=None, leave=False):
            n_rows += 1
            sol = parse_prm800k_line(obj, label, line, src)
            if sol is None:
                continue
            if sol.id in seen:
                raise DataError(label, line, "id", f"duplicate id {sol.id!r} (first in {seen[sol.id]})")
            seen[sol.id] = f"{label}:{line}"
            out.append(sol)
        if not n_rows:
            raise DataError(label, None, None, "no records")
    return out


# --------------------------------------------------------------------------------------
# ProcessBench
# --------------------------------------------------------------------------------------

_PB_FIELDS = ("id", "generator", "problem", "steps", "final_answer_correct", "label")


def parse_processbench_row(obj: Any, label: str, line: int, subset: str) -> ProcessBenchItem:
    """One ProcessBench solution (official fields) -> ProcessBenchItem with its subset."""
    rec = _pick(obj, _PB_FIELDS, label, line)
    _require(rec, ("id", "problem", "steps", "label"), "steps", label, line)
    item = parse_record(ProcessBenchItem, {**rec, "subset": subset}, label, line, strict=True)
    _check_steps(item.steps, label, line, "steps")
    if not item.problem.strip():
        raise DataError(label, line, "problem", "empty problem text")
    if item.label >= len(item.steps):
        raise DataError(
            label, line, "label",
            f"first-error index {item.label} out of range for {len(item.steps)} steps (-1..{len(item.steps) - 1})",
        )
    return item


def load_rprm_part_subset_ids(data: DataParams, source: Source | None = None) -> dict[str, list[str]]:
    """The R-PRM authors' quick-evaluation ids per ProcessBench subset.

    Read from the source folder; with `hub` from data.dir (the bundled file is truncated).
    """
    source = source or data.source
    path = source_root(data, "dir" if source == "hub" else source) / PROCESSBENCH_IDS_FILE
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise DataError(path, None, None, "expected an object {subset: [ids]}")
    for subset, ids in obj.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DataError(path, None, subset, "expected a list of id strings")
    return obj


def balanced_head(items: list[ProcessBenchItem], limit: int) -> list[ProcessBenchItem]:
    """The first `limit` items, alternating erroneous and all-correct solutions (file order within each).

    ProcessBench files list erroneous solutions first, so a plain head would hold no correct
    solution and leave F1 (a harmonic mean over both kinds) undefined.
    """
    wrong = [it for it in items if it.label != -1]
    right = [it for it in items if it.label == -1]
    out: list[ProcessBenchItem] = []
    for i in range(max(len(wrong), len(right))):
        out.extend(x[i] for x in (wrong, right) if i < len(x))
    keep = {id(it) for it in out[:limit]}
    return [it for it in items if id(it) in keep]


def load_processbench(
    data: DataParams,
    subsets: Sequence[str] = PROCESSBENCH_SUBSETS,
    limit: int | None = None,
    rprm_part_subset: bool = False,
    *,
    source: Source | None = None,
) -> list[ProcessBenchItem]:
    """ProcessBench solutions of `subsets`, in file order; optionally only the R-PRM quick-eval
    ids, and at most `limit` per subset (the first ones, deterministic)."""
    source = source or data.source
    wanted = load_rprm_part_subset_ids(data, source) if rprm_part_subset else None
    out: list[ProcessBenchItem] = []
    for subset in subsets:
        if subset not in PROCESSBENCH_SUBSETS:
            raise DataError(f"processbench/{subset}", None, "subset", f"unknown subset (one of {PROCESSBENCH_SUBSETS})")
        label, rows = _rows(
            data, source, f"processbench/{subset}.jsonl", hub_name=data.hub_processbench, hub_split=subset
        )
        items = unique_records(rows, lambda obj, line, label=label, subset=subset:
                               parse_processbench_row(obj, label, line, subset),
                               label, key=lambda it: it.id)
        seen = {it.id for it in items}
        if wanted is not None:
            ids = wanted.get(subset)
            if ids is None:
                raise DataError(PROCESSBENCH_IDS_FILE, None, subset, "no quick-eval ids for this subset")
            missing = [i for i in ids if i not in seen]
            if missing:
                raise DataError(PROCESSBENCH_IDS_FILE, None, subset, f"ids not in {label}: {missing[:5]}")
            keep = set(ids)
            items = [it for it in items if it.id in keep]
        out.extend(balanced_head(items, limit) if limit is not None else items)
    return out


def load_processbench_file(path: str | Path) -> list[ProcessBenchItem]:
    """ProcessBench solutions (record format) from a folder of `<subset>.jsonl` files or one JSONL file.

    Each item's `subset` is set (from the file name in a folder, else from the item's own
    `subset` field or its id prefix). Duplicate ids are an error. What `rprm score-processbench`
    scores against.
    """
    path = Path(path)
    items: list[ProcessBenchItem] = []
    if path.is_dir():
        files = [path / f"{s}.jsonl" for s in PROCESSBENCH_SUBSETS if (path / f"{s}.jsonl").exists()]
        if not files:
            raise DataError(path, None, None, f"no ProcessBench subset files ({', '.join(PROCESSBENCH_SUBSETS)}).jsonl")
        for f in files:
            for item in read_jsonl(f, ProcessBenchItem, key=lambda r: r.id):
                items.append(item.model_copy(update={"subset": item.subset or f.stem}))
    else:
        for item in read_jsonl(path, ProcessBenchItem, key=lambda r: r.id):
            items.append(item.model_copy(update={"subset": processbench_subset(item)}))
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DataError(path, None, "id", f"duplicate id {item.id!r} across subset files")
        seen.add(item.id)
    return items


# --------------------------------------------------------------------------------------
# PRMBench
# --------------------------------------------------------------------------------------

_PRMB_FIELDS = ("idx", "classification", "modified_question", "modified_process", "error_steps")


def parse_prmbench_row(obj: Any, label: str, line: int, position: int) -> PRMBenchItem:
    """One PRMBench item -> PRMBenchItem (position = 0-based record index in the source).

    `error_steps` are 1-based and must be >= 1. Indices past the end of `modified_process`
    are kept: 100 official items have them and the official scorer ignores them.
    """
    rec = _pick(obj, _PRMB_FIELDS, label, line)
    _require(rec, _PRMB_FIELDS, "modified_process", label, line)
    item = parse_record(PRMBenchItem, {**rec, "position": position}, label, line, strict=True)
    if item.classification not in PRMBENCH_CLASSES:
        raise DataError(label, line, "classification", f"unknown class {item.classification!r}")
    # Three official items carry blank steps; they are part of the benchmark, kept as is.
    _check_steps(item.modified_process, label, line, "modified_process", allow_blank=True)
    if not item.modified_question.strip():
        raise DataError(label, line, "modified_question", "empty question")
    for i, e in enumerate(item.error_steps):
        if e < 1:
            raise DataError(label, line, f"error_steps.{i}", f"step index {e} out of range (1-based)")
    return item


def spread_across_classes(items: Sequence[PRMBenchItem], limit: int) -> list[PRMBenchItem]:
    """At most `limit` items taken round-robin over classes (file order within a class)."""
    by_class: dict[str, list[PRMBenchItem]] = {}
    for it in items:
        by_class.setdefault(it.classification, []).append(it)
    chosen: list[PRMBenchItem] = []
    depth = 0
    while len(chosen) < limit and any(depth < len(v) for v in by_class.values()):
        for group in by_class.values():
            if depth < len(group) and len(chosen) < limit:
                chosen.append(group[depth])
        depth += 1
    return sorted(chosen, key=lambda it: it.position)


def load_prmbench(
    data: DataParams, limit: int | None = None, *, source: Source | None = None
) -> list[PRMBenchItem]:
    """PRMBench items in file order; with `limit`, at most that many spread across classes."""
    source = source or data.source
    label, rows = _rows(data, source, PRMBENCH_FILE, hub_name=data.hub_prmbench, hub_split="train")
    items = [parse_prmbench_row(obj, label, line, pos) for pos, (line, obj) in enumerate(rows)]
    if not items:
        raise DataError(label, None, None, "no records")
    return spread_across_classes(items, limit) if limit is not None else items


def load_prmbench_file(path: str | Path) -> list[PRMBenchItem]:
    """PRMBench items (record format) from a JSONL file (or a folder holding `prmbench_preview.jsonl`), in order.

    `position` is set to the item's 0-based position in the file, so (idx, position) is unique.
    What `rprm score-prmbench` scores against.
    """
    path = Path(path)
    if path.is_dir():
        path = path / Path(PRMBENCH_FILE).name
    items = read_jsonl(path, PRMBenchItem)
    return [it.model_copy(update={"position": i}) for i, it in enumerate(items)]


# --------------------------------------------------------------------------------------
# Best-of-N test sets and candidate pools
# --------------------------------------------------------------------------------------


def _bon_root(data: DataParams, source: Source | None) -> Path:
    source = source or data.source
    return source_root(data, "bundled" if source == "hub" else source) / "bon"


def _text(obj: dict[str, Any], key: str, label: str, line: int) -> str:
    if key not in obj:
        raise DataError(label, line, key, "missing field")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(label, line, key, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(label, line, key, "empty")
    return value


def parse_bon_row(obj: Any, label: str, line: int, dataset: str) -> BonProblem:
    """One test-set problem -> BonProblem with its gold answer.

    Gold answer: `answer` for every set (AMC23 is already "27", not 27.0; Minerva's is the
    last \\boxed{} of its solution, extracted upstream), except OlympiadBench, whose gold is
    the list `meta.final_answer` (several for multiple-answer problems).
    """
    if not isinstance(obj, dict):
        raise DataError(label, line, None, f"expected a JSON object, got {type(obj).__name__}")
    pid = _text(obj, "id", label, line)
    problem = _text(obj, "problem", label, line)
    answer: str | list[str]
    if dataset.startswith("olympiadbench"):
        meta = obj.get("meta")
        if not isinstance(meta, dict) or "final_answer" not in meta:
            raise DataError(label, line, "meta.final_answer", "missing field")
        fa = meta["final_answer"]
        if not isinstance(fa, list) or not fa or not all(isinstance(a, str) and a.strip() for a in fa):
            raise DataError(label, line, "meta.final_answer", "expected a non-empty list of answer strings")
        answer = fa
    else:
        answer = _text(obj, "answer", label, line)
    solution = obj.get("solution")
    if isinstance(solution, list) and all(isinstance(s, str) for s in solution):
        solution = "\n\n".join(solution)  # full OlympiadBench: alternative reference solutions
    if solution is not None and not isinstance(solution, str):
        raise DataError(label, line, "solution", f"expected a string or null, got {type(solution).__name__}")
    return BonProblem(id=pid, dataset=dataset, problem=problem, answer=answer, solution=solution)


def load_bon_testset(data: DataParams, name: str, *, source: Source | None = None) -> list[BonProblem]:
    """A Best-of-N test set by name (see BON_TESTSETS); ids unique."""
    if name not in BON_TESTSETS:
        raise DataError(f"bon/testsets/{name}", None, "name", f"unknown test set (one of {sorted(BON_TESTSETS)})")
    path = _bon_root(data, source) / "testsets" / BON_TESTSETS[name]
    label = str(path)
    return unique_records(iter_json_lines(path), lambda obj, line: parse_bon_row(obj, label, line, name),
                          label, key=lambda p: p.id)


def _candidate(raw: Any, label: str, line: int, where: str) -> Candidate:
    """A pool candidate: given steps, or an unsplit `response` cut on blank lines.

    A candidate may end up with no step (an empty response): kept, so that Best-of-N can
    count it instead of crashing.
    """
    if not isinstance(raw, dict):
        raise DataError(label, line, where, f"expected an object, got {type(raw).__name__}")
    correct = raw.get("correct")
    if correct is not None and not isinstance(correct, bool):
        raise DataError(label, line, f"{where}.correct", f"expected a bool, got {type(correct).__name__}")
    if "steps" in raw:
        steps = raw["steps"]
        if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
            raise DataError(label, line, f"{where}.steps", "expected a list of strings")
        return Candidate(steps=steps, correct=correct)
    if "response" in raw:
        response = raw["response"]
        if not isinstance(response, str):
            raise DataError(label, line, f"{where}.response", f"expected a string, got {type(response).__name__}")
        return Candidate(steps=split_steps(response), correct=correct, response=response)
    raise DataError(label, line, f"{where}.steps", "missing field (neither `steps` nor `response`)")


def load_candidate_pool(data: DataParams, name: str, *, source: Source | None = None) -> list[CandidatePool]:
    """A real candidate pool by name (see CANDIDATE_POOLS) or file name under bon/candidates."""
    file, dataset = CANDIDATE_POOLS.get(name, (name, name.split(".")[0]))
    path = _bon_root(data, source) / "candidates" / file
    label = str(path)
    out: list[CandidatePool] = []
    seen: dict[str, int] = {}
    for line, obj in iter_json_lines(path):
        if not isinstance(obj, dict):
            raise DataError(label, line, None, f"expected a JSON object, got {type(obj).__name__}")
        pid = _text(obj, "id", label, line)
        problem = _text(obj, "problem", label, line)
        answer = obj.get("answer")
        if answer is not None and not isinstance(answer, (str, list)):
            raise DataError(label, line, "answer", f"expected a string, got {type(answer).__name__}")
        raw_cands = obj.get("candidates")
        if not isinstance(raw_cands, list):
            raise DataError(label, line, "candidates", "missing field" if raw_cands is None else "expected a list")
        if not raw_cands:
            raise DataError(label, line, "candidates", "empty candidate list")
        cands = [_candidate(c, label, line, f"candidates.{i}") for i, c in enumerate(raw_cands)]
        if pid in seen:
            raise DataError(label, line, "id", f"duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = line
        out.append(CandidatePool(id=pid, dataset=dataset, problem=problem, answer=answer, candidates=cands))
    if not out:
        raise DataError(label, None, None, "no records")
    return out
