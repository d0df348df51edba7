"""The PRM as a reward: `rprm score` on a solutions file and `ProcessReward`, TRL's reward function.

Real components: the tiny verdict model scores through the hf backend, `rprm score` runs as a
subprocess (exit codes, resumption from its journal, nothing written on bad input), a model
registered in a temporary SQLite store resolves from `models:/...@alias`, and a real
`GRPOTrainer` trains the tiny policy for two steps with the PRM as its reward.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import Params
from components.io import DataError
from components.records import Solution
from components.rewards import (
    ProcessReward,
    aggregate_scores,
    journal_path,
    parse_solution_row,
    read_solutions,
    shape,
)

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Tom has 7 apples and buys 5 more. How many apples does he have?"
GOOD = ["He starts with 7 apples.", "7 + 5 = 12.", "The answer is \\boxed{12}."]
BAD = ["He starts with 7 apples.", "7 + 5 = 13.", "The answer is \\boxed{13}."]


# --------------------------------------------------------------------------------------
# Input rows (fast)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("row", "field", "message"), [
    ([1, 2], None, "expected a JSON object"),
    ({"steps": ["a"]}, "question", "missing field"),
    ({"question": 3, "steps": ["a"]}, "question", "expected a string"),
    ({"question": "  ", "steps": ["a"]}, "question", "empty question"),
    ({"problem": "q", "steps": "a"}, "steps", "expected a list of strings"),
    ({"question": "q", "steps": []}, "steps", "empty step list"),
    ({"question": "q", "steps": ["a", 7]}, "steps.1", "expected a string, got int"),
    ({"question": "q", "steps": ["a", " "]}, "steps.1", "empty step"),
    ({"question": "q"}, "steps", "missing field"),
    ({"question": "q", "solution": ["a"]}, "solution", "expected a string"),
    ({"question": "q", "response": "\n\n \n\n"}, "response", "no step"),
    ({"question": "q", "steps": ["a"] * 5}, "steps", "5 steps; at most 4"),
    ({"question": "q", "steps": ["a" * 200]}, "steps", "oversized"),
    ({"question": "q" * 200, "steps": ["a"]}, "question", "oversized"),
    ({"question": "q", "steps": ["a"], "id": 5}, "id", "non-empty string"),
])
def test_bad_rows_name_line_and_field(row: object, field: str | None, message: str) -> None:
    with pytest.raises(DataError) as err:
        parse_solution_row(row, "in.jsonl", 3, max_steps=4, max_chars=100)
    assert err.value.line == 3 and err.value.field == field and message in err.value.message
    assert str(err.value).startswith("in.jsonl:3:")


def test_rows_take_steps_or_a_text_split_like_best_of_n(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "question": QUESTION, "steps": GOOD},
        {"problem": QUESTION, "solution": "\n\n".join(BAD) + "\n\n"},
    ]) + "\n")
    a, b = read_solutions(path, 8, 1000)
    assert a.id == "a" and a.steps == GOOD
    assert b.id == "row-2" and b.steps == BAD
    path.write_text(path.read_text() + json.dumps({"id": "a", "question": "q", "steps": ["x"]}) + "\n")
    with pytest.raises(DataError, match=r"in.jsonl:3: field 'id' duplicate id 'a' \(first on line 1\)"):
        read_solutions(path, 8, 1000)


def test_aggregate_scores_and_shaping() -> None:
    assert aggregate_scores([0.9, 0.5, 0.8]) == pytest.approx(
        {"min": 0.5, "last": 0.8, "product": 0.36, "mean": 2.2 / 3})
    assert shape([0.9, 0.4], "verdict", 0.5) == [1.0, 0.0]
    assert shape([0.9, 0.4], "centered", 0.5) == pytest.approx([0.4, -0.1])


# --------------------------------------------------------------------------------------
# ProcessReward with a recorded scorer (fast)
# --------------------------------------------------------------------------------------


class RecordingScorer:
    """A ScoreFn: reward 0.2 for steps holding '13', else 0.9; records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[list[Solution]] = []

    def __call__(self, solutions: list[Solution]) -> list[list[float | None]]:
        self.calls.append(solutions)
        return [[0.2 if "13" in s else 0.9 for s in sol.steps] for sol in solutions]


def test_process_reward_has_trls_signature_and_aggregates() -> None:
    scorer = RecordingScorer()
    reward = ProcessReward(scorer, aggregation="min", name="rprm")
    assert reward.__name__ == "rprm"
    prompts = [QUESTION] * 4
    completions = ["\n\n".join(GOOD), "\n\n".join(BAD), "\n\n".join(GOOD), ""]
    assert reward(prompts=prompts, completions=completions) == pytest.approx([0.9, 0.2, 0.9, 0.0])
    (call,) = scorer.calls
    assert len(call) == 2  # identical completions scored once, empty ones not at all
    assert [s.steps for s in call] == [GOOD, BAD] and call[0].question == QUESTION
    assert ProcessReward(scorer, aggregation="mean", shaping="verdict")(prompts[:2], completions[:2]) == \
        pytest.approx([1.0, 1 / 3])
    assert ProcessReward(scorer, aggregation="last", shaping="centered")(prompts[:2], completions[:2]) == \
        pytest.approx([0.4, -0.3])
    assert ProcessReward(scorer, empty_reward=None)([QUESTION], ["  "]) == [None]


