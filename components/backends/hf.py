"""The `hf` generation backend: transformers models with per-row seeded sampling.

This module is the backend (`HFBackend`: prompts, batching, the decoding loops, verdicts); its
parts live beside it: the inference engine in `hf_engine.py` (`SharedPromptLM`), the prefix
cache in `prefix_cache.py`, the sampler and its fingerprint in `sampler.py` (`SAMPLER`) and the
verdict-phrase locator, shared with vllm, in `verdict.py`.

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
  scratch (its query chunks and matrix-product blocks sit at the same absolute positions:
  `hf_engine.blocked_linear`), so samples and verdict probabilities do not depend on what the cache held (resumed
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
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from components.backends.base import BackendError, Conversation, Generation, request_rows
from components.backends.hf_engine import (
    SharedPromptLM,
    SharedState,
    fast_path_supported,
    fill_holes,
)
from components.backends.prefix_cache import PrefixCache
from components.backends.sampler import SAMPLER, Row, new_rows, sample_tokens
from components.backends.verdict import VerdictLocator
from components.config import BackendParams, SamplingParams
from components.prompts import NO_TOKEN_TEXT, VERDICT_PHRASE, YES_TOKEN_TEXT


def resolve_device(name: str) -> str:
    """`auto` picks cuda when available, else cpu; anything else is taken as a torch device."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


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

        from components.model_folder import check_tokenizer_folder, torch_dtype

        self.params = params
        self.model_path = str(model_path)
        self.device = resolve_device(params.device)
        check_tokenizer_folder(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if not self.tokenizer.chat_template:
            raise BackendError(f"{model_path}: tokenizer has no chat template")
        try:
            weights = torch_dtype(dtype)
        except KeyError:
            raise BackendError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)") from None
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=weights)
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
        self._warm_up()

    def _warm_up(self) -> None:
        """One short generation at load, forgotten at once, so that no caller's work is the first
        generation in the process. The first one rounded differently now and then (observed on
        2026-12-07, Intel Xeon with MKL 2024.2, two threads: a sample's verdict probability
        0.46523255 instead of 0.46523064, in about one process in ten, only ever in the first
        call), which made a killed-and-resumed `sample-pairs` differ from an uninterrupted one."""
        conversation = [{"role": "user", "content": "What is 1 + 1?"}]
        self.generate([conversation], SamplingParams(n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0))
        self.prefix_cache.clear()
        self.peak_batch = (0, 0)

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

    def _advance(self, logits: Any, live: Sequence[Row], sampling: SamplingParams, stop: Sequence[str]) -> Any:
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
        tokens = sample_tokens(logits, live, sampling)
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

    def _generate_shared(
        self,
        prompts: Sequence[list[int]],
        prefixes: Sequence[str],
        seeds: Sequence[int],
        sampling: SamplingParams,
        stop: Sequence[str],
        bar: Any,
        forced: Any = None,
    ) -> list[Row]:
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
        # buffers for no more prompts than the call has: with batch_size 64, a one-prompt call
        # allocated and zeroed 64 prompts' KV (10-15% of the naive bench baseline's time)
        cap = min(self.params.batch_size, len(order))
        state = self.fast.empty_state(slots, max_new - 1, dtype, dev, max_prompts=cap, budget=budget)
        grid: list[Row | None] = []  # row c * slots + s: sample slot s of prompt c (None: unused)
        logits = torch.zeros((0, self.model.get_output_embeddings().weight.shape[0]), device=dev)  # model vocab (may be padded past the tokenizer)
        done: list[Row] = []

        def active(r: Row | None) -> bool:
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
                        new = new_rows([(i, j) for j in js], prefixes, seeds, sampling, self.device)
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
                    leaving = [
                        (c, [r for r in grid[c * slots : (c + 1) * slots] if r is not None])
                        for c in range(state.prompts) if c not in kept
                    ]
                    if forced is not None:
                        self._forced_from_cache(state, leaving, prompts, forced, stop)
                    for _, finished in leaving:
                        done += finished
                        bar.update(len(finished))
                    keep = fill_holes(keep)
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
        self, state: SharedState, leaving: Sequence[tuple[int, Sequence[Row]]], prompts: Sequence[list[int]],
        forced: Any, stop: Sequence[str],
    ) -> None:
        """`forced_p_yes` of the rows of the leaving batch prompts (position `c`, its rows) that
        ended without the one-pass verdict: the teacher-forced pass `verdict_probability(conversation,
        teacher_forced(text))`, run only over the tokens past the longest prefix it shares with
        what was decoded (the prompt's KV and the row's generated KV are read in place; typically
        only the fallback question is encoded), for all those rows in batched passes
        (`SharedPromptLM.continue_many`). Same number as the separate pass up to float rounding
        (the reused KV comes from the batched decoding step, not the prompt encoder). A row keeps
        None when the template's last special token does not split the tokenization (the scorer
        then runs the separate pass)."""

        templates, teacher_forced = forced
        todo = [(c, r) for c, rows in leaving for r in rows if r.p_yes is None]
        if not todo:
            return
        room = state.gen_k[0].shape[3]
        dev = state.prompt_bias.device
        tails = self._tail_ids_many([
            (templates[r.conv], prompts[r.conv], r.prefix, teacher_forced(self._finish(r, stop).text)) for _, r in todo
        ])
        items: list[tuple[Row, list[int], list[list[tuple[Any, Any]]]]] = []
        for (c, r), ids in zip(todo, tails, strict=True):
            if ids is None:
                continue
            # KV is valid for the prompt and generated tokens [0, min(len - 1, room - 1)): a
            # finished row's later (pad) feeds overwrite the position after its last token
            prompt, plen = prompts[r.conv], state.prompt_len[c]
            decoded = prompt + r.ids[: max(0, min(len(r.ids) - 1, room - 1))]
            limit = min(len(decoded), len(ids) - 1)
            n = 0
            while n < limit and decoded[n] == ids[n]:
                n += 1
            if n == 0:  # nothing to reuse: the separate pass's own encoding
                _, logits = self.fast.encode(ids, dev)
                r.forced_p_yes = float(self._p_yes(logits))
                continue
            s, cut = r.index % state.slots, min(n, plen)
            segments = []
            for layer in range(len(state.prompt_k)):
                segs = [(state.prompt_k[layer][c, :, :cut], state.prompt_v[layer][c, :, :cut])]
                if n > plen:
                    segs.append((state.gen_k[layer][c, :, s, : n - plen], state.gen_v[layer][c, :, s, : n - plen]))
                segments.append(segs)
            items.append((r, ids[n:], segments))
        for group in self._continuation_groups(items):
            logits = self.fast.continue_many([(ids, segs) for _, ids, segs in group], dev)
            for (r, _, _), p in zip(group, self._p_yes(logits).tolist(), strict=True):
                r.forced_p_yes = float(p)

    def _continuation_groups(self, items: Sequence[tuple[Row, list[int], Any]]) -> list[list[Any]]:
        """`items` (row, new ids, past segments) in batches for `continue_many`: by increasing
        number of new tokens, a batch ending where the next item has more than 5/4 of the first's
        (at least 10: the padding) or where its padded KV would pass `token_budget`."""
        order = sorted(items, key=lambda it: len(it[1]))
        groups: list[list[Any]] = []
        widest = 0
        for it in order:
            past = sum(int(k.shape[1]) for k, _ in it[2][0])
            if groups:
                g = groups[-1]
                width = max(widest, past + len(it[1]))
                if 4 * len(it[1]) <= 5 * max(8, len(g[0][1])) and (len(g) + 1) * width <= self.params.token_budget:
                    g.append(it)
                    widest = width
                    continue
            groups.append([it])
            widest = past + len(it[1])
        return groups

    def _tail_ids_many(self, requests: Sequence[tuple[str, list[int], str, str]]) -> list[list[int] | None]:
        """For each (template, prompt ids, prefix, text): the token ids of `template + text` (what
        `verdict_probability` encodes), tokenizing only from the template's last special token on
        (the tokenizer splits there), all texts in one tokenizer call; None where the prompt's own
        ids (`template + prefix`) do not tokenize that way."""
        heads: list[tuple[int, int] | None] = []  # (position in the prompt ids, in the template)
        texts: list[str] = []
        for template, prompt, prefix, text in requests:
            cut = self._last_special(template)
            head = len(prompt) - 1
            if cut is not None:
                at, size = cut
                while head >= 0 and prompt[head] != self._special_ids[template[at : at + size]]:
                    head -= 1
            if cut is None or head < 0:
                heads.append(None)
                continue
            heads.append((head, cut[0]))
            texts += [template[cut[0] :] + prefix, template[cut[0] :] + text]
        encoded = iter(self._encode_all(texts))
        out: list[list[int] | None] = []
        for (_, prompt, _, _), at in zip(requests, heads, strict=True):
            if at is None:
                out.append(None)
                continue
            own, tail = next(encoded), next(encoded)
            out.append(prompt[: at[0]] + tail if prompt[at[0] :] == own else None)
        return out

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
    ) -> list[Row]:
        import torch

        convs = list(dict.fromkeys(i for i, _ in batch))
        slot = {c: k for k, c in enumerate(convs)}
        rows = new_rows(batch, prefixes, seeds, sampling, self.device)
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

    def _finish(self, row: Row, stop: Sequence[str]) -> Generation:
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
