"""`mlflow models serve -m models:/r-prm@champion --env-manager local` over real HTTP on 127.0.0.1.

One server for the module: the tiny verdict model is registered (`rprm register` code path,
small K and short analyses in the scoring params), promoted to champion, and served from the
registry. Checks: step rewards for a request, early exit as a request param, 4xx with a
message for malformed and oversized payloads (the server keeps serving), and a bounded burst
of concurrent requests all answered, identical to the same solutions scored in one batch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from components import registry
from components.config import BackendParams, Params
from components.records import Solution, StepScores
from components.scoring import StepScorer
from components.serving import CombiningBatcher, RequestError, parse_request

MAX_STEPS = 6
MAX_CHARS = 4000
BURST_REQUESTS = 200
BURST_CONCURRENCY = 8

QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"
STEPS = [
    "In May she sold 48 / 2 = 24 clips.",
    "Altogether she sold 48 + 24 = 72 clips.",
    "The answer is \\boxed{72}.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving_params() -> Params:
    p = Params()
    p.tracking.experiment = "r-prm-serving-test"
    p.scoring.sampling.n = 2
    p.scoring.sampling.max_new_tokens = 24
    p.scoring.max_steps = MAX_STEPS
    p.scoring.max_chars = MAX_CHARS
    p.register.gate.benchmark = "processbench"  # the report written below (the gate has its own tests)
    p.promote.metric = "processbench_avg_f1"
    return p


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, verdict_model_dir: Path) -> str:
    """Register + promote the verdict model in a temp store, serve models:/r-prm@champion."""
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    shutil.copytree(verdict_model_dir, root / "models" / "dpo")
    (root / "reports").mkdir()
    (root / "reports" / "processbench.json").write_text(json.dumps({"models": {"dpo": {"avg_f1": 12.5, "verdict_reach_rate": 1.0}}}))
    (root / "reports" / "prmbench.json").write_text(json.dumps({"models": {"dpo": {"prmscore": 0.5}}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("RPRM_PARENT_RUN_ID", raising=False)
        params = serving_params()
        registry.run_register(params)
        assert registry.promote(params)["promoted"]
    port = free_port()
    log = root / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/r-prm@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def invoke(url: str, payload, *, client: httpx.Client | None = None, content_type: str = "application/json"):
    body = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    send = client.post if client else httpx.post
    return send(f"{url}/invocations", content=body, headers={"Content-Type": content_type}, timeout=120)


def check_prediction(pred: dict, n_steps: int, threshold: float = 0.5) -> None:
    """A well-formed answer: rewards in [0, 1], first error and verdicts consistent with them."""
    rewards = pred["step_rewards"]
    assert len(rewards) == n_steps and len(pred["verdicts"]) == n_steps
    scored = [r for r in rewards if r is not None]
    assert scored and all(0.0 <= r <= 1.0 for r in scored)
    low = [i for i, r in enumerate(rewards) if r is not None and r < threshold]
    assert pred["first_error"] == (low[0] if low else -1)
    assert pred["verdicts"] == [None if r is None else ("yes" if r >= threshold else "no") for r in rewards]


@pytest.fixture(scope="module")
def scorer(verdict_model_dir: Path) -> StepScorer:
    """The real step scorer on the tiny verdict model, with the serving test's scoring params."""
    from components.backends import load_backend

    backend = load_backend(BackendParams(), verdict_model_dir)
    return StepScorer(backend, serving_params().scoring, early_exit=False, progress=False)


