"""The generated arithmetic domain: determinism, record formats, labels, disjoint splits, error kinds."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from components import arithmetic
from components.checker import find_claims
from components.config import ArithmeticDomainParams, SamplingParams
from components.prepare import flatten
from components.records import StepSample
from components.teachers import OfflineTeacher


def small(**kw: object) -> ArithmeticDomainParams:
    return ArithmeticDomainParams(train_problems=60, heldout_problems=40, bon_problems=10, **kw)


def _claim_holds(step: str) -> bool:
    return all(c.holds for c in find_claims(step))


def test_generation_is_deterministic_and_splits_are_disjoint() -> None:
    a, b = arithmetic.problem_splits(small()), arithmetic.problem_splits(small())
    assert a == b
    questions = {split: {p.question for p in probs} for split, probs in a.items()}
    assert not questions["train"] & questions["heldout"]
    assert not (questions["train"] | questions["heldout"]) & questions["bon"]
    assert arithmetic.problem_splits(small(seed=1))["train"] != a["train"]


def test_every_intermediate_value_stays_in_range() -> None:
    params = small()
    for p in arithmetic.problem_splits(params)["train"]:
        value = p.start
        for op, b in p.ops:
            value = arithmetic.apply(op, value, b)
            assert 1 <= value <= params.max_value
        assert value == p.answer


def test_training_solutions_flatten_into_labelled_step_samples() -> None:
    params = small(negative_rate=1.0)
    sols = arithmetic.training_solutions(params, arithmetic.problem_splits(params)["train"])
    samples, counts = flatten(sols, "positive")
    assert counts.rated == len(samples)
    # every step: the right step (label True) and a wrong alternative (False), prefix = right steps
    assert Counter(s.label for s in samples) == {True: len(sols) * 4, False: len(sols) * 4}
    for s in samples:
        assert all(_claim_holds(prev) for prev in s.previous_steps)
        if s.label:
            assert _claim_holds(s.now_step)


@pytest.mark.parametrize("kind", arithmetic.ERROR_KINDS)
def test_each_error_kind_is_wrong_in_its_own_way(kind: str) -> None:
    params = small()
    rng = random.Random(0)
    seen_kinds = Counter()
    for p in arithmetic.problem_splits(params)["train"][:30]:
        value = arithmetic.apply(p.ops[0][0], p.start, p.ops[0][1])
        good = arithmetic.correct_step(p, 1, value)
        bad = arithmetic.wrong_step(p, 1, value, kind, rng, [arithmetic.correct_step(p, 0, p.start).text])
        assert not bad.correct and bad.text != good.text
        seen_kinds[bad.kind] += 1
        numbers = set(arithmetic._NUMBER.findall(p.question + " " + str(value)))
        claim = find_claims(bad.text)[0]
        operands = set(arithmetic._NUMBER.findall(claim.lhs))
        if bad.kind == "wrong_result":
            assert not claim.holds and operands <= numbers
        elif bad.kind in ("wrong_copy", "no_source"):
            assert claim.holds and not operands <= numbers  # right arithmetic on a number from nowhere
        else:
            assert claim.holds and operands <= numbers and bad.value != good.value
    assert seen_kinds[kind] > 0


def test_heldout_benchmark_has_correct_and_erroneous_solutions_with_first_error_labels() -> None:
    params = small()
    items = arithmetic.heldout_benchmark(params, arithmetic.problem_splits(params)["heldout"])
    labels = Counter(it.label for it in items)
    assert labels[-1] > 0 and sum(n for label, n in labels.items() if label >= 0) > 0
    for it in items:
        assert it.subset == arithmetic.SUBSET and it.final_answer_correct == (it.label == -1)
        for i, step in enumerate(it.steps[: it.label if it.label >= 0 else None]):
            assert _claim_holds(step), (it.id, i)


def test_heldout_solutions_name_the_kind_of_their_first_error() -> None:
    """Each erroneous held-out solution carries the kind the generator gave its first error; the
    step text agrees with it (a wrong result fails its arithmetic, an extra term has no source)."""
    params = ArithmeticDomainParams(train_problems=60, heldout_problems=120, bon_problems=10)
    solved = arithmetic.heldout_solutions(params, arithmetic.problem_splits(params)["heldout"])
    assert [it for it, _ in solved] == arithmetic.heldout_benchmark(params, arithmetic.problem_splits(params)["heldout"])
    kinds = Counter(kind for _, kind in solved)
    assert kinds[None] == sum(1 for it, _ in solved if it.label == -1)
    assert set(kinds) - {None} <= {*arithmetic.ERROR_KINDS, arithmetic.ANSWER_COPY}
    assert kinds["wrong_result"] and kinds["no_source"] and kinds[arithmetic.ANSWER_COPY]
    for it, kind in solved:
        if kind is None:
            continue
        step = it.steps[it.label]
        assert (kind == arithmetic.ANSWER_COPY) == (it.label == len(it.steps) - 1), it.id
        assert (kind == "wrong_result") == (not _claim_holds(step)), (it.id, kind, step)
        if kind == "no_source":
            assert len(find_claims(step)[0].lhs.split()) == 5, step  # x op b + c


def test_offline_teacher_catches_what_it_can_check_and_misses_wrong_operations() -> None:
    params = small()
    teacher, rng = OfflineTeacher(), random.Random(0)
    verdicts: dict[str, list[bool]] = {k: [] for k in arithmetic.ERROR_KINDS}
    for p in arithmetic.problem_splits(params)["train"]:
        first = arithmetic.correct_step(p, 0, p.start)
        for kind in arithmetic.ERROR_KINDS:
            bad = arithmetic.wrong_step(p, 1, first.value, kind, rng, [first.text])
            sample = StepSample(id=p.id, problem_id=p.id, question=p.question, previous_steps=[first.text],
                                now_step=bad.text, step_index=1, label=False, source="test")
            text, _ = teacher.write_analysis(sample, random.Random(1), 0.0)
            verdicts[bad.kind].append(text.endswith("No"))
    assert all(verdicts["wrong_result"]) and all(verdicts["wrong_copy"]) and all(verdicts["no_source"])
    assert not any(verdicts["wrong_operation"])  # the teacher cannot see this kind: agreement is not 100%


def test_policy_proposes_next_steps_seeded_per_row_and_bon_pool_grades() -> None:
    params = small(policy_error_rate=0.5)
    bon = arithmetic.problem_splits(params)["bon"]
    policy = arithmetic.ArithmeticPolicy(params, bon)
    conv = [{"role": "user", "content": bon[0].question}]
    sampling = SamplingParams(n=6, temperature=1.0, top_p=1.0, max_new_tokens=32, seed=0)
    a = policy.generate([conv], sampling, seeds=[7], assistant_prefixes=[""])
    b = policy.generate([conv, conv], sampling, seeds=[3, 7], assistant_prefixes=["", ""])
    assert [g.text for g in a[0]] == [g.text for g in b[1]]
    assert len({g.text for g in a[0]}) > 1  # right and wrong proposals
    pools = arithmetic.bon_pools(params, bon)
    for pool in pools:
        assert pool.answer == str(next(p for p in bon if p.id == pool.id).answer)
        for cand in pool.candidates:
            assert len(cand.steps) == params.steps + 1 and "\\boxed{" in cand.steps[-1]
    assert 0 < sum(c.correct for p in pools for c in p.candidates) < sum(len(p.candidates) for p in pools)
    with pytest.raises(arithmetic.BackendError, match="not a problem"):
        policy.generate([[{"role": "user", "content": "What is 2 + 2?"}]], sampling)


def test_wrong_operation_with_no_other_operation_left_falls_back_to_a_wrong_result() -> None:
    # After an error a solution carries the wrong value on; a negative one (-1 + 2) leaves no other
    # operation whose quantity stays >= 0 (-1 - 2, -1 * 2): the generator once crashed here
    # (small numbers, `max_value` 30).
    params = small(max_operand=9, max_value=30, max_multiplier=3)
    problem = arithmetic.Problem(id="p", name="Ana", item="pens", start=5, ops=(("-", 4), ("+", 2)),
                                 question="Ana has 5 pens. Then Ana loses 4 pens. Then Ana buys 2 more pens. "
                                          "How many pens does Ana have now?")
    step = arithmetic.wrong_step(problem, 1, -1, "wrong_operation", random.Random(0), ["Step 1: ..."])
    assert step.kind == "wrong_result" and not step.correct and step.value != 1
    # and a whole corpus with small numbers generates without error
    assert arithmetic.corpus_texts(params, count=400)
