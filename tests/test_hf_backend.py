"""The `hf` generation backend: per-row seeded sampling, batching, stop strings, and the verdict
probability read in the generation pass (equal to the teacher-forced reference)."""

from __future__ import annotations

import importlib.util
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from components.backends import BackendError, load_backend
from components.backends.base import GenerationBackend, StreamingBackend
from components.backends.hf import HFBackend
from components.backends.prefix_cache import ATTENTION_CHUNK
from components.backends.sampler import SAMPLER
from components.config import BackendParams, SamplingParams
from components.prompts import (
    VERDICT_PHRASE,
    cut_at_verdict,
    parse_verdict,
    postprocess_response,
    student_messages,
)

CONVERSATIONS = [
    student_messages("What is 7 + 5?", [], "7 + 5 = 12"),
    student_messages(
        "A rectangle has sides 3 and 4. What is the length of its diagonal?",
        ["The diagonal is the hypotenuse of a right triangle with legs 3 and 4."],
        "So the diagonal is $\\sqrt{3^2 + 4^2} = \\sqrt{25} = 5$.",
    ),
    [{"role": "user", "content": "Say something."}],
]


def _backend(model_dir: Path, **overrides: object) -> HFBackend:
    backend = load_backend(BackendParams(**overrides), model_dir)
    assert isinstance(backend, HFBackend)
    return backend


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir: Path) -> HFBackend:
    return _backend(tiny_model_dir)


@pytest.fixture(scope="module")
def verdict_backend(verdict_model_dir: Path) -> HFBackend:
    return _backend(verdict_model_dir)


def _texts(result: list[list]) -> list[list[tuple[str, int, str]]]:
    return [[(g.text, g.num_tokens, g.finish_reason) for g in per] for per in result]


def test_load_backend_builds_the_protocol(tiny_backend: HFBackend) -> None:
    assert isinstance(tiny_backend, GenerationBackend) and not isinstance(tiny_backend, StreamingBackend)
    assert tiny_backend.name == "hf"
    assert tiny_backend.sampler == SAMPLER and tiny_backend.forced_in_generation


def test_same_conversation_same_samples_alone_or_in_any_batch(tiny_model_dir: Path) -> None:
    sampling = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=11)
    seeds = [11, 12, 13]
    wide = _backend(tiny_model_dir, batch_size=16).generate(CONVERSATIONS, sampling, seeds=seeds)
    narrow = _backend(tiny_model_dir, batch_size=1, token_budget=256).generate(
        CONVERSATIONS, sampling, seeds=seeds
    )
    assert _texts(wide) == _texts(narrow)
    alone = _backend(tiny_model_dir).generate(CONVERSATIONS[1:2], sampling, seeds=[12])
    assert _texts(alone)[0] == _texts(wide)[1]
    # sample j depends on (seed, j) only: asking for fewer samples gives the first ones
    fewer = _backend(tiny_model_dir).generate(
        CONVERSATIONS[1:2], sampling.model_copy(update={"n": 2}), seeds=[12]
    )
    assert _texts(fewer)[0] == _texts(wide)[1][:2]
    # the samples of one conversation differ from each other (a random model, T=1)
    assert len({g.text for g in wide[1]}) == 3


def test_default_seeds_follow_sampling_seed(tiny_backend: HFBackend) -> None:
    sampling = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=5)
    default = tiny_backend.generate(CONVERSATIONS[:2], sampling)
    explicit = tiny_backend.generate(CONVERSATIONS[:2], sampling, seeds=[5, 6])
    other = tiny_backend.generate(CONVERSATIONS[:2], sampling, seeds=[105, 106])
    assert _texts(default) == _texts(explicit)
    assert _texts(default) != _texts(other)


