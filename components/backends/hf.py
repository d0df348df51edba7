"""The `hf` generation backend: transformers models with per-row seeded sampling.

Decoding is our own KV-cache loop (no `generate()`), which gives what R-PRM scoring needs:
- Llama/Qwen2-style models (`fast_path_supported`) run on `SharedPromptLM`, a direct forward
  with the model's own modules: each prompt is encoded once, unpadded, continuing the longest
  prefix in `PrefixCache` (the step prompts of a solution share the question and previous
  steps; the teacher-forced pass extends a prompt); its KV is stored once and shared by its K
  samples (their queries meet it in one matmul); generated KV is preallocated per row. Batches
  are continuous: prompts enter longest first and leave when all their samples are done, the
  freed room taking the next ones, within `batch_size` prompts and `token_budget` KV tokens
  (`HFBackend.batch_tokens`); the batch's buffers are reused (a leaving prompt's place is taken
  by the last one, not by shifting all). On CPU, a decoding step's attention runs torch's fused
  flash kernel, one call for the prompt part and one for the generated part, merged by their
  log-sum-exp. The prefix cache holds at most `token_budget` tokens more. Only encoder-computed
  KV enters the cache, and an encoding continuing a cached prefix is bitwise the encoding from
  scratch, so samples and verdict probabilities do not depend on what the cache held (resumed
  runs reproduce uninterrupted ones byte for byte).
- other models use the generic loop: left-padded batches through `model(...)`, the prompt's
  cache repeated for its K samples;
- sample j of conversation i draws its uniforms once, from a `torch.Generator` seeded with
  `row_seed(seeds[i], j)` (one per token it may generate), and takes token t by inverse CDF of
  the temperature/top-p filtered distribution of its RAW logits at uniform t (`SAMPLER`): a
  sample does not depend on which other rows share its batch, and a decoding step costs a few
  batched tensor ops whatever the number of rows (a Gumbel-max draw per row costs one
  random-number call and a vocabulary of noise per row per token);
- the verdict probability P(" Yes") / (P(" Yes") + P(" No")) is read from the raw logits at the
  first step whose text (assistant prefix + generated so far) ends with
  `Is the step correct (Yes/No)?` — the same number the teacher-forced reference
  (`verdict_probability`) computes on the analysis cut at that phrase;
- finished rows (end-of-turn token, stop string) stop at once: a decoding step runs the per-row
  work (projections, MLP, head, generated KV) for live rows only, so a prompt waiting for its
  slowest sample costs its prompt-part attention and that sample's row, not K rows (bitwise
  the same logits: at least `MIN_ROWS` rows are computed, see `SharedPromptLM.step`);
- with `generate(..., teacher_forced=f)` a sample that never reached the phrase gets
  `Generation.forced_p_yes`, the teacher-forced fallback `verdict_probability(conv, f(text))`
  read from the KV it was decoded with (only the tokens past the longest prefix shared with the
  decoded ones are encoded), before its prompt leaves the batch (`_forced_from_cache`).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.backends.base import BackendError, Conversation, Generation, request_rows, row_seed
from components.config import BackendParams, SamplingParams
from components.prompts import NO_TOKEN_TEXT, VERDICT_PHRASE, YES_TOKEN_TEXT

# How the hf backend turns a row seed into tokens; part of every journal fingerprint, so samples
# drawn by an earlier sampler are never mixed with new ones.
SAMPLER = "inverse-cdf/1"


@dataclass
class _Row:
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


def resolve_device(name: str) -> str:
    """`auto` picks cuda when available, else cpu; anything else is taken as a torch device."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def torch_dtype(name: str) -> Any:
    """torch dtype from its params name."""
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise BackendError(f"unknown dtype {name!r} (float32, bfloat16, float16)") from None


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


_FAST_MODEL_TYPES = {"llama", "qwen2"}
_STATIC_ROPE = {"default", "linear", "llama3", "yarn"}


def fast_path_supported(model: Any) -> bool:
    """Whether `SharedPromptLM` can run this model: a Llama/Qwen2-style decoder, full attention only."""
    cfg = model.config
    inner = getattr(model, "model", None)
    if cfg.model_type not in _FAST_MODEL_TYPES or inner is None or not hasattr(model, "lm_head"):
        return False
    if getattr(cfg, "use_sliding_window", False):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in _STATIC_ROPE:
        return False
    attn = inner.layers[0].self_attn
    return all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")) and not any(
        hasattr(attn, a) for a in ("q_norm", "k_norm")
    )


def _fill_holes(keep: Sequence[int]) -> list[int]:
    """New order of the kept prompts (increasing positions): each kept one stays
    where it is, and the last ones fill the holes left by the others, so a batch losing a
    prompt copies one prompt's KV instead of shifting all that follow it."""
    m, kept = len(keep), set(keep)
    movers = [c for c in reversed(keep) if c >= m]
    return [c if c in kept else movers.pop(0) for c in range(m)]


def _merge_attention(a: tuple[Any, Any], b: tuple[Any, Any]) -> Any:
    """Attention over the union of two key sets from each set's (output, log-sum-exp): the
    outputs weighted by their share of the total softmax mass. (Through the larger log-sum-exp,
    not `torch.logaddexp`: that one rounds differently in the vectorized body of a tensor and in
    its tail, so a row's value would depend on the batch around it.)"""
    import torch

    (o_a, lse_a), (o_b, lse_b) = a, b
    top = torch.maximum(lse_a, lse_b)
    w_a, w_b = (lse_a - top).exp_(), (lse_b - top).exp_()
    return (o_a * w_a + o_b * w_b) / (w_a + w_b)


