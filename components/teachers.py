"""Teachers for seed-data synthesis (docs/method.md §2.2, §6).

Two kinds, chosen by `teacher.kind`:

- :class:`BackendTeacher`: any generation backend (`hf`, `vllm`, `openai`) holding a teacher
  model, fed the official one-shot teacher chat (:func:`prompts.teacher_messages`). The
  human label is never part of the prompt.
- :class:`OfflineTeacher`: a genuine, if weak, verifier for the default profile. It never reads
  the label. It finds the arithmetic claims of the Now Step (``a op b = c``, chains
  ``a + b = c = d``, common LaTeX), evaluates them with a small safe parser (numbers, ``+ - * /
  ^``, parentheses, ``!`` on small integers; never ``eval``), and writes a short analysis in the
  R-PRM section structure ending with the verdict line. When it finds no checkable claim it
  says so and decides by an openly weak heuristic, sampled with a seeded random stream per
  analysis, so its K samples can differ and the agreement filter does real work.

`RPRM_OFFLINE_TEACHER_DELAY_S` (environment, tests only): seconds the offline teacher sleeps
per analysis, to widen the window in which the kill-and-resume test kills the stage.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Protocol

from components.backends.base import Generation, GenerationBackend, row_seed
from components.config import ParamsError, SamplingParams, TeacherParams
from components.prompts import VERDICT_NO, VERDICT_YES, teacher_messages
from components.records import StepSample

DELAY_ENV = "RPRM_OFFLINE_TEACHER_DELAY_S"


class Teacher(Protocol):
    """What the synthesis stage needs from a teacher."""

    name: str  # recorded as Critique.generator

    def analyze_iter(
        self, samples: Sequence[StepSample], sampling: SamplingParams, seeds: Sequence[int]
    ) -> Iterator[tuple[int, list[Generation]]]:
        """Yield (i, `sampling.n` analyses of sample i) as they finish, in any order; seeded per row."""
        ...

    def analyze(
        self, samples: Sequence[StepSample], sampling: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Generation]]:
        """`sampling.n` analyses per sample; analysis j of sample i uses row_seed(seeds[i], j)."""
        ...

    def close(self) -> None:
        """Free resources."""
        ...


# --------------------------------------------------------------------------------------
# Safe arithmetic: a recursive-descent parser over numbers, + - * / ^ ! and parentheses
# --------------------------------------------------------------------------------------


class ExpressionError(ValueError):
    """The text is not a small arithmetic expression this parser accepts (never evaluated)."""


MAX_EXPRESSION_CHARS = 256
MAX_DEPTH = 32
MAX_EXPONENT = 64
MAX_RESULT_BITS = 4096
MAX_FACTORIAL = 50

_TOKEN = re.compile(r"\s*(?:(?P<num>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)|(?P<op>[-+*/^()!]))")


def _tokenize(text: str) -> list[str]:
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            raise ExpressionError(f"unexpected character {text[pos:].lstrip()[:1]!r}")
        tokens.append(m.group("num") or m.group("op"))
        pos = m.end()
    if not tokens:
        raise ExpressionError("empty expression")
    return tokens


def _bits(x: Fraction) -> int:
    return x.numerator.bit_length() + x.denominator.bit_length()


def _int_root(n: int, q: int) -> int:
    lo, hi = 0, 1 << (n.bit_length() // q + 1)
    while lo < hi:  # largest r with r**q <= n
        mid = (lo + hi + 1) // 2
        if mid**q <= n:
            lo = mid
        else:
            hi = mid - 1
    if lo**q != n:
        raise ExpressionError("root is not exact")
    return lo


def _exact_root(x: Fraction, q: int) -> Fraction:
    """The exact q-th root of a non-negative rational, or ExpressionError (irrational)."""
    if q > 16 or x < 0:
        raise ExpressionError("unsupported root")
    return Fraction(_int_root(x.numerator, q), _int_root(x.denominator, q))


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary | implicit '(')*;
    unary := ('+'|'-') unary | power; power := postfix ('^' unary)?; postfix := atom '!'*;
    atom := NUMBER | '(' expr ')'."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.i = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ExpressionError("expression ends early")
        self.i += 1
        return tok

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExpressionError(f"nested deeper than {MAX_DEPTH}")

    def parse(self) -> Fraction:
        value = self.expr()
        if self.peek() is not None:
            raise ExpressionError(f"unexpected {self.peek()!r}")
        return value

    def expr(self) -> Fraction:
        self.enter()
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        self.depth -= 1
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while True:
            tok = self.peek()
            if tok in ("*", "/"):
                self.take()
                rhs = self.unary()
                if tok == "/":
                    if rhs == 0:
                        raise ExpressionError("division by zero")
                    value = value / rhs
                else:
                    value = value * rhs
            elif tok == "(":  # implicit multiplication: 2(3 + 4)
                value = value * self.unary()
            else:
                return value
            if _bits(value) > MAX_RESULT_BITS:
                raise ExpressionError("intermediate result too large")

    def unary(self) -> Fraction:
        tok = self.peek()
        if tok in ("+", "-"):
            self.take()
            self.enter()
            value = self.unary()
            self.depth -= 1
            return -value if tok == "-" else value
        return self.power()

    def power(self) -> Fraction:
        base = self.postfix()
        if self.peek() != "^":
            return base
        self.take()
        self.enter()
        exponent = self.unary()
        self.depth -= 1
        if exponent.denominator != 1:
            base = _exact_root(base, exponent.denominator)
            exponent = Fraction(exponent.numerator)
        e = exponent.numerator
        if abs(e) > MAX_EXPONENT or _bits(base) * max(abs(e), 1) > MAX_RESULT_BITS:
            raise ExpressionError("power too large")
        if base == 0 and e < 0:
            raise ExpressionError("division by zero")
        return base**e

    def postfix(self) -> Fraction:
        value = self.atom()
        while self.peek() == "!":
            self.take()
            if value.denominator != 1 or not 0 <= value.numerator <= MAX_FACTORIAL:
                raise ExpressionError("factorial of a non-integer or too large a number")
            out = 1
            for k in range(2, value.numerator + 1):
                out *= k
            value = Fraction(out)
        return value

    def atom(self) -> Fraction:
        tok = self.take()
        if tok == "(":
            value = self.expr()
            if self.take() != ")":
                raise ExpressionError("missing ')'")
            return value
        if tok[0].isdigit() or tok[0] == ".":
            return Fraction(tok)
        raise ExpressionError(f"unexpected {tok!r}")


def evaluate_expression(text: str) -> Fraction:
    """Exact value of a small arithmetic expression; ExpressionError for anything else.

    Accepts decimal numbers, `+ - * / ^`, postfix `!` (integers up to 50), parentheses and
    implicit multiplication before `(`. Names, attributes, calls, huge powers, deep nesting
    and long inputs are rejected before any work is done; nothing is ever `eval`-ed.
    """
    return _Parser(_tokenize(text)).parse()


# --------------------------------------------------------------------------------------
# Finding arithmetic claims in a step
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One checked equality `lhs = rhs` (or `lhs ≈ rhs`) found in a step."""

    lhs: str
    rhs: str
    lhs_value: Fraction
    rhs_value: Fraction
    approx: bool
    holds: bool

    def describe(self) -> str:
        """Short text of the claim, as written (normalised)."""
        sign = "≈" if self.approx else "="
        return _clip(re.sub(r"\s+", " ", f"{self.lhs} {sign} {self.rhs}"), 36)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3].rstrip() + "..."