def test_temperature_zero_is_greedy_like_transformers_generate(tiny_backend: HFBackend) -> None:
    import torch

    sampling = SamplingParams(n=2, temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0)
    ours = tiny_backend.generate(CONVERSATIONS, sampling)
    tok, model = tiny_backend.tokenizer, tiny_backend.model
    for conv, per in zip(CONVERSATIONS, ours, strict=True):
        ids = tok(tiny_backend.render(conv), add_special_tokens=False, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
        reference = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert [g.text for g in per] == [reference, reference]


def _branch(backend: HFBackend) -> tuple[list[dict[str, str]], str, object]:
    """A conversation, an assistant prefix ending where the verdict model chooses between
    " correct" and " wrong", and the next-token probabilities there (T=1)."""
    import torch
    from conftest import synthetic_analysis

    conv = CONVERSATIONS[0]
    prefix = synthetic_analysis(True).split(" correct.")[0]
    tok, model = backend.tokenizer, backend.model
    ids = tok(backend.render(conv, prefix), add_special_tokens=False, return_tensors="pt").input_ids
    with torch.inference_mode():
        probs = torch.softmax(model(ids).logits[0, -1].float(), dim=-1)
    return conv, prefix, probs


def test_sampling_matches_the_model_distribution(verdict_backend: HFBackend) -> None:
    """Gumbel-max sampling is exact: next-token frequencies follow softmax(logits / T)."""
    conv, prefix, probs = _branch(verdict_backend)
    top = int(probs.argmax())
    p = float(probs[top])
    assert 0.05 < p < 0.95, "the verdict model should hesitate between correct and wrong here"
    n = 400
    sampling = SamplingParams(n=n, temperature=1.0, top_p=1.0, max_new_tokens=1, seed=0)
    result = verdict_backend.generate([conv], sampling, assistant_prefixes=[prefix])[0]
    expected_text = verdict_backend.tokenizer.decode([top], skip_special_tokens=True)
    hits = sum(g.text == expected_text for g in result)
    assert abs(hits - n * p) < 4 * math.sqrt(n * p * (1 - p)) + 1


def test_top_p_keeps_only_the_nucleus(verdict_backend: HFBackend) -> None:
    conv, prefix, probs = _branch(verdict_backend)
    order = probs.argsort(descending=True)
    # nucleus = the best token plus the next one: top_p half-way between their two cumulative
    # masses, since the engine's probabilities differ from this forward pass by float32 noise
    # (a margin of 1e-6 above the best token's mass once dropped the second token)
    p0, p1 = float(probs[order[0]]), float(probs[order[1]])
    assert p1 > 0.05, "the verdict model should hesitate between its two best tokens here"
    top_p = p0 + p1 / 2
    tok = verdict_backend.tokenizer
    allowed = {tok.decode([int(order[0])]), tok.decode([int(order[1])])}
    sampling = SamplingParams(n=60, temperature=1.0, top_p=min(top_p, 1.0), max_new_tokens=1, seed=3)
    texts = {g.text for g in verdict_backend.generate([conv], sampling, assistant_prefixes=[prefix])[0]}
    assert texts <= allowed and len(texts) == 2


def test_verdict_model_writes_analyses_that_reach_the_verdict(verdict_backend: HFBackend) -> None:
    sampling = SamplingParams(n=8, temperature=0.95, top_p=0.95, max_new_tokens=120, seed=0)
    result = verdict_backend.generate(CONVERSATIONS[:2], sampling)
    gens = [g for per in result for g in per]
    valid = [g for g in gens if parse_verdict(g.text).valid]
    assert len(valid) >= 0.75 * len(gens)
    assert {parse_verdict(g.text).verdict for g in valid} == {"yes", "no"}
    for g in gens:
        if VERDICT_PHRASE in g.text:
            assert g.p_yes is not None and 0.0 <= g.p_yes <= 1.0
        if g.finish_reason == "stop":
            assert "<|im_end|>" not in g.text and g.num_tokens >= 1


def test_one_pass_verdict_probability_equals_teacher_forced(verdict_backend: HFBackend) -> None:
    """docs/method.md §9.2: cut each analysis at the first phrase, forward pass, last position."""
    sampling = SamplingParams(n=6, temperature=1.0, top_p=0.95, max_new_tokens=120, seed=21)
    result = verdict_backend.generate(CONVERSATIONS[:2], sampling)
    convs, prefixes, one_pass = [], [], []
    for conv, per in zip(CONVERSATIONS[:2], result, strict=True):
        for g in per:
            prefix, found = cut_at_verdict(g.text)
            if found:
                assert g.p_yes is not None
                convs.append(conv)
                prefixes.append(prefix)
                one_pass.append(g.p_yes)
            else:
                assert g.p_yes is None
    assert len(one_pass) >= 6
    teacher_forced = verdict_backend.verdict_probability(convs, prefixes)
    tolerance = 1e-5  # observed: below 1e-6 (the same float32 computation, other kernels)
    for a, b in zip(one_pass, teacher_forced, strict=True):
        assert b is not None and abs(a - b) < tolerance
    # and the equality is not that of a constant: the values differ between analyses by far more
    # than the tolerance (the tiny verdict model's P(Yes) barely depends on the text, so the spread
    # is small in absolute terms: about 4e-4 here)
    assert max(one_pass) - min(one_pass) > 10 * tolerance
    # teacher-forced values do not depend on batching either
    single = [verdict_backend.verdict_probability([c], [p])[0] for c, p in zip(convs[:3], prefixes[:3], strict=True)]
    assert all(abs(a - b) < 1e-5 for a, b in zip(single, teacher_forced[:3], strict=True))


# Raw analyses as a model may write them, which the official post-processing changes before the
# verdict (docs/method.md §9.2): indented and trailing-space
# lines, a leading blank line, a literal backslash-n, and (control) one it leaves unchanged.
RAW_ANALYSES = [
    ("indented", "Analysis:\n  **Now Step Analysis**: It adds 7 and 5.\n  Conclusion: Hence it is correct.\n"
                 "Verification: " + VERDICT_PHRASE),
    ("trailing_spaces", "Analysis:  \n**Now Step Analysis**: It adds 7 and 5.   \nConclusion: Hence it is correct. \n"
                        "Verification: " + VERDICT_PHRASE),
    ("leading_blank", "\n\nAnalysis:\n**Now Step Analysis**: It adds 7 and 5.\nConclusion: Hence it is correct.\n"
                      "Verification: " + VERDICT_PHRASE),
    ("literal_backslash_n", "Analysis:\\n**Now Step Analysis**: It adds 7 and 5.\nConclusion: Hence it is correct.\n"
                            "Verification: " + VERDICT_PHRASE),
    ("unchanged", "Analysis:\n**Now Step Analysis**: It adds 7 and 5.\nConclusion: Hence it is correct.\n"
                  "Verification: " + VERDICT_PHRASE),
]


def test_one_pass_reads_the_raw_text_the_official_second_pass_the_postprocessed(verdict_backend: HFBackend) -> None:
    """Our one-pass P(Yes) is the teacher-forced value of the RAW analysis; the official second pass
    teacher-forces the POST-PROCESSED one. They are equal when post-processing leaves the text
    before the verdict alone, and differ when it changes it."""
    conv = CONVERSATIONS[0]
    greedy = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=1, seed=0)
    gaps = {}
    for name, raw in RAW_ANALYSES:
        official_prefix, found = cut_at_verdict(postprocess_response(raw))
        assert found and cut_at_verdict(raw) == (raw, True)
        # the one-pass value of a generation that wrote `raw`: read as soon as the phrase is there
        (one_pass,) = verdict_backend.generate([conv], greedy, assistant_prefixes=[raw])[0]
        raw_forced, official = verdict_backend.verdict_probability([conv, conv], [raw, official_prefix])
        assert one_pass.p_yes is not None and abs(one_pass.p_yes - raw_forced) < 1e-5
        gaps[name] = abs(one_pass.p_yes - official)
        if name == "unchanged":
            assert official_prefix == raw and gaps[name] < 1e-5
        else:
            assert official_prefix != raw
            assert gaps[name] > 1e-4, (name, one_pass.p_yes, official)  # a different number
    # and on the analyses the model samples itself: equal exactly where post-processing is a no-op
    sampling = SamplingParams(n=6, temperature=1.0, top_p=0.95, max_new_tokens=120, seed=21)
    for conv, gens in zip(CONVERSATIONS[:2], verdict_backend.generate(CONVERSATIONS[:2], sampling), strict=True):
        for g in gens:
            raw_prefix, found = cut_at_verdict(g.text)
            if not found:
                continue
            official_prefix, _ = cut_at_verdict(postprocess_response(g.text))
            (official,) = verdict_backend.verdict_probability([conv], [official_prefix])
            if official_prefix == raw_prefix:
                assert abs(g.p_yes - official) < 1e-4


