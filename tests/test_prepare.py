"""The `prepare` stage: flattening, rating map, decontamination, caps, split, staged benchmarks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from components import data as D
from components import paths
from components import prepare as P
from components.config import Params, load_params
from components.io import read_jsonl
from components.records import (
    CandidatePool,
    PRM800KCompletion,
    PRM800KSolution,
    PRM800KStep,
    PRMBenchItem,
    ProcessBenchItem,
    StepSample,
)

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "data" / "bundled"
SHARED = REPO.parent / "shared" / "data"
OUTPUTS = [paths.STEPS_TRAIN, paths.STEPS_VAL, paths.PROCESSBENCH, paths.PRMBENCH, paths.PREPARE_COUNTS]


def params_for(**sections: dict[str, Any]) -> Params:
    """params.yaml with absolute data folders and the given section overrides."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["domain"]["kind"] = "prm800k"  # these tests are about PRM800K; the arithmetic domain has its own
    raw["data"]["bundled_dir"] = str(BUNDLED)
    raw["data"]["dir"] = str(SHARED)
    for name, values in sections.items():
        node = raw
        for part in name.split("."):
            node = node[part]
        node.update(values)
    from components.config import params_from_dict

    return params_from_dict(raw)


def step(texts_ratings: list[tuple[str, int | None]], chosen: int | None, human: str | None = None) -> PRM800KStep:
    return PRM800KStep(
        completions=[PRM800KCompletion(text=t, rating=r) for t, r in texts_ratings],
        human_completion=human,
        chosen_completion=chosen,
        chose_human_completion=chosen is None and human is not None,
    )


def solution(steps: list[PRM800KStep], sid: str = "s1", problem: str = "What is 2+3?") -> PRM800KSolution:
    return PRM800KSolution(id=sid, problem=problem, steps=steps, source="test.jsonl")


# --------------------------------------------------------------------------------------
# Flattening
# --------------------------------------------------------------------------------------


def test_flatten_every_rated_completion_with_the_chosen_prefix() -> None:
    sol = solution([
        step([("We add.", 1)], 0),
        step([("2+3=6.", -1), ("2+3=7.", -1)], None, human="2+3=5."),
        step([("So 5.", 1), ("Hmm.", 0), ("Maybe.", None)], 0),
    ])
    counts = P.FlattenCounts()
    samples = P.flatten_solution(sol, "positive", counts)
    assert [s.id for s in samples] == ["s1-s0-c0", "s1-s1-c0", "s1-s1-c1", "s1-s2-c0", "s1-s2-c1"]
    assert [s.label for s in samples] == [True, False, False, True, True]
    assert [s.step_index for s in samples] == [0, 1, 1, 2, 2]
    assert samples[0].previous_steps == []
    assert samples[1].previous_steps == ["We add."]
    assert samples[3].previous_steps == ["We add.", "2+3=5."]  # the human-written step
    assert samples[4].now_step == "Hmm." and samples[4].question == "What is 2+3?"
    assert {s.problem_id for s in samples} == {D.problem_id("what is 2+3?")}
    assert (counts.rated, counts.unrated_skipped, counts.neutral_mapped) == (5, 1, 1)
    assert all(isinstance(s, StepSample) and s.source == "test.jsonl" for s in samples)


@pytest.mark.parametrize(("neutral", "label"), [("positive", True), ("negative", False), ("drop", None)])
def test_neutral_rating_is_a_parameter(neutral: str, label: bool | None) -> None:
    sol = solution([step([("Let us think.", 0), ("Add: 5.", 1)], 1)])
    samples, counts = P.flatten([sol], neutral)
    neutral_samples = [s for s in samples if s.now_step == "Let us think."]
    if label is None:
        assert neutral_samples == [] and (counts.neutral_dropped, counts.neutral_mapped) == (1, 0)
    else:
        assert [s.label for s in neutral_samples] == [label] and counts.neutral_mapped == 1
    assert [s.label for s in samples if s.now_step == "Add: 5."] == [True]


def test_trajectory_stops_after_a_wrong_chosen_step_or_an_unchosen_step() -> None:
    wrong = solution([
        step([("A.", 1)], 0),
        step([("B is wrong.", -1), ("B'.", 1)], 0),
        step([("C.", 1)], 0),
    ])
    samples, counts = P.flatten([wrong], "positive")
    assert [s.id for s in samples] == ["s1-s0-c0", "s1-s1-c0", "s1-s1-c1"]
    assert counts.stopped_at_wrong_step == 1 and counts.steps_after_end_ignored == 1
    unchosen = solution([step([("A.", 1)], 0), step([("B.", -1), ("B2.", 0)], None), step([("C.", 1)], 0)])
    samples, counts = P.flatten([unchosen], "negative")
    assert [s.id for s in samples] == ["s1-s0-c0", "s1-s1-c0", "s1-s1-c1"]
    assert [s.label for s in samples] == [True, False, False]
    assert counts.steps_after_end_ignored == 1


