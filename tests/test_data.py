"""Data layer: every loader on the bundled, dir and hub sources, and every kind of bad input.

Bad input is produced for real: broken files written into tmp_path and read through the same
loaders the stages use. The hub source is exercised offline through the same `datasets` code
path (a dataset written by `save_to_disk`, and `load_dataset` on a local folder of files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from components import data as D
from components.config import DataParams
from components.io import DataError
from components.records import PRM800KSolution

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "data" / "bundled"
SHARED = REPO.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED / "MANIFEST.json").exists(), reason="full-size reference data ../shared/data not present"
)


def bundled() -> DataParams:
    return DataParams(source="bundled", bundled_dir=str(BUNDLED))


def dir_params(root: Path) -> DataParams:
    return DataParams(source="dir", dir=str(root), bundled_dir=str(BUNDLED))


def write_lines(path: Path, rows: list[Any]) -> Path:
    """Write rows (dicts as JSON, str/bytes verbatim) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        for row in rows:
            if isinstance(row, bytes):
                fh.write(row + b"\n")
            elif isinstance(row, str):
                fh.write(row.encode("utf-8") + b"\n")
            else:
                fh.write(json.dumps(row).encode("utf-8") + b"\n")
    return path


def first_lines(rel: str, n: int) -> list[dict[str, Any]]:
    with (BUNDLED / rel).open(encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


def shared_solution() -> dict[str, Any]:
    """A per-step-format solution with a human-written step, as in ../shared/data."""
    return {
        "id": "sol-1",
        "split": "test",
        "problem": "What is  2+3?",
        "steps": [
            {"completions": [{"text": "We add.", "rating": 1}], "human_completion": None,
             "chosen_completion": 0, "chose_human_completion": False},
            {"completions": [{"text": "2+3=6.", "rating": -1}, {"text": "2+3=7.", "rating": -1}],
             "human_completion": "2+3=5.", "chosen_completion": None, "chose_human_completion": True},
            {"completions": [{"text": "So 5.", "rating": 1}, {"text": "Hmm.", "rating": 0},
                             {"text": "Maybe.", "rating": None}],
             "human_completion": None, "chosen_completion": 0, "chose_human_completion": False},
        ],
        "chosen_steps": ["We add.", "2+3=5.", "So 5."],
        "final_answer": "5",
    }


def official_line(sol: dict[str, Any]) -> dict[str, Any]:
    """The same solution in PRM800K's official line format (human_completion an object)."""
    steps = []
    for st in sol["steps"]:
        human = st["human_completion"]
        steps.append({
            "completions": [{**c, "flagged": None} for c in st["completions"]],
            "human_completion": None if human is None else
            {"text": human, "rating": None, "source": "human", "flagged": False},
            "chosen_completion": st["chosen_completion"],
        })
    return {
        "labeler": "x", "timestamp": "2023-01-22T04:34:27", "generation": None,
        "is_quality_control_question": False, "is_initial_screening_question": False,
        "question": {"problem": sol["problem"], "ground_truth_answer": "5"},
        "label": {"steps": steps, "total_time": 1000, "finish_reason": "solution"},
    }


def assert_data_error(err: DataError, path: Path | str, line: int | None, field: str | None) -> None:
    assert str(path) in err.path
    assert err.line == line, str(err)
    if field is None:
        assert err.field is None, str(err)
    else:
        assert err.field == field, str(err)
    assert str(path) in str(err) and (line is None or f":{line}:" in str(err))


# --------------------------------------------------------------------------------------
# Bundled source
# --------------------------------------------------------------------------------------


def test_bundled_loaders_read_every_kind() -> None:
    p = bundled()
    sols = D.load_prm800k(p)
    assert len(sols) == 120 and all(isinstance(s, PRM800KSolution) for s in sols)
    assert sols[0].id == "prm800k-phase1_train_plus-00000"
    assert sols[0].source == "prm800k/phase1_train_plus.solutions.jsonl"
    human = [st for s in sols for st in s.steps if st.chose_human_completion]
    assert human and all(st.chosen_text() == st.human_completion for st in human)

    pb = D.load_processbench(p)
    assert len(pb) == 160 and {it.subset for it in pb} == set(D.PROCESSBENCH_SUBSETS)
    # A cap alternates erroneous and all-correct solutions (kept in file order) so F1 is defined.
    assert [it.id for it in D.load_processbench(p, ["math"], limit=3)] == ["math-7", "math-12", "math-503"]
    assert len(D.load_processbench(p, rprm_part_subset=True)) == 160

    prmb = D.load_prmbench(p)
    assert len(prmb) == 108 and [it.position for it in prmb] == list(range(108))
    assert {it.classification for it in prmb} == set(D.PRMBENCH_CLASSES)

    sizes = {n: len(D.load_bon_testset(p, n)) for n in
             ["aime24", "amc23", "math500", "minerva_math", "olympiadbench", "college_math"]}
    assert sizes == {"aime24": 30, "amc23": 40, "math500": 500, "minerva_math": 272,
                     "olympiadbench": 200, "college_math": 200}
    assert len(D.load_candidate_pool(p, "olympiadbench")) == 30
    assert len(D.load_candidate_pool(p, "math_cot_100")) == 20


def test_bon_gold_answers_follow_the_data_readme() -> None:
    p = bundled()
    olymp = D.load_bon_testset(p, "olympiadbench")
    assert all(isinstance(x.answer, list) and x.answer for x in olymp)
    assert olymp[0].answer == ["108"] and olymp[0].dataset == "olympiadbench"
    assert D.load_bon_testset(p, "amc23")[0].answer == "27"
    minerva = D.load_bon_testset(p, "minerva_math")[0]
    assert minerva.answer == "1.6" and "\\boxed{1.6}" in (minerva.solution or "")
    with pytest.raises(DataError, match="unknown test set"):
        D.load_bon_testset(p, "gsm8k")


def test_math_cot_pool_is_split_on_blank_lines() -> None:
    pools = D.load_candidate_pool(bundled(), "math_cot_100")
    raw = first_lines("bon/candidates/qwen25math_eval_rm_maj_example.math_cot_100.jsonl", 1)[0]
    first = pools[0].candidates[0]
    assert first.response == raw["candidates"][0]["response"]
    assert first.steps == [s.strip() for s in first.response.split("\n\n") if s.strip()]
    assert len(first.steps) > 1
    for pool in pools:
        assert len(pool.candidates) == 8 and pool.dataset == "math"
        for c in pool.candidates:
            assert isinstance(c.correct, bool) and all("\n\n" not in s for s in c.steps)
    olymp = D.load_candidate_pool(bundled(), "olympiadbench")[0]
    assert olymp.candidates[0].response is None and olymp.candidates[0].steps


def test_prmbench_limit_spreads_across_classes() -> None:
    items = D.load_prmbench(bundled(), limit=20)
    per_class: dict[str, int] = {}
    for it in items:
        per_class[it.classification] = per_class.get(it.classification, 0) + 1
    assert len(items) == 20 and len(per_class) == 9
    assert max(per_class.values()) - min(per_class.values()) <= 1
    assert [it.position for it in items] == sorted(it.position for it in items)
    assert D.load_prmbench(bundled(), limit=20) == items


def test_problem_normalisation_ignores_whitespace_and_case() -> None:
    assert D.problem_id("What is  2+3?\n") == D.problem_id("what IS 2+3?")
    assert D.problem_id("What is 2+3?") != D.problem_id("What is 2+4?")


# --------------------------------------------------------------------------------------
# PRM800K: both line formats
# --------------------------------------------------------------------------------------


def test_official_and_per_step_formats_give_the_same_solution(tmp_path: Path) -> None:
    sol = shared_solution()
    write_lines(tmp_path / "prm800k" / "mixed.jsonl", [sol, official_line(sol)])
    a, b = D.load_prm800k(dir_params(tmp_path), ["prm800k/mixed.jsonl"])
    assert a.id == "sol-1" and b.id == "mixed-000002"
    assert a.steps == b.steps and a.problem == b.problem
    assert b.finish_reason == "solution" and a.finish_reason is None
    assert [st.chosen_text() for st in a.steps] == sol["chosen_steps"]
    assert a.steps[2].completions[2].rating is None


def test_official_format_found_error_line(tmp_path: Path) -> None:
    """The annotated example line of the PRM800K README (phase 2, found_error)."""
    line = {
        "question": {"problem": "What is the greatest common factor of $20 !$ and $200,\\!000$?",
                     "pre_generated_steps": ["a", "b", "c"]},
        "label": {"steps": [
            {"completions": [{"text": "I want to find the largest integer.", "rating": 0, "flagged": None}],
             "human_completion": None, "chosen_completion": 0},
            {"completions": [{"text": "One way is to factor.", "rating": 0, "flagged": None}],
             "human_completion": None, "chosen_completion": 0},
            {"completions": [{"text": "200,000 = 2^9 5^4.", "rating": -1, "flagged": None},
                             {"text": "To factor 20!, ...", "rating": 0, "flagged": False}],
             "human_completion": None, "chosen_completion": None},
        ], "total_time": 278270, "finish_reason": "found_error"},
    }
    skipped = {"question": {"problem": "Broken problem"},
               "label": {"steps": [], "finish_reason": "bad_problem"}}
    write_lines(tmp_path / "prm800k" / "phase2_test.jsonl", [line, skipped])
    [sol] = D.load_prm800k(dir_params(tmp_path), ["prm800k/phase2_test.jsonl"])
    assert sol.id == "phase2_test-000001" and sol.finish_reason == "found_error"
    assert sol.steps[2].chosen_text() is None and sol.steps[0].chosen_text() == "I want to find the largest integer."


# --------------------------------------------------------------------------------------
# Bad input: file, line and field
# --------------------------------------------------------------------------------------


def _prm_error(tmp_path: Path, rows: list[Any]) -> DataError:
    path = write_lines(tmp_path / "prm800k" / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        D.load_prm800k(dir_params(tmp_path), ["prm800k/bad.jsonl"])
    assert str(path) in info.value.path
    return info.value


def _with(sol: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `sol` with the dotted `path` set (or deleted when value is ...)."""
    sol = json.loads(json.dumps(sol))
    *parents, last = path.split(".")
    node: Any = sol
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is ...:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return sol


@pytest.mark.parametrize(
    ("mutation", "field", "message"),
    [
        (("problem", ...), "problem", "missing field"),
        (("steps", []), "steps", "empty step list"),
        (("steps.2.completions.1.rating", 2), "steps.2.completions.1.rating", "less than or equal to 1"),
        (("steps.2.completions.1.rating", -2), "steps.2.completions.1.rating", "greater than or equal to -1"),
        (("steps.2.completions.1.rating", "1"), "steps.2.completions.1.rating", "valid integer"),
        (("steps.2.completions.1.rating", True), "steps.2.completions.1.rating", "valid integer"),
        (("steps.0.completions.0.text", 7), "steps.0.completions.0.text", "valid string"),
        (("steps.0.completions.0.text", " "), "steps.0.completions.0.text", "empty"),
        (("steps.0.completions", "We add."), "steps.0.completions", "valid list"),
        (("steps.0.chosen_completion", 3), "steps.0.chosen_completion", "out of range"),
        (("steps.1.human_completion", None), "steps.1.human_completion", "chosen but missing"),
        (("problem", "   "), "problem", "empty problem"),
    ],
)
def test_prm800k_bad_records(tmp_path: Path, mutation: tuple[str, Any], field: str, message: str) -> None:
    good = shared_solution()
    bad = _with(good, *mutation)
    err = _prm_error(tmp_path, [_with(good, "id", "ok"), bad])
    assert err.line == 2 and err.field == field and message in err.message, str(err)


def test_prm800k_official_bad_records(tmp_path: Path) -> None:
    line = official_line(shared_solution())
    err = _prm_error(tmp_path, [_with(line, "label.steps.1.human_completion", {"txt": "x"})])
    assert err.line == 1 and err.field.startswith("label.steps.1.human_completion"), str(err)
    err = _prm_error(tmp_path, [_with(line, "label.steps", [])])
    assert (err.line, err.field, err.message) == (1, "label.steps", "empty step list")
    err = _prm_error(tmp_path, [_with(line, "question.problem", ...)])
    assert (err.line, err.field, err.message) == (1, "question.problem", "missing field")
    err = _prm_error(tmp_path, [{"hello": 1}])
    assert err.field == "problem" and "neither" in err.message


def test_prm800k_broken_bytes_and_json(tmp_path: Path) -> None:
    good = shared_solution()
    err = _prm_error(tmp_path, [good, '{"id": "x", "problem": '])
    assert (err.line, err.field) == (2, None) and "invalid JSON" in err.message
    err = _prm_error(tmp_path, [b'{"id": "x", "problem": "caf\xe9"}'])
    assert err.line == 1 and "UTF-8" in err.message
    err = _prm_error(tmp_path, ["[1, 2]"])
    assert err.line == 1 and "JSON object" in err.message
    err = _prm_error(tmp_path, [good, "", good])
    assert (err.line, err.field) == (3, "id") and "duplicate id 'sol-1' " in err.message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found") as info:
        D.load_prm800k(dir_params(tmp_path), ["prm800k/nope.jsonl"])
    assert info.value.path.endswith("prm800k/nope.jsonl")


def _pb_rows() -> list[dict[str, Any]]:
    return first_lines("processbench/gsm8k.jsonl", 3)


@pytest.mark.parametrize(
    ("line", "mutation", "field", "message"),
    [
        (2, ("label", 99), "label", "out of range"),
        (2, ("label", -2), "label", "greater than or equal to -1"),
        (3, ("label", "1"), "label", "valid integer"),
        (1, ("steps", []), "steps", "empty step list"),
        (1, ("steps", "one step"), "steps", "valid list"),
        (2, ("steps.1", ""), "steps.1", "empty step"),
        (3, ("problem", ...), "problem", "missing field"),
        (3, ("final_answer_correct", "yes"), "final_answer_correct", "valid boolean"),
        (2, ("id", "gsm8k-0"), "id", "duplicate id"),
    ],
)
def test_processbench_bad_records(
    tmp_path: Path, line: int, mutation: tuple[str, Any], field: str, message: str
) -> None:
    rows = _pb_rows()
    rows[line - 1] = _with(rows[line - 1], *mutation)
    path = write_lines(tmp_path / "processbench" / "gsm8k.jsonl", rows)
    with pytest.raises(DataError) as info:
        D.load_processbench(dir_params(tmp_path), ["gsm8k"])
    assert_data_error(info.value, path, line, field)
    assert message in info.value.message


def test_processbench_quick_eval_ids_must_exist(tmp_path: Path) -> None:
    write_lines(tmp_path / "processbench" / "gsm8k.jsonl", _pb_rows())
    (tmp_path / "processbench" / "rprm_part_subset_ids.json").write_text(json.dumps({"gsm8k": ["gsm8k-0", "gsm8k-9"]}))
    with pytest.raises(DataError, match="gsm8k-9") as info:
        D.load_processbench(dir_params(tmp_path), ["gsm8k"], rprm_part_subset=True)
    assert info.value.field == "gsm8k"
    (tmp_path / "processbench" / "rprm_part_subset_ids.json").write_text(json.dumps({"gsm8k": ["gsm8k-0"]}))
    assert [it.id for it in D.load_processbench(dir_params(tmp_path), ["gsm8k"], rprm_part_subset=True)] == ["gsm8k-0"]


@pytest.mark.parametrize(
    ("mutation", "field", "message"),
    [
        (("error_steps", [0]), "error_steps.0", "out of range"),
        (("error_steps", ["3"]), "error_steps.0", "valid integer"),
        (("modified_process", []), "modified_process", "empty step list"),
        (("classification", "typo"), "classification", "unknown class"),
        (("idx", ...), "idx", "missing field"),
    ],
)
def test_prmbench_bad_records(tmp_path: Path, mutation: tuple[str, Any], field: str, message: str) -> None:
    rows = first_lines("prmbench/prmbench_preview.jsonl", 2)
    rows[1] = _with(rows[1], *mutation)
    path = write_lines(tmp_path / D.PRMBENCH_FILE, rows)
    with pytest.raises(DataError) as info:
        D.load_prmbench(dir_params(tmp_path))
    assert_data_error(info.value, path, 2, field)
    assert message in info.value.message


def test_bon_and_pool_bad_records(tmp_path: Path) -> None:
    rows = first_lines("bon/testsets/olympiadbench_200.jsonl", 2)
    path = write_lines(tmp_path / "bon/testsets/olympiadbench_200.jsonl",
                       [rows[0], _with(rows[1], "meta.final_answer", "108")])
    with pytest.raises(DataError) as info:
        D.load_bon_testset(dir_params(tmp_path), "olympiadbench")
    assert_data_error(info.value, path, 2, "meta.final_answer")

    rows = first_lines("bon/testsets/amc23.jsonl", 2)
    path = write_lines(tmp_path / "bon/testsets/amc23.jsonl", [rows[0], _with(rows[1], "answer", 27.0)])
    with pytest.raises(DataError, match="expected a string") as info:
        D.load_bon_testset(dir_params(tmp_path), "amc23")
    assert_data_error(info.value, path, 2, "answer")

    file = D.CANDIDATE_POOLS["olympiadbench"][0]
    rows = first_lines(f"bon/candidates/{file}", 2)
    cases = [
        (_with(rows[1], "candidates", []), "candidates", "empty candidate list"),
        (_with(rows[1], "candidates.3.correct", "yes"), "candidates.3.correct", "expected a bool"),
        (_with(rows[1], "candidates.2.steps", ...), "candidates.2.steps", "missing field"),
        (_with(rows[1], "id", rows[0]["id"]), "id", "duplicate id"),
    ]
    for bad, field, message in cases:
        path = write_lines(tmp_path / "bon/candidates" / file, [rows[0], bad])
        with pytest.raises(DataError) as info:
            D.load_candidate_pool(dir_params(tmp_path), "olympiadbench")
        assert_data_error(info.value, path, 2, field)
        assert message in info.value.message
    # A candidate with no step at all is data, not an error: Best-of-N counts it.
    write_lines(tmp_path / "bon/candidates" / file, [_with(rows[0], "candidates.0.steps", [])])
    assert D.load_candidate_pool(dir_params(tmp_path), "olympiadbench")[0].candidates[0].steps == []


# --------------------------------------------------------------------------------------
# Hub source (offline, same datasets code path)
# --------------------------------------------------------------------------------------


@pytest.fixture()
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep `datasets`' cache inside tmp_path and never reach the network."""
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return cache


def test_hub_processbench_and_prmbench_from_saved_datasets(tmp_path: Path, hf_cache: Path) -> None:
    import datasets

    pb_rows = {s: [json.loads(line) for line in (BUNDLED / f"processbench/{s}.jsonl").open()]
               for s in D.PROCESSBENCH_SUBSETS}
    datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in pb_rows.items()}).save_to_disk(
        tmp_path / "ProcessBench")
    prmb_rows = [json.loads(line) for line in (BUNDLED / D.PRMBENCH_FILE).open()]
    datasets.Dataset.from_list(prmb_rows).save_to_disk(tmp_path / "PRMBench")
    hub = DataParams(source="hub", bundled_dir=str(BUNDLED), dir=str(BUNDLED),
                     hub_processbench=str(tmp_path / "ProcessBench"), hub_prmbench=str(tmp_path / "PRMBench"))
    assert D.load_processbench(hub) == D.load_processbench(bundled())
    assert D.load_processbench(hub, ["omnimath"], limit=2, rprm_part_subset=True) == \
        D.load_processbench(bundled(), ["omnimath"], limit=2, rprm_part_subset=True)
    assert D.load_prmbench(hub) == D.load_prmbench(bundled())
    assert D.load_prmbench(hub, limit=9) == D.load_prmbench(bundled(), limit=9)
    # The Best-of-N sets are not on the hub: read from the bundled folder.
    assert D.load_bon_testset(hub, "aime24") == D.load_bon_testset(bundled(), "aime24")

    # A bad row is reported with the dataset, split and 1-based row.
    broken = [dict(r) for r in pb_rows["gsm8k"]]
    broken[4]["label"] = 50
    datasets.DatasetDict({"gsm8k": datasets.Dataset.from_list(broken)}).save_to_disk(tmp_path / "PB-broken")
    bad = hub.model_copy(update={"hub_processbench": str(tmp_path / "PB-broken")})
    with pytest.raises(DataError) as info:
        D.load_processbench(bad, ["gsm8k"])
    assert info.value.path == f"hub:{tmp_path / 'PB-broken'}[gsm8k]"
    assert (info.value.line, info.value.field) == (5, "label")
    with pytest.raises(DataError, match="no split 'math'"):
        D.load_processbench(bad, ["math"])


def test_hub_prm800k_through_load_dataset(tmp_path: Path, hf_cache: Path) -> None:
    sols = first_lines("prm800k/phase1_test.solutions.jsonl", 5)
    repo = tmp_path / "PRM800K"
    write_lines(repo / "phase1_test.jsonl", [official_line(s) for s in sols])
    write_lines(tmp_path / "dir" / "prm800k" / "phase1_test.jsonl", [official_line(s) for s in sols])
    hub = DataParams(source="hub", bundled_dir=str(BUNDLED), hub_prm800k=str(repo),
                     prm800k_files=["phase1_test.jsonl"])
    from_hub = D.load_prm800k(hub)
    from_dir = D.load_prm800k(dir_params(tmp_path / "dir"), ["prm800k/phase1_test.jsonl"])
    assert [s.model_dump(exclude={"source"}) for s in from_hub] == \
        [s.model_dump(exclude={"source"}) for s in from_dir]
    assert from_hub[0].source == f"{repo}/phase1_test.jsonl"
    assert any(st.chose_human_completion for s in from_hub for st in s.steps)
    # The per-step files load through the same path too.
    write_lines(repo / "per_step.jsonl", sols)
    per_step = D.load_prm800k(hub, ["per_step.jsonl"])
    assert [s.steps for s in per_step] == [s.steps for s in from_hub]
    with pytest.raises(DataError, match="cannot load") as info:
        D.load_prm800k(hub, ["missing.jsonl"])
    assert info.value.path.startswith("hub:")
    # A file `datasets` cannot parse is reported with its dataset and file (no line: the
    # JSON reader of `datasets` does not give one).
    write_lines(repo / "broken.jsonl", [sols[0], '{"id": "x", "problem": '])
    with pytest.raises(DataError, match="cannot load") as info:
        D.load_prm800k(hub, ["broken.jsonl"])
    assert info.value.path == f"hub:{repo}/broken.jsonl[train]"


# --------------------------------------------------------------------------------------
# Full-size reference data (dir source)
# --------------------------------------------------------------------------------------


@needs_shared
def test_full_reference_data_loads() -> None:
    p = dir_params(SHARED)
    sols = D.load_prm800k(p, ["prm800k/phase1_train_plus.solutions.jsonl", "prm800k/phase1_test.solutions.jsonl"])
    assert len(sols) == 943 + 106
    pb = D.load_processbench(p)
    counts = {s: sum(1 for it in pb if it.subset == s) for s in D.PROCESSBENCH_SUBSETS}
    assert counts == {"gsm8k": 400, "math": 1000, "olympiadbench": 1000, "omnimath": 1000}
    errs = {s: sum(1 for it in pb if it.subset == s and it.label != -1) for s in D.PROCESSBENCH_SUBSETS}
    assert errs == {"gsm8k": 207, "math": 594, "olympiadbench": 661, "omnimath": 759}
    part = D.load_processbench(p, rprm_part_subset=True)
    assert len(part) == 700
    prmb = D.load_prmbench(p)
    assert len(prmb) == 6216 and sum(len(it.modified_process) for it in prmb) == 83456
    assert len({(it.idx, it.position) for it in prmb}) == 6216 > len({it.idx for it in prmb})
    assert len(D.load_bon_testset(p, "olympiadbench_675")) == 675
    pool = D.load_candidate_pool(p, "olympiadbench")
    assert len(pool) == 200 and {len(x.candidates) for x in pool} == {8}
    mean_acc = sum(c.correct for x in pool for c in x.candidates) / 1600
    assert round(mean_acc, 3) == 0.380