def test_fallback_read_from_the_decoding_kv_equals_the_separate_teacher_forced_pass(
    verdict_backend: HFBackend,
) -> None:
    """`generate(..., teacher_forced=f)`: a sample without the one-pass verdict gets
    `forced_p_yes` = `verdict_probability(conv, f(text))` (within float rounding), whether it
    ended at the length cap, at the end-of-turn token or at a stop string, with or without an
    assistant prefix; a sample that reached the verdict gets none."""

    def fallback(text: str) -> str:
        return cut_at_verdict(postprocess_response(text))[0]

    checked = 0
    for max_new, stop, prefixes in ((6, None, None), (40, None, None), (120, ["\n\n"], None),
                                    (24, None, ["Analysis:\n", "", "Sure"])):
        sampling = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=max_new, seed=5)
        out = verdict_backend.generate(CONVERSATIONS, sampling, stop=stop, assistant_prefixes=prefixes,
                                       teacher_forced=fallback)
        plain = verdict_backend.generate(CONVERSATIONS, sampling, stop=stop, assistant_prefixes=prefixes)
        assert _texts(out) == _texts(plain)  # the extra pass changes no sample
        for conv, gens in zip(CONVERSATIONS, out, strict=True):
            for g in gens:
                if g.p_yes is not None:
                    assert g.forced_p_yes is None
                    continue
                # built from the generated text alone (not the assistant prefix), as the scorer does
                (reference,) = verdict_backend.verdict_probability([conv], [fallback(g.text)])
                assert g.forced_p_yes is not None and abs(g.forced_p_yes - reference) < 1e-5, (g, reference)
                checked += 1
    assert checked >= 10