@dataclass
class _SharedState:
    """KV of the batch being decoded: each prompt once, right-padded ([cap, kv heads, Wcap, d]
    per layer), and every row's generated tokens ([cap, kv heads, S, T, d]); row r = c * S + s
    is sample slot s of prompt c, for the first C = `prompts` of `cap` allocated prompts.

    The buffers are allocated for as many prompts as the token budget admits at their width
    (`max_prompts`, `budget`) and reused: prompts are written in and compacted in place, and
    the buffers are reallocated only when a batch outgrows them (more prompts, or a longer one,
    or a shorter width that admits more prompts). Positions past a prompt's length, or past a
    row's generated tokens, may hold stale values: attention masks them.
    """

    prompt_k: list[Any]
    prompt_v: list[Any]
    prompt_bias: Any  # [cap, 1, 1, Wcap]: 0 on prompt tokens, -inf on the padding
    gen_k: list[Any]
    gen_v: list[Any]
    slots: int
    max_prompts: int = 1
    budget: int = 0  # KV tokens: cap * (Wcap + slots * T) stays within it (one prompt may exceed it)
    prompt_len: list[int] = field(default_factory=list)

    @property
    def prompts(self) -> int:
        """Prompts in the batch (C)."""
        return len(self.prompt_len)

    @property
    def width(self) -> int:
        """Padded prompt length of the batch (W: its longest prompt)."""
        return max(self.prompt_len, default=0)

    @property
    def allocated_tokens(self) -> int:
        """KV tokens the buffers hold room for."""
        cap, room = self.prompt_bias.shape[0], self.gen_k[0].shape[3]
        return int(cap * (self.prompt_bias.shape[-1] + self.slots * room))

    def keep(self, convs: Sequence[int]) -> None:
        """Keep only the prompts at positions `convs`, with their rows, as prompts 0, 1, ... in that
        order (only those whose position changes are copied)."""
        import torch

        moves = [(t, c) for t, c in enumerate(convs) if t != c]
        if moves:
            dev = self.prompt_bias.device
            dst = torch.tensor([t for t, _ in moves], dtype=torch.long, device=dev)
            src = torch.tensor([c for _, c in moves], dtype=torch.long, device=dev)
            for buf in [self.prompt_bias, *self.prompt_k, *self.prompt_v, *self.gen_k, *self.gen_v]:
                buf.index_copy_(0, dst, buf.index_select(0, src))
        self.prompt_len = [self.prompt_len[c] for c in convs]

    def _reallocate(self, prompts: int, width: int) -> None:
        """Buffers for at least `prompts` prompts of `width` tokens, keeping the current ones."""
        import torch

        room = self.gen_k[0].shape[3]
        fits = self.budget // max(1, width + self.slots * room) if self.budget else self.max_prompts
        cap = max(prompts, min(self.max_prompts, fits))
        keep, w = self.prompts, min(self.width, width)

        def grown(buf: Any, shape: tuple[int, ...], fill: float, pad_axis: int | None) -> Any:
            out = torch.full(shape, fill, dtype=buf.dtype, device=buf.device)
            if pad_axis is None:
                out[:keep] = buf[:keep]
            elif pad_axis == 2:
                out[:keep, :, :w] = buf[:keep, :, :w]
            else:
                out[:keep, ..., :w] = buf[:keep, ..., :w]
            return out

        kvh, d = self.prompt_k[0].shape[1], self.prompt_k[0].shape[3]
        self.prompt_bias = grown(self.prompt_bias, (cap, 1, 1, width), float("-inf"), 3)
        self.prompt_k = [grown(k, (cap, kvh, width, d), 0.0, 2) for k in self.prompt_k]
        self.prompt_v = [grown(v, (cap, kvh, width, d), 0.0, 2) for v in self.prompt_v]
        self.gen_k = [grown(k, (cap, *k.shape[1:]), 0.0, None) for k in self.gen_k]
        self.gen_v = [grown(v, (cap, *v.shape[1:]), 0.0, None) for v in self.gen_v]

    def add(self, prompts: Sequence[list[tuple[Any, Any]]]) -> None:
        """Append encoded prompts (per layer keys, values [kv heads, L, d]) with fresh rows."""
        lens = [int(kvs[0][0].shape[1]) for kvs in prompts]
        need, width = self.prompts + len(lens), max([self.width, *lens])
        if need > self.prompt_bias.shape[0] or width > self.prompt_bias.shape[-1]:
            self._reallocate(need, width)
        for c, (kvs, n) in enumerate(zip(prompts, lens, strict=True), start=self.prompts):
            self.prompt_bias[c, ..., :n] = 0.0
            self.prompt_bias[c, ..., n:] = float("-inf")
            for layer, (k, v) in enumerate(kvs):
                self.prompt_k[layer][c, :, :n] = k
                self.prompt_v[layer][c, :, :n] = v
        self.prompt_len += lens