def _fmt(x: Fraction) -> str:
    if x.denominator == 1 and abs(x.numerator) < 10**12:
        return str(x.numerator)
    try:
        return f"{float(x):.6g}"
    except OverflowError:
        return "a huge number"


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the `{...}` group opening at `start` (balanced), and the index after it."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for i in range(start, min(len(text), start + 400)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def _replace_commands(text: str, names: tuple[str, ...], nargs: int, render) -> str:
    """Rewrite `\\name{a}{b}` groups with `render(args)` (None keeps the original text)."""
    pattern = re.compile(r"\\(" + "|".join(names) + r")(?![A-Za-z])\s*")
    for _ in range(50):
        changed = False
        out, pos = [], 0
        for m in pattern.finditer(text):
            if m.start() < pos:
                continue
            args, end = [], m.end()
            for _k in range(nargs):
                group = _braced(text, end)
                if group is None:
                    break
                args.append(group[0])
                end = group[1]
            if len(args) != nargs or any("\\" + n in a for a in args for n in names):
                continue  # innermost first; outer groups are rewritten on a later pass
            replacement = render(args)
            if replacement is None:
                continue
            out.append(text[pos : m.start()])
            out.append(replacement)
            pos = end
            changed = True
        out.append(text[pos:])
        text = "".join(out)
        if not changed:
            return text
    return text


