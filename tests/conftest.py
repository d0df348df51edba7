"""Shared fixtures: the repository's params, the tiny base model, and a tiny verdict model.

`tiny_model_dir` is the random tiny Qwen2 built by `components.base_model` (what the default
profile's `base-model` stage builds). `verdict_model_dir` is that model trained for a few
seconds with a plain torch loop on short synthetic R-PRM chats (real PRM800K questions and
steps in the student prompt, random labels), so that when sampled it writes a short analysis
ending with `Verification: Is the step correct (Yes/No)? Yes|No`, Yes and No about equally
often (see `synthetic_analysis`). At T=0.95, top_p=0.95 practically every sample reaches the
verdict, also after long ProcessBench prompts; at T=1, top_p=1 about two in three do. Tests
that exercise one-pass verdict reading, scoring, pair sampling or serving use it.

Both are deterministic builds; a finished build is kept under ~/.cache/rprm-tests, keyed by
the hash of everything it depends on, and each session gets its own copy (see `_cached_model`;
RPRM_TEST_CACHE=0 or CI set: always build).

No test may leave MLflow's default store in the repository: MLflow 3.17 falls back to
`sqlite:///mlflow.db` in the current folder when no tracking URI is set, so any MLflow call made
from the repository root without one (in this process or a subprocess) used to leave an
`mlflow.db` there. The session sets MLFLOW_TRACKING_URI to a temporary store unless one is
given; in this process opening `<repository>/mlflow.db` fails the test that does it, and a
file that appears anyway (a subprocess) fails the session (`_no_default_mlflow_store`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from components.config import Params, load_params
from components.prompts import VERDICT_NO, VERDICT_YES, student_messages

REPO_ROOT = Path(__file__).resolve().parents[1]
PRM800K_BUNDLED = REPO_ROOT / "data" / "bundled" / "prm800k"

MLFLOW_DEFAULT_STORE = REPO_ROOT / "mlflow.db"  # MLflow's default store, opened from the repository root

VERDICT_TRAIN_STEPS = 100
VERDICT_BATCH = 4
VERDICT_LR = 5e-3
VERDICT_SEED = 1234


def _refuse_default_store(event: str, args: tuple[Any, ...]) -> None:
    """Audit hook: opening MLflow's default store in the repository is an error naming the test."""
    if event != "sqlite3.connect" or not args or not isinstance(args[0], (str, os.PathLike)):
        return
    target = os.fspath(args[0])
    if target.startswith("file:"):
        target = target.removeprefix("file:").split("?", 1)[0]
    if target and not target.startswith(":") and Path(target).resolve() == MLFLOW_DEFAULT_STORE:
        # pytest.fail's exception is no Exception, so MLflow's connection retries do not swallow it
        pytest.fail(
            f"{os.environ.get('PYTEST_CURRENT_TEST', 'a test')} opened MLflow's default store "
            f"{MLFLOW_DEFAULT_STORE}: set MLFLOW_TRACKING_URI (or params tracking.tracking_uri) to a "
            "temporary store"
        )


sys.addaudithook(_refuse_default_store)