def test_same_problem_in_two_files_is_one_problem() -> None:
    a = solution([step([("x.", 1)], 0)], sid="a", problem="Find  x.")
    b = solution([step([("y.", 1)], 0)], sid="b", problem="find x.\n")
    samples, _ = P.flatten([a, b], "positive")
    assert len({s.problem_id for s in samples}) == 1
    train, val = P.split_by_problem(samples, 0.5, 0)
    assert sorted(len(x) for x in (train, val)) == [0, 2]


# --------------------------------------------------------------------------------------
# Decontamination, caps, split
# --------------------------------------------------------------------------------------


def test_decontamination_matches_normalised_text() -> None:
    math500 = D.load_bon_testset(D.DataParams(bundled_dir=str(BUNDLED)), "math500")[0].problem
    variant = "  " + math500.upper().replace(" ", "\n  ") + " "
    clean = solution([step([("a.", 1), ("b.", -1)], 0)], sid="clean", problem="A fresh problem.")
    dirty = solution([step([("c.", 1)], 0), step([("d.", 1)], 0)], sid="dirty", problem=variant)
    samples, _ = P.flatten([clean, dirty], "positive")
    kept, removed, n = P.decontaminate(samples, {D.normalize_problem(math500)})
    assert [s.id for s in kept] == ["clean-s0-c0", "clean-s0-c1"]
    assert removed == {D.problem_id(math500)} and n == 2


def test_caps_and_split_are_deterministic_and_by_problem() -> None:
    sols = D.load_prm800k(D.DataParams(bundled_dir=str(BUNDLED)), ["prm800k/phase1_train_plus.solutions.jsonl"])
    samples, _ = P.flatten(sols, "positive")
    capped = P.cap(samples, 30, 500, seed=7)
    assert capped == P.cap(samples, 30, 500, seed=7)
    assert len(capped) == 500 and len({s.problem_id for s in capped}) <= 30
    assert [s.id for s in capped] == [s.id for s in samples if s.id in {c.id for c in capped}]  # order kept
    assert P.cap(samples, 30, 500, seed=8) != capped
    train, val = P.split_by_problem(capped, 0.2, seed=7)
    assert (train, val) == P.split_by_problem(capped, 0.2, seed=7)
    tp, vp = {s.problem_id for s in train}, {s.problem_id for s in val}
    assert not tp & vp and len(train) + len(val) == len(capped)
    assert len(vp) == round(0.2 * len(tp | vp))
    _, none = P.split_by_problem(capped, 0.0, seed=7)
    assert none == []