def _render_binom(args: list[str]) -> str | None:
    try:
        n, k = (evaluate_expression(_normalize_inline(a)) for a in args)
    except ExpressionError:
        return None
    if n.denominator != 1 or k.denominator != 1 or not 0 <= k.numerator <= n.numerator <= MAX_FACTORIAL:
        return None
    n_, k_ = n.numerator, k.numerator
    return f"({n_}!/({k_}!*{n_ - k_}!))"


def _render_sqrt(args: list[str]) -> str | None:
    return f"(({_normalize_inline(args[0])})^(1/2))"


def _group(text: str) -> str:
    text = text.strip()
    return text if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", text) else f"({text})"


def _normalize_inline(text: str) -> str:
    text = text.replace("{", "(").replace("}", ")")
    text = re.sub(r"\\(times|cdot|ast)(?![A-Za-z])", " * ", text)
    text = re.sub(r"\\div(?![A-Za-z])", " / ", text)
    return text


_SIMPLE_REPLACEMENTS = [
    (re.compile(r"\\(?:cdots|ldots|dots)(?![A-Za-z])"), " … "),
    (re.compile(r"\\(?:displaystyle|left|right|big|Big|bigg|Bigg)(?![A-Za-z])"), ""),
    (re.compile(r"\\[,;:!]|\\ |\\quad(?![A-Za-z])|\\qquad(?![A-Za-z])"), " "),
    (re.compile(r"\\(?:times|cdot|ast)(?![A-Za-z])|[×·∙]"), " * "),
    (re.compile(r"\\div(?![A-Za-z])|÷"), " / "),
    (re.compile(r"\\approx(?![A-Za-z])|≈"), " ≈ "),
    (re.compile(r"−"), "-"),
    (re.compile(r"\\\$|\$|\\\(|\\\)|\\\[|\\\]"), " "),
]
_PERCENT = re.compile(r"(?<![0-9.])([0-9]+(?:\.[0-9]+)?)\s*\\?%")
_THOUSANDS = re.compile(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))")


def normalize_math(text: str) -> str:
    """Rewrite common LaTeX and typography into plain arithmetic (`\\frac{a}{b}` -> `(a)/(b)`)."""
    for pattern, repl in _SIMPLE_REPLACEMENTS:
        text = pattern.sub(repl, text)
    text = _replace_commands(text, ("dfrac", "tfrac", "frac"), 2, lambda a: f"({_group(a[0])}/{_group(a[1])})")
    text = _replace_commands(text, ("binom",), 2, _render_binom)
    text = _replace_commands(text, ("sqrt",), 1, _render_sqrt)
    text = text.replace("{", "(").replace("}", ")")
    text = _PERCENT.sub(r"(\1/100)", text)
    while _THOUSANDS.search(text):
        text = _THOUSANDS.sub("", text)
    return text


_RUN = re.compile(r"[0-9.()+\-*/^!=≈ ]+")
_OPERATORS = set("+-*/^")
_WORDISH = re.compile(r"[A-Za-z0-9_\\'\"|\]\[]")


def _balance_parens(part: str) -> str:
    part = part.strip()
    while part.endswith(")") and part.count(")") > part.count("("):
        part = part[:-1].rstrip()
    while part.startswith("(") and part.count("(") > part.count(")"):
        part = part[1:].lstrip()
    return part


def _decimals(part: str) -> int | None:
    m = re.fullmatch(r"-?[0-9]*\.([0-9]+)", part.strip())
    return len(m.group(1)) if m else None


def _holds(lhs: Fraction, rhs: Fraction, lhs_text: str, rhs_text: str, approx: bool) -> bool:
    if lhs == rhs:
        return True
    tol = Fraction(0)
    for text in (lhs_text, rhs_text):
        d = _decimals(text)
        if d:
            tol = max(tol, Fraction(1, 10**d))  # a shown decimal is rounded or truncated
    if approx:
        tol = max(tol, abs(rhs) / 100, Fraction(1, 100))
    return abs(lhs - rhs) <= tol


