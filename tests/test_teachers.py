"""Teachers and the offline checker (components/checker.py): the safe arithmetic parser, claim
finding, the offline teacher, the backend teacher."""

from __future__ import annotations

import ast
import json
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import pytest
from fault_server import FaultServer
from hypothesis import given, settings
from hypothesis import strategies as st

from components import checker, teachers
from components.backends.openai import OpenAIBackend
from components.checker import ExpressionError, evaluate_expression, find_claims, normalize_math
from components.config import OpenAIParams, SamplingParams, load_params
from components.prompts import parse_verdict, teacher_messages
from components.records import StepSample
from components.teachers import BackendTeacher, OfflineTeacher

REPO = Path(__file__).resolve().parents[1]
SECTIONS = [
    "**Previous Steps Analysis**:",
    "**Now Step Analysis**:",
    "**Data Source Analysis**:",
    "**Consistency Analysis**:",
    "**Calculation Analysis**:",
    "Conclusion:",
    "Verification: Is the step correct (Yes/No)? ",
]


def step(now: str, previous: list[str] | None = None, label: bool | None = True, sid: str = "s1") -> StepSample:
    previous = previous or []
    return StepSample(
        id=sid, problem_id="p1", question="How many seconds are in 7.8 minutes?",
        previous_steps=previous, now_step=now, step_index=len(previous), label=label,
    )


@pytest.fixture(scope="module")
def bundled_steps() -> list[StepSample]:
    """Step samples flattened from the bundled PRM800K subset by the prepare stage's own code."""
    from components.data import load_prm800k
    from components.prepare import flatten

    params = load_params(REPO / "params.yaml")
    data = params.data.model_copy(update={"bundled_dir": str(REPO / "data" / "bundled")})
    samples, _ = flatten(load_prm800k(data, source="bundled"), "positive")
    return samples


# --------------------------------------------------------------------------------------
# Safe parser
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2+3*4", 14), ("(2+3)*4", 20), ("2^10", 1024), ("-2^2", -4), ("2^-1", Fraction(1, 2)),
        ("7!", 5040), ("1/3", Fraction(1, 3)), ("2(3+4)", 14), ("8^(1/3)", 2), ("16^(1/2)", 4),
        ("0.1+0.2", Fraction(3, 10)), (" 10 - 4 - 3 ", 3), ("2^3^2", 512), ("--3", 3),
    ],
)
def test_evaluate_expression_values(text: str, value: Fraction | int) -> None:
    assert evaluate_expression(text) == value


@pytest.mark.parametrize(
    "hostile",
    [
        "__import__('os').system('x')",
        "().__class__.__bases__[0].__subclasses__()",
        "open('/etc/passwd').read()",
        "lambda: 1",
        "a + b",
        "2**3",
        "1e400",
        "0x10",
        "1_000",
        "٣+٣",  # non-ASCII digits
        "2^100000",
        "9^9^9^9",
        "99999999999999999999^64",
        "60!",
        "1/0",
        "0^-1",
        "2^(1/3)",  # irrational
        "(" * 100 + "1" + ")" * 100,  # deeper than the limit, shorter than the length cap
        "-" * 200 + "1",
        "1+" * 200 + "1",  # longer than the length cap
        "",
        "(1",
        "1)",
    ],
)
def test_evaluate_expression_rejects_hostile_input(hostile: str) -> None:
    with pytest.raises(ExpressionError):
        evaluate_expression(hostile)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789.+-*/^()! _aex'", max_size=80))
def test_evaluate_expression_only_ever_returns_a_number_or_expression_error(text: str) -> None:
    try:
        value = evaluate_expression(text)
    except ExpressionError:
        return
    assert isinstance(value, Fraction)


@pytest.mark.parametrize("module", [checker, teachers])
def test_teacher_module_never_calls_eval_exec_or_compile(module: ModuleType) -> None:
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    banned = {"eval", "exec", "compile", "__import__"}
    calls = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert banned.isdisjoint(calls)