class SharedPromptLM:
    """Direct forward of a Llama/Qwen2-style decoder (the model's own modules and weights).

    `encode` runs one unpadded prompt (causal SDPA) and returns its per-layer KV; `step` decodes
    one token for every row, attending to its prompt's KV, stored once for all K samples (the
    K rows' queries meet it in one matmul), and to the row's own generated KV, preallocated
    (no per-token concatenation). One softmax spans both parts, so this is the usual attention.
    """

    def __init__(self, model: Any):
        import torch

        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        attn = self.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.heads = int(model.config.num_attention_heads)
        self.kv_heads = int(model.config.num_key_value_heads)
        self.groups = self.heads // self.kv_heads
        self.scaling = float(attn.scaling)
        # torch's fused CPU attention that also returns the log-sum-exp (`_attend`)
        self.fused = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")

    @staticmethod
    def _rope(x: Any, cos: Any, sin: Any) -> Any:
        import torch

        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def encode(
        self, ids: Sequence[int], device: str, past: list[tuple[Any, Any]] | None = None
    ) -> tuple[list[tuple[Any, Any]], Any]:
        """Per-layer (keys, values) [kv heads, L, d] of one sequence, and its last-position logits.

        With `past` (the KV of a prefix of P tokens), `ids` continue it from position P and
        the returned KV covers only `ids`.
        """
        import torch
        import torch.nn.functional as F

        n, start = len(ids), (past[0][0].shape[1] if past else 0)
        x = self.embed(torch.tensor([list(ids)], dtype=torch.long, device=device))
        cos, sin = self.rotary(x, torch.arange(start, start + n, device=device)[None])
        cos, sin = cos[:, None], sin[:, None]
        # Queries attend in chunks that start at multiples of ATTENTION_CHUNK (absolute
        # positions), each over the keys from position 0 to its end: the attention kernel's
        # blocking (and so its rounding) is then the same for a token whether the prefix came
        # from the cache (cut at a multiple of the chunk, as PrefixCache cuts) or was encoded
        # with it. One causal call over the whole sequence would split its queries by length.
        bounds = [start, *range((start // ATTENTION_CHUNK + 1) * ATTENTION_CHUNK, start + n, ATTENTION_CHUNK), start + n]
        chunks = [(lo, hi, torch.full((hi - lo, hi), float("-inf"), dtype=x.dtype, device=device).triu_(lo + 1))
                  for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        kvs = []
        for layer in self.layers:
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = self._rope(a.q_proj(h).view(1, n, self.heads, self.head_dim).transpose(1, 2), cos, sin)
            k = self._rope(a.k_proj(h).view(1, n, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            v = a.v_proj(h).view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
            kvs.append((k[0], v[0]))
            if past:
                k = torch.cat([past[len(kvs) - 1][0][None], k], dim=2)
                v = torch.cat([past[len(kvs) - 1][1][None], v], dim=2)
            o = torch.cat([
                F.scaled_dot_product_attention(
                    q[:, :, lo - start : hi - start], k[:, :, :hi], v[:, :, :hi], attn_mask=mask,
                    scale=self.scaling, enable_gqa=True,
                )
                for lo, hi, mask in chunks
            ], dim=2)
            x = x + a.o_proj(o.transpose(1, 2).reshape(1, n, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return kvs, self.lm_head(self.norm(x[0, -1:]))[0].float()

    def empty_state(
        self, slots: int, max_tokens: int, dtype: Any, device: str, *, max_prompts: int = 1, budget: int = 0
    ) -> _SharedState:
        """A batch without prompts, `slots` sample rows per prompt, `max_tokens` generated KV per
        row; its buffers grow to at most `max_prompts` prompts within `budget` KV tokens (0: no cap)."""
        import torch

        kv, d = self.kv_heads, self.head_dim
        return _SharedState(
            prompt_k=[torch.zeros((0, kv, 0, d), dtype=dtype, device=device) for _ in self.layers],
            prompt_v=[torch.zeros((0, kv, 0, d), dtype=dtype, device=device) for _ in self.layers],
            prompt_bias=torch.zeros((0, 1, 1, 0), dtype=dtype, device=device),
            gen_k=[torch.zeros((0, kv, slots, max(1, max_tokens), d), dtype=dtype, device=device) for _ in self.layers],
            gen_v=[torch.zeros((0, kv, slots, max(1, max_tokens), d), dtype=dtype, device=device) for _ in self.layers],
            slots=slots,
            max_prompts=max_prompts,
            budget=budget,
        )

    @staticmethod
    def _width_groups(lengths: Sequence[int], most: int = 3) -> list[tuple[int, int, int]]:
        """Consecutive prompt ranges (start, end, padded width) that cut the padding: a range
        ends where a prompt is under 3/4 of its width (at most `most` ranges)."""
        groups: list[tuple[int, int, int]] = []
        start, width = 0, 0
        for c, n in enumerate(lengths):
            if c > start and len(groups) < most - 1 and 4 * n < 3 * width:
                groups.append((start, c, width))
                start, width = c, 0
            width = max(width, n)
        groups.append((start, len(lengths), width))
        return groups

    def _attend(self, q: Any, pk: Any, pv: Any, bias: Any, gk: Any, gv: Any, gen_bias: Any) -> Any:
        """Attention of queries q [C, kvh, S, g, d] (pre-scaled) over prompt KV [C, kvh, W, d]
        (+ bias [C, 1, 1, W]) and generated KV [C, kvh, S, span, d] (+ gen_bias [C, 1, S, 1, span]):
        one softmax over both parts. On CPU each part runs torch's fused flash kernel, which also
        returns its log-sum-exp, and the two are merged by those weights (`_attend_fused`);
        elsewhere the scores are materialized (`_attend_dense`)."""
        if self.fused and q.device.type == "cpu":
            return self._attend_fused(q, pk, pv, bias, gk, gv, gen_bias)
        return self._attend_dense(q, pk, pv, bias, gk, gv, gen_bias)

    @staticmethod
    def _attend_fused(q: Any, pk: Any, pv: Any, bias: Any, gk: Any, gv: Any, gen_bias: Any) -> Any:
        """`_attend` through `aten._scaled_dot_product_flash_attention_for_cpu`, one call per part."""
        import torch

        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        n, kvh, s, g, d = q.shape
        span = gk.shape[3]
        o_p, lse_p = flash(q.reshape(n, kvh, s * g, d), pk, pv, 0.0, False, attn_mask=bias, scale=1.0)
        rows = n * kvh * s
        o_g, lse_g = flash(
            q.reshape(rows, 1, g, d), gk.reshape(rows, 1, span, d), gv.reshape(rows, 1, span, d), 0.0, False,
            attn_mask=gen_bias.expand(n, kvh, s, 1, span).reshape(rows, 1, 1, span), scale=1.0,
        )
        return _merge_attention(
            (o_p.view(n, kvh, s, g, d), lse_p.view(n, kvh, s, g, 1)),
            (o_g.view(n, kvh, s, g, d), lse_g.view(n, kvh, s, g, 1)),
        ).to(pv.dtype)

    @staticmethod
    def _attend_dense(q: Any, pk: Any, pv: Any, bias: Any, gk: Any, gv: Any, gen_bias: Any) -> Any:
        """`_attend` with materialized scores: one softmax through the parts' common maximum, in float32."""
        import torch

        n, kvh, s, g, d = q.shape
        width = pk.shape[2]
        sp = torch.bmm(q.view(n * kvh, s * g, d), pk.reshape(n * kvh, width, d).transpose(1, 2)).float()
        sp.view(n, kvh, s * g, width).add_(bias)
        sg = torch.matmul(q, gk.transpose(-1, -2)).float() + gen_bias
        top = torch.maximum(sp.view(n, kvh, s, g, width).amax(-1), sg.amax(-1)).unsqueeze(-1)
        ep = sp.view(n, kvh, s, g, width).sub_(top).exp_()
        eg = sg.sub_(top).exp_()
        total = ep.sum(-1, keepdim=True) + eg.sum(-1, keepdim=True)
        o = torch.bmm(ep.view(n * kvh, s * g, width).to(pv.dtype), pv.reshape(n * kvh, width, d)).float()
        return ((o.view(n, kvh, s, g, d) + torch.matmul(eg.to(gv.dtype), gv).float()) / total).to(pv.dtype)

    def step(self, tokens: Any, index: Sequence[int], state: _SharedState, compute: Sequence[int] | None = None) -> Any:
        """Logits [rows, vocab] after feeding each row's token as its generated token `index[r]`.

        Attention stays in prompt-major layout ([C, kv heads, S x g queries, keys]): one matmul
        against each prompt's KV for its S rows, one against each row's own generated KV
        (`_attend`), per range of similar prompt lengths (`_width_groups`), so that a long
        prompt does not pad every other one to its length.

        `compute`, when given, lists the rows (increasing) that need logits: only those run the
        per-row work (embedding, projections, MLP, head) and write generated KV; the others
        (finished rows, waiting for their prompt's last row) get zero queries in the attention
        and zero logits. At least `MIN_ROWS` rows (or all) are computed, since a matrix product
        over fewer rows rounds differently: each computed row's logits are bitwise those of
        computing every row.
        """
        import torch

        rows, s, kvh, g, d = tokens.shape[0], state.slots, self.kv_heads, self.groups, self.head_dim
        n_conv = rows // s
        dev = tokens.device
        room = state.gen_k[0].shape[3]
        at_list = [min(i, room - 1) for i in index]
        span = max(at_list) + 1
        if compute is not None and len(compute) < rows:
            chosen = set(compute)
            extra = [r for r in range(rows) if r not in chosen][: max(0, min(MIN_ROWS, rows) - len(compute))]
            compute = sorted([*compute, *extra])
        else:
            compute = None
        sel = None if compute is None else torch.tensor(compute, dtype=torch.long, device=dev)
        picked = range(rows) if compute is None else compute
        m = len(picked)
        at = torch.tensor([at_list[r] for r in picked], dtype=torch.long, device=dev)
        all_at = torch.tensor(at_list, dtype=torch.long, device=dev)
        positions = torch.tensor([state.prompt_len[r // s] for r in picked], device=dev) + at
        hidden = torch.arange(span, device=dev)[None] > all_at[:, None]  # [rows, span]: not yet written
        gen_bias = torch.zeros(hidden.shape, dtype=torch.float32, device=dev).masked_fill_(hidden, float("-inf"))
        gen_bias = gen_bias.view(n_conv, 1, s, 1, span)
        conv_of = torch.tensor([r // s for r in picked], dtype=torch.long, device=dev)
        slot_of = torch.tensor([r % s for r in picked], dtype=torch.long, device=dev)
        groups = self._width_groups(state.prompt_len)
        x = self.embed(tokens if sel is None else tokens[sel])
        cos, sin = self.rotary(x[:, None], positions[:, None])
        for layer, block in enumerate(self.layers):
            a = block.self_attn
            h = block.input_layernorm(x)
            q = self._rope(a.q_proj(h).view(m, self.heads, d), cos, sin) * self.scaling
            if sel is not None:
                q = torch.zeros((rows, self.heads, d), dtype=q.dtype, device=dev).index_copy_(0, sel, q)
            gk, gv = state.gen_k[layer], state.gen_v[layer]  # [C, kvh, S, T, d]
            gk[conv_of, :, slot_of, at] = self._rope(a.k_proj(h).view(m, kvh, d), cos, sin)
            gv[conv_of, :, slot_of, at] = a.v_proj(h).view(m, kvh, d)
            qc = q.view(n_conv, s, kvh, g, d).transpose(1, 2).contiguous()  # [C, kvh, S, g, d]
            pk, pv = state.prompt_k[layer], state.prompt_v[layer]
            parts = [
                self._attend(
                    qc[lo:hi], pk[lo:hi, :, :w], pv[lo:hi, :, :w], state.prompt_bias[lo:hi, ..., :w],
                    gk[lo:hi, :, :, :span], gv[lo:hi, :, :, :span], gen_bias[lo:hi],
                )
                for lo, hi, w in groups
            ]
            o = parts[0] if len(parts) == 1 else torch.cat(parts)
            o = o.transpose(1, 2).reshape(rows, self.heads * d)
            x = x + a.o_proj(o if sel is None else o[sel])
            x = x + block.mlp(block.post_attention_layernorm(x))
        out = self.lm_head(self.norm(x)).float()
        if sel is None:
            return out
        return torch.zeros((rows, out.shape[1]), dtype=out.dtype, device=dev).index_copy_(0, sel, out)


MIN_ROWS = 4  # fewest rows a decoding step computes: CPU matrix products round alike from 4 rows up


ATTENTION_CHUNK = 32  # query chunk of FastDecoder.encode; PrefixCache cuts at multiples of it


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


class HFBackend:
    """Generation backend on a local transformers causal LM (see module docstring)."""

    name = "hf"
    sampler = SAMPLER
    # `generate(..., teacher_forced=f)` returns `Generation.forced_p_yes` (on the shared-prompt
    # path): the scorer then needs no second pass (`_forced_from_cache`)
    forced_in_generation = True

    def __init__(self, model_path: str | Path, params: BackendParams, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from components.base_model import check_tokenizer_folder

        self.params = params
        self.model_path = str(model_path)
        self.device = resolve_device(params.device)
        check_tokenizer_folder(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if not self.tokenizer.chat_template:
            raise BackendError(f"{model_path}: tokenizer has no chat template")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(dtype))
        self.model.to(self.device).eval()
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad_id is None:
            raise BackendError(f"{model_path}: tokenizer has neither a pad nor an eos token")
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        if gen_eos is not None:
            eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=self.device)
        self._eos_set = set(eos)
        self.yes_id = tok.encode(YES_TOKEN_TEXT, add_special_tokens=False)[0]
        self.no_id = tok.encode(NO_TOKEN_TEXT, add_special_tokens=False)[0]
        self.verdict = VerdictLocator(tok)
        # added tokens the tokenizer splits the text at (lstrip/rstrip ones would eat spaces)
        self._special_ids = {
            t.content: i for i, t in tok.added_tokens_decoder.items()
            if t.special and not t.lstrip and not t.rstrip and not t.single_word
        }
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        self.fast = SharedPromptLM(self.model) if fast_path_supported(self.model) else None
        self.prefix_cache = PrefixCache(params.token_budget)
        self.peak_batch = (0, 0)  # largest (prompts, KV tokens held) of a shared-prompt batch so far

    # ----------------------------------------------------------------------------------
    # Prompts
    # ----------------------------------------------------------------------------------

    def render(self, conversation: Conversation, prefix: str = "") -> str:
        """Chat template with the assistant generation prompt, plus an assistant prefix."""
        text = self.tokenizer.apply_chat_template(
            list(conversation), tokenize=False, add_generation_prompt=True
        )
        return text + prefix

    def _encode_all(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, in one tokenizer call (the fast tokenizer batches them)."""
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False).input_ids]

    def _left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[Any, Any, Any]:
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            if s:
                ids[r, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
                mask[r, width - len(s) :] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), position_ids.to(self.device)

    def _encode_kv(self, ids: Sequence[int], remember: bool = True) -> tuple[list[tuple[Any, Any]], Any]:
        """`SharedPromptLM.encode` of a sequence, continuing its longest remembered prefix."""
        import torch

        assert self.fast is not None
        hit = self.prefix_cache.longest(ids, len(ids) - 1)
        if hit is None:
            kvs, logits = self.fast.encode(ids, self.device)
        else:
            n, past = hit
            rest, logits = self.fast.encode(ids[n:], self.device, past)
            kvs = [(torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)) for (pk, pv), (k, v) in zip(past, rest, strict=True)]
        if remember:
            self.prefix_cache.add(ids, kvs)
        return kvs, logits

    def _p_yes(self, logits: Any) -> Any:
        import torch

        pair = torch.stack([logits[..., self.yes_id], logits[..., self.no_id]], dim=-1).float()
        return torch.softmax(pair, dim=-1)[..., 0]

    # ----------------------------------------------------------------------------------
    # Teacher-forced reference
    # ----------------------------------------------------------------------------------

    def verdict_probability(
        self, conversations: Sequence[Conversation], prefixes: Sequence[str]
    ) -> list[float | None]:
        """Teacher-forced P(Yes): chat prompt + assistant prefix, one forward pass, last position."""
        import torch

        if len(conversations) != len(prefixes):
            raise ValueError("conversations and prefixes differ in length")
        seqs = self._encode_all([self.render(c, p) for c, p in zip(conversations, prefixes, strict=True)])
        if self.fast is not None:  # one unpadded pass per sequence, from its longest remembered prefix
            with torch.inference_mode():
                logits = [self._encode_kv(seq)[1] for seq in seqs]
            return [float(p) for p in self._p_yes(torch.stack(logits)).tolist()] if seqs else []
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: list[float | None] = [None] * len(seqs)
        start = 0
        while start < len(order):
            longest = len(seqs[order[start]])
            rows = max(1, min(self.params.batch_size, self.params.token_budget // max(longest, 1)))
            chunk = order[start : start + rows]
            ids, mask, pos = self._left_pad([seqs[i] for i in chunk])
            with torch.inference_mode():
                logits = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1
                ).logits[:, -1]
            for i, p in zip(chunk, self._p_yes(logits).tolist(), strict=True):
                out[i] = float(p)
            start += rows
        return out

    # ----------------------------------------------------------------------------------
    # Sampling
    # ----------------------------------------------------------------------------------

    def batch_tokens(self, batch: Sequence[tuple[int, int]], lengths: Sequence[int], max_new: int) -> int:
        """KV tokens a batch of (conversation, sample) rows holds at most (what `token_budget` caps).

        Shared-prompt decoding keeps each prompt once (padded to the longest) plus `max_new`
        tokens per sample slot; the generic loop keeps (longest prompt + max_new) per row.
        """
        if not batch:
            return 0
        longest = max(lengths[i] for i, _ in batch)
        if self.fast is None:
            return len(batch) * (longest + max_new)
        counts: dict[int, int] = {}
        for i, _ in batch:
            counts[i] = counts.get(i, 0) + 1
        return len(counts) * (longest + max(counts.values()) * max_new)

    def _batches(self, lengths: Sequence[int], n: int, max_new: int) -> list[list[tuple[int, int]]]:
        """Rows (conversation, sample), longest prompts first, grouped so that a batch holds at
        most `batch_size` conversations and `batch_tokens` stays within `token_budget`."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        batches: list[list[tuple[int, int]]] = []
        current: list[tuple[int, int]] = []
        convs: set[int] = set()
        for i in order:
            for j in range(n):
                fits = self.batch_tokens([*current, (i, j)], lengths, max_new) <= self.params.token_budget
                if current and (not fits or (i not in convs and len(convs) >= self.params.batch_size)):
                    batches.append(current)
                    current, convs = [], set()
                current.append((i, j))
                convs.add(i)
        if current:
            batches.append(current)
        return batches

    @staticmethod
    def _nucleus(probs: Any, top_p: float, widths: Sequence[int] = (16, 128)) -> tuple[Any, Any]:
        """(kept probabilities in descending order, their token ids) of each row's top-p nucleus;
        tokens outside it get probability 0 (the best token always stays). Looks at the best
        `widths[0]` tokens first, then `widths[1]`, and sorts the whole vocabulary only when some
        row's nucleus is larger still (the result is the same whichever width holds it)."""
        vocab = probs.shape[-1]
        for k in [w for w in widths if w < vocab]:
            best, idx = probs.topk(k, dim=-1)  # descending
            before = best.cumsum(dim=-1) - best  # mass of the better tokens
            if bool((before[:, -1] >= top_p).all()):
                break
        else:
            best, idx = probs.sort(dim=-1, descending=True)
            before = best.cumsum(dim=-1) - best
        drop = before >= top_p
        drop[:, 0] = False
        return best.masked_fill(drop, 0.0), idx

    def _sample(self, logits: Any, rows: Sequence[_Row], sampling: SamplingParams) -> Any:
        """Next token of every row: inverse CDF, at the row's next uniform, of the
        temperature/top-p filtered softmax of its raw logits (argmax at temperature 0)."""
        import torch

        if sampling.temperature == 0:
            return logits.argmax(dim=-1)
        probs = (logits / sampling.temperature).softmax(dim=-1)
        if sampling.top_p < 1.0:
            kept, idx = self._nucleus(probs, sampling.top_p)
        else:
            kept, idx = probs, None
        cdf = kept.double().cumsum(dim=-1)
        u = torch.tensor([r.uniforms[len(r.ids)] for r in rows], dtype=torch.float64, device=logits.device)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        # u < 1, so pick is inside the support but for rounding at the very top: clamp to the
        # last token with probability > 0
        pick = torch.minimum(pick, (kept > 0).sum(dim=-1) - 1) if idx is not None else pick.clamp_(max=cdf.shape[-1] - 1)
        return pick if idx is None else idx.gather(-1, pick[:, None])[:, 0]

    def _advance(self, logits: Any, live: Sequence[_Row], sampling: SamplingParams, stop: Sequence[str]) -> Any:
        """One decoding step of the live rows (logits in their order): read verdicts where the
        text first ends with the phrase, sample, mark finished rows; returns the tokens."""
        import torch

        check = [k for k, r in enumerate(live) if r.p_yes is None and self.verdict.could_end(r.ids)]
        if check:
            tails = self.verdict.tails([live[k].prefix for k in check], [live[k].ids for k in check])
            hits = [k for k, t in zip(check, tails, strict=True) if t.endswith(VERDICT_PHRASE)]
            if hits:
                probs = self._p_yes(logits[hits]).tolist()
                for k, p in zip(hits, probs, strict=True):
                    live[k].p_yes = float(p)
        tokens = self._sample(logits, live, sampling)
        is_eos = torch.isin(tokens, self.eos_ids).tolist()
        for r, t, e in zip(live, tokens.tolist(), is_eos, strict=True):
            r.ids.append(t)
            if e:
                r.finish = "stop"
        if stop:
            width = 4 * max(len(s) for s in stop) + 4
            pending = [r for r in live if r.finish is None]
            texts = self.tokenizer.batch_decode([r.ids[-width:] for r in pending], skip_special_tokens=True)
            for r, t in zip(pending, texts, strict=True):
                if any(s in t for s in stop):
                    r.finish, r.stop_at = "stop", len(r.ids)
        return tokens

    def _new_rows(
        self, batch: Sequence[tuple[int, int]], prefixes: Sequence[str], seeds: Sequence[int], sampling: SamplingParams
    ) -> list[_Row]:
        """Rows for (conversation, sample) pairs, each with its own seeded uniforms."""
        import torch

        rows = []
        draws = sampling.max_new_tokens if sampling.temperature > 0 else 0
        for i, j in batch:
            g = torch.Generator(device=self.device)
            g.manual_seed(row_seed(seeds[i], j))
            u = torch.rand(draws, generator=g, dtype=torch.float64, device=self.device).tolist() if draws else []
            rows.append(_Row(conv=i, index=j, uniforms=u, prefix=prefixes[i]))
        return rows

    def _generate_shared(
        self,
        prompts: Sequence[list[int]],
        prefixes: Sequence[str],
        seeds: Sequence[int],
        sampling: SamplingParams,
        stop: Sequence[str],
        bar: Any,
        forced: Any = None,
    ) -> list[_Row]:
        """Continuous batching on `SharedPromptLM`: prompts enter the batch longest first, each
        encoded once, unpadded, with its (up to) K sample rows sharing its KV; a prompt leaves
        as soon as all its rows are done and the freed room takes the next prompts. The batch
        keeps at most `batch_size` prompts and `token_budget` KV tokens (prompts padded to the
        longest in the batch, plus `max_new_tokens` per sample row). A step computes only the
        live rows (`SharedPromptLM.step`'s `compute`): a prompt waiting for its slowest sample
        costs its prompt-part attention and that sample's row, not K rows.

        `forced`, when given, is (templates, teacher_forced): each row that ends without the
        one-pass verdict gets `forced_p_yes` from its decoding KV (`_forced_from_cache`) before
        its prompt leaves the batch."""
        import torch

        assert self.fast is not None
        n, max_new, budget = sampling.n, sampling.max_new_tokens, self.params.token_budget
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        if not order:
            return []
        slots = max(1, min(n, (budget - len(prompts[order[0]])) // max(1, max_new)))
        queue = deque((i, range(j, min(n, j + slots))) for i in order for j in range(0, n, slots))
        dev = self.device
        dtype = self.model.get_input_embeddings().weight.dtype
        state = self.fast.empty_state(slots, max_new - 1, dtype, dev, max_prompts=self.params.batch_size, budget=budget)
        grid: list[_Row | None] = []  # row c * slots + s: sample slot s of prompt c (None: unused)
        logits = torch.zeros((0, self.model.get_output_embeddings().weight.shape[0]), device=dev)  # model vocab (may be padded past the tokenizer)
        done: list[_Row] = []

        def active(r: _Row | None) -> bool:
            return r is not None and r.finish is None and len(r.ids) < max_new

        with torch.inference_mode():
            while queue or grid:
                enter: list[tuple[int, range]] = []
                while queue:
                    count = state.prompts + len(enter) + 1
                    width = max([state.width, len(prompts[queue[0][0]])] + [len(prompts[i]) for i, _ in enter])
                    if count > 1 and (count > self.params.batch_size or count * (width + slots * max_new) > budget):
                        break
                    enter.append(queue.popleft())
                if enter:
                    encoded = [self._encode_kv(prompts[i]) for i, _ in enter]
                    state.add([kvs for kvs, _ in encoded])
                    held = max(state.prompts * (state.width + slots * max_new), state.allocated_tokens)
                    self.peak_batch = max(self.peak_batch, (state.prompts, held))
                    for i, js in enter:
                        new = self._new_rows([(i, j) for j in js], prefixes, seeds, sampling)
                        grid += new + [None] * (slots - len(new))
                    fresh = [last.expand(slots, -1) for _, last in encoded]
                    logits = torch.cat([logits[: len(grid) - slots * len(enter)], *fresh])
                live = [k for k, r in enumerate(grid) if active(r)]
                index = torch.tensor(live, dtype=torch.long, device=dev)
                tokens = self._advance(logits[index], [grid[k] for k in live], sampling, stop)
                feed = torch.full((len(grid),), self.pad_id, dtype=torch.long, device=dev)
                feed[index] = tokens
                keep = [c for c in range(state.prompts) if any(active(r) for r in grid[c * slots : (c + 1) * slots])]
                if len(keep) < state.prompts:
                    kept = set(keep)
                    for c in range(state.prompts):
                        if c not in kept:
                            finished = [r for r in grid[c * slots : (c + 1) * slots] if r is not None]
                            if forced is not None:
                                self._forced_from_cache(state, c, finished, prompts, forced, stop)
                            done += finished
                            bar.update(len(finished))
                    keep = _fill_holes(keep)
                    state.keep(keep)
                    select = torch.tensor([c * slots + s for c in keep for s in range(slots)], dtype=torch.long)
                    feed = feed[select.to(dev)]
                    grid = [grid[c * slots + s] for c in keep for s in range(slots)]
                if grid:
                    compute = [k for k, r in enumerate(grid) if active(r)]
                    logits = self.fast.step(
                        feed, [len(r.ids) - 1 if r is not None else 0 for r in grid], state, compute
                    )
        return done

    def _forced_from_cache(
        self, state: _SharedState, c: int, rows: Sequence[_Row], prompts: Sequence[list[int]], forced: Any,
        stop: Sequence[str],
    ) -> None:
        """`forced_p_yes` of the rows of batch prompt `c` that ended without the one-pass verdict:
        the teacher-forced pass `verdict_probability(conversation, teacher_forced(text))`, run
        only over the tokens past the longest prefix it shares with what was decoded (the
        prompt's KV and the row's generated KV are reused; typically only the fallback question
        is encoded). Same number as the separate pass up to float rounding (the generated KV
        comes from the batched decoding step, not the prompt encoder). A row keeps None when
        the template's last special token does not split the tokenization (the scorer then runs
        the separate pass)."""
        import torch

        templates, teacher_forced = forced
        todo = [r for r in rows if r.p_yes is None]
        if not todo:
            return
        room = state.gen_k[0].shape[3]
        plen = state.prompt_len[c]
        dev = state.prompt_bias.device
        for r in todo:
            template, prompt = templates[r.conv], prompts[r.conv]
            ids = self._tail_ids(template, prompt, r.prefix, teacher_forced(self._finish(r, stop).text))
            if ids is None:
                continue
            # KV is valid for the prompt and generated tokens [0, min(len - 1, room - 1)): a
            # finished row's later (pad) feeds overwrite the position after its last token
            decoded = prompt + r.ids[: max(0, min(len(r.ids) - 1, room - 1))]
            limit = min(len(decoded), len(ids) - 1)
            n = 0
            while n < limit and decoded[n] == ids[n]:
                n += 1
            s = r.index % state.slots
            past = []
            for layer in range(len(state.prompt_k)):
                pk, pv = state.prompt_k[layer][c, :, : min(n, plen)], state.prompt_v[layer][c, :, : min(n, plen)]
                if n > plen:
                    pk = torch.cat([pk, state.gen_k[layer][c, :, s, : n - plen]], dim=1)
                    pv = torch.cat([pv, state.gen_v[layer][c, :, s, : n - plen]], dim=1)
                past.append((pk, pv))
            _, logits = self.fast.encode(ids[n:], dev, past if n else None)
            r.forced_p_yes = float(self._p_yes(logits))

    def _tail_ids(self, template: str, prompt: list[int], prefix: str, text: str) -> list[int] | None:
        """Token ids of `template + text` (what `verdict_probability` encodes), tokenizing only
        from the template's last special token on (the tokenizer splits there); None when the
        prompt's own ids (`template + prefix`) do not tokenize that way."""
        cut = self._last_special(template)
        if cut is None:
            return None
        at, pos = cut
        head = len(prompt) - 1
        while head >= 0 and prompt[head] != self._special_ids[template[at : at + pos]]:
            head -= 1
        if head < 0:
            return None
        tails = self._encode_all([template[at:] + prefix, template[at:] + text])
        if prompt[head:] != tails[0]:
            return None
        return prompt[:head] + tails[1]

    def _last_special(self, template: str) -> tuple[int, int] | None:
        """(position, length) of the last added special token in a rendered prompt."""
        best: tuple[int, int] | None = None
        for tok in self._special_ids:
            at = template.rfind(tok)
            if at >= 0 and (best is None or at > best[0]):
                best = (at, len(tok))
        return best

    def _decode_batch(
        self,
        batch: list[tuple[int, int]],
        prompts: Sequence[list[int]],
        prefixes: Sequence[str],
        seeds: Sequence[int],
        sampling: SamplingParams,
        stop: Sequence[str],
    ) -> list[_Row]:
        import torch

        convs = list(dict.fromkeys(i for i, _ in batch))
        slot = {c: k for k, c in enumerate(convs)}
        rows = self._new_rows(batch, prefixes, seeds, sampling)
        ids, mask, pos = self._left_pad([prompts[c] for c in convs])
        with torch.inference_mode():
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1
            )
            select = torch.tensor([slot[r.conv] for r in rows], device=self.device)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            cache.batch_select_indices(select)  # the prompt's cache, once per sample
            logits = out.logits[:, -1].float()[select]
            mask = mask[select]
            next_pos = pos[select, -1] + 1
            alive = list(range(len(rows)))
            for step in range(sampling.max_new_tokens):
                live = [rows[a] for a in alive]
                tokens = self._advance(logits, live, sampling, stop)
                if step == sampling.max_new_tokens - 1:
                    break
                keep = [k for k, r in enumerate(live) if r.finish is None]
                if not keep:
                    break
                if len(keep) < len(live):
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    mask, next_pos, tokens = mask[index], next_pos[index], tokens[index]
                    alive = [alive[k] for k in keep]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                logits = self.model(
                    input_ids=tokens[:, None],
                    attention_mask=mask,
                    position_ids=next_pos[:, None],
                    use_cache=True,
                    **{self._cache_arg: cache},
                ).logits[:, -1].float()
                next_pos = next_pos + 1
        return rows

    def _finish(self, row: _Row, stop: Sequence[str]) -> Generation:
        ids = row.ids
        if row.finish == "stop" and row.stop_at is None and ids and ids[-1] in self._eos_set:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if row.stop_at is not None:
            cut = min((p for p in (text.find(s) for s in stop) if p >= 0), default=len(text))
            text = text[:cut]
        return Generation(
            text=text,
            p_yes=row.p_yes,
            num_tokens=len(row.ids),
            finish_reason=row.finish or "length",
            forced_p_yes=row.forced_p_yes,
        )

    def generate(
        self,
        conversations: Sequence[Conversation],
        sampling: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
        assistant_prefixes: Sequence[str] | None = None,
        stop: Sequence[str] | None = None,
        progress: bool = False,
        teacher_forced: Callable[[str], str] | None = None,
    ) -> list[list[Generation]]:
        """`sampling.n` seeded samples per conversation, with one-pass verdict probabilities.

        `teacher_forced(text)`, when given, is the assistant prefix of the fallback pass of a
        sample without the one-pass verdict: its `forced_p_yes` is then
        `verdict_probability([conversation], [teacher_forced(text)])`, read from the decoding
        KV (shared-prompt path only; elsewhere it stays None)."""
        from tqdm.auto import tqdm

        n_conv = len(conversations)
        seeds, prefixes = request_rows(n_conv, sampling, seeds, assistant_prefixes)
        stop = [s for s in (stop or []) if s]
        rendered = [self.render(c, p) for c, p in zip(conversations, prefixes, strict=True)]
        prompts = self._encode_all(rendered)
        forced = None
        if teacher_forced is not None:
            templates = [r[: len(r) - len(p)] if p else r for r, p in zip(rendered, prefixes, strict=True)]
            forced = (templates, teacher_forced)
        results: list[list[Generation | None]] = [[None] * sampling.n for _ in range(n_conv)]
        with tqdm(total=n_conv * sampling.n, desc="generate (hf)", unit="sample", disable=not progress) as bar:
            if self.fast is not None:
                for row in self._generate_shared(prompts, prefixes, seeds, sampling, stop, bar, forced):
                    results[row.conv][row.index] = self._finish(row, stop)
            else:
                for batch in self._batches([len(p) for p in prompts], sampling.n, sampling.max_new_tokens):
                    for row in self._decode_batch(batch, prompts, prefixes, seeds, sampling, stop):
                        results[row.conv][row.index] = self._finish(row, stop)
                    bar.update(len(batch))
        return [[g for g in per if g is not None] for per in results]

    def reset_prefix_cache(self) -> None:
        """Forget the remembered prompt KV (benchmarks start every timed run from nothing)."""
        self.prefix_cache.clear()

    def close(self) -> None:
        """Drop the model, the remembered KV (and the CUDA cache when on a GPU)."""
        import torch

        self.model = None
        self.fast = None
        self.prefix_cache.clear()
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