def find_claims(text: str) -> list[Claim]:
    """Every arithmetic equality in `text` whose sides are all numeric expressions, checked.

    A side touching a letter (`2x + 3 = 7`, `a_5 = 7!`) belongs to algebra, not arithmetic,
    and is dropped; what remains of a chain (`f(3) = 9 + 3 = 12` -> `9 + 3 = 12`) is checked.
    """
    norm = normalize_math(text)
    claims: list[Claim] = []
    for m in _RUN.finditer(norm):
        raw = m.group(0)
        if "=" not in raw and "≈" not in raw:
            continue
        before = norm[m.start() - 1] if m.start() > 0 else ""
        after = norm[m.end()] if m.end() < len(norm) else ""
        pieces = re.split(r"([=≈])", raw)
        parts, seps = pieces[0::2], pieces[1::2]
        stripped = raw.strip()
        # `x - 3 = 7`, `2x + 1 = 5`, `a_5 = 7`: the first side continues an algebraic term.
        left_dirty = bool(before) and bool(_WORDISH.match(before)) and (
            not raw.startswith(" ") or stripped[:1] in _OPERATORS | {"=", "≈", "!", ")"}
        )
        left_dirty = left_dirty or stripped[:1] in {"+", "*", "/", "^", "!", "=", "≈", ")"}
        right_dirty = bool(after) and bool(_WORDISH.match(after)) and not raw.endswith(" ")
        right_dirty = right_dirty or after in {"(", "["} or stripped.rstrip(".")[-1:] in _OPERATORS | {"("}
        cleaned = [_balance_parens(p).rstrip(".").rstrip() for p in parts]
        keep = list(range(len(cleaned)))
        if left_dirty:
            keep = keep[1:]
        if right_dirty and keep and keep[-1] == len(cleaned) - 1:
            keep = keep[:-1]
        values: dict[int, list[tuple[str, Fraction]]] = {}
        for i in keep:
            part = cleaned[i]
            if not re.search(r"[0-9]", part):
                continue
            options = [part]
            if i == len(cleaned) - 1 and part.endswith("!"):
                options.append(part[:-1].rstrip())  # a final "!" may be an exclamation mark
            vals = []
            for opt in options:
                try:
                    vals.append((opt, evaluate_expression(opt)))
                except ExpressionError:
                    continue
            if vals:
                values[i] = vals
        for i, j in zip(keep, keep[1:], strict=False):
            if i not in values or j not in values or j != i + 1:
                continue
            if not any(_OPERATORS & set(p.lstrip("-")) or "!" in p for p in (cleaned[i], cleaned[j])):
                continue  # `3 = 3`: nothing computed
            approx = seps[i] == "≈"
            (ltext, lval) = values[i][0]
            best = None
            for rtext, rval in values[j]:
                ok = _holds(lval, rval, ltext, rtext, approx)
                if best is None or ok:
                    best = Claim(ltext, rtext, lval, rval, approx, ok)
                if ok:
                    break
            if best is not None:
                claims.append(best)
    return claims


# --------------------------------------------------------------------------------------
# The offline teacher
# --------------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<![0-9.])[0-9]+(?:\.[0-9]+)?")


def _pick(rng: random.Random, options: Sequence[str]) -> str:
    return options[rng.randrange(len(options))]


def _unexplained_numbers(sample: StepSample) -> list[str]:
    """Numbers in the Now Step that neither the question nor the Previous Steps contain."""
    context = set(_NUMBER.findall(normalize_math(" ".join([sample.question, *sample.previous_steps]))))
    return [x for x in dict.fromkeys(_NUMBER.findall(normalize_math(sample.now_step))) if x not in context]


def _heuristic_p_correct(sample: StepSample) -> tuple[float, str]:
    """Openly weak prior that a step without checkable arithmetic is correct, and why."""
    if not sample.previous_steps:
        return 0.85, "a first step usually restates the question"
    new = _unexplained_numbers(sample)
    if new:
        return 0.45, f"it brings in {_clip(', '.join(new[:2]), 16)} without a source"
    return 0.6, "nothing in it looks wrong"


def _tempered(p: float, temperature: float) -> float:
    if temperature <= 0:
        return 1.0 if p >= 0.5 else 0.0
    a, b = p ** (1.0 / temperature), (1.0 - p) ** (1.0 / temperature)
    return a / (a + b)


@dataclass(frozen=True)
class StepCheck:
    """What the offline teacher finds in a step, before any wording is sampled."""

    claims: tuple[Claim, ...]
    previous_claims: int
    previous_wrong: int
    data_source: str
    unsourced: tuple[str, ...]  # operands of the claims that appear nowhere before the Now Step
    repeats: bool
    prior: tuple[float, str]  # weak prior P(correct) and why, used when no claim is checkable


