"""The R-PRM prompt, step formatting and verdict parsing (rprm-method.md sections 2 and 9).

Everything here must match the official code byte for byte; tests pin it against the method
document. Where we deviate on purpose it is a parameter, never a silent change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

SYSTEM_PROMPT = "You are a helpful assistant."

VERDICT_PHRASE = "Is the step correct (Yes/No)?"
VERDICT_PREFIX = "Verification: " + VERDICT_PHRASE + " "
VERDICT_YES = VERDICT_PREFIX + "Yes"
VERDICT_NO = VERDICT_PREFIX + "No"
# Appended to an analysis that never reached the verdict (section 5, point 3).
FALLBACK_SUFFIX = "\nBased on your analysis. Is the answer correct (Yes/No)?"
# Reward tokens: first id of these strings (leading space!).
YES_TOKEN_TEXT = " Yes"
NO_TOKEN_TEXT = " No"

FIRST_STEP_SENTENCE = "Since the Now Step is the first step, there are no Previous Steps."

# Instruction block shared by the student prompt (2.1) and the teacher system prompt (2.2).
_INSTRUCTIONS = (
    "You are an excellent math teacher. Please verify the correctness of the Now Step.\n"
    "\n"
    "You first need to analyze the Now Step and the Previous Steps and then summarize based on your analysis.\n"
    "Analysis:\n"
    "You need to analyze the following aspects.\n"
    "**Previous Steps Analysis**: You need to analyze the Previous Steps step by step. For each step, you need to first explain what the current step is doing, then you try to find any error in the current step.\n"
    "**Now Step Analysis**: You first need to explain what the Now Step is doing, and then point out which part of the Question it is trying to solve or which part of the information it states.\n"
    "**Data Source Analysis**: First you need to find out what data are used in the Now Step, and then you need to determine whether the source of the data is reasonable and correct. When you judge whether the source of a data is reasonable and correct, you need to specify the specific source of this data: such as which part of the question, or which content of the previous step; and then determine the source and current use is consistent, the Now Step is used correctly.\n"
    "**Consistency Analysis**: You need to check that the Now Step is consistent with the contents of the Previous Steps, and then you need to check that all the information inside the Now Step is consistent.\n"
    "**Calculation Analysis**: If the Now Step involves any calculations, such as addition, subtraction, multiplication, division, equations, modulo operations, etc., you will first need to perform a check on the calculation, such as a reverse operation, to see if the calculation was done correctly, and then analyze the results of your check to see if there was an error in the calculation.\n"
)
_CONCLUSION = (
    "Conclusion: \n"
    "Please verify the correctness of the Now Step based on your analysis, if there is any error in the Now Step then the Now Step is wrong and vice versa the Now Step is correct. At the end of the Conclusion, when you give your final answer, write it in the form \"Verification: Is the step correct (Yes/No)? X\", where X is either Yes or No."
)

# Section 2.1: the R-PRM template (GenPRM-evaluate-new-for-train3.txt); three positional slots.
RPRM_TEMPLATE = (
    _INSTRUCTIONS
    + _CONCLUSION
    + "\n\n"
    "Question: {}\n"
    "Previous Steps: {}\n"
    "Now Step: {}\n"
    "Please carefully analyze the correctness of the Now Step.\n"
    "Reply: "
)

# Section 2.2: teacher system prompt (extra blank line before `Conclusion: `) and user template.
TEACHER_SYSTEM_PROMPT = _INSTRUCTIONS + "\n" + _CONCLUSION
TEACHER_TEMPLATE = (
    "Question: {}\nPrevious Steps: {}\nNow Step: {}\n"
    "Please carefully analyze the correctness of the Now Step.\nReply:"
)


def format_previous_steps(previous_steps: list[str]) -> str:
    """`Step 1: ...\\nStep 2: ...`, or the exact first-step sentence when there are none."""
    if not previous_steps:
        return FIRST_STEP_SENTENCE
    return "\n".join(f"Step {i}: {s}" for i, s in enumerate(previous_steps, start=1))


def format_now_step(now_step: str, step_index: int) -> str:
    """`Step k: <text>` with k = step_index + 1 (1-based numbering)."""
    return f"Step {step_index + 1}: {now_step}"


def render_rprm_prompt(question: str, previous_steps: list[str], now_step: str) -> str:
    """Fill the section 2.1 template (the user turn of the student)."""
    return RPRM_TEMPLATE.format(
        question, format_previous_steps(previous_steps), format_now_step(now_step, len(previous_steps))
    )


def student_messages(question: str, previous_steps: list[str], now_step: str) -> list[dict[str, str]]:
    """Chat form used for training and inference: system + user (filled template)."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": render_rprm_prompt(question, previous_steps, now_step)},
    ]


def student_prompt_tokens(tokenizer: Any, question: str, previous_steps: list[str], now_step: str) -> int:
    """Length in tokens of the student prompt, chat template and generation prompt included."""
    messages = student_messages(question, previous_steps, now_step)
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    return len(out["input_ids"])


