"""Kill -9 and resume: a stage SIGKILLed at a random point, then rerun, equals an uninterrupted run.

`kill_and_resume` is the reusable harness. It runs a stage command once uninterrupted (the
reference), then again in a fresh copy of the project, SIGKILLs that process group at a seeded
random point once its journal holds some but not all records, reruns it to completion, and
checks: the killed run wrote no final output; the rerun asked the engine only for what the
journal lacked; the final outputs are byte-identical to the reference's; the journal holds every
record of the reference, each exactly once and equal to the reference's. The harness is itself
run on a toy journaled stage, correct and with two classic resume bugs.

Applied here to the evaluation scoring of `rprm evaluate` (journals in data/scores/journals),
which no other test kills (`synthesize` is killed in tests/test_synthesis.py, `sample-pairs` in
tests/test_pairs.py, SFT/DPO in tests/test_training.py). The engine is an OpenAI-compatible
HTTP server on 127.0.0.1 run by the test (tests/fault_server.py with no faults, deterministic
per request seed) reached through the stage's real `openai` backend: the stage, its journal and
the kill are real; the server only keeps generation cheap enough for three runs on 2 cores.
Set RPRM_KILL_SEED to try other kill points.

Last, a static check that `dvc repro` keeps every journal and checkpoint folder (persist: true).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from fault_server import FaultServer

from components import paths
from components.io import write_jsonl
from components.journal import HEADER_KEY

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "data" / "bundled"
RPRM = Path(sys.executable).with_name("rprm")
KILL_SEED = int(os.environ.get("RPRM_KILL_SEED", "20240611"))  # set to explore other kill points


# --------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------


def journal_records(files: Iterable[Path], key: str, skip: frozenset[str] = frozenset()) -> list[tuple[str, dict]]:
    """(key, record) of every complete journal line (a torn last line is not a record)."""
    out = []
    for f in files:
        if not f.exists():
            continue
        for raw in f.read_bytes().split(b"\n")[:-1]:  # the part after the last newline is torn
            if not raw.strip():
                continue
            rec = json.loads(raw)
            if str(rec[key]) not in skip:
                out.append((f"{f.name}:{rec[key]}", rec))
    return out


@dataclass
class KillOutcome:
    """What happened: the kill point, the journal at the kill, the engine work of each run."""

    target: int
    at_kill: int
    total: int
    reference_work: int
    rerun_work: int


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} in {cwd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def kill_and_resume(
    cmd: list[str],
    *,
    make: Callable[[Path], None],
    root: Path,
    journals: Callable[[Path], list[Path]],
    key: str,
    outputs: Callable[[Path], dict[str, bytes]],
    env: dict[str, str],
    seed: int,
    work: Callable[[], int] | None = None,
    skip_keys: frozenset[str] = frozenset(),
    burst: int = 1,
    timeout: float = 300.0,
) -> KillOutcome:
    """Reference run, killed run, rerun; assert equal outputs and an exact journal (see module doc).

    `make(dir)` builds a fresh project; `journals(dir)` lists its journal files; `outputs(dir)`
    maps the stage's final outputs to their bytes; `work()` counts engine requests so far;
    `burst` is the most records the stage journals at once (a batch), so the kill point is drawn
    from [1, total - burst] and always leaves work to resume.
    """
    reference, killed = root / "reference", root / "killed"
    make(reference)
    make(killed)
    count = work or (lambda: 0)
    w0 = count()
    _run(cmd, reference, env, timeout)
    reference_work = count() - w0
    ref_records = dict(journal_records(journals(reference), key, skip_keys))
    total = len(ref_records)
    assert total > burst, f"the reference run journaled only {total} records: nothing to interrupt"
    assert outputs(reference), "the reference run wrote no final output"

    target = random.Random(seed).randint(1, total - burst)
    proc = subprocess.Popen(cmd, cwd=killed, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while len(journal_records(journals(killed), key, skip_keys)) < target:
            if proc.poll() is not None:
                pytest.fail(f"stage ended (rc {proc.returncode}) before the kill point {target}/{total}:\n"
                            + proc.stdout.read().decode(errors="replace")[-3000:])
            assert time.monotonic() < deadline, f"no progress to {target} journal records in {timeout}s"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    at_kill = journal_records(journals(killed), key, skip_keys)
    assert target <= len(at_kill) < total, f"kill point {target}: {len(at_kill)}/{total} journaled"
    assert not outputs(killed), f"a killed run left final outputs: {sorted(outputs(killed))}"

    w1 = count()
    _run(cmd, killed, env, timeout)
    rerun_work = count() - w1
    if work is not None:  # the rerun generated only what the journal lacked
        assert 0 < rerun_work < reference_work, f"rerun asked {rerun_work} of the engine, reference {reference_work}"

    final = journal_records(journals(killed), key, skip_keys)
    keys = [k for k, _ in final]
    assert len(keys) == len(set(keys)), f"duplicated journal records: {sorted({k for k in keys if keys.count(k) > 1})}"
    assert set(keys) == set(ref_records), f"lost {sorted(set(ref_records) - set(keys))[:5]}"
    for k, rec in final:
        assert rec == ref_records[k], f"journal record {k} differs from the uninterrupted run's"
    assert outputs(killed) == outputs(reference), (
        f"kill point {target}/{total}: outputs differ in "
        f"{sorted(p for p in outputs(reference) if outputs(killed).get(p) != outputs(reference)[p])}"
    )
    return KillOutcome(target, len(at_kill), total, reference_work, rerun_work)


def files_bytes(root: Path, patterns: Iterable[str]) -> dict[str, bytes]:
    """{relative path: bytes} of the files under root matching the glob patterns."""
    return {str(p.relative_to(root)): p.read_bytes() for pat in patterns for p in sorted(root.glob(pat)) if p.is_file()}


# --------------------------------------------------------------------------------------
# Projects
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> Iterable[FaultServer]:
    """A deterministic OpenAI-compatible server on 127.0.0.1 (no faults; a small delay per request)."""
    with FaultServer(delay_s=0.01) as server:
        yield server


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    """The stage's environment: one MLflow store for the three runs, no parent run, no API key."""
    out = {k: v for k, v in os.environ.items() if k not in ("RPRM_PARENT_RUN_ID", "OPENAI_API_KEY")}
    out.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlruns.db'}", COLUMNS="120", PYTHONPATH=str(REPO))
    return out