# --------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("there are 60 * 7 = 420 seconds in 7 minutes.", [("60 * 7", True)]),
        ("So, in total, there are 420 + 48 = 458 seconds.", [("420 + 48", False)]),
        ("$a_5=7!=7*6*5*4*3*2*1=5040$", [("7!", True), ("7*6*5*4*3*2*1", True)]),
        ("$\\frac{7}{8} = 0.875$", [("(7/8)", True)]),
        ("$3 \\times 4 = 12$ and $12 \\div 4 = 2$", [("3 * 4", True), ("12 / 4", False)]),
        ("$2^{10} = 1024$", [("2^(10)", True)]),
        ("1,000 + 2,000 = 3,000", [("1000 + 2000", True)]),
        ("$50 \\cdot 20\\% = 10$", [("50 * (20/100)", True)]),
        ("1/3 = 0.33", [("1/3", True)]),
        ("2/3 \\approx 0.7", [("2/3", True)]),
        ("$\\sqrt{16} = 5$", [("((16)^(1/2))", False)]),
        ("There are $\\binom{5}{3}=10$ ways", [("(5!/(3!*2!))", True)]),
        ("f(3) = 9 + 3 = 12", [("9 + 3", True)]),
        ("a = 2 + 3 = 6", [("2 + 3", False)]),
        # algebra, not arithmetic: nothing to check
        ("x - 3 = 7", []), ("2x + 3 = 7", []), ("$5p+e-3p-e=1.82-1.24$", []), ("$2p=0.58$", []),
        ("$x^2 + 3 = 12$", []), ("$\\log_2 8 = 3$", []), ("Let n = 5.", []), ("$3 = 3$", []),
        ("3 + 4 = 7x", []), ("The answer is 10!", []),
    ],
)
def test_find_claims(text: str, expected: list[tuple[str, bool]]) -> None:
    got = [(c.lhs, c.holds) for c in find_claims(text)]
    assert [(" ".join(lhs.split()), ok) for lhs, ok in got] == [(" ".join(lhs.split()), ok) for lhs, ok in expected]


def test_normalize_math_handles_nested_fractions() -> None:
    assert evaluate_expression(normalize_math("\\frac{\\frac{1}{2}}{2}").strip()) == Fraction(1, 4)


def test_claims_separate_wrong_from_right_steps_on_real_data(bundled_steps: list[StepSample]) -> None:
    """A genuine checker: wrong claims are far more frequent in steps humans rated wrong."""
    def wrong_share(samples: list[StepSample]) -> float:
        flagged = [any(not c.holds for c in find_claims(s.now_step)) for s in samples]
        return sum(flagged) / len(flagged)

    neg = [s for s in bundled_steps if s.label is False]
    pos = [s for s in bundled_steps if s.label is True]
    assert len(neg) > 100 and len(pos) > 100
    assert wrong_share(neg) > 4 * wrong_share(pos)


# --------------------------------------------------------------------------------------
# Offline teacher
# --------------------------------------------------------------------------------------


class _LabelGuard:
    """A step sample whose label cannot be read: reading it fails the test."""

    def __init__(self, sample: StepSample):
        self._sample = sample

    def __getattr__(self, name: str):
        if name == "label":
            raise AssertionError("the offline teacher read the label")
        return getattr(self._sample, name)


def test_offline_teacher_never_reads_the_label() -> None:
    t = OfflineTeacher()
    sampling = SamplingParams(n=6, temperature=1.0, top_p=1.0, max_new_tokens=256, seed=0)
    s = step("So we need 3 more.", ["We have 4 apples.", "We want 7."])
    guarded = t.analyze([_LabelGuard(s)], sampling, [11])  # type: ignore[list-item]
    flipped = t.analyze([s.model_copy(update={"label": False})], sampling, [11])
    assert [g.text for g in guarded[0]] == [g.text for g in flipped[0]]


