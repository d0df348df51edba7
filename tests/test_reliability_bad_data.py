"""Bad data: a broken-input corpus through every loader and every command that reads a file.

One table drives everything. `tests/badcorpus.py` generates, into tmp_path, each kind of input
file broken in each way (invalid JSON, a non-object line, non-UTF-8 bytes, an empty file, a
wrong type, a missing field, an empty list, a label out of range, a duplicate id, a 50 MB
single line) and broken params files. Each must raise a DataError naming the file, the line and
the field (no field for a line-level fault) through the loaders (LOADERS), and through
`rprm <command>` run in a temporary project that holds a previous run's files (CLI_TABLE,
PARAMS_TABLE): exit code 2 with a one-line `error:` message, no traceback, and no file created,
changed or removed, no MLflow run. A few cases also run as real `rprm` processes. The 50 MB
line is refused after a bounded read (Python heap and process RSS are checked).

The last section holds property-based tests (hypothesis) of the ProcessBench and PRMBench
metrics that tests/test_benchmarks.py does not already pin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import badcorpus as bc
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from components import benchmarks as B
from components import data as D
from components import dpo, sft, training
from components.config import DataParams
from components.io import DataError, read_jsonl
from components.records import (
    PreferencePair,
    PRMBenchItem,
    ProcessBenchItem,
    SFTExample,
    StepSample,
)

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "data" / "bundled"
RPRM = Path(sys.executable).with_name("rprm")


# --------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------


def dir_params(root: Path) -> DataParams:
    return DataParams(source="dir", dir=str(root), bundled_dir=str(BUNDLED))


def _pb_items() -> list[ProcessBenchItem]:
    return [ProcessBenchItem(**r, subset="gsm8k") for r in bc.processbench_records()]


def _prmb_items() -> list[PRMBenchItem]:
    return [PRMBenchItem(**r, position=i) for i, r in enumerate(bc.prmbench_records())]


POOL_FILE = "bon/candidates/" + D.CANDIDATE_POOLS["olympiadbench"][0]

# target -> [(loader name, file path under the data root, loader(root, path))]
Loader = Callable[[Path, Path], Any]
LOADERS: dict[str, list[tuple[str, str, Loader]]] = {
    "prm800k_steps": [("data.load_prm800k", "prm800k/x.jsonl",
                       lambda root, p: D.load_prm800k(dir_params(root), ["prm800k/x.jsonl"]))],
    "prm800k_official": [("data.load_prm800k", "prm800k/x.jsonl",
                          lambda root, p: D.load_prm800k(dir_params(root), ["prm800k/x.jsonl"]))],
    "processbench": [("data.load_processbench", "processbench/gsm8k.jsonl",
                      lambda root, p: D.load_processbench(dir_params(root), ["gsm8k"]))],
    "prepared_processbench": [
        ("read_jsonl(ProcessBenchItem)", "pb.jsonl", lambda root, p: read_jsonl(p, ProcessBenchItem, key=lambda r: r.id)),
        ("data.load_processbench_file", "pb.jsonl", lambda root, p: D.load_processbench_file(p)),
    ],
    "prmbench": [("data.load_prmbench", D.PRMBENCH_FILE, lambda root, p: D.load_prmbench(dir_params(root)))],
    "prepared_prmbench": [
        ("read_jsonl(PRMBenchItem)", "prmb.jsonl", lambda root, p: read_jsonl(p, PRMBenchItem)),
        ("data.load_prmbench_file", "prmb.jsonl", lambda root, p: D.load_prmbench_file(p)),
    ],
    "bon_testset": [("data.load_bon_testset", "bon/testsets/amc23.jsonl",
                     lambda root, p: D.load_bon_testset(dir_params(root), "amc23"))],
    "bon_olympiadbench": [("data.load_bon_testset", "bon/testsets/olympiadbench_200.jsonl",
                           lambda root, p: D.load_bon_testset(dir_params(root), "olympiadbench"))],
    "candidate_pool": [("data.load_candidate_pool", POOL_FILE,
                        lambda root, p: D.load_candidate_pool(dir_params(root), "olympiadbench"))],
    "step_samples": [("read_jsonl(StepSample)", "steps.jsonl", lambda root, p: read_jsonl(p, StepSample, key=lambda r: r.id))],
    "sft_examples": [
        ("read_jsonl(SFTExample)", "sft.jsonl", lambda root, p: read_jsonl(p, SFTExample, key=lambda r: r.id)),
        ("training.read_stage_file(sft)", "sft.jsonl", lambda root, p: training.read_stage_file(sft.RECIPE, p, allow_empty=False)),
    ],
    "preference_pairs": [
        ("read_jsonl(PreferencePair)", "dpo.jsonl", lambda root, p: read_jsonl(p, PreferencePair, key=lambda r: r.id)),
        ("training.read_stage_file(dpo)", "dpo.jsonl", lambda root, p: training.read_stage_file(dpo.RECIPE, p, allow_empty=False)),
    ],
    "processbench_predictions": [("benchmarks.read_processbench_predictions", "preds.jsonl",
                                  lambda root, p: B.read_processbench_predictions(p, _pb_items(), 0.5))],
    "prmbench_results": [("benchmarks.read_prmbench_results", "results.jsonl",
                          lambda root, p: B.read_prmbench_results(p, _prmb_items(), 0.5))],
}
assert set(LOADERS) == set(bc.TARGETS), "every corpus target has a loader"

LOADER_CASES = [
    pytest.param(name, rel, fn, c, id=f"{c.id}-{name}")
    for target, loaders in LOADERS.items()
    for c in bc.cases(target)
    for name, rel, fn in loaders
]


def assert_names_file_line_field(err: DataError, path: Path, c: bc.Case) -> None:
    """The error names the file, the 1-based line and the field the case broke."""
    text = str(err)
    assert Path(err.path) == path, text
    assert err.line == c.line, f"line {err.line}, expected {c.line}: {text}"
    assert err.field == c.field, f"field {err.field!r}, expected {c.field!r}: {text}"
    assert c.message.lower() in text.lower(), f"{c.message!r} not in {text!r}"
    assert text.startswith(f"{path}:" if c.line is None else f"{path}:{c.line}:"), text
    if c.field is not None:
        assert f"field '{c.field}'" in text


def test_every_target_has_every_breakage_or_a_reason() -> None:
    for name, t in bc.TARGETS.items():
        made = {c.breakage for c in bc.cases(name)}
        missing = set(bc.BREAKAGES) - made - set(t.skip) - ({"huge_line"} if not t.huge else set())
        missing -= {"duplicate_id"} if t.key is None else set()
        assert not missing, f"{name} lacks {missing}"
        for b, reason in t.skip.items():
            assert reason.strip(), f"{name}: skipping {b} needs a reason"


@pytest.mark.parametrize(("loader", "rel", "load", "c"), LOADER_CASES)
def test_loader_rejects_broken_file(tmp_path: Path, loader: str, rel: str, load: Loader, c: bc.Case) -> None:
    path = c.write(tmp_path / rel)
    if c.huge_at is None:
        with pytest.raises(DataError) as err:
            load(tmp_path, path)
    else:  # the 50 MB line: refused after a bounded read, never parsed whole
        tracemalloc.start()
        try:
            with pytest.raises(DataError) as err:
                load(tmp_path, path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 40 * 2**20, f"{loader} held {peak / 2**20:.0f} MiB reading a 50 MB line"
    assert_names_file_line_field(err.value, path, c)


@pytest.mark.parametrize("target", sorted(LOADERS))
def test_loader_accepts_the_unbroken_corpus(tmp_path: Path, target: str) -> None:
    """The corpus's valid records load: each failure above is the breakage, not the base file."""
    recs = bc.TARGETS[target].records()
    for name, rel, load in LOADERS[target]:
        path = tmp_path / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
        out = load(path.parents[len(Path(rel).parts) - 1], path)
        size = len(out) if hasattr(out, "__len__") else len(out.rows)
        assert size == 3, f"{name} read {size} records"


