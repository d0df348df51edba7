"""Answer grading: extraction, math-verify comparison, explicit outcomes, timeouts off the main thread."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from components.grading import Grader, extract_answer, last_boxed, reference_answers

# sympy tries to evaluate this tower exactly; math-verify's verify never returns on it.
PATHOLOGICAL = "The answer is \\boxed{9^{9^{9^{9}}}}"


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout_s=5.0) as g:
        yield g


# ------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}} and then", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{1}, finally \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("\\boxed {x+1}", "x+1"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{3} then an unclosed \\boxed{4", "3"),
        ("no box here", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "answer", "how"),
    [
        ("Thus \\(\\boxed{11}\\).", "11", "boxed"),
        ("We get 3 and 4.\nThe final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}", "answer_phrase"),
        ("So the answer is: 42", "42", "answer_phrase"),
        ("Final answer:\n\\(x = 5\\)", "x = 5", "answer_phrase"),
        ("We add 2 and 3.\nTotal apples 1,250 then 3/4", "3/4", "last_number"),
        ("We add 2 and 3.\nTotal is -2.5 apples", "-2.5", "last_number"),
        ("no number at all\n\n", None, "none"),
        ("\\boxed{} but 5 later", None, "boxed"),
    ],
)
def test_extract_answer_with_documented_fallbacks(text, answer, how):
    assert extract_answer(text) == (answer, how)


def test_reference_answers_per_dataset():
    assert reference_answers("27") == ["27"]
    assert reference_answers(["$5$", "$7$"]) == ["$5$", "$7$"]
    assert reference_answers("x", {"final_answer": ["$1,2$"]}) == ["$1,2$"]
    assert reference_answers(None) == []


# ------------------------------------------------------------------------- comparison


@pytest.mark.parametrize(
    ("text", "references", "outcome"),
    [
        ("\\boxed{\\frac{1}{2}}", ["0.5"], "correct"),
        ("\\boxed{\\dfrac{3}{4}}", ["\\frac34"], "correct"),
        ("\\boxed{2\\sqrt{3}}", ["\\sqrt{12}"], "correct"),
        ("\\boxed{27.0}", ["27"], "correct"),  # AMC23 answers
        ("\\boxed{\\frac{2}{3}}", ["\\frac{3}{4}"], "incorrect"),
        ("\\boxed{[2,5)}", ["[2, 5)"], "correct"),  # intervals
        ("\\boxed{x \\in [2,5)}", ["[2,5)"], "correct"),
        ("\\boxed{(2,5)}", ["[2,5)"], "incorrect"),
        ("\\boxed{864, 1350, 2400}", ["2400, 1350, 864"], "correct"),  # multiple answers: a set
        ("\\boxed{\\pm 1, \\pm 7}", ["1,-1,7,-7"], "correct"),
        ("\\boxed{-2, -1, 2}", ["$-1$,$2$,$-2$"], "correct"),  # OlympiadBench $..$,$..$ lists
        ("\\boxed{(1,2)}", ["(2,1)"], "incorrect"),  # tuples are ordered
        ("\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}", ["\\begin{pmatrix}1\\\\2\\end{pmatrix}"], "correct"),
        ("\\boxed{7}", ["$5$", "$7$"], "correct"),  # any listed reference
        ("\\boxed{\\$18.90}", ["\\$18.90"], "correct"),  # escaped dollars are not math delimiters
        ("\\boxed{!!!}", ["3"], "no_answer"),  # extracted but unparseable
        ("I cannot solve it.", ["3"], "no_answer"),  # nothing extracted
        ("\\boxed{3}", ["Yes, this is a subspace."], "bad_reference"),
        ("\\boxed{3}", [], "bad_reference"),
    ],
)
def test_outcomes(grader, text, references, outcome):
    assert grader.grade(text, references).outcome == outcome


def test_bad_reference_is_never_correct(grader):
    # Even an answer textually equal to an unparseable reference is not silently correct.
    grade = grader.grade("\\boxed{No solution : \\oslash}", ["No solution : $\\oslash$"])
    assert grade.outcome == "bad_reference"
    assert not grade.correct


def test_answer_classes(grader):
    classes = grader.answer_classes(["\\frac{1}{2}", "0.5", "3", None, "1/2", "3.0"])
    assert classes[0] == classes[1] == classes[4]
    assert classes[2] == classes[5] != classes[0]
    assert classes[3] is None


# ------------------------------------------------------------------------- timeouts


def test_timeout_from_a_thread_then_recovers():
    """A runaway sympy comparison graded from a worker thread times out; the grader carries on."""
    with Grader(timeout_s=3.0) as g:
        assert g.grade("\\boxed{2}", ["2"]).outcome == "correct"  # worker warm

        def work():
            return g.grade(PATHOLOGICAL, ["5"])

        with ThreadPoolExecutor(max_workers=1) as pool:
            result = pool.submit(work).result()
        assert threading.current_thread() is threading.main_thread()
        assert result.outcome == "timeout"
        assert not result.correct
        assert g.restarts == 1
        assert g.grade("\\boxed{\\frac{6}{4}}", ["1.5"]).outcome == "correct"


def test_concurrent_threads_share_one_grader():
    with Grader(timeout_s=10.0) as g, ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(g.grade, f"\\boxed{{{i}}}", [str(i if i % 2 else i + 1)]) for i in range(12)]
        outcomes = [f.result().outcome for f in futures]
    assert outcomes == ["correct" if i % 2 else "incorrect" for i in range(12)]


def test_worker_killed_mid_request_is_an_error_not_a_crash():
    """The worker process dies (real SIGKILL) while verifying: outcome `error`, then recovery."""
    with Grader(timeout_s=60.0) as g:
        assert g.grade("\\boxed{1}", ["1"]).correct
        pid = g._worker.proc.pid

        def kill_soon():
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_soon)
        killer.start()
        result = g.grade(PATHOLOGICAL, ["5"])
        killer.join()
        assert result.outcome == "error"
        assert g.grade("\\boxed{4}", ["4"]).outcome == "correct"


def test_grading_inside_a_prefect_task(tmp_path, monkeypatch):
    """A Prefect task (run by the thread-pool task runner, off the main thread) grades and times out."""
    pytest.importorskip("prefect")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    from prefect import flow, task
    from prefect.testing.utilities import prefect_test_harness

    @task
    def grade_task(text: str, reference: str) -> tuple[str, bool]:
        with Grader(timeout_s=2.0) as g:
            return g.grade(text, [reference]).outcome, threading.current_thread() is threading.main_thread()

    @flow
    def grading_flow() -> list[tuple[str, bool]]:
        futures = [grade_task.submit("\\boxed{\\frac{1}{2}}", "0.5"), grade_task.submit(PATHOLOGICAL, "5")]
        return [f.result() for f in futures]

    with prefect_test_harness(server_startup_timeout=120):
        results = grading_flow()
    assert results == [("correct", False), ("timeout", False)]
