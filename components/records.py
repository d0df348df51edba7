"""Record types exchanged between stages (JSON Lines; one schema each, validated at the boundary)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
    field_validator,
)

STEP_SEPARATOR = "\n\n"  # between the steps of a solution's text (docs/method.md §3)

# The official ProcessBench subsets and PRMBench classes (grouped as PRMBench reports them).
ProcessBenchSubset = Literal["gsm8k", "math", "olympiadbench", "omnimath"]
PROCESSBENCH_SUBSETS: tuple[str, ...] = get_args(ProcessBenchSubset)
PRMBENCH_GROUPS: dict[str, tuple[str, ...]] = {
    "simplicity": ("redundency", "circular"),
    "soundness": ("counterfactual", "step_contradiction", "domain_inconsistency", "confidence"),
    "sensitivity": ("missing_condition", "deception", "multi_solutions"),
}
PRMBENCH_CLASSES: tuple[str, ...] = tuple(c for cs in PRMBENCH_GROUPS.values() for c in cs)


def split_steps(text: str) -> list[str]:
    """Cut an unsplit solution into steps on blank lines, dropping empty pieces."""
    return [part.strip() for part in text.split(STEP_SEPARATOR) if part.strip()]


def join_steps(steps: Sequence[str]) -> str:
    """A solution's text: its steps joined by a blank line (what `split_steps` cuts)."""
    return STEP_SEPARATOR.join(steps)


def assistant_prefix(steps: Sequence[str]) -> str:
    """Assistant text a continuation starts from: the chosen steps and a blank line."""
    return join_steps(steps) + STEP_SEPARATOR if steps else ""


class Record(BaseModel):
    """Base of every record: unknown fields are kept out, types are strict enough to catch errors."""

    model_config = ConfigDict(extra="forbid")


class StepSample(Record):
    """One labelled (or unlabelled) step to verify, given its question and the previous steps."""

    id: str = Field(min_length=1)
    problem_id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    previous_steps: list[str]
    now_step: str = Field(min_length=1)
    step_index: int = Field(ge=0, description="0-based index of the Now Step in its solution.")
    label: StrictBool | None = Field(
        None, description="True = the step is correct; None = unknown. JSON true/false/null only."
    )
    source: str = ""


class PRM800KCompletion(Record):
    """One candidate step of a PRM800K solution and its human rating (-1, 0, +1; None = unrated)."""

    text: str = Field(min_length=1)
    rating: int | None = Field(None, ge=-1, le=1)


class PRM800KStep(Record):
    """One PRM800K step: the rated candidates and the one the trajectory continued with."""

    completions: list[PRM800KCompletion]
    human_completion: str | None = Field(None, description="Step written by the labeler, if any.")
    chosen_completion: int | None = Field(None, ge=0, description="Index into completions, or None.")
    chose_human_completion: bool = False

    def chosen_text(self) -> str | None:
        """Text the trajectory continued with: the chosen completion, else the human one, else None."""
        if self.chosen_completion is not None and not self.chose_human_completion:
            return self.completions[self.chosen_completion].text
        return self.human_completion

    def chosen_rating(self) -> int | None:
        """Rating of the chosen completion (None for a human-written step or none chosen)."""
        if self.chosen_completion is not None and not self.chose_human_completion:
            return self.completions[self.chosen_completion].rating
        return None


class PRM800KSolution(Record):
    """A PRM800K labelled solution (read from either the per-step or the official line format)."""

    id: str = Field(min_length=1)
    problem: str = Field(min_length=1)
    steps: list[PRM800KStep] = Field(min_length=1)
    finish_reason: str | None = Field(None, description="Official format only (lost in the re-format).")
    source: str = Field("", description="File (or hub dataset/file) the solution was read from.")


class Critique(Record):
    """One sampled analysis of a StepSample, with its parsed verdict."""

    sample_id: str
    text: str
    verdict: Literal["yes", "no", "invalid"]
    p_yes: float | None = Field(None, ge=0.0, le=1.0)
    generator: str
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    index: int = Field(ge=0, description="Index among the K samples of this step sample.")
    invalid_reason: str | None = None
    agrees: bool | None = None
    kept: bool = False
    error: str | None = Field(None, description="Engine error text when generation failed.")