# --------------------------------------------------------------------------------------
# Commands: `rprm <command>` in a temporary project that holds a previous run's files
# --------------------------------------------------------------------------------------

PARAMS = "params.yaml"
# command -> argv after `rprm`
COMMANDS: dict[str, list[str]] = {
    "prepare": ["prepare", "-p", PARAMS],
    "synthesize": ["synthesize", "-p", PARAMS],
    "sft": ["sft", "-p", PARAMS],
    "sample-pairs": ["sample-pairs", "-p", PARAMS],
    "dpo": ["dpo", "-p", PARAMS],
    "evaluate": ["evaluate", "-p", PARAMS],
    "best-of-n": ["best-of-n", "-p", PARAMS],
    "score-processbench": ["score-processbench", "preds.jsonl", "--benchmark", "bench/pb",
                           "--out", "reports/pb_scored.json"],
    "score-prmbench": ["score-prmbench", "results.jsonl", "--benchmark", "bench/prmbench.jsonl",
                       "--out", "reports/prmb_scored.json"],
    "validate-params": ["validate-params", "-p", PARAMS],
}
NEEDS_SFT_MODEL = {"sample-pairs"}  # checks models/sft before reading its data
STALE_REPORTS = ["prepare", "synthesis", "sft", "pairs", "dpo", "processbench", "prmbench", "scaling",
                 "pb_scored", "prmb_scored"]