def test_process_reward_reads_conversations_and_the_question_column() -> None:
    scorer = RecordingScorer()
    reward = ProcessReward(scorer, aggregation="product")
    prompts = [[{"role": "system", "content": "Reason step by step."}, {"role": "user", "content": QUESTION}]]
    completions = [[{"role": "assistant", "content": "\n\n".join(BAD)}]]
    metrics: dict[str, float] = {}
    assert reward(prompts, completions, log_metric=metrics.__setitem__) == pytest.approx([0.9 * 0.2 * 0.2])
    assert scorer.calls[-1][0].question == QUESTION
    assert metrics == {"prm/prm/flagged_rate": 1.0, "prm/prm/steps": 3.0}
    reward(["templated prompt"], ["\n\n".join(GOOD)], question=["the raw question"])
    assert scorer.calls[-1][0].question == "the raw question"


def test_process_reward_bad_input_names_row_and_field() -> None:
    reward = ProcessReward(RecordingScorer(), max_steps=2, max_chars=200)
    with pytest.raises(ValueError, match=r"row 1: field 'completions': expected a string or a list of messages, got int"):
        reward([QUESTION, QUESTION], ["a", 5])
    with pytest.raises(ValueError, match=r"row 0: field 'prompts': expected a string"):
        reward([None], ["a"])
    with pytest.raises(ValueError, match=r"row 0: field 'completions': 3 steps; at most 2"):
        reward([QUESTION], ["\n\n".join(GOOD)])
    with pytest.raises(ValueError, match=r"row 0: field 'completions': oversized"):
        reward([QUESTION], ["x" * 300])
    with pytest.raises(ValueError, match=r"row 0: field 'question'"):
        reward([QUESTION], ["a"], question=[3])
    truncating = ProcessReward(RecordingScorer(), max_steps=2, max_chars=200, oversized="truncate")
    assert truncating([QUESTION], ["\n\n".join(BAD)]) == pytest.approx([0.2])  # the first two steps
    with pytest.raises(ValueError, match="aggregation"):
        ProcessReward(RecordingScorer(), aggregation="median")
    with pytest.raises(ValueError, match="multiplies signs"):
        ProcessReward(RecordingScorer(), aggregation="product", shaping="centered")


# --------------------------------------------------------------------------------------
# `rprm score` end to end (the tiny verdict model)
# --------------------------------------------------------------------------------------