@lru_cache(maxsize=8192)
def _claims_of(text: str) -> tuple[Claim, ...]:
    return tuple(find_claims(text))


def check_step(sample: StepSample) -> StepCheck:
    """Check the arithmetic of the Now Step and the Previous Steps, and trace its numbers.

    The numbers traced are the operands of its calculations (the left-hand sides), or, in a step
    without a calculation, every number it states: each must appear in the question or a
    Previous Step. A result computed here is not traced.
    """
    claims = _claims_of(sample.now_step)
    previous = [c for p in sample.previous_steps for c in _claims_of(p)]
    known = set(_NUMBER.findall(normalize_math(" ".join([sample.question, *sample.previous_steps]))))
    if claims:
        traced = list(dict.fromkeys(x for c in claims for x in _NUMBER.findall(c.lhs)))
    else:
        traced = list(dict.fromkeys(_NUMBER.findall(normalize_math(sample.now_step))))
    unsourced = tuple(x for x in traced if x not in known)
    if not traced:
        data = "It uses no number."
    elif not unsourced:
        data = f"Every number it uses comes from the question or the Previous Steps: {', '.join(traced[:3])}."
    else:
        data = f"A number it uses, {unsourced[0]}, appears nowhere in the question or the Previous Steps."
    return StepCheck(
        claims=claims,
        previous_claims=len(previous),
        previous_wrong=sum(not c.holds for c in previous),
        data_source=data,
        unsourced=unsourced,
        repeats=any(sample.now_step.strip() == p.strip() for p in sample.previous_steps),
        prior=_heuristic_p_correct(sample),
    )


class OfflineTeacher:
    """Calculation-checking teacher: short R-PRM-structured analyses; never reads the label."""

    name = "offline-calculation-checker"

    def __init__(self, delay_s: float | None = None, trace_sources: bool = True):
        env = os.environ.get(DELAY_ENV)
        self.delay_s = delay_s if delay_s is not None else float(env) if env else 0.0
        self.trace_sources = trace_sources  # a number with no source makes a step wrong

    def analyze(
        self, samples: Sequence[StepSample], sampling: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Generation]]:
        """`sampling.n` analyses per sample; analysis j is drawn from row_seed(seeds[i], j)."""
        return [gens for _, gens in self.analyze_iter(samples, sampling, seeds)]

    def analyze_iter(
        self, samples: Sequence[StepSample], sampling: SamplingParams, seeds: Sequence[int]
    ) -> Iterator[tuple[int, list[Generation]]]:
        """Yield (i, analyses of sample i) in order, one sample at a time."""
        for i, (sample, seed) in enumerate(zip(samples, seeds, strict=True)):
            check = check_step(sample)
            gens = []
            for j in range(sampling.n):
                if self.delay_s:
                    time.sleep(self.delay_s)
                rng = random.Random(row_seed(seed, j))
                text, meta = self.write_analysis(sample, rng, sampling.temperature, check)
                gens.append(Generation(text=text, p_yes=None, num_tokens=len(text.split()), meta=meta))
            yield i, gens

    def write_analysis(
        self, sample: StepSample, rng: random.Random, temperature: float, check: StepCheck | None = None
    ) -> tuple[str, dict]:
        """One analysis of a step (no label involved) and a record of how it was decided."""
        check = check or check_step(sample)
        k = len(sample.previous_steps)
        claims, wrong = check.claims, [c for c in check.claims if not c.holds]
        if k == 0:
            prev = "None; the Now Step is the first step."
        elif check.previous_claims:
            prev = f"Steps 1-{k}: {check.previous_claims} calculation(s) checked, " + (
                f"{check.previous_wrong} wrong." if check.previous_wrong else "all hold."
            )
        else:
            prev = f"Steps 1-{k}: no calculation to check."

        if claims:
            now = _pick(rng, ["It computes a new quantity from earlier ones.", "It carries out a calculation."])
        else:
            now = _pick(rng, ["It states a fact or a plan; nothing to compute.", "It describes the next move; no calculation."])

        data = check.data_source
        consistency = "It repeats a Previous Step." if check.repeats else _pick(
            rng, ["It follows from the Previous Steps.", "It is consistent with the Previous Steps."]
        )

        # Each section leads with its judgement; the numbers that back it follow.
        meta: dict = {"claims": len(claims), "wrong_claims": len(wrong)}
        if wrong:
            c = wrong[0]
            calc = f"The calculation is wrong: {c.lhs.strip()} is {_fmt(c.lhs_value)}, not {_fmt(c.rhs_value)}."
            verdict, conclusion = "No", "The Now Step is wrong: it has a calculation error."
            meta["decided_by"] = "calculation"
        elif check.unsourced and self.trace_sources:
            calc = (f"The calculation itself is correct: {claims[0].describe()}." if claims
                    else "There is no calculation to check.")
            verdict, conclusion = "No", "The Now Step is wrong: it uses a number with no source."
            meta["decided_by"] = "data_source"
        elif claims:
            what = claims[0].describe() if len(claims) == 1 else f"all {len(claims)} calculations hold"
            calc = _pick(rng, ["The calculation is correct: {c}.", "The calculation is right: {c}."]).format(c=what)
            verdict, conclusion = "Yes", "The Now Step is correct."
            meta["decided_by"] = "calculation"
        else:
            p, why = check.prior
            yes = rng.random() < _tempered(p, temperature)
            calc = f"There is no calculation to check. Weak rule: {why}."
            verdict = "Yes" if yes else "No"
            conclusion = "I find no error." if yes else "I doubt the Now Step."
            meta["decided_by"] = "heuristic"
            meta["heuristic_p_correct"] = p

        text = "\n".join([
            "Analysis:",
            f"**Previous Steps Analysis**: {prev}",
            f"**Now Step Analysis**: {now}",
            f"**Data Source Analysis**: {data}",
            f"**Consistency Analysis**: {consistency}",
            f"**Calculation Analysis**: {calc}",
            f"Conclusion: {conclusion}",
            VERDICT_YES if verdict == "Yes" else VERDICT_NO,
        ])
        return text, meta

    def close(self) -> None:
        """Nothing to free."""