ALL = tuple(bc.BREAKAGES)

# (command, file broken (project-relative), corpus target, breakages)
CLI_TABLE: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("prepare", "src/prm800k/phase1_train_plus.solutions.jsonl", "prm800k_steps", ALL),
    ("prepare", "src/prm800k/phase1_test.solutions.jsonl", "prm800k_official",
     ("invalid_json", "empty_list", "label_out_of_range", "empty_file")),
    ("prepare", "src/processbench/gsm8k.jsonl", "processbench", ("non_utf8", "label_out_of_range", "duplicate_id")),
    ("prepare", "src/prmbench/prmbench_preview.jsonl", "prmbench", ("missing_field", "label_out_of_range")),
    ("prepare", "src/bon/testsets/math500.jsonl", "bon_testset", ("wrong_type", "duplicate_id")),
    ("synthesize", "data/prepared/steps_train.jsonl", "step_samples", ALL),
    ("synthesize", "data/prepared/steps_val.jsonl", "step_samples", ("invalid_json", "label_out_of_range", "duplicate_id")),
    ("sft", "data/synth/sft_train.jsonl", "sft_examples", ALL),
    ("sft", "data/synth/sft_val.jsonl", "sft_examples", ("wrong_type", "duplicate_id")),
    ("sample-pairs", "data/prepared/steps_train.jsonl", "step_samples",
     ("invalid_json", "missing_field", "label_out_of_range", "duplicate_id", "empty_file")),
    ("dpo", "data/pairs/dpo_train.jsonl", "preference_pairs", ALL),
    ("dpo", "data/pairs/dpo_val.jsonl", "preference_pairs", ("label_out_of_range", "duplicate_id")),
    ("evaluate", "data/prepared/processbench.jsonl", "prepared_processbench", ALL),
    ("evaluate", "data/prepared/prmbench.jsonl", "prepared_prmbench", ALL),
    ("best-of-n", "src/bon/testsets/amc23.jsonl", "bon_testset", ("invalid_json", "wrong_type", "empty_list", "duplicate_id")),
    ("best-of-n", "src/bon/testsets/olympiadbench_200.jsonl", "bon_olympiadbench", ("missing_field", "empty_list")),
    ("best-of-n", "src/" + POOL_FILE, "candidate_pool", ("non_utf8", "wrong_type", "empty_list", "duplicate_id")),
    ("score-processbench", "preds.jsonl", "processbench_predictions", ALL),
    ("score-processbench", "bench/pb/gsm8k.jsonl", "prepared_processbench", ALL),
    ("score-prmbench", "results.jsonl", "prmbench_results", ALL),
    ("score-prmbench", "bench/prmbench.jsonl", "prepared_prmbench", ALL),
]
assert set(COMMANDS) - {"validate-params"} == {row[0] for row in CLI_TABLE}, "every file-reading command has rows"

