"""A learnable default domain: seeded multi-step arithmetic word problems with labelled steps.

The real benchmarks are out of reach of a tiny model trained from scratch on a 2-core machine;
this domain is where the same pipeline, unchanged, can be seen to work. Everything is generated
from `domain.arithmetic` params and a seed, deterministically, in the record formats the
pipeline already reads:

- training problems as PRM800K solutions (:class:`PRM800KSolution`): at every step the correct
  step (rating +1, chosen) and, with probability `negative_rate`, one erroneous alternative
  (rating -1), so flattening yields balanced labelled step samples;
- a held-out ProcessBench-format benchmark (:class:`ProcessBenchItem`, subset `arithmetic`):
  first-error labels, all-correct solutions as well as erroneous ones, problems disjoint from
  training;
- a Best-of-N pool (:class:`CandidatePool`): `bon_candidates` solutions per problem sampled from
  :class:`ArithmeticPolicy` with a reference answer.

A problem is a start quantity and a chain of `steps` operations (`+`, `-`, `*`) on small
integers, told as a story; its solution has one step per operation (``x op b = y``) and a final
step ``The answer is \\boxed{y}.`` Errors come in four kinds:

- `wrong_result`: ``x op b = y'`` with y' != y (the offline teacher recomputes it);
- `wrong_copy`: an operand copied wrongly (a number that appears nowhere before: the teacher's
  data-source check finds it);
- `no_source`: an extra term with no source in the question or the previous steps (likewise);
- `wrong_operation`: the arithmetic is right but the operation is not the one the question asks
  for. The offline teacher cannot see this one, so its agreement with the labels is not 100%.

After an error a solution goes on consistently from the wrong value, as real solutions do, so
its final answer is wrong.

:class:`ArithmeticPolicy` is a *simulated* policy behind the generation-backend interface: given
a problem and the steps so far it proposes the next step, erroneous with probability
`policy_error_rate` (kinds weighted as above; half of its mistakes are a habitual one per problem
and point, so wrong answers repeat across samples and can win a majority vote). It stands in for a policy model in Best-of-N and
guided search on this domain; it is never a verifier.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from components.backends.base import BackendError, Conversation, Generation, row_seed
from components.config import ArithmeticDomainParams, SamplingParams
from components.records import (
    Candidate,
    CandidatePool,
    PRM800KCompletion,
    PRM800KSolution,
    PRM800KStep,
    ProcessBenchItem,
    assistant_prefix,
    split_steps,
)

SUBSET = "arithmetic"
ERROR_KINDS = ("wrong_result", "wrong_copy", "no_source", "wrong_operation")
OPS = ("+", "-", "*")
POLICY_NAME = "arithmetic-policy"
SYSTEMATIC_SHARE = 0.5  # share of the simulated policy's mistakes that are its habitual one

_NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena",
          "Milo", "Nia", "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vik", "Wren", "Yara", "Zed")
_ITEMS = ("apples", "marbles", "stickers", "coins", "books", "shells", "cards", "pens", "stamps",
          "beads", "cookies", "plums", "bottles", "candles", "buttons", "ribbons")
# Story phrase and step phrase of each operation ({b} is the operand, {item} the thing counted).
_STORY = {
    "+": ("Then {who} gets {b} more {item}.", "Then {who} finds {b} more {item}.", "Then {who} buys {b} more {item}."),
    "-": ("Then {who} gives away {b} {item}.", "Then {who} loses {b} {item}.", "Then {who} sells {b} {item}."),
    "*": ("Then the number of {item} becomes {b} times as large.", "Then {who} ends up with {b} times as many {item}."),
}
_STEP = {
    "+": "Adding the {b} new {item}: {expr} = {y}.",
    "-": "Taking away {b} {item}: {expr} = {y}.",
    "*": "Making it {b} times as many: {expr} = {y}.",
}
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Problem:
    """A start quantity and a chain of operations, with its story."""

    id: str
    name: str
    item: str
    start: int
    ops: tuple[tuple[str, int], ...]
    question: str

    @property
    def answer(self) -> int:
        """The correct final quantity."""
        value = self.start
        for op, b in self.ops:
            value = apply(op, value, b)
        return value


@dataclass(frozen=True)
class Step:
    """One solution step, its correctness and (if wrong) its error kind; `value` is carried on."""

    text: str
    correct: bool
    value: int
    kind: str | None = None


def apply(op: str, x: int, b: int) -> int:
    """x op b."""
    return x + b if op == "+" else x - b if op == "-" else x * b


def make_problem(rng: random.Random, pid: str, params: ArithmeticDomainParams) -> Problem:
    """A random problem whose every intermediate value stays within [1, params.max_value]."""
    while True:
        start = rng.randint(2, params.max_operand)
        value, ops = start, []
        for _ in range(params.steps):
            choices = []
            for op in OPS:
                hi = params.max_multiplier if op == "*" else params.max_operand
                for b in range(2, hi + 1):
                    if 1 <= apply(op, value, b) <= params.max_value and apply(op, value, b) != value:
                        choices.append((op, b))
            if not choices:
                break
            op = rng.choice([o for o in OPS if any(c[0] == o for c in choices)])
            b = rng.choice([c[1] for c in choices if c[0] == op])
            ops.append((op, b))
            value = apply(op, value, b)
        if len(ops) == params.steps:
            break
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    story = [f"{name} has {start} {item}."]
    for op, b in ops:
        story.append(rng.choice(_STORY[op]).format(who=name, b=b, item=item))
    story.append(f"How many {item} does {name} have now?")
    return Problem(id=pid, name=name, item=item, start=start, ops=tuple(ops), question=" ".join(story))


def _numbers(texts: Sequence[str]) -> set[int]:
    return {int(m) for t in texts for m in _NUMBER.findall(t)}


def _step_text(problem: Problem, op: str, b: int, expr: str, y: int) -> str:
    return _STEP[op].format(b=b, item=problem.item, expr=expr, y=y)


def correct_step(problem: Problem, index: int, value: int) -> Step:
    """Step `index` done right from the carried value (the final step states the answer)."""
    if index == len(problem.ops):
        return Step(f"The answer is \\boxed{{{value}}}.", True, value)
    op, b = problem.ops[index]
    y = apply(op, value, b)
    return Step(_step_text(problem, op, b, f"{value} {op} {b}", y), True, y)


def _unseen(rng: random.Random, near: int, seen: set[int], lo: int = 1) -> int:
    """A number close to `near` that appears nowhere in `seen`."""
    for spread in (3, 6, 12, 40):
        options = [v for v in range(max(lo, near - spread), near + spread + 1) if v != near and v not in seen]
        if options:
            return rng.choice(options)
    raise AssertionError("unreachable: a spread of 40 always leaves a number unseen")


def wrong_step(problem: Problem, index: int, value: int, kind: str, rng: random.Random,
               context: Sequence[str]) -> Step:
    """Step `index` done wrong in the way `kind` names (the carried value is the step's claim)."""
    seen = _numbers([problem.question, *context])
    if index == len(problem.ops):  # the final step: only a miscopied answer makes sense here
        y = _unseen(rng, value, seen | {value})
        return Step(f"The answer is \\boxed{{{y}}}.", False, y, "wrong_copy")
    op, b = problem.ops[index]
    y = apply(op, value, b)
    if kind == "wrong_result":
        bad = _unseen(rng, y, {y}, lo=0)
        return Step(_step_text(problem, op, b, f"{value} {op} {b}", bad), False, bad, kind)
    if kind == "wrong_copy":
        if rng.random() < 0.5 and index > 0:  # the carried value miscopied
            x = _unseen(rng, value, seen | {value}, lo=max(1, b) if op == "-" else 1)
            return Step(_step_text(problem, op, b, f"{x} {op} {b}", apply(op, x, b)), False, apply(op, x, b), kind)
        b2 = _unseen(rng, b, seen | {b}, lo=2)
        if op == "-" and b2 > value:  # keep it a plausible miscopy: no negative quantities
            return wrong_step(problem, index, value, "wrong_result", rng, context)
        return Step(_step_text(problem, op, b, f"{value} {op} {b2}", apply(op, value, b2)), False,
                    apply(op, value, b2), kind)
    if kind == "no_source":
        c = _unseen(rng, rng.randint(2, 9), seen, lo=2)
        y2 = apply(op, value, b) + c
        return Step(_step_text(problem, op, b, f"{value} {op} {b} + {c}", y2), False, y2, kind)
    if kind == "wrong_operation":
        others = [o for o in OPS if o != op and apply(o, value, b) >= 0 and apply(o, value, b) != y]
        if not others:  # a carried wrong value can leave no other operation with a quantity >= 0
            return wrong_step(problem, index, value, "wrong_result", rng, context)
        o = rng.choice(others)
        y2 = apply(o, value, b)
        return Step(_step_text(problem, op, b, f"{value} {o} {b}", y2), False, y2, kind)
    raise ValueError(f"unknown error kind {kind!r} (one of {ERROR_KINDS})")


def pick_kind(rng: random.Random, params: ArithmeticDomainParams) -> str:
    """An error kind drawn with the `error_mix` weights."""
    weights = [getattr(params.error_mix, k) for k in ERROR_KINDS]
    return rng.choices(ERROR_KINDS, weights=weights)[0]


def problems(params: ArithmeticDomainParams, split: str, count: int, avoid: set[str] | None = None) -> list[Problem]:
    """`count` distinct problems of a split (seeded by split name); none whose question is in `avoid`."""
    rng = random.Random(f"{params.seed}:{split}")
    out: list[Problem] = []
    seen = set(avoid or ())
    while len(out) < count:
        p = make_problem(rng, f"{SUBSET}-{split}-{len(out)}", params)
        if p.question in seen:
            continue
        seen.add(p.question)
        out.append(p)
    return out


def rollout(problem: Problem, rng: random.Random, params: ArithmeticDomainParams, error_rate: float,
            first_error: int | None = None) -> list[Step]:
    """A whole solution: each step wrong with `error_rate` (or exactly at `first_error`, -1 = none)."""
    steps: list[Step] = []
    value = problem.start
    for i in range(len(problem.ops) + 1):
        context = [s.text for s in steps]
        if first_error is None:
            wrong = rng.random() < error_rate
        else:
            wrong = i == first_error
        step = wrong_step(problem, i, value, pick_kind(rng, params), rng, context) if wrong else correct_step(problem, i, value)
        steps.append(step)
        value = step.value
    return steps


def problem_splits(params: ArithmeticDomainParams) -> dict[str, list[Problem]]:
    """The training, held-out and Best-of-N problems: seeded per split and pairwise disjoint."""
    train = problems(params, "train", params.train_problems)
    seen = {p.question for p in train}
    heldout = problems(params, "heldout", params.heldout_problems, seen)
    bon = problems(params, "bon", params.bon_problems, seen | {p.question for p in heldout})
    return {"train": train, "heldout": heldout, "bon": bon}


def training_solutions(params: ArithmeticDomainParams, train: Sequence[Problem]) -> list[PRM800KSolution]:
    """PRM800K-format training problems: the correct step chosen, an erroneous alternative rated -1."""
    rng = random.Random(f"{params.seed}:train-labels")
    out = []
    for p in train:
        value, steps, texts = p.start, [], []
        for i in range(len(p.ops) + 1):
            good = correct_step(p, i, value)
            completions = [PRM800KCompletion(text=good.text, rating=1)]
            if rng.random() < params.negative_rate:
                bad = wrong_step(p, i, value, pick_kind(rng, params), rng, texts)
                completions.insert(rng.randrange(2), PRM800KCompletion(text=bad.text, rating=-1))
            chosen = next(j for j, c in enumerate(completions) if c.rating == 1)
            steps.append(PRM800KStep(completions=completions, chosen_completion=chosen))
            texts.append(good.text)
            value = good.value
        out.append(PRM800KSolution(id=p.id, problem=p.question, steps=steps, source=f"{SUBSET}/train"))
    return out


ANSWER_COPY = "wrong_copy_answer"  # a held-out first error in the final step: the boxed answer miscopied


def heldout_solutions(params: ArithmeticDomainParams,
                      heldout: Sequence[Problem]) -> list[tuple[ProcessBenchItem, str | None]]:
    """ProcessBench-format held-out solutions, each with the kind of its first error (None if all correct).

    `heldout_correct_share` are all correct, the rest have a first error at a uniformly drawn step; a
    first error in the final step has the kind `ANSWER_COPY`, the others one of `ERROR_KINDS`.
    """
    rng = random.Random(f"{params.seed}:heldout-labels")
    out = []
    for p in heldout:
        first = -1 if rng.random() < params.heldout_correct_share else rng.randrange(len(p.ops) + 1)
        steps = rollout(p, rng, params, 0.0, first_error=first)
        # after the first error the solution carries on without further errors (one error each)
        item = ProcessBenchItem(
            id=p.id, generator=POLICY_NAME, problem=p.question, steps=[s.text for s in steps],
            final_answer_correct=first == -1, label=first, subset=SUBSET,
        )
        kind = None if first == -1 else ANSWER_COPY if first == len(p.ops) else steps[first].kind
        out.append((item, kind))
    return out


def heldout_benchmark(params: ArithmeticDomainParams, heldout: Sequence[Problem]) -> list[ProcessBenchItem]:
    """The held-out solutions of :func:`heldout_solutions` without their error kinds."""
    return [item for item, _ in heldout_solutions(params, heldout)]


def bon_pools(params: ArithmeticDomainParams, bon: Sequence[Problem]) -> list[CandidatePool]:
    """Best-of-N problems with `bon_candidates` solutions each, sampled step by step from
    :class:`ArithmeticPolicy` (as guided search samples it), and the reference answer."""
    policy = ArithmeticPolicy(params, bon)
    one = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_new_tokens=64, seed=params.seed)
    out = []
    for p in bon:
        cands = []
        for j in range(params.bon_candidates):
            steps: list[str] = []
            for i in range(len(p.ops) + 1):
                seed = row_seed(params.seed, hash_id(f"{p.id}:{j}:{i}"))
                prefix = assistant_prefix(steps)
                gen = policy.generate([[{"role": "user", "content": p.question}]], one, seeds=[seed],
                                      assistant_prefixes=[prefix])[0][0]
                steps.append(gen.text)
            answer = _NUMBER.findall(steps[-1])
            cands.append(Candidate(steps=steps, correct=bool(answer) and int(answer[-1]) == p.answer))
        out.append(CandidatePool(id=p.id, dataset=SUBSET, problem=p.question, answer=str(p.answer), candidates=cands))
    return out