# --------------------------------------------------------------------------------------
# LLM teachers
# --------------------------------------------------------------------------------------


def teacher_conversation(sample: StepSample) -> list[dict[str, str]]:
    """The official one-shot teacher chat for a step sample (the label is never used)."""
    return teacher_messages(sample.question, list(sample.previous_steps), sample.now_step)


class BackendTeacher:
    """A teacher model behind any generation backend, prompted with the one-shot teacher chat.

    Backends that stream finished rows (`generate_iter`, e.g. openai) hand each sample over as
    soon as it is done; others are called `chunk_size` samples at a time.
    """

    def __init__(self, backend: GenerationBackend, chunk_size: int = 64):
        self.backend = backend
        self.chunk_size = chunk_size
        self.name = f"teacher:{backend.name}"

    def analyze(
        self, samples: Sequence[StepSample], sampling: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Generation]]:
        """`sampling.n` analyses per sample from the backend, seeded per row."""
        conversations = [teacher_conversation(s) for s in samples]
        return self.backend.generate(conversations, sampling, seeds=list(seeds), progress=False)

    def analyze_iter(
        self, samples: Sequence[StepSample], sampling: SamplingParams, seeds: Sequence[int]
    ) -> Iterator[tuple[int, list[Generation]]]:
        """Yield (i, analyses of sample i) as the backend finishes them."""
        conversations = [teacher_conversation(s) for s in samples]
        seeds = list(seeds)
        stream = getattr(self.backend, "generate_iter", None)
        if stream is not None:
            yield from stream(conversations, sampling, seeds=seeds)
            return
        for start in range(0, len(conversations), self.chunk_size):
            end = start + self.chunk_size
            out = self.backend.generate(conversations[start:end], sampling, seeds=seeds[start:end], progress=False)
            for k, gens in enumerate(out):
                yield start + k, gens

    def close(self) -> None:
        """Close the backend."""
        self.backend.close()


def load_teacher(params: TeacherParams) -> Teacher:
    """Build the teacher named by params: the offline checker or a backend holding a model."""
    if params.kind == "offline":
        return OfflineTeacher(trace_sources=params.offline_trace_sources)
    from components.backends import load_backend

    if params.backend.kind in ("hf", "vllm") and not params.model:
        raise ParamsError(
            f"teacher.model: required when teacher.kind=backend and teacher.backend.kind="
            f"{params.backend.kind} (a model folder or hub id)"
        )
    chunk = {"hf": params.backend.batch_size, "vllm": 1024}.get(params.backend.kind, 64)
    return BackendTeacher(load_backend(params.backend, params.model or "", dtype=params.dtype), chunk_size=chunk)