CLI_CASES = [
    pytest.param(cmd, rel, c, id=f"{cmd}-{Path(rel).name}-{c.breakage}")
    for cmd, rel, target, breakages in CLI_TABLE
    for c in bc.cases(target)
    if c.breakage in breakages
]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_project(root: Path, sft_model: Path | None = None) -> Path:
    """A project as a previous run left it: params, a data folder, every stage's inputs and outputs.

    The data folder mirrors data/bundled with symlinks (a broken file replaces its link, so
    the repository is never written). Reports hold a stale marker: a failed run must leave them.
    """
    raw = yaml.safe_load((REPO / PARAMS).read_text(encoding="utf-8"))
    raw["data"].update(source="dir", dir=str(root / "src"), bundled_dir=str(BUNDLED))
    # the real-data paths: PRM800K and the bundled Best-of-N sets are read (and must be refused when broken)
    raw["domain"]["kind"] = "prm800k"
    raw["best_of_n"].update(datasets=["aime24", "amc23", "math500", "olympiadbench", "college_math", "minerva_math"],
                            policy_model=None, max_problems=1, n=4)
    (root / PARAMS).write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    for f in BUNDLED.rglob("*"):
        if f.is_file():
            link = root / "src" / f.relative_to(BUNDLED)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f)
    _jsonl(root / "data/prepared/steps_train.jsonl", bc.step_sample_records())
    val = {**bc.step_sample_records()[0], "id": "val-0", "problem_id": "p9"}
    _jsonl(root / "data/prepared/steps_val.jsonl", [val])
    _jsonl(root / "data/prepared/processbench.jsonl", bc.prepared_processbench_records())
    _jsonl(root / "data/prepared/prmbench.jsonl", bc.prepared_prmbench_records())
    _jsonl(root / "data/synth/sft_train.jsonl", bc.sft_records())
    _jsonl(root / "data/synth/sft_val.jsonl", [{**bc.sft_records()[1], "id": "sft-val"}])
    _jsonl(root / "data/synth/critiques.jsonl", [{"stale": True}])
    _jsonl(root / "data/pairs/dpo_train.jsonl", bc.pair_records())
    _jsonl(root / "data/pairs/dpo_val.jsonl", [{**bc.pair_records()[0], "id": "pair-val"}])
    _jsonl(root / "data/pairs/critiques.jsonl", [{"stale": True}])
    _jsonl(root / "preds.jsonl", bc.processbench_prediction_records())
    _jsonl(root / "results.jsonl", bc.prmbench_result_records())
    _jsonl(root / "bench/pb/gsm8k.jsonl", bc.processbench_records())
    _jsonl(root / "bench/prmbench.jsonl", bc.prmbench_records())
    for name in STALE_REPORTS:
        _jsonl(root / "reports" / f"{name}.json", [{"stale": True}])
    if sft_model is not None:
        (root / "models").mkdir()
        (root / "models" / "sft").symlink_to(sft_model, target_is_directory=True)
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root (links not followed) with its type, size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def assert_nothing_written(before: dict[str, tuple[int, int, int]], root: Path) -> None:
    after = snapshot(root)
    created = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    assert not (created or removed or changed), f"created {created}, removed {removed}, changed {changed}"


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Path:
    """A temporary project as cwd, MLflow pointed at a SQLite file inside it."""
    root = tmp_path / "proj"
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlruns.db'}")
    monkeypatch.delenv("RPRM_PARENT_RUN_ID", raising=False)
    return root


def assert_clean_failure(output: str, exit_code: int, where: str, line: int | None, field: str | None,
                         message: str) -> None:
    """Exit code 2 and a one-line `error: <file>:<line>: field '<field>' <message>`, no traceback."""
    assert exit_code == 2, f"exit code {exit_code}: {output[-2000:]}"
    assert "Traceback" not in output, output[-3000:]
    errors = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    assert errors, output[-2000:]
    msg = errors[0]
    assert where in msg, f"{where!r} not in {msg!r}"
    if line is not None:
        assert f"{where}:{line}:" in msg, msg
    if field is not None:
        assert f"field '{field}'" in msg, msg
    assert message.lower() in output.lower(), f"{message!r} not in {output[-2000:]!r}"


@pytest.mark.parametrize(("cmd", "rel", "c"), CLI_CASES)
def test_command_rejects_broken_input_and_writes_nothing(
    project: Path, request: pytest.FixtureRequest, cmd: str, rel: str, c: bc.Case
) -> None:
    from components.cli import app

    sft_model = request.getfixturevalue("tiny_model_dir") if cmd in NEEDS_SFT_MODEL else None
    make_project(project, sft_model)
    c.write(project / rel)
    before = snapshot(project)
    result = CliRunner().invoke(app, COMMANDS[cmd])
    assert isinstance(result.exception, SystemExit), f"{cmd} raised {result.exception!r}: {result.output[-2000:]}"
    assert_clean_failure(result.output, result.exit_code, Path(rel).name, c.line, c.field, c.message)
    assert_nothing_written(before, project)
    assert not (project / "mlruns.db").exists() and not (project / "mlruns").exists()