def test_batcher_combines_concurrent_requests_and_keeps_them_apart(scorer: StepScorer) -> None:
    """Concurrent requests share scorer calls; each gets exactly its own solutions' scores."""
    calls: list[list[str]] = []

    def score(solutions: list[Solution], early_exit: bool) -> list[StepScores]:
        calls.append([s.id for s in solutions])
        return scorer.score(solutions)

    batcher = CombiningBatcher(score, max_solutions=64)
    distinct = [Solution(id=f"s{i}", question=f"What is {i} times 3?", steps=[f"{i} * 3 = {3 * i}."])
                for i in range(4)]
    clash = Solution(id="s0", question="Other content under a used id.", steps=["x = 2."])
    requests = [[distinct[i % 4]] for i in range(24)] + [[clash], [distinct[1], distinct[2]]]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda sols: batcher.submit(sols, False), requests))
    alone = {s.id + s.question: scorer.score([s])[0] for s in [*distinct, clash]}
    for sols, got in zip(requests, results, strict=True):
        assert [g.id for g in got] == [s.id for s in sols]
        for s, g in zip(sols, got, strict=True):
            assert g.step_rewards == pytest.approx(alone[s.id + s.question].step_rewards, abs=1e-4)
    assert all(len(call) == len(set(call)) for call in calls)  # never a repeated id in one call
    assert sum(len(call) for call in calls) < sum(len(r) for r in requests)  # shared work


def test_parse_request_rejects_with_row_and_field() -> None:
    with pytest.raises(RequestError, match=r"row 1: field 'steps.0'"):
        parse_request([{"question": "q", "steps": ["a"]}, {"question": "q", "steps": [""]}], 4, 100)
    with pytest.raises(RequestError, match=r"row 0: field 'question': 101 characters; at most 100"):
        parse_request([{"question": "q" * 101, "steps": ["a"]}], 4, 100)
    with pytest.raises(RequestError, match=r"row 0: field 'steps': question and steps hold 101 characters"):
        parse_request([{"question": "q" * 50, "steps": ["a" * 30, "b" * 21]}], 4, 100)
    (sol,) = parse_request([{"question": "q", "steps": np.array(["a", "b"]), "id": float("nan")}], 4, 100)
    assert sol.steps == ["a", "b"] and sol.id.startswith("req-")


@pytest.mark.slow
def test_invocations_return_step_rewards(server: str) -> None:
    r = invoke(server, {"dataframe_records": [{"question": QUESTION, "steps": STEPS, "id": "natalia"}]})
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    assert pred["id"] == "natalia"
    check_prediction(pred, len(STEPS))
    # the `inputs` form and a row without id are accepted too; same id + content -> same rewards
    again = invoke(server, {"inputs": [{"question": QUESTION, "steps": STEPS, "id": "natalia"}]})
    assert again.json()["predictions"][0]["step_rewards"] == pytest.approx(pred["step_rewards"], abs=1e-6)
    anonymous = invoke(server, {"dataframe_records": [{"question": QUESTION, "steps": STEPS}]})
    assert anonymous.status_code == 200 and anonymous.json()["predictions"][0]["id"].startswith("req-")


@pytest.mark.slow
def test_early_exit_request_param(server: str) -> None:
    steps = ["1 + 1 = 5.", *STEPS]  # one row in, several steps to leave unscored after a low one
    r = invoke(server, {"dataframe_records": [{"question": QUESTION, "steps": steps}], "params": {"early_exit": True}})
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    check_prediction(pred, len(steps))
    if pred["first_error"] >= 0:  # nothing after the first low step is scored
        assert all(v is None for v in pred["step_rewards"][pred["first_error"] + 1 :])
    else:
        assert None not in pred["step_rewards"]


