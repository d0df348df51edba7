"""The hf backend's prefix cache: KV of recently encoded token blocks, found again by a sequence's
longest cached prefix (`PrefixCache`).

Blocks are `ATTENTION_CHUNK` tokens long, the query chunk and matrix-product block of
`hf_engine.SharedPromptLM.encode`, so an encoding continuing a cached prefix is bitwise the encoding
from scratch (see `hf.py`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

ATTENTION_CHUNK = 32  # query chunk of SharedPromptLM.encode (hf_engine); PrefixCache cuts at multiples of it


class PrefixCache:
    """KV of recently encoded token blocks, found again by a sequence's longest cached prefix.

    A sequence's KV is kept in blocks of `block` tokens, each keyed by a hash chain over the
    tokens up to its end (so a block is shared by every sequence with that prefix, and stored
    once); a lookup walks the chain and verifies each block's tokens. At most `max_tokens`
    tokens are kept, least recently used blocks first out. The step prompts of one solution
    share their question and previous steps, and the teacher-forced pass extends a prompt, so
    most of a prompt's encoding is a lookup.
    """

    def __init__(self, max_tokens: int, block: int = ATTENTION_CHUNK):
        self.max_tokens = max_tokens
        self.block = block
        # chain hash -> (the block's tokens, per layer (keys, values) [kv heads, block, d])
        self.blocks: OrderedDict[int, tuple[tuple[int, ...], list[tuple[Any, Any]]]] = OrderedDict()

    @property
    def tokens(self) -> int:
        """Tokens held."""
        return len(self.blocks) * self.block

    def _chain(self, ids: Sequence[int]) -> list[tuple[int, tuple[int, ...]]]:
        out, h = [], 0
        for start in range(0, len(ids) - self.block + 1, self.block):
            part = tuple(ids[start : start + self.block])
            h = hash((h, part))
            out.append((h, part))
        return out

    def add(self, ids: Sequence[int], kvs: list[tuple[Any, Any]]) -> None:
        """Remember the per-layer KV [kv heads, len(ids), d] of a sequence (its full blocks)."""
        for m, (h, part) in enumerate(self._chain(ids)):
            if h in self.blocks:
                self.blocks.move_to_end(h)
                continue
            lo, hi = m * self.block, (m + 1) * self.block
            self.blocks[h] = (part, [(k[:, lo:hi].clone(), v[:, lo:hi].clone()) for k, v in kvs])
        while self.tokens > self.max_tokens:
            self.blocks.popitem(last=False)

    def longest(self, ids: Sequence[int], limit: int) -> tuple[int, list[tuple[Any, Any]]] | None:
        """(P, per layer KV of ids[:P]) for the longest cached block prefix with P <= limit."""
        import torch

        found = []
        for h, part in self._chain(ids[:limit]):
            hit = self.blocks.get(h)
            if hit is None or hit[0] != part:
                break
            self.blocks.move_to_end(h)
            found.append(hit[1])
        if not found:
            return None
        layers = range(len(found[0]))
        past = [
            (torch.cat([f[i][0] for f in found], dim=1), torch.cat([f[i][1] for f in found], dim=1)) for i in layers
        ]
        return len(found) * self.block, past

    def clear(self) -> None:
        """Forget everything."""
        self.blocks.clear()