@pytest.fixture(scope="session", autouse=True)
def _no_default_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temporary default MLflow store for the session; none may appear in the repository."""
    existed = MLFLOW_DEFAULT_STORE.exists()
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        store = tmp_path_factory.mktemp("mlflow-default") / "mlruns.db"
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    yield
    if not existed and MLFLOW_DEFAULT_STORE.exists():
        raise RuntimeError(f"a test process left MLflow's default store {MLFLOW_DEFAULT_STORE}: it ran "
                           "MLflow from the repository root with no tracking URI")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (holds params.yaml, dvc.yaml, data/bundled)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def default_params() -> Params:
    """The repository's params.yaml (the default, tiny profile), validated.

    Shared by the whole session: copy before changing (`default_params.model_copy(deep=True)`).
    """
    return load_params(REPO_ROOT / "params.yaml")


def _versions() -> bytes:
    import tokenizers
    import torch
    import transformers

    return f"{torch.__version__} {transformers.__version__} {tokenizers.__version__}".encode()


def _cached_model(kind: str, key_parts: list[bytes], build: Callable[[Path], object], dest: Path) -> Path:
    """Build a fixture model into `dest`, reusing an earlier identical build when there is one.

    Builds are deterministic functions of `key_parts` (sources, data, library versions), so a
    finished build is kept under ~/.cache/rprm-tests (RPRM_TEST_CACHE_DIR) and copied from
    there. Set RPRM_TEST_CACHE=0 to always build; CI (CI set) always builds.
    """
    if os.environ.get("CI") or os.environ.get("RPRM_TEST_CACHE", "1") == "0":
        build(dest)
        return dest
    root = Path(os.environ.get("RPRM_TEST_CACHE_DIR", Path.home() / ".cache" / "rprm-tests"))
    digest = hashlib.sha256(b"\0".join(key_parts)).hexdigest()[:20]
    cached = root / f"{kind}-{digest}"
    if not (cached / ".complete").exists():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
        try:
            build(staging / "model")
            (staging / "model" / ".complete").write_text("ok", encoding="utf-8")
            try:
                (staging / "model").rename(cached)
            except OSError:
                pass  # another session finished the same build first
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(cached, dest, ignore=shutil.ignore_patterns(".complete"))
    return dest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_params: Params) -> Path:
    """The tiny random Qwen2 + BPE tokenizer, built once per session from params.yaml's model.tiny."""
    from components.base_model import build_tiny_model

    corpus = sorted(PRM800K_BUNDLED.glob("*.jsonl"))
    tiny = default_params.model.tiny
    key = [
        (REPO_ROOT / "components" / "base_model.py").read_bytes(),
        (REPO_ROOT / "components" / "prompts.py").read_bytes(),
        (REPO_ROOT / "components" / "teachers.py").read_bytes(),  # its fixed sentences are phrase tokens
        (REPO_ROOT / "components" / "checker.py").read_bytes(),
        (REPO_ROOT / "components" / "resources" / "teacher_one_shot_official.json").read_bytes(),
        *(p.read_bytes() for p in corpus),
        tiny.model_dump_json().encode(),
        _versions(),
    ]
    out = tmp_path_factory.mktemp("tiny-model") / "base"
    return _cached_model("tiny", key, lambda d: build_tiny_model(tiny, d, corpus), out)


def synthetic_analysis(correct: bool) -> str:
    """A short R-PRM-style analysis (section header, conclusion, verdict line).

    Deliberately compact, with no repeated section headers: a two-layer model trained for a
    few seconds then writes it reliably even after long prompts (with all five headers it
    loses its place between sections and loops). The verdict is decided at "Hence it is
    correct/wrong"; the briefly trained two-layer model barely conditions on it (measured on
    the current tiny model: P(Yes) at the verdict is about 0.35 after either word), so tests
    compare its verdict probabilities with tolerances far below their spread, not with 0 and 1.
    """
    return (
        "Analysis:\n"
        "**Now Step Analysis**: It uses data from this Question, consistent with earlier work.\n"
        f"Conclusion: Hence it is {'correct' if correct else 'wrong'}.\n"
        + (VERDICT_YES if correct else VERDICT_NO)
    )


