"""Section c: orchestration overhead (a no-op `dvc repro`; the Prefect flow against direct runs).

A no-op `dvc repro` is timed in a temporary copy, never in the working tree (a stray rerun of
real stages in a shared checkout would be costly): a copy of the completed real pipeline when
`dvc status` in the project says everything is up to date and the copy says so too, else a copy
of the project's DAG (same stages, deps, params and outs) whose commands only write small
placeholder outputs. The Prefect flow's overhead is always measured on that placeholder DAG:
with stages that do almost nothing, what is left of a run is the orchestration.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT, SectionResult, median

# Left out of the copy of a completed project unless a stage's deps or outs need them (the
# trainers' persistent `checkpoints/` are outs, so they are copied: without them `dvc status`
# sees the training stages as changed and the "no-op" reruns SFT and DPO).
COPY_IGNORE = (
    ".venv*", ".git", "mlruns*", "mlartifacts", "cache", "tmp", "__pycache__", ".pytest_cache",
    ".ruff_cache", "bench", "*.egg-info", ".prefect",
)

STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STAGE_SCRIPT = '''"""Placeholder stage for the bench: writes every path given on the command line."""
import json, pathlib, sys
for arg in sys.argv[1:]:
    p = pathlib.Path(arg)
    if arg.endswith("/"):
        p.mkdir(parents=True, exist_ok=True)
        (p / "part.txt").write_text("bench placeholder\\n")
        continue
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".json":
        p.write_text(json.dumps({"value": 1.0}))
    elif p.suffix == ".csv":
        p.write_text("x,y\\n1,1\\n")
    else:
        p.write_text("bench placeholder\\n")
'''


def dvc_cmd() -> list[str]:
    """The dvc command of this interpreter's environment."""
    exe = Path(sys.executable).parent / "dvc"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dvc"]


def _run(cmd: Sequence[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd} ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def _paths(entries: list[Any] | None) -> list[str]:
    """Paths of a dvc.yaml deps/outs/metrics/plots list (strings or one-key mappings)."""
    out: list[str] = []
    for e in entries or []:
        out.extend([e] if isinstance(e, str) else list(e))
    return out


def changed_stages(root: Path) -> list[str] | None:
    """Stages `dvc status` in `root` says would rerun ([] when up to date); None without a
    dvc.lock or when `dvc status` fails."""
    if not (root / "dvc.lock").exists():
        return None
    try:
        out = _run([*dvc_cmd(), "status", "--json"], root, timeout=300)
    except (RuntimeError, subprocess.TimeoutExpired):
        return None
    return sorted(name.split(":")[-1] for name in json.loads(out.stdout or "{}"))


def project_pipeline_complete(root: Path = ROOT) -> bool:
    """True when the project has a dvc.lock and `dvc status` reports nothing to rerun."""
    return changed_stages(root) == []


def pipeline_paths(root: Path = ROOT) -> list[str]:
    """Every path dvc.yaml names as a stage's dep, out, metric or plot."""
    dvc = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    return sorted({
        p.rstrip("/")
        for st in dvc["stages"].values()
        for key in ("deps", "outs", "metrics", "plots")
        for p in _paths(st.get(key))
    })


def _copy_ignore(root: Path, keep: Sequence[str]) -> Any:
    """A copytree `ignore` that leaves out COPY_IGNORE's names, except on the way to a kept path
    or inside one."""
    skip = shutil.ignore_patterns(*COPY_IGNORE)
    kept = [Path(k) for k in keep]

    def ignore(directory: str, names: list[str]) -> set[str]:
        rel = Path(directory).resolve().relative_to(root.resolve())
        out = set()
        for name in skip(directory, names):
            path = rel / name
            if not any(path == k or path in k.parents or k in path.parents for k in kept):
                out.add(name)
        return out

    return ignore


def copy_completed_project(dest: Path, root: Path = ROOT) -> None:
    """Copy the project with its pipeline's deps and outputs (not venvs, git or runs) into
    `dest`, a fresh git repository that reads the project's DVC cache in place (`dvc status`
    needs a cached out's cache entry; a no-op repro writes none)."""
    cache = _run([*dvc_cmd(), "cache", "dir"], root).stdout.strip()
    shutil.copytree(root, dest, ignore=_copy_ignore(root, pipeline_paths(root)), symlinks=True)
    _run(["git", "init", "-q"], dest)
    _run([*dvc_cmd(), "cache", "dir", "--local", str(Path(root, cache).resolve())], dest)


def placeholder_dag(dest: Path, root: Path = ROOT) -> int:
    """The project's DAG in `dest` with placeholder commands; returns the number of stages."""
    dest.mkdir(parents=True, exist_ok=True)
    dvc = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    stages: dict[str, Any] = dvc["stages"]
    produced: dict[str, str] = {}  # out path -> stage
    for name, st in stages.items():
        for p in _paths(st.get("outs")) + _paths(st.get("metrics")) + _paths(st.get("plots")):
            produced[p] = name
    all_deps = {d for st in stages.values() for d in _paths(st.get("deps"))}
    (dest / "bench_stage.py").write_text(STAGE_SCRIPT, encoding="utf-8")
    shutil.copy2(root / "params.yaml", dest / "params.yaml")
    for dep in sorted(all_deps):
        if any(dep == o or dep.startswith(o.rstrip("/") + "/") for o in produced):
            continue
        src, dst = root / dep, dest / dep
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, dst)
        else:
            dst.write_text("bench placeholder for a file not written yet\n", encoding="utf-8")
    for st in stages.values():
        targets: list[str] = []
        for out in _paths(st.get("outs")):
            inside = sorted(d for d in all_deps if d.startswith(out.rstrip("/") + "/"))
            if inside or not Path(out).suffix:
                targets.extend(inside or [out.rstrip("/") + "/"])
            else:
                targets.append(out)
        targets += _paths(st.get("metrics")) + _paths(st.get("plots"))
        st["cmd"] = f"{Path(sys.executable).as_posix()} bench_stage.py " + " ".join(targets)
    (dest / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False), encoding="utf-8")
    _run(["git", "init", "-q"], dest)
    _run([*dvc_cmd(), "init", "-q"], dest)
    _run([*dvc_cmd(), "config", "core.analytics", "false"], dest)
    return len(stages)