MALFORMED = [
    ("missing steps", {"dataframe_records": [{"question": QUESTION}]}, "steps"),
    ("empty question", {"dataframe_records": [{"question": "  ", "steps": STEPS}]}, "question"),
    ("steps not a list", {"dataframe_records": [{"question": QUESTION, "steps": "Step one."}]}, "steps"),
    ("steps not text", {"dataframe_records": [{"question": QUESTION, "steps": [1, 2]}]}, "steps"),
    ("nested steps", {"dataframe_records": [{"question": QUESTION, "steps": [["a"], ["b"]]}]}, ""),
    ("steps null", {"dataframe_records": [{"question": QUESTION, "steps": None}]}, ""),
    ("blank step", {"dataframe_records": [{"question": QUESTION, "steps": ["ok", " "]}]}, "steps.1"),
    ("question not text", {"dataframe_records": [{"question": 3, "steps": STEPS}]}, "question"),
    ("too many steps", {"dataframe_records": [{"question": QUESTION, "steps": ["x = 1."] * (MAX_STEPS + 1)}]},
     "scoring.max_steps"),
    ("oversized question", {"dataframe_records": [{"question": "q" * 2_000_000, "steps": STEPS}]},
     "field 'question': 2000000 characters; at most 4000 (scoring.max_chars)"),
    ("oversized steps", {"dataframe_records": [{"question": QUESTION, "steps": ["x = 1. " * 300] * 2}]},
     "field 'steps': question and steps hold"),
    ("unknown params", {"dataframe_records": [{"question": QUESTION, "steps": STEPS}],
                        "params": {"temperature": 0.2, "n": 3}}, "unknown request params 'n', 'temperature'"),
    ("same id, other content", {"dataframe_records": [{"question": QUESTION, "steps": STEPS, "id": "a"},
                                                     {"question": QUESTION, "steps": STEPS[:1], "id": "a"}]}, "id"),
    ("no rows", {"dataframe_records": []}, ""),
    ("not JSON", b"{\"dataframe_records\": [", ""),
]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "payload", "mentions"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_payload_gets_4xx_and_server_keeps_serving(server: str, case: str, payload, mentions: str) -> None:
    r = invoke(server, payload)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert mentions in r.text[:20000]
    assert r.json().get("message")  # MLflow's error body carries a message
    ok = invoke(server, {"dataframe_records": [{"question": QUESTION, "steps": STEPS[:1]}]})
    assert ok.status_code == 200


@pytest.mark.slow
def test_wrong_content_type_is_415(server: str) -> None:
    r = invoke(server, "question,steps\n", content_type="text/plain")
    assert r.status_code == 415
    assert httpx.get(f"{server}/ping", timeout=10).status_code == 200


@pytest.mark.slow
def test_concurrent_burst_all_answered_correctly(server: str) -> None:
    """200 single-row requests, 8 in flight, equal to the same 20 solutions scored in one batch."""
    rows = [
        {"id": f"burst-{i}", "question": f"What is {i} + {i}?",
         "steps": [f"{i} + {i} = {2 * i + i % 3}.", f"So the answer is \\boxed{{{2 * i + i % 3}}}."]}
        for i in range(20)
    ]
    reference = invoke(server, {"dataframe_records": rows})
    assert reference.status_code == 200, reference.text
    expected = {p["id"]: p for p in reference.json()["predictions"]}
    for p in expected.values():
        check_prediction(p, 2)

    def one(i: int) -> tuple[int, dict]:
        with httpx.Client() as client:
            r = invoke(server, {"dataframe_records": [rows[i % len(rows)]]}, client=client)
        return r.status_code, r.json()

    with ThreadPoolExecutor(max_workers=BURST_CONCURRENCY) as pool:
        answers = list(pool.map(one, range(BURST_REQUESTS)))
    assert [code for code, _ in answers] == [200] * BURST_REQUESTS
    for i, (_, body) in enumerate(answers):
        (pred,) = body["predictions"]
        want = expected[rows[i % len(rows)]["id"]]
        assert pred["id"] == want["id"] and pred["first_error"] == want["first_error"]
        assert pred["step_rewards"] == pytest.approx(want["step_rewards"], abs=1e-4)
    assert httpx.get(f"{server}/ping", timeout=10).status_code == 200


