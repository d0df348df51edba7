"""Defaults, descriptions and profile overlays (architecture issue, point 5).

The pydantic defaults are the default profile (params.yaml), every field is documented, and a
profile states only what it changes: `extends: default` plus the differing keys, merged onto the
defaults by `load_params` and written out whole by `rprm profile`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.config import (
    DEFAULT_HEADER,
    Params,
    ParamsError,
    Section,
    default_params_dict,
    dump_params,
    explain_params,
    load_params,
    merge_overlay,
    params_from_dict,
)

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
PROFILES = sorted((REPO / "profiles").glob("*.yaml"))
CLI = [sys.executable, "-m", "components.cli"]


def sections(model: type[Section], prefix: str = "") -> list[tuple[str, type[Section]]]:
    """Every section class reachable from `model` (optional ones too), with its dotted path."""
    out = [(prefix, model)]
    for name, field in model.model_fields.items():
        ann = field.annotation
        for sub in [ann] if isinstance(ann, type) else list(getattr(ann, "__args__", ())):
            if isinstance(sub, type) and issubclass(sub, Section):
                out += sections(sub, f"{prefix}{name}.")
    return out


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf values of nested mappings by dotted path (lists and null are leaves)."""
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out |= flat(v, f"{prefix}{k}.")
    return out


def test_every_field_has_a_description() -> None:
    missing = [f"{path}{name}" for path, model in sections(Params)
               for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"fields without a description: {missing}"


def test_defaults_are_the_default_profile_field_by_field() -> None:
    """Params() (the pydantic defaults) equals params.yaml: no default disagrees with it."""
    defaults = flat(Params().model_dump(mode="json"))
    file = flat(load_params(PARAMS).model_dump(mode="json"))
    assert defaults.keys() == file.keys()
    differ = {k: (defaults[k], file[k]) for k in defaults if defaults[k] != file[k]}
    assert not differ, f"default vs params.yaml: {differ}"
    assert Params() == load_params(PARAMS)


def test_params_yaml_is_the_dump_of_the_defaults() -> None:
    """`rprm profile default` rewrites params.yaml byte for byte."""
    assert PARAMS.read_text(encoding="utf-8") == DEFAULT_HEADER + dump_params(Params())


def test_profiles_exist_as_overlays() -> None:
    assert {p.stem for p in PROFILES} >= {"small", "paper"}
    for path in PROFILES:
        assert yaml.safe_load(path.read_text()).get("extends") == "default", path.name


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_profiles_state_only_what_they_change(path: Path) -> None:
    """Every key a profile sets differs from the default (and exists: load_params rejects unknown keys)."""
    overlay = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "extends"}
    defaults = flat(default_params_dict())
    same = [k for k, v in flat(overlay).items() if k in defaults and defaults[k] == v]
    assert not same, f"{path.name} restates defaults: {same}"
    assert isinstance(load_params(path), Params)


def test_merge_overlay_merges_mappings_and_replaces_lists() -> None:
    base = {"a": {"x": 1, "y": [1, 2]}, "b": None, "c": 3}
    got = merge_overlay(base, {"a": {"y": [3]}, "b": {"z": 1}, "d": 4})
    assert got == {"a": {"x": 1, "y": [3]}, "b": {"z": 1}, "c": 3, "d": 4}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": None, "c": 3}, "the base is not modified"


def test_an_overlay_is_merged_onto_the_defaults() -> None:
    p = params_from_dict({"extends": "default", "sft": {"learning_rate": 1e-3}, "evaluate": {"models": ["dpo"]}})
    expected = Params()
    expected.sft.learning_rate = 1e-3
    expected.evaluate.models = ["dpo"]
    assert p == expected
    assert params_from_dict({"extends": "default"}) == Params()


@pytest.mark.parametrize(
    ("overlay", "expected"),
    [
        ({"sft": {"learnin_rate": 1e-3}}, "sft.learnin_rate: unknown key"),
        ({"extra": {}}, "extra: unknown key"),
        ({"sft": {"learning_rate": "fast"}}, "sft.learning_rate: Input should be a valid number"),
        ({"evaluate": {"prmbench": {"sampling": {"top_p": 1.0}}}}, "evaluate.prmbench.sampling.n: missing key"),
    ],
)
def test_overlay_errors_name_the_dotted_key(overlay: dict[str, Any], expected: str) -> None:
    with pytest.raises(ParamsError) as info:
        params_from_dict({"extends": "default", **overlay}, "ov.yaml")
    assert f"ov.yaml: {expected}" in str(info.value)


def test_extends_names_only_the_defaults() -> None:
    with pytest.raises(ParamsError, match="extends: expected 'default'"):
        params_from_dict({"extends": "profiles/small.yaml"}, "ov.yaml")


def test_a_whole_file_must_still_be_complete(tmp_path: Path) -> None:
    """Without `extends`, a missing key is an error (params.yaml stays strict), reported once."""
    data = yaml.safe_load(PARAMS.read_text())
    data["sft"].pop("learning_rate")
    with pytest.raises(ParamsError) as info:
        params_from_dict(data, "p.yaml")
    assert str(info.value).count("p.yaml: sft.learning_rate: missing key") == 1


def test_profile_command_writes_the_merged_whole_file(tmp_path: Path) -> None:
    for profile in PROFILES:
        out = tmp_path / f"{profile.stem}.params.yaml"
        run = subprocess.run([*CLI, "profile", str(profile), "-o", str(out)], capture_output=True, text=True, cwd=REPO)
        assert run.returncode == 0, run.stderr
        text = out.read_text()
        assert text.startswith(f"# Written by `rprm profile {profile}`")
        data = yaml.safe_load(text)
        assert "extends" not in data
        assert params_from_dict(data) == load_params(profile)  # a whole file (missing keys are errors)
    default = tmp_path / "default.yaml"
    run = subprocess.run([*CLI, "profile", "default", "-o", str(default)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert default.read_bytes() == PARAMS.read_bytes()


def test_profile_command_refuses_a_bad_profile_and_leaves_the_file(tmp_path: Path) -> None:
    out = tmp_path / "params.yaml"
    out.write_text("untouched\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: default\nsft:\n  learnin_rate: 1.0\n")
    run = subprocess.run([*CLI, "profile", str(bad), "-o", str(out)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and "sft.learnin_rate: unknown key" in run.stderr
    assert out.read_text() == "untouched\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "params.yaml"], "no temp file left"


def test_explain_prints_every_field_with_value_default_and_description() -> None:
    p = load_params(REPO / "profiles" / "small.yaml")
    lines = explain_params(p)
    text = "\n".join(lines)
    for path, model in sections(Params):
        if path.startswith("evaluate.prmbench.sampling."):
            continue  # null in this profile: shown as one value
        for name, field in model.model_fields.items():
            assert f"{path}{name}" in text, f"{path}{name}"
            assert field.description.split("\n")[0][:40] in text, f"{path}{name}"
    assert '  sft.learning_rate = 0.0001  (default 0.003)' in lines
    assert '  sft.seed = 42  (default)' in lines


def test_validate_params_explain_command() -> None:
    run = subprocess.run([*CLI, "validate-params", "-p", "profiles/paper.yaml", "--explain"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "ok (model=pretrained" in run.stdout
    assert '  dpo.learning_rate = 5e-07  (default 0.0001)' in run.stdout.splitlines()
    assert "Peak learning rate (AdamW)." in run.stdout