def base_params(engine: FaultServer) -> dict[str, Any]:
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["data"]["bundled_dir"] = str(BUNDLED)
    raw["backend"]["kind"] = "openai"
    raw["backend"]["openai"].update(base_url=engine.base_url, concurrency=2, max_retries=0, timeout_s=30.0)
    return raw


TOY_STAGE = """
import json, os, sys, time
from pathlib import Path
mode, journal, done = sys.argv[1], Path("journal.jsonl"), {}
if journal.exists():
    data = journal.read_bytes()
    data = data[: data.rfind(b"\\n") + 1]  # drop a torn tail
    journal.write_bytes(data)
    done = {r["key"]: r for r in map(json.loads, data.splitlines())}
fresh = {}
with journal.open("a") as fh:
    for i in range(40):
        if i in done and mode != "redoes_journaled_work":
            continue
        fresh[i] = {"key": i, "value": i * i}
        fh.write(json.dumps(fresh[i]) + "\\n"); fh.flush(); os.fsync(fh.fileno())
        time.sleep(0.01)
kept = fresh if mode == "drops_journaled_work" else {**done, **fresh}
Path("out.json").write_text(json.dumps([kept[k]["value"] for k in sorted(kept)]))
"""


@pytest.mark.parametrize(("mode", "error"), [
    ("resumes", None),
    ("redoes_journaled_work", "duplicated journal records"),
    ("drops_journaled_work", "outputs differ"),
])
def test_harness_passes_a_resuming_stage_and_catches_broken_ones(
    tmp_path: Path, env: dict[str, str], mode: str, error: str | None
) -> None:
    """A toy journaled stage, correct and with two classic resume bugs, through the same harness."""
    script = tmp_path / "toy_stage.py"
    script.write_text(TOY_STAGE, encoding="utf-8")
    run = lambda: kill_and_resume(  # noqa: E731
        [sys.executable, str(script), mode], make=lambda d: d.mkdir(), root=tmp_path, key="key", env=env,
        seed=KILL_SEED, journals=lambda d: [d / "journal.jsonl"], outputs=lambda d: files_bytes(d, ["out.json"]),
    )
    if error is None:
        out = run()
        assert 1 <= out.target <= out.at_kill < out.total == 40
    else:
        with pytest.raises(AssertionError, match=error):
            run()