def _ran(stdout: str) -> list[str]:
    """Stage names a `dvc repro` output says it ran."""
    return [line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage '")]


def time_noop_repro(workdir: Path, repeats: int) -> dict[str, Any]:
    """Run `dvc repro` once to complete the pipeline, then time `repeats` no-op reruns."""
    first = time.perf_counter()
    ran_first = _ran(_run([*dvc_cmd(), "repro"], workdir).stdout)
    first_s = time.perf_counter() - first
    times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = _run([*dvc_cmd(), "repro"], workdir)
        times.append(time.perf_counter() - t0)
        if "Running stage" in out.stdout:
            raise RuntimeError(f"second dvc repro in {workdir} was not a no-op:\n{out.stdout}")
    t0 = time.perf_counter()
    _run([*dvc_cmd(), "--version"], workdir)
    startup = time.perf_counter() - t0
    return {
        "first_repro_s": round(first_s, 3),
        "first_repro_ran": ran_first,
        "noop_repro_s": [round(t, 3) for t in times],
        "noop_repro_median_s": round(median(times), 3),
        "dvc_startup_s": round(startup, 3),
    }


COPY_MODE = "copy of the project after a completed real pipeline"
PLACEHOLDER_MODE = ("temp git+dvc copy of the project's DAG (same stages, deps, params, outs) "
                    "with placeholder commands")


def prepare_project(work: Path, root: Path = ROOT) -> tuple[str, int]:
    """A pipeline to time no-op reruns in, at `work`: a copy of the completed real one when the
    copy is up to date too, else the placeholder DAG; returns (how it was made, stages)."""
    n_stages = len(yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
    if project_pipeline_complete(root):
        copy_completed_project(work, root)
        changed = changed_stages(work)
        if changed == []:
            return COPY_MODE, n_stages
        shutil.rmtree(work)
        placeholder_dag(work, root)
        return (f"{PLACEHOLDER_MODE}: the copy of the completed pipeline was not up to date "
                f"(dvc status: {', '.join(changed or ['failed'])})"), n_stages
    placeholder_dag(work, root)
    return f"{PLACEHOLDER_MODE}: the real pipeline outputs do not exist", n_stages


def _dirty(work: Path, stamp: int) -> None:
    """Change the bundled data (a dep of base-model and prepare) so both stages rerun."""
    target = work / "data" / "bundled" / "prm800k" / "bench_touch.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"bench run {stamp}\n", encoding="utf-8")


def bench_prefect(work: Path, stages: Sequence[str], repeats: int) -> dict[str, Any]:
    """The `rprm-pipeline` flow on `stages` against the same `dvc repro --single-item` run directly.

    Before every run the stages' shared input is changed, so both sides really run them. The
    first flow run includes starting Prefect's ephemeral API server (when no PREFECT_API_URL is
    configured); later runs show the steady overhead.
    """
    prefect_home = work.parent / "prefect-home"
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "MLFLOW_TRACKING_URI", STARTUP_TIMEOUT)}
    if "PREFECT_API_URL" not in os.environ:
        os.environ["PREFECT_HOME"] = str(prefect_home)
        # Prefect's default (20 s) is too short for the temporary API server on a crowded machine.
        os.environ.setdefault(STARTUP_TIMEOUT, "300")
    os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///" + str(work / "mlruns.db")
    cwd = Path.cwd()
    direct: list[float] = []
    flows: list[float] = []
    stamp = 0
    try:
        for _ in range(repeats):
            stamp += 1
            _dirty(work, stamp)
            t0 = time.perf_counter()
            for stage in stages:
                out = _run([sys.executable, "-m", "dvc", "repro", "--single-item", stage], work)
                if "Running stage" not in out.stdout:
                    raise RuntimeError(f"direct dvc repro of {stage} did not run it:\n{out.stdout}")
            direct.append(time.perf_counter() - t0)
        from flows.pipeline import pipeline

        for _ in range(repeats + 1):
            stamp += 1
            _dirty(work, stamp)
            t0 = time.perf_counter()
            result = pipeline(project_dir=str(work), stages=list(stages), retries=0)
            flows.append(time.perf_counter() - t0)
            ran = [r["status"] for r in result["stages"]]
            if ran != ["ran"] * len(stages):
                raise RuntimeError(f"flow did not run every stage: {result['stages']}")
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    warm = flows[1:]
    return {
        "stages": list(stages),
        "api": os.environ.get("PREFECT_API_URL") or "ephemeral (temporary PREFECT_HOME)",
        "direct_s": [round(t, 3) for t in direct],
        "flow_s": [round(t, 3) for t in flows],
        "direct_median_s": round(median(direct), 3),
        "flow_first_s": round(flows[0], 3),
        "flow_warm_median_s": round(median(warm), 3),
        "overhead_warm_s": round(median(warm) - median(direct), 3),
        "overhead_first_s": round(flows[0] - median(direct), 3),
        "overhead_warm_ratio": round(median(warm) / median(direct), 3),
    }


