"""The offline teacher's calculation checker: finds the arithmetic claims of a step and checks them.

It never reads the label. `find_claims` finds the arithmetic claims of a step (``a op b = c``,
chains ``a + b = c = d``, common LaTeX normalised by `normalize_math`) and evaluates both sides
with a small safe parser (`evaluate_expression`: numbers, ``+ - * / ^``, parentheses, ``!`` on
small integers; never ``eval``). `check_step` checks the Now Step and the Previous Steps and
traces the Now Step's numbers to the question and earlier steps (`StepCheck`), which the offline
teacher (`teachers.OfflineTeacher`) turns into an analysis.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from components.records import StepSample

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
        return clip_text(re.sub(r"\s+", " ", f"{self.lhs} {sign} {self.rhs}"), 36)


def clip_text(text: str, n: int) -> str:
    """`text`, cut to at most `n` characters with "..." when longer."""
    return text if len(text) <= n else text[: n - 3].rstrip() + "..."


def format_number(x: Fraction) -> str:
    """A value as an analysis writes it: the integer itself, else 6 significant digits."""
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
# Checking a step
# --------------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<![0-9.])[0-9]+(?:\.[0-9]+)?")


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
        return 0.45, f"it brings in {clip_text(', '.join(new[:2]), 16)} without a source"
    return 0.6, "nothing in it looks wrong"


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


# Fixed sentences of the data-source line (single tokens of the tiny tokenizer; see teachers).
# The line names each number and its source first and judges last, so a model that learns it
# decides each number's source right after copying that number, not all at once beforehand.
DATA_USES = "The numbers it uses:"
FROM_QUESTION = "from the question"
FROM_STEP = "from Step"
FROM_NOWHERE = "from nowhere"
DATA_SOURCED = "Each of them has a source."
DATA_UNSOURCED = "has no source in the question or the Previous Steps."
DATA_NONE = "It uses no number."
MAX_TRACED_SHOWN = 3


def number_sources(numbers: Sequence[str], sample: StepSample) -> dict[str, str]:
    """Where each number comes from: the question if it holds it, else the latest Previous Step, else nowhere."""
    question = set(_NUMBER.findall(normalize_math(sample.question)))
    steps = [set(_NUMBER.findall(normalize_math(p))) for p in sample.previous_steps]
    out = {}
    for x in numbers:
        j = next((j for j in range(len(steps), 0, -1) if x in steps[j - 1]), None)
        out[x] = FROM_QUESTION if x in question else f"{FROM_STEP} {j}" if j else FROM_NOWHERE
    return out


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
    shown = traced[:MAX_TRACED_SHOWN]
    if unsourced and unsourced[0] not in shown:
        shown = [*traced[: MAX_TRACED_SHOWN - 1], unsourced[0]]
    if not traced:
        data = DATA_NONE
    else:
        sources = number_sources(shown, sample)
        listed = ", ".join(f"{x} {sources[x]}" for x in shown)
        data = f"{DATA_USES} {listed}. " + (f"{unsourced[0]} {DATA_UNSOURCED}" if unsourced else DATA_SOURCED)
    return StepCheck(
        claims=claims,
        previous_claims=len(previous),
        previous_wrong=sum(not c.holds for c in previous),
        data_source=data,
        unsourced=unsourced,
        repeats=any(sample.now_step.strip() == p.strip() for p in sample.previous_steps),
        prior=_heuristic_p_correct(sample),
    )