def test_build_reads_only_the_params_dvc_declares() -> None:
    """prepare's outputs change with no param outside what dvc.yaml lists for the stage."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["prepare"]
    assert set(dvc["params"]) == {"domain", "data", "prepare", "evaluate.processbench",
                                  "evaluate.prmbench.max_items", "evaluate.full_benchmarks"}
    assert {"components/prepare.py", "components/data.py", "data/bundled"} <= set(dvc["deps"])
    assert dvc["outs"] == ["data/prepared"] and list(dvc["metrics"][0]) == [str(paths.PREPARE_COUNTS)]
    assert all(Path(p).parent == paths.PREPARED for p in
               (paths.STEPS_TRAIN, paths.STEPS_VAL, paths.PROCESSBENCH, paths.PRMBENCH))
    base = P.build(params_for())
    other = P.build(params_for(**{
        "evaluate": {"k_sweep": [1], "thresholds": [0.5], "early_exit": False, "models": ["dpo"]},
        "evaluate.prmbench": {"threshold": 0.9, "comparison": ">"},
        "synthesize": {"max_samples": 3, "seed": 1},
        "sft": {"seed": 3},
        "scoring": {"threshold": 0.1},
    }))
    assert (base.train, base.val, base.processbench, base.prmbench, base.report) == \
        (other.train, other.val, other.processbench, other.prmbench, other.report)
    changed = P.build(params_for(**{"evaluate.processbench": {"max_per_subset": 2},
                                    "evaluate.prmbench": {"max_items": 9}}))
    assert len(changed.processbench) == 8 and len(changed.prmbench) == 9


def test_full_benchmarks_ignore_the_caps() -> None:
    if not (SHARED / "processbench").exists():
        pytest.skip("full-size reference data ../shared/data not present")
    p = params_for(evaluate={"full_benchmarks": True}, **{"evaluate.processbench": {"subsets": ["gsm8k"]}})
    pb, prmb, info = P.stage_benchmarks(p)
    assert info["source"] == "dir" and len(pb) == 400 and len(prmb) == 6216


# --------------------------------------------------------------------------------------
# The stage end to end
# --------------------------------------------------------------------------------------


@pytest.fixture()
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.delenv("RPRM_PARENT_RUN_ID", raising=False)
    return tmp_path


def test_run_writes_counts_outputs_and_mlflow_run(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow

    params = params_for(prepare={"max_problems": 60})
    report = P.run(params)
    train = read_jsonl(paths.STEPS_TRAIN, StepSample)
    val = read_jsonl(paths.STEPS_VAL, StepSample)
    pb = read_jsonl(paths.PROCESSBENCH, ProcessBenchItem)
    prmb = read_jsonl(paths.PRMBENCH, PRMBenchItem)
    on_disk = json.loads(paths.PREPARE_COUNTS.read_text())
    assert on_disk == report
    assert report["train"]["samples"] == len(train) and report["val"]["samples"] == len(val)
    assert report["samples"] == len(train) + len(val)
    assert report["positives"] == sum(s.label for s in train + val)
    assert report["negatives"] == sum(not s.label for s in train + val)
    assert report["problems"] == params.prepare.max_problems
    assert not {s.problem_id for s in train} & {s.problem_id for s in val}
    # The bundled phase-1 test solutions are all MATH-500 problems: all removed.
    decon = report["decontamination"]
    assert decon["removed_solutions"] == 20 and decon["removed_problems"] == 20 and decon["removed_samples"] > 0
    assert not any("phase1_test" in s.source for s in train + val)
    assert len(pb) == 4 * params.evaluate.processbench.max_per_subset
    assert len(prmb) == params.evaluate.prmbench.max_items
    out = capsys.readouterr().out
    assert "train" in out and f"removed {decon['removed_problems']} problems" in out

    client = mlflow.MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name(params.tracking.experiment).experiment_id])
    assert run.data.tags["rprm.stage"] == "prepare" and run.info.status == "FINISHED"
    assert run.data.params["prepare.neutral_rating"] == "positive"
    assert run.data.metrics["samples"] == report["samples"]
    assert run.data.metrics["decontamination.removed_samples"] == decon["removed_samples"]

    # Same params, same outputs (ids, order, split).
    first = paths.STEPS_TRAIN.read_bytes()
    P.run(params)
    assert paths.STEPS_TRAIN.read_bytes() == first


def test_bad_data_fails_cleanly_and_writes_nothing(in_tmp: Path) -> None:
    from components.cli import app

    data_dir = in_tmp / "data-src"
    (data_dir / "prm800k").mkdir(parents=True)
    lines = (BUNDLED / "prm800k/phase1_train_plus.solutions.jsonl").read_text().splitlines()[:3]
    bad = json.loads(lines[2])
    bad["steps"][1]["completions"][0]["rating"] = 5
    (data_dir / "prm800k" / "train.jsonl").write_text("\n".join([lines[0], lines[1], json.dumps(bad)]) + "\n")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["domain"]["kind"] = "prm800k"
    raw["data"].update(source="dir", dir=str(data_dir), bundled_dir=str(BUNDLED), prm800k_files=["prm800k/train.jsonl"])
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    load_params(in_tmp / "params.yaml")
    result = CliRunner().invoke(app, ["prepare", "-p", "params.yaml"])
    assert result.exit_code != 0
    assert "train.jsonl:3: field 'steps.1.completions.0.rating'" in result.output
    assert not any(p.exists() for p in OUTPUTS)
    assert not os.path.exists("mlruns.db")  # no run opened for a stage that never started


def test_arithmetic_domain_stages_training_heldout_and_bon_pool(in_tmp: Path) -> None:
    """domain.kind arithmetic: generated training steps, the held-out benchmark and the Best-of-N pool,
    disjoint by problem; the real benchmarks are still staged (out-of-domain). The stage is handed
    a layout rooted outside the working directory: it writes there and nowhere else."""
    params = params_for(**{"domain": {"kind": "arithmetic"},
                           "domain.arithmetic": {"train_problems": 40, "heldout_problems": 20, "bon_problems": 6}})
    layout = paths.Layout(in_tmp / "elsewhere")
    report = P.run(params, layout)
    assert not (in_tmp / paths.PREPARED).exists() and not (in_tmp / paths.REPORTS).exists()
    assert json.loads(layout.prepare_counts.read_text()) == report
    assert report["domain"] == "arithmetic" and report["source"] == "generated"
    assert report["problems"] == 40 and report["negatives"] > 0 and report["positives"] > 0
    assert report["benchmarks"]["out_of_domain"] is True and report["benchmarks"]["processbench"]["items"] > 0
    heldout = read_jsonl(layout.heldout, ProcessBenchItem)
    pools = read_jsonl(layout.bon_arithmetic, CandidatePool)
    assert len(heldout) == 20 and report["heldout"]["items"] == 20 and len(pools) == 6
    assert {it.label == -1 for it in heldout} == {True, False}
    kinds = json.loads(layout.heldout_kinds.read_text())  # the generator's kind of each first error
    assert set(kinds) == {it.id for it in heldout if it.label >= 0}
    train_q = {s.question for s in read_jsonl(layout.steps_train, StepSample) + read_jsonl(layout.steps_val, StepSample)}
    assert not train_q & {it.problem for it in heldout} and not train_q & {p.problem for p in pools}
    assert 0 < report["bon_pool"]["policy_correct_rate"] < 1
    contamination = report["contamination"]  # generated problems: nothing to measure, nothing loaded
    assert contamination["applicable"] is False and contamination["prmbench"]["problems"] == 0
    assert all(e["problems"] == 0 for e in contamination["best_of_n"].values())
    assert report["decontamination"]["enabled"] is False


# --------------------------------------------------------------------------------------
# Contamination: measured against every evaluated benchmark, removed where named
# --------------------------------------------------------------------------------------


def test_overlap_with_every_benchmark_is_reported_and_prmbench_removed_when_named() -> None:
    """Bundled PRM800K phase-1 problems reappear in PRMBench (15 problems, 72 of its 108 items), MATH-500
    (20) and ProcessBench's math subset (1); the report counts each overlap whether or not it is removed,
    and naming a benchmark in prepare.decontaminate removes exactly its problems."""
    none = P.build(params_for(prepare={"decontaminate": []}))
    c = none.report["contamination"]
    assert c["applicable"] is True and c["training_problems"] == none.report["problems_read"]
    assert set(c["processbench"]) == {"gsm8k", "math", "olympiadbench", "omnimath"}
    assert set(c["best_of_n"]) == set(P.BON_EVALUATED)
    prmb = c["prmbench"]
    assert (prmb["problems"], prmb["items"], prmb["benchmark_items"]) == (15, 72, 108)
    assert prmb["removed"] is False and (prmb["remaining_problems"], prmb["remaining_items"]) == (15, 72)
    assert c["best_of_n"]["math500"]["problems"] == c["best_of_n"]["math500"]["remaining_problems"] == 20
    assert c["processbench"]["math"]["problems"] == 1
    assert all(e["problems"] == 0 for n, e in c["best_of_n"].items() if n != "math500")
    assert all(c["processbench"][sub]["problems"] == 0 for sub in ("gsm8k", "olympiadbench", "omnimath"))
    assert none.report["decontamination"]["enabled"] is False and none.report["decontamination"]["removed_samples"] == 0

    prmb_problems = {D.normalize_problem(it.modified_question) for it in D.load_prmbench(params_for().data)}
    assert any(D.normalize_problem(s.question) in prmb_problems for s in none.train + none.val)
    named = P.build(params_for(prepare={"decontaminate": ["prmbench"]}))
    assert not any(D.normalize_problem(s.question) in prmb_problems for s in named.train + named.val)
    c2, d2 = named.report["contamination"], named.report["decontamination"]
    assert c2["prmbench"] == {**prmb, "removed": True, "remaining_problems": 0, "remaining_items": 0}
    assert d2["benchmarks"] == ["prmbench"] and d2["removed_problems"] == 15
    assert d2["reference_problems"] == {"prmbench": prmb["benchmark_problems"]}
    # The PRMBench problems are MATH-500 problems here: 5 of the 20 remain, the ProcessBench one too.
    assert c2["best_of_n"]["math500"]["remaining_problems"] == 5 and not c2["best_of_n"]["math500"]["removed"]

    default = P.build(params_for())  # params.yaml: [math500, processbench]
    cd = default.report["contamination"]
    assert default.report["decontamination"]["benchmarks"] == ["math500", "processbench"]
    assert cd["processbench"]["math"]["removed"] and cd["processbench"]["math"]["remaining_problems"] == 0
    assert cd["best_of_n"]["math500"]["remaining_problems"] == 0 and cd["prmbench"]["removed"] is False


def test_decontaminate_accepts_the_old_boolean_and_names_bad_entries(tmp_path: Path) -> None:
    from components.config import ParamsError

    on = params_for(prepare={"decontaminate": True}).prepare.decontaminate
    off = params_for(prepare={"decontaminate": False}).prepare.decontaminate
    assert on == ["math500", "processbench"] and off == []
    with pytest.raises(ParamsError, match=r"prepare\.decontaminate\.1"):
        params_for(prepare={"decontaminate": ["math500", "gsm8k"]})
    with pytest.raises(ParamsError, match="named twice: prmbench"):
        params_for(prepare={"decontaminate": ["prmbench", "prmbench"]})