def bench_orchestration(repeats: int = 3) -> SectionResult:
    """Section c: no-op `dvc repro` (target < 5 s) and the Prefect flow's overhead, in a temp copy."""
    res = SectionResult("c_orchestration")
    with tempfile.TemporaryDirectory(prefix="rprm-bench-orch-") as tmp:
        work = Path(tmp) / "project"
        mode, n_stages = prepare_project(work)
        dvc = time_noop_repro(work, repeats)
        if mode == COPY_MODE:  # the Prefect runs rerun stages: placeholder ones, not the real
            work = Path(tmp) / "placeholder"
            placeholder_dag(work)
            _run([*dvc_cmd(), "repro", "-q"], work)
        prefect = bench_prefect(work, ["base-model", "prepare"], max(1, repeats - 1))
    met = dvc["noop_repro_median_s"] < 5.0
    res.data = {"mode": mode, "stages": n_stages, "dvc": {**dvc, "target_s": 5.0, "target_met": met},
                "prefect": {**prefect, "mode": PLACEHOLDER_MODE}}
    res.rows = [
        ("no-op `dvc repro` (median)", f"{dvc['noop_repro_median_s']:.2f} s",
         f"target < 5 s: {'met' if met else 'MISSED'}; {n_stages} stages; {mode}"),
        ("`dvc --version` (startup floor)", f"{dvc['dvc_startup_s']:.2f} s", ""),
        ("Prefect flow vs direct `dvc repro` (" + " + ".join(prefect["stages"]) + ")",
         f"{prefect['flow_warm_median_s']:.2f} s vs {prefect['direct_median_s']:.2f} s",
         f"overhead +{prefect['overhead_warm_s']:.2f} s warm ({prefect['overhead_warm_ratio']}x); "
         f"first run {prefect['flow_first_s']:.2f} s incl. API start ({prefect['api']}); "
         "flow adds the MLflow parent run and the markdown artifact; placeholder stage commands"),
    ]
    return res