@pytest.mark.parametrize(("cmd", "rel"), [("synthesize", "data/prepared/steps_train.jsonl"),
                                        ("score-processbench", "preds.jsonl"),
                                        ("evaluate", "data/prepared/prmbench.jsonl")])
def test_folder_where_a_file_belongs_is_named(project: Path, cmd: str, rel: str) -> None:
    from components.cli import app

    make_project(project)
    (project / rel).unlink()
    (project / rel).mkdir()
    before = snapshot(project)
    result = CliRunner().invoke(app, COMMANDS[cmd])
    assert isinstance(result.exception, SystemExit), f"{cmd} raised {result.exception!r}: {result.output[-2000:]}"
    assert_clean_failure(result.output, result.exit_code, Path(rel).name, None, None, "is a folder")
    assert_nothing_written(before, project)


# validate-params gets every broken params file; stages load params through the same function,
# so each also gets three kinds (a wrong type, a duplicate key, bad bytes)
PARAMS_TABLE = [("validate-params", c) for c in bc.PARAMS_CASES] + [
    (cmd, c) for cmd in ("prepare", "synthesize", "evaluate") for c in bc.PARAMS_CASES
    if c.breakage in {"wrong_type", "duplicate_id", "non_utf8"}
]


@pytest.mark.parametrize(("cmd", "c"), PARAMS_TABLE, ids=[f"{cmd}-{c.id}" for cmd, c in PARAMS_TABLE])
def test_broken_params_file_fails_before_anything(project: Path, cmd: str, c: bc.ParamsCase) -> None:
    from components.cli import app

    make_project(project)
    c.write(project / "bad.yaml", (REPO / PARAMS).read_bytes())
    before = snapshot(project)
    argv = [a if a != PARAMS else "bad.yaml" for a in COMMANDS[cmd]]
    result = CliRunner().invoke(app, argv)
    assert isinstance(result.exception, SystemExit), f"{cmd} raised {result.exception!r}: {result.output[-2000:]}"
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output[-2000:]
    assert "error: bad.yaml" in result.output, result.output
    for needle in c.needles:
        assert needle in result.output, f"{needle!r} not in {result.output!r}"
    assert_nothing_written(before, project)


# (command, file broken, target, breakage): a real `rprm` process each, the 50 MB line included
PROCESS_CASES = [
    ("prepare", "src/prm800k/phase1_train_plus.solutions.jsonl", "prm800k_steps", "huge_line"),
    ("synthesize", "data/prepared/steps_train.jsonl", "step_samples", "huge_line"),
    ("score-prmbench", "results.jsonl", "prmbench_results", "label_out_of_range"),
]


@pytest.mark.parametrize(("cmd", "rel", "target", "breakage"), PROCESS_CASES, ids=[f"{r[0]}-{r[3]}" for r in PROCESS_CASES])
def test_rprm_process_exits_2_with_bounded_memory(project: Path, cmd: str, rel: str, target: str, breakage: str) -> None:
    """The installed `rprm` script, as a user runs it: exit 2, one-line error, nothing written, RSS bounded."""
    assert RPRM.exists(), f"console script not installed at {RPRM}"
    make_project(project)
    c = bc.case(target, breakage)
    c.write(project / rel)
    before = snapshot(project)
    # Linux carries a process's peak RSS across fork+exec, so a child forked from this (large)
    # test process reports at least our own RSS. A small Python launcher in between forks
    # `rprm` from a fresh, small process and reports the peak of `rprm` alone.
    launcher = ("import os, subprocess, sys\n"
                "p = subprocess.Popen(sys.argv[2:], stdout=sys.stdout, stderr=sys.stderr)\n"
                "_, status, usage = os.wait4(p.pid, 0)\n"
                "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
                "sys.exit(os.waitstatus_to_exitcode(status))\n")
    peak_file = project.parent / "peak_kib.txt"
    with (project.parent / "out.txt").open("w+") as out:
        proc = subprocess.run([sys.executable, "-c", launcher, str(peak_file), str(RPRM), *COMMANDS[cmd]],
                              cwd=project, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "COLUMNS": "200"}, check=False)
        out.seek(0)
        output = out.read()
    assert_clean_failure(output, proc.returncode, Path(rel).name, c.line, c.field, c.message)
    assert_nothing_written(before, project)
    peak_mib = int(peak_file.read_text()) / 1024  # Linux: KiB
    assert peak_mib < 256, f"rprm {cmd} peaked at {peak_mib:.0f} MiB on a {bc.HUGE_LINE_BYTES >> 20} MB line"


