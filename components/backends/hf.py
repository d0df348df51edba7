"""The `hf` generation backend: transformers models with per-row seeded sampling.

Decoding is a plain KV-cache loop over left-padded batches (no `generate()`), which gives what
R-PRM scoring needs exactly:
- each prompt is encoded once; its cache is then repeated for its K samples;
- sample j of conversation i draws from its own `torch.Generator` seeded with
  `row_seed(seeds[i], j)` through the Gumbel-max trick on temperature/top-p filtered RAW
  logits, so a sample does not depend on which other rows share its batch;
- the verdict probability P(" Yes") / (P(" Yes") + P(" No")) is read from the raw logits at the
  first step whose text (assistant prefix + generated so far) ends with
  `Is the step correct (Yes/No)?` — the same number the teacher-forced reference
  (`verdict_probability`) computes on the analysis cut at that phrase;
- finished rows (end-of-turn token, stop string) leave the batch at once.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.backends.base import BackendError, Conversation, Generation, row_seed
from components.config import BackendParams, SamplingParams
from components.prompts import NO_TOKEN_TEXT, VERDICT_PHRASE, YES_TOKEN_TEXT


@dataclass
class _Row:
    """One sample being decoded: conversation `conv`, sample `index`."""

    conv: int
    index: int
    generator: Any
    prefix: str
    ids: list[int] = field(default_factory=list)
    p_yes: float | None = None
    finish: str | None = None
    stop_at: int | None = None  # generated tokens kept when a stop string ended the row


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


class HFBackend:
    """Generation backend on a local transformers causal LM (see module docstring)."""

    name = "hf"

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
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"

    # ----------------------------------------------------------------------------------
    # Prompts
    # ----------------------------------------------------------------------------------

    def render(self, conversation: Conversation, prefix: str = "") -> str:
        """Chat template with the assistant generation prompt, plus an assistant prefix."""
        text = self.tokenizer.apply_chat_template(
            list(conversation), tokenize=False, add_generation_prompt=True
        )
        return text + prefix

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

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
        seqs = [self._encode(self.render(c, p)) for c, p in zip(conversations, prefixes, strict=True)]
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

    def _batches(self, lengths: Sequence[int], n: int, max_new: int) -> list[list[tuple[int, int]]]:
        """Rows (conversation, sample) grouped so that a batch holds at most `batch_size`
        conversations and (prompt + new tokens) x rows stays within `token_budget`."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        batches: list[list[tuple[int, int]]] = []
        current: list[tuple[int, int]] = []
        convs: set[int] = set()
        longest = 0
        for i in order:
            for j in range(n):
                width = max(longest, lengths[i]) + max_new
                fits = (len(current) + 1) * width <= self.params.token_budget
                if current and (not fits or (i not in convs and len(convs) >= self.params.batch_size)):
                    batches.append(current)
                    current, convs, longest = [], set(), 0
                current.append((i, j))
                convs.add(i)
                longest = max(longest, lengths[i])
        if current:
            batches.append(current)
        return batches

    def _sample(self, logits: Any, rows: Sequence[_Row], sampling: SamplingParams) -> Any:
        """Next token of every row: Gumbel-max on temperature/top-p filtered raw logits."""
        import torch

        if sampling.temperature == 0:
            return logits.argmax(dim=-1)
        scores = logits / sampling.temperature
        if sampling.top_p < 1.0:
            sorted_scores, idx = scores.sort(dim=-1, descending=True)
            probs = sorted_scores.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass of the better tokens
            drop = before >= sampling.top_p
            drop[:, 0] = False
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(-1, idx, sorted_scores)
        noise = torch.stack(
            [
                torch.empty(scores.shape[-1], device=scores.device).exponential_(generator=r.generator)
                for r in rows
            ]
        )
        return (scores - noise.log()).argmax(dim=-1)

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
        rows = []
        for i, j in batch:
            g = torch.Generator(device=self.device)
            g.manual_seed(row_seed(seeds[i], j))
            rows.append(_Row(conv=i, index=j, generator=g, prefix=prefixes[i]))
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
            max_len = max(len(s) for s in stop) if stop else 0
            for step in range(sampling.max_new_tokens):
                live = [rows[a] for a in alive]
                # Verdict: read where the text so far ends with the phrase (first time only).
                check = [
                    k for k, r in enumerate(live) if r.p_yes is None and self.verdict.could_end(r.ids)
                ]
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
                    pending = [r for r in live if r.finish is None]
                    windows = [r.ids[-(4 * max_len + 4) :] for r in pending]
                    for r, t in zip(pending, self.tokenizer.batch_decode(windows, skip_special_tokens=True), strict=True):
                        if any(s in t for s in stop):
                            r.finish, r.stop_at = "stop", len(r.ids)
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
    ) -> list[list[Generation]]:
        """`sampling.n` seeded samples per conversation, with one-pass verdict probabilities."""
        from tqdm.auto import tqdm

        n_conv = len(conversations)
        seeds = list(seeds) if seeds is not None else [sampling.seed + i for i in range(n_conv)]
        prefixes = list(assistant_prefixes) if assistant_prefixes is not None else [""] * n_conv
        if len(seeds) != n_conv or len(prefixes) != n_conv:
            raise ValueError("seeds / assistant_prefixes must have one entry per conversation")
        stop = [s for s in (stop or []) if s]
        prompts = [self._encode(self.render(c, p)) for c, p in zip(conversations, prefixes, strict=True)]
        results: list[list[Generation | None]] = [[None] * sampling.n for _ in range(n_conv)]
        batches = self._batches([len(p) for p in prompts], sampling.n, sampling.max_new_tokens)
        with tqdm(total=n_conv * sampling.n, desc="generate (hf)", unit="sample", disable=not progress) as bar:
            for batch in batches:
                for row in self._decode_batch(batch, prompts, prefixes, seeds, sampling, stop):
                    results[row.conv][row.index] = self._finish(row, stop)
                bar.update(len(batch))
        return [[g for g in per if g is not None] for per in results]

    def close(self) -> None:
        """Drop the model (and the CUDA cache when on a GPU)."""
        import torch

        self.model = None
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