class ChatMessage(Record):
    role: Literal["system", "user", "assistant"]
    content: str


class SFTExample(Record):
    """A chat SFT example: system, user (filled R-PRM template), assistant (analysis)."""

    id: str
    problem_id: str
    messages: list[ChatMessage] = Field(min_length=3)
    verdict: Literal["yes", "no"]


class PreferencePair(Record):
    """A DPO pair of the SFT model's own analyses of one step sample."""

    id: str
    sample_id: str
    problem_id: str
    prompt: list[ChatMessage] = Field(min_length=1)
    chosen: str
    rejected: str
    chosen_verdict: Literal["yes", "no"]


class Solution(Record):
    """A solution to score step by step (ProcessBench, PRMBench, Best-of-N candidates, serving)."""

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    steps: list[str] = Field(min_length=1)
    first_error: int | None = Field(None, ge=-1, description="Gold first wrong step (0-based) or -1.")
    step_labels: list[bool] | None = Field(None, description="Gold per-step correctness.")
    subset: str = ""

    @field_validator("steps")
    @classmethod
    def _non_empty_steps(cls, steps: list[str]) -> list[str]:
        for i, s in enumerate(steps):
            if not isinstance(s, str) or not s.strip():
                raise ValueError(f"step {i} is empty")
        return steps


class StepScores(Record):
    """Step rewards of one solution; null rewards for steps not scored after an early exit."""

    id: str
    step_rewards: list[float | None]
    samples: list[list[float]] = Field(description="Per step: the K P(Yes) values.")
    first_error: int = Field(ge=-1, description="Predicted first wrong step, or -1.")
    generations: int = Field(0, ge=0, description="Analyses generated for this solution.")
    fallbacks: int = Field(0, ge=0, description="Analyses that needed the teacher-forced fallback.")


class ProcessBenchItem(Record):
    """A ProcessBench solution (official fields)."""

    id: str
    generator: str = ""
    problem: str
    steps: list[str] = Field(min_length=1)
    final_answer_correct: bool | None = None
    label: int = Field(ge=-1)
    subset: str = ""

    @field_validator("label")
    @classmethod
    def _label_within_steps(cls, label: int, info: ValidationInfo) -> int:
        steps = info.data.get("steps")
        if steps is not None and label >= len(steps):
            raise ValueError(f"first-error index {label} out of range for {len(steps)} steps (-1..{len(steps) - 1})")
        return label


def processbench_subset(item: ProcessBenchItem) -> str:
    """The subset of a ProcessBench solution: its `subset` field, else its id prefix (`gsm8k-0`)."""
    if item.subset:
        return item.subset
    return item.id.rsplit("-", 1)[0] if "-" in item.id else ""


def _one_based_step(index: int) -> int:
    if index < 1:
        raise ValueError(f"step index {index} out of range (1-based)")
    return index


class PRMBenchItem(Record):
    """A PRMBench item; `modified_process` is the solution to grade, `error_steps` 1-based."""

    model_config = ConfigDict(extra="ignore")
    idx: str
    classification: str
    modified_question: str
    modified_process: list[str] = Field(min_length=1)
    error_steps: list[Annotated[int, AfterValidator(_one_based_step)]] = Field(
        description="1-based wrong steps (indices past the end occur upstream and are kept)."
    )
    position: int = Field(0, ge=0, description="Line position in the source file (idx is not unique).")


class BonProblem(Record):
    """A Best-of-N test problem with its reference answer."""

    model_config = ConfigDict(extra="ignore")
    id: str
    dataset: str
    problem: str
    answer: str | list[str]
    solution: str | None = None


class Candidate(Record):
    steps: list[str]
    correct: bool | None = Field(None, description="Publisher's own grading, when known.")
    response: str | None = None


class CandidatePool(Record):
    """N sampled solutions for one problem (real pools in data/, or generated by a policy)."""

    model_config = ConfigDict(extra="ignore")
    id: str
    dataset: str
    problem: str
    answer: str | list[str] | None = None
    candidates: list[Candidate] = Field(min_length=1)