# --------------------------------------------------------------------------------------
# `rprm evaluate`: step scoring of ProcessBench and PRMBench
# --------------------------------------------------------------------------------------

EVALUATE_OUTPUTS = ("reports/processbench.json", "reports/prmbench.json", "reports/scaling.json",
                    "data/scores/base/*.jsonl", "plots/*")


@pytest.mark.slow
def test_evaluate_killed_at_a_random_point_resumes_to_identical_outputs(
    tmp_path: Path, engine: FaultServer, env: dict[str, str]
) -> None:
    from components.config import params_from_dict
    from components.prepare import stage_benchmarks

    raw = base_params(engine)
    raw["evaluate"].update(models=["base"], k_sweep=[1, 2], thresholds=[0.3, 0.5])
    raw["evaluate"]["processbench"]["max_per_subset"] = 2
    raw["evaluate"]["prmbench"]["max_items"] = 3
    raw["scoring"]["sampling"].update(n=2, max_new_tokens=64)
    raw["scoring"]["fallback"] = "sampled_verdict"
    pb, prmb, _ = stage_benchmarks(params_from_dict(raw))
    model = tmp_path / "model"  # the openai engine needs only a model folder to name (shared: same fingerprint)
    model.mkdir()
    (model / "config.json").write_text("{}", encoding="utf-8")

    def make(d: Path) -> None:
        d.mkdir()
        (d / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        write_jsonl(d / paths.PROCESSBENCH, pb)
        write_jsonl(d / paths.PRMBENCH, prmb)
        (d / "models").mkdir()
        (d / paths.BASE_MODEL).symlink_to(model, target_is_directory=True)

    kill_and_resume(
        [str(RPRM), "evaluate", "-p", "params.yaml"], make=make, root=tmp_path, key="key", env=env, seed=KILL_SEED,
        journals=lambda d: sorted((d / paths.SCORES / "journals").glob("*.jsonl")),
        # an early-exit wave (ProcessBench) journals one step per solution; a full-scoring wave
        # (PRMBench) every step of its active solutions (here all three items)
        skip_keys=frozenset({HEADER_KEY}),
        burst=max(len(pb), sum(len(item.modified_process) for item in prmb)),
        outputs=lambda d: files_bytes(d, EVALUATE_OUTPUTS),
        work=lambda: len(engine.requests),
    )


# --------------------------------------------------------------------------------------
# Resume state survives `dvc repro`
# --------------------------------------------------------------------------------------

RESUME_STATE = [  # what a rerun resumes from
    paths.SYNTH_JOURNAL,
    paths.PAIRS_JOURNAL,
    paths.SCORES / "journals",
    paths.BON_POOLS,
    paths.BON_SCORES,
    paths.BON_GUIDED,
    paths.CHECKPOINTS / "sft",
    paths.CHECKPOINTS / "dpo",
]


def test_dvc_keeps_every_journal_and_checkpoint_across_repro() -> None:
    """DVC deletes a stage's outputs before rerunning it unless they are `persist: true`: any output
    holding a journal or checkpoints must be persisted, or a crashed `dvc repro` restarts from zero."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    covering: dict[str, list[str]] = {str(p): [] for p in RESUME_STATE}
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            for state in covering:
                if Path(state) == Path(path) or Path(path) in Path(state).parents:
                    if not (opts or {}).get("persist", False):
                        covering[state].append(f"{name}: {path}")
    wiped = {state: outs for state, outs in covering.items() if outs}
    assert not wiped, f"resume state deleted by `dvc repro` (declare it `persist: true`): {wiped}"
