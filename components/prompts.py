"""The R-PRM prompt, step formatting and verdict parsing (docs/method.md §2 to §4).

Everything here must match the official code byte for byte; tests pin it against docs/method.md
and against the vendored official teacher prompt file (components/resources/). Where we deviate
on purpose it is a parameter or documented in docs/method.md §12, never silent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SYSTEM_PROMPT = "You are a helpful assistant."

VERDICT_PHRASE = "Is the step correct (Yes/No)?"
VERDICT_PREFIX = "Verification: " + VERDICT_PHRASE + " "
VERDICT_YES = VERDICT_PREFIX + "Yes"
VERDICT_NO = VERDICT_PREFIX + "No"
# Appended to an analysis that never reached the verdict (docs/method.md §9.3).
FALLBACK_SUFFIX = "\nBased on your analysis. Is the answer correct (Yes/No)?"
# Reward tokens: first id of these strings (leading space!).
YES_TOKEN_TEXT = " Yes"
NO_TOKEN_TEXT = " No"

FIRST_STEP_SENTENCE = "Since the Now Step is the first step, there are no Previous Steps."

# Instruction block shared by the student prompt and the teacher system prompt (docs/method.md).
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

# The R-PRM template (official GenPRM-evaluate-new-for-train3.txt); three positional slots.
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

# Teacher system prompt (extra blank line before `Conclusion: `) and user template; tests pin
# both to the vendored official teacher prompt file.
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
    """Fill the R-PRM template (the user turn of the student)."""
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
    prompt: TeacherPrompt | None = None,
) -> list[dict[str, str]]:
    """One-shot teacher chat as the official code renders it (docs/method.md §2.2).

    `[system, user(example question), assistant(example answer), ..., user(filled template)]`:
    the examples are sent verbatim; in the filled template `left-brackets` / `right-brackets`
    become `{` / `}`. The label is never part of it. `prompt` defaults to the official file.
    """
    prompt = prompt if prompt is not None else OFFICIAL_TEACHER_PROMPT
    messages = [{"role": "system", "content": prompt.system}]
    for ex_q, ex_a in prompt.examples:
        messages.append({"role": "user", "content": ex_q})
        messages.append({"role": "assistant", "content": ex_a})
    user = prompt.template.format(
        question, format_previous_steps(previous_steps), format_now_step(now_step, len(previous_steps))
    )
    messages.append({"role": "user", "content": _escape_braces(user)})
    return messages


# The official one-shot teacher prompt file, vendored unchanged (components/resources/README.md).
TEACHER_PROMPT_FILE = Path(__file__).resolve().parent / "resources" / "teacher_one_shot_official.json"


@dataclass(frozen=True)
class TeacherPrompt:
    """A one-shot teacher prompt file: system prompt, (question, answer) examples, user template."""

    system: str
    examples: tuple[tuple[str, str], ...]
    template: str


def load_teacher_prompt(path: str | Path = TEACHER_PROMPT_FILE) -> TeacherPrompt:
    """Read and check a teacher prompt file in the official format (`system-prompt`, `examples`, `template`)."""
    from components.io import DataError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, None, None, "teacher prompt file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(path, getattr(err, "lineno", None), None, f"not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise DataError(path, None, None, f"expected a JSON object, got {type(data).__name__}")
    for key in ("system-prompt", "template"):
        if not isinstance(data.get(key), str):
            raise DataError(path, None, key, "missing or not a string")
    if data["template"].count("{}") != 3:
        raise DataError(path, None, "template", "needs exactly three `{}` slots (question, previous steps, now step)")
    examples = data.get("examples")
    if not isinstance(examples, list) or not examples:
        raise DataError(path, None, "examples", "needs a non-empty list of {question, answer}")
    pairs = []
    for i, ex in enumerate(examples):
        for key in ("question", "answer"):
            if not isinstance(ex, dict) or not isinstance(ex.get(key), str):
                raise DataError(path, None, f"examples[{i}].{key}", "missing or not a string")
        pairs.append((ex["question"], ex["answer"]))
    return TeacherPrompt(data["system-prompt"], tuple(pairs), data["template"])


OFFICIAL_TEACHER_PROMPT = load_teacher_prompt()
# The official one-shot example (question, answer), sent verbatim: its previous steps are joined
# by a literal backslash-n, as in the official file.
ONE_SHOT_EXAMPLE: tuple[str, str] = OFFICIAL_TEACHER_PROMPT.examples[0]


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