def small_params(path: Path, k: int = 2) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["scoring"]["sampling"].update(n=k, max_new_tokens=24)
    data["tracking"]["tracking_uri"] = f"sqlite:///{path.parent / 'mlruns.db'}"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def rprm(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "components.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)


def write_rows(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_rprm_score_scores_resumes_and_refuses_bad_input(tmp_path: Path, verdict_model_dir: Path) -> None:
    params = small_params(tmp_path / "params.yaml")
    rows = [{"id": "good", "question": QUESTION, "steps": GOOD},
            {"question": QUESTION, "response": "\n\n".join(BAD)}]
    inp = write_rows(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out" / "scores.jsonl"
    args = ["score", str(inp), "--model", str(verdict_model_dir), "--out", str(out), "-p", str(params)]
    proc = rprm(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "scored 2 solutions (6 steps, K=2)" in proc.stdout
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == ["good", "row-2"]
    for g in got:
        rewards = g["step_rewards"]
        assert len(rewards) == 3 and all(0.0 <= r <= 1.0 for r in rewards)
        low = [i for i, r in enumerate(rewards) if r < 0.5]
        assert g["first_error"] == (low[0] if low else -1)
        assert g["verdicts"] == ["yes" if r >= 0.5 else "no" for r in rewards]
        assert g["scores"] == pytest.approx(aggregate_scores(rewards))
        assert g["generations"] == 6
    journal = journal_path(out)
    assert journal.exists() and len(journal.read_text().splitlines()) == 1 + 6  # settings + one per step

    # resume: a run killed after some steps (journal cut) finishes to the same output
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:4]))
    first = out.read_text()
    out.unlink()
    proc = rprm(*args, "--threshold", "0.3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    again = [json.loads(line) for line in out.read_text().splitlines()]
    # the resumed run scores the remaining steps in another batch: float32 noise only (~1e-6)
    assert [a["step_rewards"] for a in again] == [pytest.approx(g["step_rewards"], abs=1e-5) for g in got]
    assert again[0]["verdicts"] == ["yes" if r >= 0.3 else "no" for r in got[0]["step_rewards"]]
    assert first  # the earlier output was complete
    # other sampling settings refuse the journal, naming it
    proc = rprm(*args, "--k", "1", cwd=tmp_path)  # K is not a setting: the first analysis is reused
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(params.read_text())
    data["scoring"]["sampling"]["temperature"] = 0.5
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    proc = rprm("score", str(inp), "--model", str(verdict_model_dir), "--out", str(out), "-p", str(other),
                cwd=tmp_path)
    assert proc.returncode == 2 and "scores.jsonl.journal:1: field 'fingerprint'" in proc.stderr

    # bad input: exit 2, file:line:field, nothing written
    for bad, where in [
        ({"question": QUESTION, "steps": []}, "bad.jsonl:2: field 'steps' empty step list"),
        ({"question": QUESTION, "steps": "7 + 5 = 12"}, "bad.jsonl:2: field 'steps' expected a list"),
        ({"question": QUESTION, "steps": ["x" * 40000]}, "bad.jsonl:2: field 'steps' oversized"),
        ("{not json", "bad.jsonl:2: invalid JSON"),
    ]:
        inp_bad = write_rows(tmp_path / "bad.jsonl", [rows[0], bad])
        out_bad = tmp_path / "bad_out" / "o.jsonl"
        proc = rprm("score", str(inp_bad), "--model", str(verdict_model_dir), "--out", str(out_bad),
                    "-p", str(params), cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert where in proc.stderr
        assert not (tmp_path / "bad_out").exists()
    proc = rprm("score", str(inp), "--model", "models:/no-such-model@champion", "--out", str(tmp_path / "u.jsonl"),
                "-p", str(params), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"})
    assert proc.returncode == 2 and "models:/no-such-model@champion: field 'model' does not resolve" in proc.stderr
    assert not (tmp_path / "u.jsonl").exists() and not journal_path(tmp_path / "u.jsonl").exists()
    proc = rprm("score", str(inp), "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "u.jsonl"),
                "-p", str(params), cwd=tmp_path)
    assert proc.returncode == 2 and "field 'model' does not resolve: no such folder" in proc.stderr


@pytest.mark.slow
def test_registry_uri_resolves_to_the_registered_folder(tmp_path: Path, verdict_model_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from components import registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("resolve-test")
    with mlflow.start_run(), registry.pyfunc_spec(Params(), verdict_model_dir, "x") as spec:
        info = mlflow.pyfunc.log_model(name="prm", **spec)
    version = mlflow.register_model(info.model_uri, "r-prm")
    mlflow.MlflowClient().set_registered_model_alias("r-prm", "champion", version.version)
    cache = tmp_path / "cache"
    for spec in ("models:/r-prm@champion", "models:/r-prm/1", "models:/r-prm"):
        folder, ident = registry.resolve_model(spec, cache_dir=cache)
        assert ident == "models:/r-prm/1"
        assert (folder / "config.json").read_bytes() == (verdict_model_dir / "config.json").read_bytes()
    for spec, why in [("models:/r-prm@nope", "does not resolve in the tracking store"),
                      ("models:/r-prm/x", "expected models:/<name>@<alias>")]:
        with pytest.raises(DataError, match=why) as err:
            registry.resolve_model(spec, cache_dir=cache)
        assert err.value.field == "model" and err.value.path == spec


# --------------------------------------------------------------------------------------
# GRPO with the PRM as the reward
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grpo_trainer_trains_on_the_prm_reward(tmp_path: Path, tiny_model_dir: Path, verdict_model_dir: Path) -> None:
    """Two GRPO steps of the tiny policy on CPU; the PRM's reward reaches the logged metrics."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    params = Params()
    params.scoring.sampling.n = 1
    params.scoring.sampling.max_new_tokens = 16
    calls: list[list[float | None]] = []

    class Recorded(ProcessReward):
        def __call__(self, prompts, completions, **kwargs):  # noqa: ANN001, ANN003, ANN204
            out = super().__call__(prompts, completions, **kwargs)
            calls.append(out)
            return out

    reward = Recorded.from_model(verdict_model_dir, params, aggregation="min", shaping="none", name="rprm")
    questions = [QUESTION, "What is 3 + 4?", "A box holds 6 eggs. How many eggs are in 2 boxes?", "What is 9 - 2?"]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": q}], "question": q} for q in questions])
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), max_steps=2, per_device_train_batch_size=2, num_generations=2,
        max_completion_length=12, learning_rate=1e-4, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=True, bf16=False, seed=0, dataloader_pin_memory=False, temperature=1.0,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tok)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/rprm/mean" in h]
    assert len(logged) == 2, trainer.state.log_history
    assert len(calls) == 2 and all(len(c) == 2 for c in calls)
    for h, c in zip(logged, calls, strict=True):
        assert 0.0 <= h["rewards/rprm/mean"] <= 1.0
        assert h["rewards/rprm/mean"] == pytest.approx(sum(c) / len(c), abs=1e-5)
    assert any("prm/rprm/steps" in h for h in trainer.state.log_history)
