"""The R-PRM template, step formatting and verdict parser, pinned to docs/method.md; the teacher
chat pinned to the official rendering of the vendored official one-shot prompt file."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from components import prompts
from components.prompts import (
    FIRST_STEP_SENTENCE,
    RPRM_TEMPLATE,
    VERDICT_NO,
    VERDICT_YES,
    agrees,
    cut_at_verdict,
    format_previous_steps,
    parse_verdict,
    postprocess_response,
    render_rprm_prompt,
    student_messages,
    teacher_messages,
)

METHOD_DOC = Path(__file__).resolve().parents[1] / "docs" / "method.md"
# The reference the project was written from, when it sits beside the checkout (not in a clone).
REFERENCE_DOC = Path(__file__).resolve().parents[2] / "shared" / "docs" / "rprm-method.md"


def _template_block(doc: Path) -> str:
    text = doc.read_text(encoding="utf-8")
    section = text.split("### 2.1 The R-PRM prompt", 1)[1]
    block = section.split("```", 2)[1]
    assert block.startswith("\n")
    return block[1:-1]  # drop the newline after the fence and the one before the closing fence


def test_template_is_byte_exact_with_method_doc() -> None:
    expected = _template_block(METHOD_DOC)
    assert RPRM_TEMPLATE == expected
    assert "Conclusion: \n" in RPRM_TEMPLATE  # trailing space kept
    assert RPRM_TEMPLATE.endswith("Reply: ")  # trailing space kept
    assert RPRM_TEMPLATE.count("{}") == 3


@pytest.mark.skipif(not REFERENCE_DOC.exists(), reason="the reference ../shared/docs/rprm-method.md is not beside the checkout")
def test_method_doc_template_equals_the_reference() -> None:
    assert _template_block(METHOD_DOC) == _template_block(REFERENCE_DOC)


def test_teacher_system_prompt_has_extra_blank_line_before_conclusion() -> None:
    expected_block = _template_block(METHOD_DOC).split("\n\nQuestion: {}")[0]
    assert prompts.TEACHER_SYSTEM_PROMPT == expected_block.replace("\nConclusion: ", "\n\nConclusion: ")
    assert prompts.TEACHER_TEMPLATE == (
        "Question: {}\nPrevious Steps: {}\nNow Step: {}\nPlease carefully analyze the correctness of the Now Step.\nReply:"
    )


def test_step_formatting() -> None:
    assert format_previous_steps([]) == "Since the Now Step is the first step, there are no Previous Steps."
    assert format_previous_steps(["a", "b"]) == "Step 1: a\nStep 2: b"
    text = render_rprm_prompt("Q?", ["x = 1", "y = 2"], "z = 3")
    assert text.endswith("Question: Q?\nPrevious Steps: Step 1: x = 1\nStep 2: y = 2\nNow Step: Step 3: z = 3\n"
                         "Please carefully analyze the correctness of the Now Step.\nReply: ")
    first = render_rprm_prompt("Q?", [], "x = 1")
    assert f"Previous Steps: {FIRST_STEP_SENTENCE}\nNow Step: Step 1: x = 1\n" in first


def test_chat_form_uses_real_newlines_and_helpful_assistant() -> None:
    msgs = student_messages("Q?", [], "x")
    assert msgs[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert msgs[1]["role"] == "user" and len(msgs) == 2
    assert "\\n" not in msgs[1]["content"] and "\n" in msgs[1]["content"]


def test_teacher_prompt_is_one_shot_and_never_holds_a_label() -> None:
    msgs = teacher_messages("Q?", ["a"], "b")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"].rstrip().endswith(VERDICT_YES)
    assert "Positive" not in msgs[3]["content"] and "Negative" not in msgs[3]["content"]
    assert msgs[3]["content"].endswith("Reply:")


TEACHER_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "teacher_chat_official.json"
OFFICIAL_PROMPT_SHA256 = "3025bec1538cfe94ff9f42ef89b7914ff644205154ba4042ba29f598fa5ddbd3"
SHARED_PROMPT_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts" / "teacher_one_shot_official.json"


@pytest.mark.parametrize("case", json.loads(TEACHER_FIXTURE.read_text(encoding="utf-8"))["cases"])
def test_teacher_chat_is_byte_exact_with_the_official_rendering(case: dict) -> None:
    """The fixture replays the official inference.py rendering; ours must give the same bytes."""
    inp = case["input"]
    msgs = teacher_messages(inp["question"], inp["previous_steps"], inp["now_step"])
    assert json.dumps(msgs, ensure_ascii=False).encode() == json.dumps(case["messages"], ensure_ascii=False).encode()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]


def test_vendored_teacher_prompt_file_is_the_official_one() -> None:
    raw = prompts.TEACHER_PROMPT_FILE.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == OFFICIAL_PROMPT_SHA256  # as components/resources/README.md states
    if SHARED_PROMPT_FILE.exists():
        assert raw == SHARED_PROMPT_FILE.read_bytes()
    official = prompts.OFFICIAL_TEACHER_PROMPT
    assert official.system == prompts.TEACHER_SYSTEM_PROMPT and official.template == prompts.TEACHER_TEMPLATE
    question, answer = prompts.ONE_SHOT_EXAMPLE
    assert (question, answer) == official.examples[0] and len(official.examples) == 1
    # the example's 12 previous steps are joined by a literal backslash-n, as in the official file
    previous = question.split("Previous Steps: ", 1)[1].split("\nNow Step: ", 1)[0]
    assert previous.count("\\n") == 11 and "\n" not in previous
    assert question.split("\nNow Step: ", 1)[1].startswith("Step 13: ")
    assert answer.startswith("Analysis:\n\n**Previous Steps Analysis**:") and answer.endswith(VERDICT_YES)
    assert parse_verdict(answer).verdict == "yes"


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("not json", None),
        ('["a list"]', None),
        ('{"template": "Q {} {} {}", "examples": [{"question": "q", "answer": "a"}]}', "system-prompt"),
        ('{"system-prompt": "s", "template": "Q {} {}", "examples": [{"question": "q", "answer": "a"}]}', "template"),
        ('{"system-prompt": "s", "template": "Q {} {} {}", "examples": []}', "examples"),
        ('{"system-prompt": "s", "template": "Q {} {} {}", "examples": [{"question": "q"}]}', "examples[0].answer"),
    ],
)
def test_bad_teacher_prompt_file_names_file_and_field(tmp_path: Path, content: str, field: str | None) -> None:
    from components.io import DataError

    path = tmp_path / "teacher.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        prompts.load_teacher_prompt(path)
    assert err.value.path == str(path) and err.value.field == field
    with pytest.raises(DataError, match="not found"):
        prompts.load_teacher_prompt(tmp_path / "missing.json")


def test_teacher_chat_with_another_prompt_file(tmp_path: Path) -> None:
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps({"system-prompt": "S", "template": "Q: {}|P: {}|N: {}",
                                "examples": [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]}))
    msgs = teacher_messages("x left-bracketsyright-brackets", [], "z", prompt=prompts.load_teacher_prompt(path))
    assert [m["content"] for m in msgs] == ["S", "q1", "a1", "q2", "a2", f"Q: x {{y}}|P: {FIRST_STEP_SENTENCE}|N: Step 1: z"]


@pytest.mark.parametrize(
    ("text", "verdict", "reason"),
    [
        ("Analysis... " + VERDICT_YES, "yes", None),
        ("Analysis... " + VERDICT_NO, "no", None),
        ("Analysis... " + VERDICT_YES + ".", "yes", None),  # `Yes.` with a period
        ("Analysis... " + VERDICT_NO + "  ...", "no", None),  # spaces, then trailing periods
        # Official rule is rstrip(".") THEN strip(): a period followed by a space is not stripped.
        ("Analysis... " + VERDICT_NO + ". ", "invalid", "not_at_end"),
        ("Analysis without a verdict.", "invalid", "no_verdict"),
        (VERDICT_YES + "\n" + VERDICT_NO, "invalid", "several_verdicts"),
        (VERDICT_YES + "\n" + VERDICT_YES, "invalid", "several_verdicts"),
        (VERDICT_YES + "\nBut wait, more text.", "invalid", "not_at_end"),
        ("Verification: Is the step correct (Yes/No)? Maybe", "invalid", "no_verdict"),
    ],
)
def test_parse_verdict_rules(text: str, verdict: str, reason: str | None) -> None:
    parsed = parse_verdict(text)
    assert parsed.verdict == verdict
    assert parsed.reason == reason


def test_agreement_with_label() -> None:
    assert agrees("x " + VERDICT_YES, True)
    assert not agrees("x " + VERDICT_YES, False)
    assert agrees("x " + VERDICT_NO + ".", False)
    assert not agrees(VERDICT_NO + " trailing", False)


def test_cut_at_first_verdict_phrase_or_fallback() -> None:
    text = "a Verification: Is the step correct (Yes/No)? Yes and again Is the step correct (Yes/No)? No"
    cut, found = cut_at_verdict(text)
    assert found and cut == "a Verification: Is the step correct (Yes/No)?"
    cut, found = cut_at_verdict("no verdict here")
    assert not found and cut == "no verdict here\nBased on your analysis. Is the answer correct (Yes/No)?"


def test_postprocess_strips_lines_and_literal_newlines_without_eating_n() -> None:
    raw = "  \\nAnalysis:\\n  indented line\n   another  \nno\\n"
    assert postprocess_response(raw) == "Analysis:\nindented line\nanother\nno"
    assert postprocess_response("nNo verdict n") == "nNo verdict n"  # the official strip bug is not reproduced


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


@given(prefix=_text, label=st.booleans(), periods=st.integers(0, 3))
def test_property_single_final_verdict_parses(prefix: str, label: bool, periods: int) -> None:
    if "Is the step correct (Yes/No)? " in prefix:
        return
    target = VERDICT_YES if label else VERDICT_NO
    parsed = parse_verdict(prefix + target + "." * periods)
    assert parsed.verdict == ("yes" if label else "no")
    assert agrees(prefix + target, label) and not agrees(prefix + target, not label)


@given(a=_text, b=_text)
def test_property_two_verdicts_are_never_valid(a: str, b: str) -> None:
    assert parse_verdict(a + VERDICT_YES + b + VERDICT_NO).verdict == "invalid"


@given(text=_text)
def test_property_parser_total_and_consistent(text: str) -> None:
    parsed = parse_verdict(text)
    assert parsed.verdict in {"yes", "no", "invalid"}
    n = len(re.findall(re.escape("Is the step correct (Yes/No)? Yes"), text)) + len(
        re.findall(re.escape("Is the step correct (Yes/No)? No"), text)
    )
    if parsed.valid:
        assert n >= 1