@pytest.mark.filterwarnings("ignore:.*input example was not provided")
def test_unknown_request_params_are_refused_on_the_pyfunc_predict_path(
        verdict_model_dir: Path, tmp_path: Path) -> None:
    """The registered pyfunc, saved and loaded as MLflow serves it: `temperature`/`n` are refused
    naming them (MLflow itself would drop them with a log line); `early_exit` still works."""
    import mlflow
    import pandas as pd

    from components import registry

    path = tmp_path / "pyfunc"
    with registry.pyfunc_spec(serving_params(), verdict_model_dir, "md5") as spec:
        mlflow.pyfunc.save_model(str(path), **spec)
    model = mlflow.pyfunc.load_model(str(path))
    rows = pd.DataFrame([{"question": QUESTION, "steps": STEPS[:1], "id": "one"}])
    with pytest.raises(MlflowException) as err:
        model.predict(rows, params={"temperature": 0.2, "n": 3})
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "unknown request params 'n', 'temperature'" in err.value.message
    assert "the only request param is early_exit" in err.value.message
    with pytest.raises(MlflowException, match="unknown request params 'top_p'"):
        model.predict(rows, params={"early_exit": True, "top_p": 0.5})
    (pred,) = model.predict(rows, params={"early_exit": True})  # nothing left over from the refusals
    assert pred["id"] == "one"
    check_prediction(pred, 1)


# Loads the saved pyfunc at argv[1] with no copy of the project importable but the model's own
# code/ (no PYTHONPATH, cwd elsewhere, the editable install's finder removed), scores one
# solution and prints the prediction and the files of the project modules that were loaded.
LOAD_FROM_SHIPPED_CODE = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
(pred,) = model.predict(pd.DataFrame([{"question": sys.argv[2], "steps": [sys.argv[3]], "id": "one"}]))
files = sorted(m.__file__ for n, m in list(sys.modules.items()) if n.split(".")[0] == "components")
print(json.dumps({"pred": pred, "files": files}, default=lambda o: o.tolist()))
"""


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*input example was not provided")
def test_served_model_ships_only_what_serving_imports_and_runs_from_it(
        verdict_model_dir: Path, tmp_path: Path) -> None:
    """The pyfunc's code/ holds its code file's (tracking's) import closure, the reward service
    included, and the package data, nothing else of
    components/; the staging copy is gone afterwards; the model loads and scores from that code alone."""
    import mlflow

    path = tmp_path / "pyfunc"
    with registry.pyfunc_spec(serving_params(), verdict_model_dir, "md5") as spec:
        staged = Path(spec["code_paths"][0])
        assert staged.name == "components"
        mlflow.pyfunc.save_model(str(path), **spec)
    assert not staged.parent.exists()
    code = path / "code"
    shipped = {f.relative_to(code) for f in code.rglob("*") if f.is_file()}
    assert shipped == set(registry.serving_code_files())
    assert Path("components/serving.py") in shipped and Path("components/resources/README.md") in shipped
    assert Path("components/tracking.py") in shipped  # the code file MLflow executes
    for never in ("training", "sft", "best_of_n", "cli", "registry"):
        assert Path(f"components/{never}.py") not in shipped, never

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", LOAD_FROM_SHIPPED_CODE, str(path), QUESTION, STEPS[0]],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    check_prediction(out["pred"], 1)
    assert out["files"] and all(Path(f).resolve().is_relative_to(code.resolve()) for f in out["files"]), out["files"]


def test_openai_backend_behind_the_server_asks_for_the_configured_model(tmp_path: Path) -> None:
    """With backend.kind openai (a vLLM fleet behind the reward service), the served model asks the
    server for backend.openai.model, not for the artifact's local folder."""
    from mlflow.pyfunc import PythonModelContext

    from components.tracking import _pyfunc_class

    params = serving_params()
    params.backend.kind = "openai"
    params.backend.openai.model = "r-prm"
    config = registry.model_config(params)
    model = _pyfunc_class()()
    model.load_context(PythonModelContext(artifacts={"model": str(tmp_path)}, model_config=config))
    try:
        assert model.service.backend.model == "r-prm"
    finally:
        model.service.backend.close()