# --------------------------------------------------------------------------------------
# Metric properties (hypothesis), beyond those in tests/test_benchmarks.py
# --------------------------------------------------------------------------------------

pb_rows_st = st.lists(
    st.tuples(st.sampled_from(B.PROCESSBENCH_SUBSETS), st.integers(-1, 5), st.integers(-1, 5)), max_size=40
)
prmb_rows_st = st.lists(
    st.integers(1, 6).flatmap(lambda n: st.tuples(
        st.sampled_from((*B.PRMBENCH_CLASSES, "correct")),
        st.lists(st.integers(1, n + 1), max_size=n, unique=True),  # n + 1: an index past the end, as upstream
        st.lists(st.booleans(), min_size=n, max_size=n),
    )),
    max_size=25,
)


@settings(max_examples=100, deadline=None)
@given(rows=pb_rows_st, data=st.data())
def test_processbench_metrics_ignore_row_order_and_scale(rows: list[tuple[str, int, int]], data: st.DataObject) -> None:
    r = B.processbench_metrics(rows)
    assert B.processbench_metrics(data.draw(st.permutations(rows))) == r
    doubled = B.processbench_metrics(rows + rows)  # every count doubles, every ratio stays
    for name, sub in r["subsets"].items():
        for key in ("acc_erroneous", "acc_correct", "f1"):
            assert doubled["subsets"][name][key] == pytest.approx(sub[key])
    assert doubled["avg_f1"] == pytest.approx(r["avg_f1"])
    if r["avg_f1"] is not None:
        assert 0.0 <= r["avg_f1"] <= 100.0


@settings(max_examples=100, deadline=None)
@given(rows=pb_rows_st, extra=pb_rows_st)
def test_processbench_subsets_are_independent(rows: list[tuple[str, int, int]], extra: list[tuple[str, int, int]]) -> None:
    """Rows of one subset never change another subset's numbers."""
    r = B.processbench_metrics(rows, subsets=list(B.PROCESSBENCH_SUBSETS))
    touched = {s for s, _, _ in extra}
    both = B.processbench_metrics(rows + extra, subsets=list(B.PROCESSBENCH_SUBSETS))
    for s in set(B.PROCESSBENCH_SUBSETS) - touched:
        assert both["subsets"][s] == r["subsets"][s]


rewards_st = st.lists(st.floats(0, 1), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(rewards=rewards_st, t1=st.floats(0, 1), t2=st.floats(0, 1))
def test_first_error_is_defined_by_the_threshold_and_moves_earlier_as_it_rises(
    rewards: list[float], t1: float, t2: float
) -> None:
    lo, hi = sorted((t1, t2))
    for t in (lo, hi):
        i = B.predict_first_error(rewards, t)
        if i == -1:
            assert all(r >= t for r in rewards)
        else:
            assert rewards[i] < t and all(r >= t for r in rewards[:i])
    at_lo, at_hi = B.predict_first_error(rewards, lo), B.predict_first_error(rewards, hi)
    as_pos = lambda i: len(rewards) if i == -1 else i  # noqa: E731 - "no error" sorts last
    assert as_pos(at_hi) <= as_pos(at_lo)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(-1, 4)), min_size=1, max_size=8), st.data())