def test_assistant_prefix_continues_the_turn_and_reads_a_verdict_at_once(verdict_backend: HFBackend) -> None:
    conv = CONVERSATIONS[1]
    prefix = "Analysis:\nThe step is fine.\nVerification: " + VERDICT_PHRASE
    sampling = SamplingParams(n=2, temperature=0.0, top_p=1.0, max_new_tokens=1, seed=0)
    gens = verdict_backend.generate([conv], sampling, assistant_prefixes=[prefix])[0]
    reference = verdict_backend.verdict_probability([conv], [prefix])[0]
    for g in gens:
        assert g.p_yes is not None and abs(g.p_yes - reference) < 1e-5
        assert g.text in {" Yes", " No"} and g.num_tokens == 1 and g.finish_reason == "length"
    # the prompt is the chat template with generation prompt, then the prefix, unchanged
    assert verdict_backend.render(conv, prefix).endswith("<|im_start|>assistant\n" + prefix)


def test_stop_strings_end_and_are_excluded(verdict_backend: HFBackend) -> None:
    sampling = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=120, seed=0)
    full = verdict_backend.generate(CONVERSATIONS[:1], sampling)[0][0]
    assert full.finish_reason == "stop"  # the end-of-turn token
    stop_at = full.text.index("\n")
    stopped = verdict_backend.generate(CONVERSATIONS[:1], sampling, stop=["\n"])[0][0]
    assert stopped.text == full.text[:stop_at]
    assert stopped.finish_reason == "stop" and stopped.num_tokens < full.num_tokens
    short = verdict_backend.generate(CONVERSATIONS[:1], sampling.model_copy(update={"max_new_tokens": 3}))[0][0]
    assert short.finish_reason == "length" and short.num_tokens == 3
    assert full.text.startswith(short.text)