def synthetic_verdict_chats(n: int, seed: int = VERDICT_SEED) -> list[list[dict[str, str]]]:
    """`n` R-PRM chats (system, user, assistant) on bundled PRM800K steps, random verdicts."""
    rng = random.Random(seed)
    solutions = []
    for path in sorted(PRM800K_BUNDLED.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            obj = json.loads(line)
            if obj.get("chosen_steps"):
                solutions.append((obj["problem"], obj["chosen_steps"]))
    chats = []
    for _ in range(n):
        question, steps = rng.choice(solutions)
        k = rng.randrange(min(len(steps), 4))
        analysis = synthetic_analysis(rng.random() < 0.5)
        chats.append(
            student_messages(question, steps[:k], steps[k])
            + [{"role": "assistant", "content": analysis}]
        )
    return chats


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def train_verdict_model(base_dir: Path, out_dir: Path) -> Path:
    """Fine-tune the tiny model on synthetic R-PRM chats (loss on the assistant turn only).

    Kept cheap: every prompt starts with the same R-PRM instructions, so each step encodes that
    shared prefix once (no gradient) and trains on the rest of the batch on top of its cache.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    examples = []
    for chat in synthetic_verdict_chats(VERDICT_TRAIN_STEPS * VERDICT_BATCH // 2):
        prompt = tok.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        a_ids = tok(chat[-1]["content"] + "<|im_end|>", add_special_tokens=False).input_ids
        examples.append((p_ids, a_ids))
    shared = _common_prefix([p for p, _ in examples]) - 1
    prefix = torch.tensor([examples[0][0][:shared]])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VERDICT_SEED)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=VERDICT_LR, weight_decay=0.0)
        rng = random.Random(VERDICT_SEED)
        for _step in range(VERDICT_TRAIN_STEPS):
            batch = [(p[shared:], a) for p, a in rng.sample(examples, VERDICT_BATCH)]
            width = max(len(p) + len(a) for p, a in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), shared + width), dtype=torch.long)
            mask[:, :shared] = 1
            targets = torch.full((len(batch), width), -100, dtype=torch.long)
            for r, (p, a) in enumerate(batch):
                ids[r, : len(p) + len(a)] = torch.tensor(p + a)
                mask[r, shared : shared + len(p) + len(a)] = 1
                targets[r, len(p) - 1 : len(p) + len(a) - 1] = torch.tensor(a)
            with torch.no_grad():
                out = model(input_ids=prefix, use_cache=True)
                cache = out.cache if hasattr(out, "cache") else out.past_key_values
            cache.batch_repeat_interleave(len(batch))
            hidden = model.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=torch.arange(shared, shared + width).expand(len(batch), -1),
                cache=cache,
                use_cache=True,
            ).last_hidden_state
            keep = targets != -100
            logits = model.lm_head(hidden[keep])
            loss = torch.nn.functional.cross_entropy(logits, targets[keep])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "verdict_training.json").write_text(
        json.dumps({"steps": VERDICT_TRAIN_STEPS, "final_loss": float(loss.detach())}), encoding="utf-8"
    )
    return out_dir


@pytest.fixture(scope="session")
def verdict_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model trained briefly so that sampled analyses reliably end in the verdict line."""
    key = [
        Path(__file__).read_bytes(),
        (tiny_model_dir / "model.safetensors").read_bytes(),
        (tiny_model_dir / "tokenizer.json").read_bytes(),
        _versions(),
    ]
    out = tmp_path_factory.mktemp("verdict-model") / "model"
    return _cached_model("verdict", key, lambda d: train_verdict_model(tiny_model_dir, d), out)


@pytest.fixture(scope="session")
def vllm_verdict_model_dir(tmp_path_factory: pytest.TempPathFactory, default_params: Params) -> Path:
    """The tiny verdict model with head_dim 32 (vLLM's CPU attention has no kernel for 16)."""
    from components.base_model import build_tiny_model

    corpus = sorted(PRM800K_BUNDLED.glob("*.jsonl"))
    tiny = default_params.model.tiny.model_copy(update={"num_attention_heads": 2, "num_key_value_heads": 1})
    key = [
        Path(__file__).read_bytes(),
        (REPO_ROOT / "components" / "base_model.py").read_bytes(),
        (REPO_ROOT / "components" / "prompts.py").read_bytes(),
        (REPO_ROOT / "components" / "resources" / "teacher_one_shot_official.json").read_bytes(),
        *(p.read_bytes() for p in corpus),
        tiny.model_dump_json().encode(),
        _versions(),
    ]

    def build(dest: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            build_tiny_model(tiny, Path(tmp) / "base", corpus)
            train_verdict_model(Path(tmp) / "base", dest)

    out = tmp_path_factory.mktemp("vllm-verdict-model") / "model"
    return _cached_model("vllm-verdict", key, build, out)