def test_predictions_as_rewards_or_indices_score_the_same(shapes: list[tuple[int, int]], data: st.DataObject) -> None:
    """score-processbench gives one report whether a PRM's file holds step rewards or first errors."""
    items, by_rewards, by_index = [], [], []
    for i, (n, label) in enumerate(shapes):
        label = min(label, n - 1)
        items.append({"id": f"math-{i}", "problem": "p", "steps": ["s"] * n, "label": label})
        rewards = data.draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
        by_rewards.append({"id": f"math-{i}", "step_rewards": rewards})
        by_index.append({"id": f"math-{i}", "first_error": B.predict_first_error(rewards, 0.5)})
    with tempfile.TemporaryDirectory() as d:
        _jsonl(Path(d) / "pb" / "math.jsonl", items)
        _jsonl(Path(d) / "r.jsonl", by_rewards)
        _jsonl(Path(d) / "i.jsonl", by_index)
        a = B.cli_score_processbench(Path(d) / "r.jsonl", Path(d) / "pb", 0.5, None)
        b = B.cli_score_processbench(Path(d) / "i.jsonl", Path(d) / "pb", 0.5, None)
    assert a["subsets"] == b["subsets"] and a["avg_f1"] == b["avg_f1"]


def _swap(c: B.Confusion) -> B.Confusion:
    """The same counts with the positive and negative classes exchanged."""
    return B.Confusion(tp=c.tn, fp=c.fn, tn=c.tp, fn=c.fp)


@settings(max_examples=200, deadline=None)
@given(st.builds(B.Confusion, *(st.integers(0, 50) for _ in range(4))))
def test_f1_scores_negative_class_is_the_positive_class_swapped(c: B.Confusion) -> None:
    s, w = B.f1_scores(c), B.f1_scores(_swap(c))
    assert (s["negative_precision"], s["negative_recall"], s["negative_f1"]) == (w["precision"], w["recall"], w["f1"])
    for key, v in s.items():
        assert v == -1.0 or 0.0 <= v <= 1.0, (key, v)  # a ratio, or upstream's -1 for undefined
    assert -1.0 <= B.prmscore(c) <= 1.0


@settings(max_examples=100, deadline=None)
@given(rows=prmb_rows_st, data=st.data())
def test_prmbench_metrics_ignore_row_order_and_scale(rows: list[tuple[str, list[int], list[bool]]], data: st.DataObject) -> None:
    r = B.prmbench_metrics(rows)
    assert B.prmbench_metrics(data.draw(st.permutations(rows))) == r
    doubled = B.prmbench_metrics(rows + rows)
    assert doubled["prmscore"] == pytest.approx(r["prmscore"])
    for name, c in r["classes"].items():
        assert doubled["classes"][name]["prmscore"] == pytest.approx(c["prmscore"])


@settings(max_examples=100, deadline=None)
@given(rows=prmb_rows_st)
def test_prmbench_overall_pools_classes_and_groups_average_them(rows: list[tuple[str, list[int], list[bool]]]) -> None:
    r = B.prmbench_metrics(rows)
    scored = [row for row in rows if row[0] != "correct"]
    assert r["n_items"] == len(scored) and r["n_steps"] == sum(len(lab) for _, _, lab in scored)
    pooled = B.Confusion()
    for name, c in r["classes"].items():
        if name != "correct":
            pooled = pooled + B.Confusion(c["tp"], c["fp"], c["tn"], c["fn"])
    if scored:
        assert (r["overall"]["tp"], r["overall"]["fp"], r["overall"]["tn"], r["overall"]["fn"]) == (
            pooled.tp, pooled.fp, pooled.tn, pooled.fn)
        assert r["prmscore"] == pytest.approx(B.prmscore(pooled))
    else:
        assert r["prmscore"] is None and r["overall"] is None
    for group, members in B.PRMBENCH_GROUPS.items():
        present = [r["classes"][m]["prmscore"] for m in members if m in r["classes"]]
        if present:
            assert min(present) - 1e-12 <= r["groups"][group] <= max(present) + 1e-12
        else:
            assert r["groups"][group] is None
    assert set(r["classes_missing"]) == set(B.PRMBENCH_CLASSES) - {c for c, _, _ in rows}


@settings(max_examples=100, deadline=None)
@given(scores=st.lists(st.floats(0, 1), max_size=20), threshold=st.floats(0, 1))
def test_step_labels_strict_comparison_is_never_more_lenient(scores: list[float], threshold: float) -> None:
    ge, gt = B.step_labels(scores, threshold, ">="), B.step_labels(scores, threshold, ">")
    assert all(g or not s for g, s in zip(ge, gt, strict=True))  # '>' correct implies '>=' correct
    assert B.step_labels(scores, 0.0, ">=") == [True] * len(scores)