def test_batches_respect_batch_size_and_token_budget(tiny_model_dir: Path) -> None:
    backend = _backend(tiny_model_dir, batch_size=2, token_budget=1000)
    backend.fast = None  # the generic decoding loop: every row holds (longest prompt + new tokens)
    lengths = [300, 50, 120, 700, 10]
    batches = backend._batches(lengths, n=3, max_new=100)
    rows = [row for batch in batches for row in batch]
    assert sorted(rows) == [(i, j) for i in range(5) for j in range(3)]
    for batch in batches:
        convs = {i for i, _ in batch}
        assert len(convs) <= 2
        width = max(lengths[i] for i in convs) + 100
        assert backend.batch_tokens(batch, lengths, 100) == len(batch) * width
        assert len(batch) == 1 or len(batch) * width <= 1000


def test_fallback_passes_group_by_tail_length_within_the_token_budget(tiny_model_dir: Path) -> None:
    """`_continuation_groups`: every row once, tails within 5/4 of their group's shortest (or 10
    tokens, for short ones), and a group's padded KV (rows x longest past + tail) within
    `token_budget` unless it is one row."""
    import torch

    backend = _backend(tiny_model_dir, token_budget=600)
    pasts, tails = [100, 40, 250, 90, 500, 60, 80], [3, 14, 40, 9, 12, 33, 45]
    items = [(i, [0] * t, [[(torch.zeros(2, p, 4), torch.zeros(2, p, 4))]]) for i, (p, t) in enumerate(zip(pasts, tails, strict=True))]
    groups = backend._continuation_groups(items)
    assert sorted(it[0] for g in groups for it in g) == list(range(len(items)))
    for g in groups:
        lens = [len(it[1]) for it in g]
        assert lens == sorted(lens) and 4 * max(lens) <= 5 * max(8, lens[0])
        assert len(g) == 1 or len(g) * max(pasts[it[0]] + len(it[1]) for it in g) <= 600
    assert len(groups) < len(items)  # and some rows do share a pass


def test_shared_prompt_batches_stay_within_batch_size_and_token_budget(tiny_model_dir: Path) -> None:
    """Continuous batching holds each prompt once plus max_new_tokens per sample slot."""
    sampling = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=20, seed=4)
    wide = _backend(tiny_model_dir)
    assert wide.fast is not None  # the tiny Qwen2 model takes the shared-prompt path
    reference = wide.generate(CONVERSATIONS * 3, sampling)
    lengths = [len(ids) for ids in wide._encode_all([wide.render(c) for c in CONVERSATIONS])]
    budget = 2 * (max(lengths) + 3 * 20)
    narrow = _backend(tiny_model_dir, batch_size=2, token_budget=budget)
    assert _texts(narrow.generate(CONVERSATIONS * 3, sampling)) == _texts(reference)
    prompts, held = narrow.peak_batch
    assert 1 < prompts <= 2 and held <= budget


def test_shared_prompt_path_equals_the_generic_loop(verdict_model_dir: Path) -> None:
    """Same samples and one-pass verdicts with or without SharedPromptLM (and the prefix cache)."""
    sampling = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=120, seed=8)
    fast = _backend(verdict_model_dir)
    generic = _backend(verdict_model_dir)
    generic.fast = None
    a, b = fast.generate(CONVERSATIONS, sampling), generic.generate(CONVERSATIONS, sampling)
    assert _texts(a) == _texts(b)
    for x, y in zip([g for per in a for g in per], [g for per in b for g in per], strict=True):
        assert (x.p_yes is None) == (y.p_yes is None)
        assert x.p_yes is None or abs(x.p_yes - y.p_yes) < 1e-5
    prefixes = [cut_at_verdict(per[0].text)[0] or "Analysis:" for per in a]
    cached = fast.verdict_probability(CONVERSATIONS, prefixes)  # continues the remembered prompts
    assert fast.prefix_cache.tokens > 0
    fast.reset_prefix_cache()
    fresh = fast.verdict_probability(CONVERSATIONS, prefixes)
    for x, y, z in zip(cached, fresh, generic.verdict_probability(CONVERSATIONS, prefixes), strict=True):
        assert abs(x - y) < 1e-5 and abs(x - z) < 1e-5


