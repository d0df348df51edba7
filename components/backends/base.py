"""One interface for every text generation engine (hf, vllm, openai).

A backend takes chat conversations (lists of {"role", "content"} dicts), applies the model's
chat template itself (or lets the server do it), and returns `sampling.n` generations per
conversation. Where the engine can, each generation carries `p_yes`: the verdict probability
P(" Yes") / (P(" Yes") + P(" No")) read from the logits at the position right after the first
`Is the step correct (Yes/No)?` in the same generation pass (docs/method.md §9.2). `verdict_probability` is the teacher-forced path: conversation plus an
assistant prefix that ends with the verdict phrase (or the fallback question), one forward
pass, last position.

Sampling is seeded per row: generation j of a conversation with seed s is drawn from its own
random stream derived from (s, j), so results do not depend on how work is batched. That is
what makes resumed stages equal uninterrupted ones and lets benchmarks compare batched and
one-at-a-time scoring on identical samples.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from components.config import SamplingParams

Conversation = list[dict[str, str]]


@dataclass
class Generation:
    """One sampled continuation (the assistant's text)."""

    text: str
    p_yes: float | None = None  # read in the generation pass; None if never reached / unavailable
    num_tokens: int = 0
    finish_reason: str = "stop"  # stop | length | error
    error: str | None = None  # engine error after retries (text empty then)
    meta: dict = field(default_factory=dict)
    # P(" Yes") of the teacher-forced fallback on `teacher_forced(text)` (see `generate`'s
    # `teacher_forced`), when the engine read it in the generation pass; None otherwise
    forced_p_yes: float | None = None


class BackendError(RuntimeError):
    """An engine failed in a way retries could not fix."""


@runtime_checkable
class GenerationBackend(Protocol):
    """What every engine implements, and every member its callers use.

    - `name`: recorded as Critique.generator and in journal fingerprints.
    - `sampler`: the sampler's fingerprint, how a row seed becomes tokens (hf:
      `sampler.SAMPLER`); journal fingerprints record it (scoring), so samples drawn by another
      sampler are never mixed in. None: the engine's own (vllm, openai).
    - `forced_in_generation`: True when `generate` also takes `teacher_forced`, a function of a
      sample's text giving the assistant prefix of its teacher-forced fallback, and fills
      `Generation.forced_p_yes` in the same pass (hf); the scorer then runs no second pass.
    - `generate_iter(...)`: engines that stream implement `StreamingBackend` (openai); the
      teachers check for it with `isinstance`.
    - Engine-specific extras, not part of the protocol: `reset_prefix_cache()` and `peak_batch`
      (hf; the benchmarks use them).
    """

    name: str
    sampler: str | None
    forced_in_generation: bool

    def generate(
        self,
        conversations: Sequence[Conversation],
        sampling: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
        assistant_prefixes: Sequence[str] | None = None,
        stop: Sequence[str] | None = None,
        progress: bool = False,
    ) -> list[list[Generation]]:
        """Return `sampling.n` generations per conversation, in order.

        `seeds[i]` seeds conversation i (default: sampling.seed + i). `assistant_prefixes[i]`
        is text the assistant turn already starts with (guided search continues a partial
        solution). `stop` strings end a generation (they are not included in the text).
        """
        ...

    def verdict_probability(
        self, conversations: Sequence[Conversation], prefixes: Sequence[str]
    ) -> list[float | None]:
        """Teacher-forced P(Yes) at the last position of conversation + assistant prefix."""
        ...

    def close(self) -> None:
        """Free engine resources."""
        ...


@runtime_checkable
class StreamingBackend(GenerationBackend, Protocol):
    """A backend that hands over each conversation's generations as soon as they are done."""

    def generate_iter(
        self,
        conversations: Sequence[Conversation],
        sampling: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
        assistant_prefixes: Sequence[str] | None = None,
        stop: Sequence[str] | None = None,
    ) -> Iterator[tuple[int, list[Generation]]]:
        """Yield (row, its `sampling.n` generations) as each conversation finishes, in any order;
        the same generations `generate` returns for that row."""
        ...


# --------------------------------------------------------------------------------------
# Seeds: every seed the project derives, from here
# --------------------------------------------------------------------------------------

# row_seed(s, j) = (s * ROW_SEED_MUL + j * ROW_SEED_STEP + ROW_SEED_ADD) mod ROW_SEED_MOD
ROW_SEED_MUL, ROW_SEED_STEP, ROW_SEED_ADD, ROW_SEED_MOD = 1_000_003, 7_919, 12_345, 2**63 - 1
SEED_RANGE = 2**31 - 1  # the derived seeds below lie in [0, SEED_RANGE)


def row_seed(seed: int, index: int) -> int:
    """Seed of the random stream of sample `index` of a conversation seeded with `seed`."""
    return (seed * ROW_SEED_MUL + index * ROW_SEED_STEP + ROW_SEED_ADD) % ROW_SEED_MOD


def single_sample_seed(seed: int, index: int) -> int:
    """The seed s' whose sample 0 is sample `index` of `seed`: row_seed(s', 0) == row_seed(seed, index).

    A one-sample-per-call baseline (bench) draws stream row_seed(s', 0); s' = s + j * STEP * MUL^-1
    (mod MOD) makes that the stream of sample j.
    """
    return (seed + index * ROW_SEED_STEP * pow(ROW_SEED_MUL, -1, ROW_SEED_MOD)) % ROW_SEED_MOD


def hashed_seed(*parts: object, sep: str = ":") -> int:
    """A seed from the sha256 of the parts joined by `sep` (first 8 bytes, big-endian, mod SEED_RANGE)."""
    digest = hashlib.sha256(sep.join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_RANGE


def drawn_seed(*parts: object) -> int:
    """A seed drawn from `random.Random` seeded with the parts joined by ':' (in [0, SEED_RANGE))."""
    return random.Random(":".join(str(p) for p in parts)).randrange(SEED_RANGE)


def sample_seed(seed: int, sample_id: str) -> int:
    """Seed of a step sample's analyses (synthesis, pair sampling): a function of (seed, sample id) only."""
    return hashed_seed(seed, sample_id)


def step_seed(seed: int, solution_id: str, step_index: int) -> int:
    """Seed of one step's K analyses (scoring), from (sampling seed, solution id, step index)."""
    return hashed_seed(seed, solution_id, step_index, sep="\x1f")


def search_seed(seed: int, problem_id: str, iteration: int, beam: int) -> int:
    """Seed of the proposals of one beam at one guided-search iteration (independent of batching)."""
    return drawn_seed(seed, problem_id, iteration, beam)


def problem_seed(seed: int, problem_id: str) -> int:
    """Seed of a problem's policy-generated Best-of-N candidates."""
    return drawn_seed(seed, problem_id)


def request_rows(
    n_conversations: int,
    sampling: SamplingParams,
    seeds: Sequence[int] | None,
    assistant_prefixes: Sequence[str] | None,
) -> tuple[list[int], list[str]]:
    """Per-conversation seeds (default `sampling.seed + row`) and assistant prefixes (default "")
    of a `generate` call; ValueError unless each has one entry per conversation."""
    seeds = list(seeds) if seeds is not None else [sampling.seed + i for i in range(n_conversations)]
    prefixes = list(assistant_prefixes) if assistant_prefixes is not None else [""] * n_conversations
    if len(seeds) != n_conversations or len(prefixes) != n_conversations:
        raise ValueError("seeds and assistant_prefixes must have one entry per conversation")
    return seeds, prefixes