def hash_id(text: str) -> int:
    """A stable 31-bit hash of a string (Python's hash() is salted per process)."""
    h = 0
    for ch in text.encode("utf-8"):
        h = (h * 131 + ch) % (2**31 - 1)
    return h


def corpus_texts(params: ArithmeticDomainParams, count: int = 200) -> list[str]:
    """Texts of the domain for a tokenizer corpus: questions, steps (right and wrong) and the
    offline teacher's analyses of them, so that the words a verifier writes here tokenize compactly."""
    from components.records import StepSample
    from components.teachers import OfflineTeacher

    rng = random.Random(f"{params.seed}:corpus")
    teacher = OfflineTeacher(delay_s=0.0)
    texts: list[str] = []
    for p in problems(params, "corpus", count):
        texts.append(p.question)
        steps = [s.text for s in rollout(p, rng, params, 0.3)]
        texts.extend(steps)
        for k, now in enumerate(steps):
            sample = StepSample(id=f"{p.id}-{k}", problem_id=p.id, question=p.question, previous_steps=steps[:k],
                                now_step=now, step_index=k, label=None, source="corpus")
            texts.append(teacher.write_analysis(sample, rng, 1.0)[0])
    return texts


# --------------------------------------------------------------------------------------
# The simulated policy (a generation backend that proposes next steps)
# --------------------------------------------------------------------------------------


