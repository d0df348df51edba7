"""Where a sampled text first reaches the verdict phrase (`VerdictLocator`; hf and vllm backends)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from components.prompts import VERDICT_PHRASE


class VerdictLocator:
    """Finds, token by token, where a sampled text first ends with the verdict phrase.

    The text is the assistant prefix plus the decoded generated tokens. Only positions right
    after a token whose text ends with "?" (the phrase's last character) can qualify, so the
    check decodes a short tail window only there.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        last = VERDICT_PHRASE[-1]
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
        self.may_end = [t.endswith(last) for t in texts]
        self.window = len(VERDICT_PHRASE) + 8

    def could_end(self, ids: Sequence[int]) -> bool:
        """Whether the text after `ids` may end with the phrase (cheap pre-check)."""
        if not ids:
            return True
        last = ids[-1]
        return 0 <= last < len(self.may_end) and self.may_end[last]

    def tails(self, prefixes: Sequence[str], id_lists: Sequence[Sequence[int]]) -> list[str]:
        """Text endings (prefix + decoded ids), each at least as long as the phrase."""
        windows = [list(ids[-self.window :]) for ids in id_lists]
        texts = self.tokenizer.batch_decode(windows, skip_special_tokens=True)
        return [
            (p + t) if len(ids) <= self.window else t
            for p, ids, t in zip(prefixes, id_lists, texts, strict=True)
        ]

    def first_position(self, prefix: str, ids: Sequence[int]) -> int | None:
        """Smallest k such that prefix + decode(ids[:k]) ends with the phrase, or None."""
        for k in range(len(ids) + 1):
            if self.could_end(ids[:k]) and self.tails([prefix], [ids[:k]])[0].endswith(VERDICT_PHRASE):
                return k
        return None