def _escape_braces(text: str) -> str:
    # The official JSON escapes literal braces as left-/right-brackets, restored after format.
    return text.replace("left-brackets", "{").replace("right-brackets", "}")


def teacher_messages(
    question: str,
    previous_steps: list[str],
    now_step: str,
    example: tuple[str, str] | None = None,
) -> list[dict[str, str]]:
    """One-shot teacher chat (section 2.2): system, example user, example answer, user. No label."""
    messages = [{"role": "system", "content": TEACHER_SYSTEM_PROMPT}]
    ex_q, ex_a = example if example is not None else ONE_SHOT_EXAMPLE
    messages.append({"role": "user", "content": ex_q})
    messages.append({"role": "assistant", "content": ex_a})
    user = TEACHER_TEMPLATE.format(
        question, format_previous_steps(previous_steps), format_now_step(now_step, len(previous_steps))
    )
    messages.append({"role": "user", "content": _escape_braces(user)})
    return messages


# A one-shot example of the target shape (section 2.2). The official example's text is not
# reproduced in the method document; this one follows its structure exactly.
ONE_SHOT_EXAMPLE = (
    TEACHER_TEMPLATE.format(
        "What is the sum of the first 5 terms of the arithmetic sequence 2, 5, 8, ...?",
        "Step 1: The first term is 2 and the common difference is 5 - 2 = 3.\n"
        "Step 2: The fifth term is 2 + 4 * 3 = 14.",
        "Step 3: The sum is 5 * (2 + 14) / 2 = 40.",
    ),
    "Analysis:\n\n"
    "**Previous Steps Analysis**: \n"
    "1. Step 1: identifies the first term 2 and the common difference 5 - 2 = 3, which is correct.\n"
    "2. Step 2: computes the fifth term as 2 + 4 * 3 = 14, which is correct.\n\n"
    "**Now Step Analysis**: The Now Step computes the sum of the first 5 terms with n(a_1 + a_n)/2.\n\n"
    "**Data Source Analysis**: It uses n = 5 from the question, a_1 = 2 from Step 1 and a_5 = 14 from Step 2; the sources are correct.\n\n"
    "**Consistency Analysis**: The Now Step is consistent with the Previous Steps.\n\n"
    "**Calculation Analysis**: 5 * (2 + 14) / 2 = 5 * 16 / 2 = 40. Reverse check: 40 * 2 / 5 = 16 = 2 + 14. Correct.\n\n"
    "Conclusion:\nThe Now Step correctly computes the sum. \n"
    "Verification: Is the step correct (Yes/No)? Yes",
)


def postprocess_response(text: str) -> str:
    """Official clean-up of a generation: strip, split on newlines (real and literal), strip lines.

    The official `strip("\\\\n")` also eats leading/trailing `n` characters (a bug); we strip only
    backslashes and literal `\\\\n` sequences, which is what was intended.
    """
    text = text.strip()
    while text.startswith("\\n") or text.endswith("\\n"):
        text = text.removeprefix("\\n").removesuffix("\\n").strip()
    text = text.strip("\\").strip()
    lines: list[str] = []
    for line in text.split("\n"):
        lines.extend(part.strip() for part in line.split("\\n"))
    return "\n".join(lines)


Verdict = Literal["yes", "no", "invalid"]


@dataclass(frozen=True)
class ParsedVerdict:
    """Result of parsing one analysis: the verdict and, when invalid, why."""

    verdict: Verdict
    reason: str | None = None  # no_verdict | several_verdicts | not_at_end

    @property
    def valid(self) -> bool:
        return self.verdict != "invalid"


def parse_verdict(text: str) -> ParsedVerdict:
    """Exactly one verdict string, and the text ends with it after `rstrip('.').strip()`."""
    n_yes, n_no = text.count(VERDICT_YES), text.count(VERDICT_NO)
    if n_yes + n_no == 0:
        return ParsedVerdict("invalid", "no_verdict")
    if n_yes + n_no > 1:
        return ParsedVerdict("invalid", "several_verdicts")
    tail = text.rstrip(".").strip()
    if n_yes == 1 and tail.endswith(VERDICT_YES):
        return ParsedVerdict("yes")
    if n_no == 1 and tail.endswith(VERDICT_NO):
        return ParsedVerdict("no")
    return ParsedVerdict("invalid", "not_at_end")


def verdict_for_label(label: bool) -> Verdict:
    """The verdict that agrees with a human label (True = step correct)."""
    return "yes" if label else "no"


def agrees(text: str, label: bool) -> bool:
    """Official agreement: valid, target verdict exactly once, and the text ends with it."""
    return parse_verdict(text).verdict == verdict_for_label(label)


def cut_at_verdict(text: str) -> tuple[str, bool]:
    """Cut an analysis after the FIRST verdict phrase (kept); else append the fallback question.

    Returns (prefix to teacher-force, whether the phrase was found).
    """
    pos = text.find(VERDICT_PHRASE)
    if pos >= 0:
        return text[: pos + len(VERDICT_PHRASE)], True
    return text + FALLBACK_SUFFIX, False