def test_offline_analysis_structure_and_verdicts() -> None:
    t = OfflineTeacher(trace_sources=False)  # 60 seconds a minute is world knowledge, stated nowhere
    sampling = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_new_tokens=256, seed=0)
    right = step("There are 60 * 7 = 420 seconds in 7 minutes.", ["7.8 minutes is 7 minutes and 0.8 minutes."])
    wrong = step("There are 60 * 7 = 480 seconds in 7 minutes.", ["7.8 minutes is 7 minutes and 0.8 minutes."])
    traced = OfflineTeacher().analyze([right], sampling, [1])[0]  # tracing sources: 60 has none
    assert all(g.meta["decided_by"] == "data_source" and parse_verdict(g.text).verdict == "no" for g in traced)
    assert all("60 from nowhere" in g.text and "60 has no source" in g.text for g in traced)
    assert all("7 from Step 1" in g.text for g in traced)  # the other operand, traced to its step
    out = t.analyze([right, wrong], sampling, [1, 2])
    for row, verdict in zip(out, ["yes", "no"], strict=True):
        assert len(row) == 4
        for g in row:
            positions = [g.text.find(h) for h in SECTIONS]
            assert all(p >= 0 for p in positions) and positions == sorted(positions), g.text
            assert parse_verdict(g.text).verdict == verdict
            assert g.meta["decided_by"] == "calculation"
    assert "480" in out[1][0].text and "420" in out[1][0].text  # says what the value is


def test_offline_samples_are_seeded_per_row_and_differ_when_uncertain() -> None:
    t = OfflineTeacher()
    sampling = SamplingParams(n=8, temperature=1.0, top_p=1.0, max_new_tokens=256, seed=0)
    a = step("Now we substitute the value back.", ["We have x."], sid="a")
    b = step("Then $3 + 4 = 7$.", ["We have 3 and 4."], sid="b")
    together = t.analyze([a, b], sampling, [5, 6])
    alone = t.analyze([b], sampling, [6]) + t.analyze([a], sampling, [5])
    assert [g.text for g in together[0]] == [g.text for g in alone[1]]
    assert [g.text for g in together[1]] == [g.text for g in alone[0]]
    verdicts = {parse_verdict(g.text).verdict for g in together[0]}
    assert verdicts == {"yes", "no"}  # the uncertain path really samples
    assert all(g.meta["decided_by"] == "heuristic" for g in together[0])
    # temperature 0: the uncertain path takes its more likely verdict every time
    greedy = t.analyze([a], sampling.model_copy(update={"temperature": 0.0}), [5])
    assert len({parse_verdict(g.text).verdict for g in greedy[0]}) == 1


def test_offline_analyses_are_short_for_the_tiny_tokenizer(
    tiny_model_dir: Path, bundled_steps: list[StepSample]
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    t = OfflineTeacher()
    sampling = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=256, seed=0)
    samples = bundled_steps[::7][:300]
    lengths = sorted(len(tok(g.text).input_ids) for row in t.analyze(samples, sampling, range(len(samples))) for g in row)
    assert lengths[len(lengths) // 2] < 150
    assert lengths[-1] < 220


# --------------------------------------------------------------------------------------
# Backend teacher (real HTTP)
# --------------------------------------------------------------------------------------


def test_backend_teacher_sends_the_one_shot_chat_and_never_the_label() -> None:
    sampling = SamplingParams(n=2, temperature=0.4, top_p=0.95, max_new_tokens=64, seed=0)
    bodies = []
    for label in (True, False, None):
        with FaultServer(max_choices=2) as server:
            params = OpenAIParams(base_url=server.base_url, model="teacher", api_key_env=None, concurrency=2)
            teacher = BackendTeacher(OpenAIBackend(params))
            s = step("Then $3 + 4 = 8$.", ["We have 3 and 4."], label=label)
            out = teacher.analyze([s], sampling, [9])
            teacher.close()
            assert [g.error for g in out[0]] == [None, None]
            assert teacher.name == "teacher:openai:teacher"
            (req,) = server.requests
            bodies.append(req.raw)
            assert req.body["messages"] == teacher_messages(s.question, s.previous_steps, s.now_step)
            text = json.dumps(req.body)
            for leak in ("Positive", "Negative", "expert", '"label"'):
                assert leak not in text
    assert bodies[0] == bodies[1] == bodies[2]  # the label changes nothing the teacher sees