def _fallback(text: str) -> str:
    return cut_at_verdict(postprocess_response(text))[0]


def _full(result: list[list]) -> list[list[tuple]]:
    return [[(g.text, g.num_tokens, g.finish_reason, g.p_yes, g.forced_p_yes) for g in per] for per in result]


def test_decoding_steps_compute_only_live_rows_bitwise(verdict_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoding step runs the per-row work for live rows only (finished rows waiting for their
    prompt's slowest sample are skipped): samples, one-pass verdicts and fallbacks are bitwise
    those of computing every row of the batch."""
    from components.backends.hf_engine import SharedPromptLM

    sampling = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_new_tokens=120, seed=3)
    convs = CONVERSATIONS * 2
    backend = _backend(verdict_model_dir, batch_size=3)
    computed: list[tuple[int, int]] = []
    original = SharedPromptLM.step

    def recording(self, tokens, index, state, compute=None):  # noqa: ANN001, ANN202
        computed.append((len(index), len(compute) if compute is not None else len(index)))
        return original(self, tokens, index, state, compute)

    monkeypatch.setattr(SharedPromptLM, "step", recording)
    skipping = backend.generate(convs, sampling, seeds=[1, 2, 3, 4, 5, 6], teacher_forced=_fallback)
    assert any(c < r for r, c in computed), [[g.num_tokens for g in per] for per in skipping]  # some skipped
    monkeypatch.setattr(SharedPromptLM, "step", lambda self, tokens, index, state, compute=None:
                        original(self, tokens, index, state, None))
    backend.reset_prefix_cache()
    every = backend.generate(convs, sampling, seeds=[1, 2, 3, 4, 5, 6], teacher_forced=_fallback)
    assert _full(skipping) == _full(every)


@pytest.mark.parametrize("threads", [1, 2])
def test_products_over_min_rows_round_each_row_as_a_larger_batch(verdict_model_dir: Path, threads: int) -> None:
    """What `MIN_ROWS` assumes, at the verdict model's sizes: every linear layer gives each row
    the same bits over MIN_ROWS rows or more as over a batch of 128, on one and on two torch
    threads (while some products over fewer rows do round apart: the floor is needed)."""
    import torch
    from transformers import AutoModelForCausalLM

    from components.backends.hf_engine import MIN_ROWS

    model = AutoModelForCausalLM.from_pretrained(verdict_model_dir).eval()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        rounding_apart = 0
        with torch.inference_mode():
            for name, layer in layers.items():
                x = torch.randn(128, layer.in_features)
                whole = layer(x)
                for rows in range(1, 48):
                    same = torch.equal(layer(x[:rows]), whole[:rows])
                    assert same or rows < MIN_ROWS, (name, rows)
                    rounding_apart = max(rounding_apart, 0 if same else rows)
        assert rounding_apart > 1  # one row is a matrix-vector product: it never rounds alike
    finally:
        torch.set_num_threads(previous)


def test_the_load_time_warm_up_leaves_nothing_behind(verdict_model_dir: Path) -> None:
    """The warm-up generation at load (so that no caller's work is a process's first generation)
    leaves an empty prefix cache and no batch record, and a generation after it is the same as
    one after another."""
    backend = _backend(verdict_model_dir, batch_size=2)
    assert backend.prefix_cache.tokens == 0 and backend.peak_batch == (0, 0)
    sampling = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_new_tokens=40, seed=5)
    first = backend.generate(CONVERSATIONS[:2], sampling, seeds=[1, 2])
    backend.reset_prefix_cache()
    assert _texts(backend.generate(CONVERSATIONS[:2], sampling, seeds=[1, 2])) == _texts(first)


def test_continuous_batching_equals_each_prompt_alone(verdict_backend: HFBackend) -> None:
    """Prompts entering the running batch as others leave (batch_size 2 of 6 prompts, K=4) get
    the samples they get alone; verdict and fallback probabilities agree within float rounding
    (the CPU attention kernel rounds by the batch's padded width, about 1e-7)."""
    sampling = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_new_tokens=80, seed=9)
    convs, seeds = CONVERSATIONS * 2, [21, 22, 23, 24, 25, 26]
    narrow = _backend(verdict_backend.model_path, batch_size=2)
    batched = narrow.generate(convs, sampling, seeds=seeds, teacher_forced=_fallback)
    assert narrow.peak_batch[0] == 2
    for conv, seed, got in zip(convs, seeds, batched, strict=True):
        verdict_backend.reset_prefix_cache()
        (alone,) = verdict_backend.generate([conv], sampling, seeds=[seed], teacher_forced=_fallback)
        assert _texts([got]) == _texts([alone])
        for x, y in zip(got, alone, strict=True):
            for a, b in ((x.p_yes, y.p_yes), (x.forced_p_yes, y.forced_p_yes)):
                assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-5)


def test_fused_attention_equals_the_dense_softmax(tiny_backend: HFBackend) -> None:
    """The CPU flash kernel per part, merged by log-sum-exp, is the one softmax over prompt and
    generated keys (padding and unwritten positions masked)."""
    import torch

    fast = tiny_backend.fast
    assert fast is not None and fast.fused, "torch should have the fused CPU attention kernel"
    gen = torch.Generator().manual_seed(0)
    c, kvh, s, g, d, width, span = 3, 2, 4, 2, 16, 40, 9
    q = torch.randn((c, kvh, s, g, d), generator=gen) * 0.3
    pk, pv = torch.randn((c, kvh, width, d), generator=gen), torch.randn((c, kvh, width, d), generator=gen)
    bias = torch.zeros((c, 1, 1, width))
    bias[1, ..., 25:] = float("-inf")  # a shorter prompt, padded
    gk, gv = torch.randn((c, kvh, s, 12, d), generator=gen), torch.randn((c, kvh, s, 12, d), generator=gen)
    written = torch.randint(0, span, (c * s,), generator=gen)
    hidden = torch.arange(span)[None] > written[:, None]
    gen_bias = torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf")).view(c, 1, s, 1, span)
    args = (q, pk, pv, bias, gk[:, :, :, :span], gv[:, :, :, :span], gen_bias)
    fused, dense = fast._attend_fused(*args), fast._attend_dense(*args)
    assert fused.shape == dense.shape == (c, kvh, s, g, d)
    assert torch.allclose(fused, dense, atol=1e-5)


def test_encoding_continuing_a_cached_prefix_is_bitwise_the_full_encoding(verdict_backend: HFBackend) -> None:
    """Resumed runs reproduce uninterrupted ones byte for byte only if a prompt's KV and logits
    do not depend on whether part of it came from the prefix cache."""

    fast = verdict_backend.fast
    assert fast is not None
    ids = verdict_backend._encode_all([verdict_backend.render(CONVERSATIONS[1], "Analysis: the diagonal")])[0]
    assert len(ids) > 70
    _assert_cache_invariant(fast, ids, lengths=(33, 34, 37, 65, 69, 70, len(ids)))


def _assert_cache_invariant(fast: Any, ids: list[int], lengths: Sequence[int]) -> None:
    """Every prefix length in `lengths`, continued from every cached cut (multiples of 32, down to
    a one-token tail, where a CPU matrix product over so few rows rounds unlike the whole
    prompt's), gives the KV and logits of encoding it whole."""
    import torch

    with torch.inference_mode():
        for n in lengths:
            full_kv, full_logits = fast.encode(ids[:n], "cpu")
            for cut in range(ATTENTION_CHUNK, n, ATTENTION_CHUNK):
                past, _ = fast.encode(ids[:cut], "cpu")
                rest_kv, logits = fast.encode(ids[cut:n], "cpu", past)
                assert torch.equal(logits, full_logits), (n, cut)
                for (k, v), (rk, rv) in zip(full_kv, rest_kv, strict=True):
                    assert torch.equal(k[:, cut:], rk) and torch.equal(v[:, cut:], rv), (n, cut)


@pytest.mark.parametrize("threads", [1, 2])
def test_cache_invariance_holds_at_small_model_sizes(threads: int) -> None:
    """The same at SmolLM2-135M's widths (hidden 576, MLP 1536, 9 heads over 3 KV heads; random
    weights, two layers), where CPU matrix products round by row count for up to 15 rows and, on
    two threads, for some counts in the tens: one and two torch threads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from components.backends.hf_engine import SharedPromptLM

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512)
        fast = SharedPromptLM(LlamaForCausalLM(config).eval())
        ids = torch.randint(0, 512, (200,)).tolist()
        _assert_cache_invariant(fast, ids, lengths=(33, 37, 69, 111, 200))
    finally:
        torch.set_num_threads(previous)


def test_continuing_several_pasts_at_once_equals_each_encoding(verdict_backend: HFBackend) -> None:
    """`continue_many` (the batched fallback pass): sequences of different lengths, each continuing
    its own past given in pieces (as a prompt's KV and a row's generated KV are), give each one's
    last-position logits as `encode` with that past does, up to float rounding."""
    import torch

    fast = verdict_backend.fast
    assert fast is not None
    texts = ["Analysis: the diagonal", "Analysis:\n**Now Step Analysis**: It adds 7 and 5, which gives 12 here", "No"]
    seqs = [verdict_backend._encode_all([verdict_backend.render(conv, t)])[0]
            for conv, t in zip(CONVERSATIONS, texts, strict=False)]
    cuts = [len(seqs[0]) - 5, len(seqs[1]) - 19, len(seqs[2]) - 1]
    with torch.inference_mode():
        items, expected = [], []
        for ids, cut in zip(seqs, cuts, strict=True):
            past, _ = fast.encode(ids[:cut], "cpu")
            expected.append(fast.encode(ids[cut:], "cpu", past)[1])
            half = cut // 2  # the past in two pieces
            items.append((ids[cut:], [[(k[:, :half], v[:, :half]), (k[:, half:], v[:, half:])] for k, v in past]))
        got = fast.continue_many(items, "cpu")
    assert got.shape == (len(seqs), expected[0].shape[-1])
    for row, want in zip(got, expected, strict=True):
        assert torch.allclose(row, want, atol=1e-4), float((row - want).abs().max())
    assert not torch.allclose(got[0], got[1], atol=1e-2)  # different sequences, different logits


def test_progress_bar(tiny_backend: HFBackend, capsys: pytest.CaptureFixture[str]) -> None:
    sampling = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=2, seed=0)
    tiny_backend.generate(CONVERSATIONS[:2], sampling, progress=True)
    assert "generate (hf)" in capsys.readouterr().err


def test_folder_without_tokenizer_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    with pytest.raises(Exception, match="no tokenizer files"):
        load_backend(BackendParams(), bare)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_without_the_gpu_extra_says_so(tiny_model_dir: Path) -> None:
    with pytest.raises(BackendError, match="gpu"):
        load_backend(BackendParams(kind="vllm"), tiny_model_dir)


def test_mismatched_arguments_are_errors(tiny_backend: HFBackend) -> None:
    sampling = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=1, seed=0)
    with pytest.raises(ValueError, match="one entry per conversation"):
        tiny_backend.generate(CONVERSATIONS, sampling, seeds=[1])
    with pytest.raises(ValueError, match="differ in length"):
        tiny_backend.verdict_probability(CONVERSATIONS, ["x"])


def test_a_vocabulary_padded_past_the_tokenizer_is_served(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Real checkpoints (Qwen2.5) pad the embedding past the tokenizer; the fast decoder must take
    the model's logit width, not the tokenizer's length."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tok) + 24)
    model.save_pretrained(tmp_path / "padded")
    tok.save_pretrained(tmp_path / "padded")
    backend = HFBackend(tmp_path / "padded", BackendParams())
    assert backend.fast is not None
    sampling = SamplingParams(n=3, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=0)
    out = backend.generate([[{"role": "user", "content": "What is 2 + 3?"}]] * 2, sampling)
    assert [len(g) for g in out] == [3, 3] and all(x.num_tokens > 0 for g in out for x in g)
    backend.close()