class ArithmeticPolicy:
    """A simulated policy for the arithmetic domain behind the GenerationBackend interface.

    It reads the problem from the user turn and the steps so far from the assistant prefix
    (blank-line separated), recovers the carried value from the last step's claim, and proposes
    the next step: wrong with probability `policy_error_rate`. Seeded per row like every backend.
    """

    name = POLICY_NAME
    sampler: str | None = None  # its own draw (below)
    forced_in_generation = False

    def __init__(self, params: ArithmeticDomainParams, known: Sequence[Problem]):
        self.params = params
        self.by_question = {p.question: p for p in known}

    def _problem(self, conversation: Conversation) -> Problem:
        question = next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
        problem = self.by_question.get(question)
        if problem is None:
            raise BackendError(f"{self.name}: not a problem of the arithmetic domain: {question[:80]!r}")
        return problem

    def generate(self, conversations: Sequence[Conversation], sampling: SamplingParams, *,
                 seeds: Sequence[int] | None = None, assistant_prefixes: Sequence[str] | None = None,
                 stop: Sequence[str] | None = None, progress: bool = False) -> list[list[Generation]]:
        """`sampling.n` proposed next steps per conversation (one step each: the stop is implied)."""
        out = []
        for i, conv in enumerate(conversations):
            problem = self._problem(conv)
            prefix = assistant_prefixes[i] if assistant_prefixes else ""
            done = split_steps(prefix)
            value = problem.start
            if done:
                claimed = _NUMBER.findall(done[-1])
                value = int(claimed[-1]) if claimed else problem.start
            index = min(len(done), len(problem.ops))
            seed = seeds[i] if seeds is not None else sampling.seed + i
            gens = []
            for j in range(sampling.n):
                rng = random.Random(row_seed(seed, j))
                if rng.random() < self.params.policy_error_rate:
                    # half of the policy's mistakes are its habitual one at this point of the problem,
                    # so wrong answers repeat across samples (as a real policy's do) and can outvote
                    habit = random.Random(f"{problem.id}:{index}:{value}") if rng.random() < SYSTEMATIC_SHARE else rng
                    step = wrong_step(problem, index, value, pick_kind(habit, self.params), habit, done)
                else:
                    step = correct_step(problem, index, value)
                final = index == len(problem.ops)
                gens.append(Generation(text=step.text, num_tokens=len(step.text.split()),
                                       meta={"stop_reason": "eos" if final else "stop"}))
            out.append(gens)
        return out

    def verdict_probability(self, conversations: Sequence[Conversation], prefixes: Sequence[str]) -> list[float | None]:
        """Not a verifier: always refuses."""
        raise BackendError(f"{self.name} is a policy, not a verifier")

    def close(self) -> None:
        """Nothing to free."""
