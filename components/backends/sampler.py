"""How the hf backend turns a row seed into tokens (`SAMPLER`, the sampler's fingerprint in journals).

Sample j of conversation i draws its uniforms once, from a `torch.Generator` seeded with
`row_seed(seeds[i], j)` (one per token it may generate: `new_rows`), and takes token t by inverse
CDF of the temperature/top-p filtered distribution of its raw logits at uniform t
(`sample_tokens`, `nucleus`): a sample does not depend on which other rows share its batch, and a
decoding step costs a few batched tensor ops whatever the number of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from components.backends.base import row_seed
from components.config import SamplingParams

# How the hf backend turns a row seed into tokens; part of every journal fingerprint, so samples
# drawn by an earlier sampler are never mixed with new ones.
SAMPLER = "inverse-cdf/1"


@dataclass
class Row:
    """One sample being decoded: conversation `conv`, sample `index`; `uniforms[t]` picks its token t."""

    conv: int
    index: int
    uniforms: list[float]
    prefix: str
    ids: list[int] = field(default_factory=list)
    p_yes: float | None = None
    finish: str | None = None
    stop_at: int | None = None  # generated tokens kept when a stop string ended the row
    forced_p_yes: float | None = None  # teacher-forced fallback read from the decoding KV


def new_rows(
    batch: Sequence[tuple[int, int]], prefixes: Sequence[str], seeds: Sequence[int], sampling: SamplingParams,
    device: str,
) -> list[Row]:
    """Rows for (conversation, sample) pairs, each with its own seeded uniforms."""
    import torch

    rows = []
    draws = sampling.max_new_tokens if sampling.temperature > 0 else 0
    for i, j in batch:
        g = torch.Generator(device=device)
        g.manual_seed(row_seed(seeds[i], j))
        u = torch.rand(draws, generator=g, dtype=torch.float64, device=device).tolist() if draws else []
        rows.append(Row(conv=i, index=j, uniforms=u, prefix=prefixes[i]))
    return rows


def nucleus(probs: Any, top_p: float, widths: Sequence[int] = (16, 128)) -> tuple[Any, Any]:
    """(kept probabilities in descending order, their token ids) of each row's top-p nucleus;
    tokens outside it get probability 0 (the best token always stays). Looks at each row's best
    `widths[0]` tokens first; only the rows whose nucleus is larger look at `widths[1]`, and only
    those still not held sort the whole vocabulary (the result is the same whichever width
    holds a row; rows are padded with probability 0 to the widest one used)."""
    import torch

    vocab = probs.shape[-1]
    parts: list[tuple[Any, Any, Any]] = []  # (rows, kept, ids) per width tried
    rows = None  # rows not yet held (None: all)
    for k in [*[w for w in widths if w < vocab], vocab]:
        sub = probs if rows is None else probs.index_select(0, rows)
        best, idx = sub.sort(dim=-1, descending=True) if k == vocab else sub.topk(k, dim=-1)  # descending
        before = best.cumsum(dim=-1) - best  # mass of the better tokens
        drop = before >= top_p
        drop[:, 0] = False
        held = drop[:, -1] if k < vocab else torch.ones(len(best), dtype=torch.bool, device=best.device)
        kept = best.masked_fill(drop, 0.0)
        if bool(held.all()):
            parts.append((rows, kept, idx))
            break
        done = held.nonzero()[:, 0]
        parts.append((done if rows is None else rows[done], kept[done], idx[done]))
        rest = (~held).nonzero()[:, 0]
        rows = rest if rows is None else rows[rest]
    if len(parts) == 1:
        return parts[0][1], parts[0][2]
    width = parts[-1][1].shape[-1]
    kept_all = probs.new_zeros((probs.shape[0], width))
    ids_all = torch.zeros((probs.shape[0], width), dtype=torch.long, device=probs.device)
    for at, kept, idx in parts:
        kept_all[at, : kept.shape[-1]] = kept
        ids_all[at, : idx.shape[-1]] = idx
    return kept_all, ids_all


def sample_tokens(logits: Any, rows: Sequence[Row], sampling: SamplingParams) -> Any:
    """Next token of every row: inverse CDF, at the row's next uniform, of the
    temperature/top-p filtered softmax of its raw logits (argmax at temperature 0)."""
    import torch

    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = (logits / sampling.temperature).softmax(dim=-1)
    u = torch.tensor([r.uniforms[len(r.ids)] for r in rows], dtype=torch.float64, device=logits.device)
    if sampling.top_p < 1.0:
        # A row whose best token alone holds the nucleus takes that token whatever its uniform,
        # with no top-k or sort. The full path decides this by a cumulative sum, which rounds:
        # a best token within ALONE_MARGIN of top_p goes that way, so every row takes the token
        # the full path would give it (above 1/2 the best token is the only one).
        best, arg = probs.max(dim=-1)
        alone = best >= max(sampling.top_p, 0.5) + ALONE_MARGIN
        if not bool(alone.all()):
            rest = (~alone).nonzero()[:, 0]
            arg[rest] = _inverse_cdf(*nucleus(probs.index_select(0, rest), sampling.top_p), u[rest])
        return arg
    return _inverse_cdf(probs, None, u)


# How far above top_p the best token's probability must be for `sample_tokens` to take it
# without the nucleus computation (float32 cumulative sums round by about 1e-7).
ALONE_MARGIN = 1e-6


def _inverse_cdf(kept: Any, idx: Any, u: Any) -> Any:
    """Token of each row at its uniform `u` under the (descending, zero-padded) kept
    probabilities `kept` with token ids `idx` (None: `kept` is the whole vocabulary)."""
    import torch

    cdf = kept.double().cumsum(dim=-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    # u < 1, so pick is inside the support but for rounding at the very top: clamp to the
    # last token with probability > 0
    pick = torch.minimum(pick, (kept > 0).sum(dim=-1) - 1) if idx is not None else pick.clamp_(max=cdf.shape[-1] - 1)
    return pick if idx is None else idx.gather(-1, pick[:, None])[:, 0]
