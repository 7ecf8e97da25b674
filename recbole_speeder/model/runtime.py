"""Speeder's speed machinery behind one interface: how fast the backbone runs, never what it computes.

- ``autocast``: mixed precision (``autocast_dtype``), the frozen decoder weights stored in its dtype once;
- ``scoring``: ``torch.inference_mode`` while scoring without gradients, its caches filled first;
- ``cached``: values computed once per evaluation (every item's MRC tokens and output vectors);
- ``hidden_states``: the instruction prefix's keys/values served from a cache while the LLM's weights hold still
  (``prefix_cache``), rows run in groups of similar prompt length (``length_bucket_*``), the last decoder layer
  computing only the states read (``last_layer_reads_only``, ``kernels.py``);
- ``start_decoding`` / ``extend`` / ``fork``: the same for generation with a growing cache;
- ``distinct_histories``: one prompt per distinct history when RecBole repeats a user's row per candidate.

Each switch is a config key; ``tests/test_speed_equivalence.py`` checks that each one leaves the results as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from logging import getLogger

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from recbole_speeder.model.kernels import decode_at, reads_only_supported, store_frozen_linears_in
from recbole_speeder.model.prompt import Prompt, PromptBuilder
from recbole_speeder.model.spae import NO_ITEM, SequentialPositionAwareness

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer
NO_NATIVE_BF16 = (
    "autocast_dtype auto: this CPU has no native bf16 (AVX512-BF16 or AMX), so Speeder computes in float32, which "
    "is several times slower than native bf16 (BENCHMARKS.md)"
)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype that ``autocast_dtype: name`` means on ``device``; None is full float32.

    ``auto`` is bfloat16 only where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or
    AMX): elsewhere bf16 is emulated and slower than float32.
    """
    if name == "float32":
        return None
    if name == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            cpu = torch.cpu
            native = device.type == "cpu" and (cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
            if not native:
                getLogger().warning(NO_NATIVE_BF16)
        return torch.bfloat16 if native else None
    return getattr(torch, name)  # bfloat16 or float16 (config.choices.AUTOCAST_DTYPES)


def outside_inference_mode(scores: torch.Tensor) -> torch.Tensor:
    """Scores RecBole may edit in place (it masks the padding item and history items) once inference mode is left."""
    return scores.clone() if scores.is_inference() and not torch.is_inference_mode_enabled() else scores


def history_groups(users: torch.Tensor, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
    """Group id per row: rows with the same user and history share one prompt."""
    key = torch.cat([users.unsqueeze(1), item_seq_len.unsqueeze(1), item_seq], dim=1)
    return torch.unique(key, dim=0, return_inverse=True)[1]


def distinct_histories(users, item_seq, item_seq_len) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first row of each distinct history, in row order; group id per row)``: RecBole's sampled evaluation
    repeats a user's row once per candidate, and one prompt per history is enough to score them all. Groups keep
    the rows' order, so a batch without repeats runs exactly as given (same floating-point sums)."""
    groups = history_groups(users, item_seq, item_seq_len)
    rows = torch.arange(len(groups), device=groups.device)
    first = torch.full((int(groups.max()) + 1,), len(groups), device=groups.device)
    first = first.scatter_reduce(0, groups, rows, reduce="amin")
    order = first.argsort()
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    return first[order], rank[groups]


def length_groups(lengths: torch.Tensor, max_tokens: int, max_padding: float) -> list[torch.Tensor]:
    """Row indices of a batch in groups of similar prompt length, each padded only to its own longest prompt.

    Histories are long-tailed (Beauty: median 3 items, max 50), so a batch padded to its longest prompt is mostly
    padding (8x on Beauty's training batches). Rows are sorted by length and cut greedily before a row that would
    make the group hold more than ``max_tokens`` padded slots (rows x longest) or pad more than ``max_padding``
    times its real tokens; a row longer than ``max_tokens`` gets a group of its own. A batch that already meets
    both bounds, or ``max_tokens <= 0``, is one group in its own order.
    """
    n_rows, longest = len(lengths), int(lengths.max())
    if max_tokens <= 0 or n_rows * longest <= min(max_tokens, (1 + max_padding) * int(lengths.sum())):
        return [torch.arange(n_rows, device=lengths.device)]
    order = torch.argsort(lengths, stable=True)
    groups, start, real = [], 0, 0
    for end, length in enumerate(lengths[order].tolist()):  # one int per row, no tensor work
        slots = (end - start + 1) * length  # sorted: this row is the group's longest
        if end > start and (slots > max_tokens or slots > (1 + max_padding) * (real + length)):
            groups.append(order[start:end])
            start, real = end, 0
        real += length
    groups.append(order[start:])
    return groups


@dataclass
class Decoding:
    """Prompts already run through the backbone, ready to continue: cache, what the attention mask is built from
    (tokens after the prefix), next position, last state."""

    cache: DynamicCache
    items: torch.Tensor  # [B, slots] history item of each token (``prompt.slot_items``)
    valid: torch.Tensor  # [B, slots] True on real tokens
    next_position: torch.Tensor  # [B]
    last: torch.Tensor  # [B, d] hidden state of the prompt's last token


class Runtime:
    """Runs Speeder's backbone over prompts as fast as the config allows. A plain object, not a module: it holds
    references to the model's backbone, prompt builder and SPAE (for its attention bias), and caches."""

    def __init__(self, config, llm: nn.Module, prompt: PromptBuilder, spae: SequentialPositionAwareness):
        self.llm, self.prompt, self.spae = llm, prompt, spae
        self.dtype = autocast_dtype(config["autocast_dtype"], torch.device(config["device"]))
        self.inference_mode = bool(config["inference_mode"])
        self.prefix_cache = bool(config["prefix_cache"])
        self.length_bucket_tokens = int(config["length_bucket_tokens"] or 0)
        self.length_bucket_padding = float(config["length_bucket_padding"])
        if config["autocast_frozen_weights"] and self.dtype is not None:
            store_frozen_linears_in(llm, self.dtype)
        self.last_layer_reads_only = bool(config["last_layer_reads_only"])
        if self.last_layer_reads_only and not reads_only_supported(llm.get_decoder()):
            getLogger().warning("last_layer_reads_only needs a Llama-family backbone: the last layer runs in full")
            self.last_layer_reads_only = False
        self.backbone_dtype = llm.get_input_embeddings().weight.dtype
        self.d_model = llm.get_input_embeddings().embedding_dim
        self._cache: dict[str, torch.Tensor] = {}
        self._prefix_kv: KeyValues | None = None

    # ------------------------------------------------------------------ precision, inference mode, caches
    def autocast(self) -> AbstractContextManager:
        """Mixed precision for MRC, the backbone and the training logits; a no-op when off."""
        return torch.autocast(torch.device(self.prompt.prefix_ids.device).type, dtype=self.dtype,
                              enabled=self.dtype is not None)

    def scoring(self, warm: Callable[[], object]) -> AbstractContextManager:
        """``torch.inference_mode`` while scoring without gradients (``inference_mode``), else nothing.

        ``warm()`` and the prefix cache fill the once-per-evaluation caches first, outside it, so that they are
        ordinary tensors.
        """
        if not self.inference_mode or torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            return nullcontext()
        warm()
        if self.prefix_cache and self.prompt.n_prefix:
            self.prefix_key_values()
        return torch.inference_mode()

    def cached(self, key: str, compute: Callable[[], torch.Tensor], keep: bool) -> torch.Tensor:
        """``compute()``, kept under ``key`` until :meth:`drop_caches` when ``keep`` and gradients are off."""
        if torch.is_grad_enabled() or not keep:
            return compute()
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def holds(self, key: str, value: torch.Tensor) -> bool:
        """Whether ``value`` is the one cached under ``key``."""
        return self._cache.get(key) is value

    def drop_caches(self) -> None:
        """Forget every cached value and the prefix keys/values (the weights they came from have changed)."""
        self._cache.clear()
        self._prefix_kv = None

    # ------------------------------------------------------------------ backbone
    def _llm_trains(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.llm.parameters())

    def prefix_key_values(self) -> KeyValues:
        """The instruction prefix's keys/values: one batch-1 forward, reused while the LLM's weights hold still."""
        if self._prefix_kv is not None and not self._llm_trains():
            return self._prefix_kv
        prefix = self.llm.get_input_embeddings()(self.prompt.prefix_ids).unsqueeze(0)
        # A cached prefix serves many batches: compute it without (LoRA) dropout, so it draws no random numbers
        # and a run resumed mid-epoch (trainer/checkpointing.py) gets the same prefix and the same RNG stream.
        training, cached = self.llm.training, not self._llm_trains()
        self.llm.train(training and not cached)
        with self.autocast():  # in the dtype the backbone's own keys/values will have
            cache = self.llm.get_decoder()(inputs_embeds=prefix, use_cache=True).cache
        self.llm.train(training)
        key_values = [(layer.keys, layer.values) for layer in cache.layers]
        if not self._llm_trains():
            self._prefix_kv = [(k.detach(), v.detach()) for k, v in key_values]
        return key_values

    def _prefixed(self, embeds: torch.Tensor, cache: DynamicCache | None, prefix_kv: KeyValues | None
                  ) -> tuple[torch.Tensor, int]:
        """``embeds`` after the instruction prefix: the prefix's keys/values (``prefix_kv``, else computed) put into
        ``cache`` (``prefix_cache``), or its embeddings prepended; returns the input and its first prompt slot."""
        batch, n_prefix = embeds.shape[0], self.prompt.n_prefix
        if n_prefix and self.prefix_cache:
            for layer, (keys, values) in enumerate(prefix_kv or self.prefix_key_values()):
                cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
            return embeds, 0
        if n_prefix:
            prefix = self.llm.get_input_embeddings()(self.prompt.prefix_ids).to(embeds.dtype).expand(batch, -1, -1)
            return torch.cat([prefix, embeds], dim=1), n_prefix
        return embeds, 0

    def attention_mask(
        self, items: torch.Tensor, n_queries: int, key_valid: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The backbone's attention mask for prompt tokens of history items ``items [B, K]`` (``slot_items``) after
        the instruction prefix, the queries being the last ``n_queries`` tokens, prefix included; ``key_valid
        [B, K]`` marks real tokens where padding precedes a query (generation).

        With SPAE's relative cue, a 4D mask carrying its item-distance bias; otherwise ``key_valid`` as the usual
        2D padding mask, or None: plain causal attention, the fast kernels' path.
        """
        n_prefix = self.prompt.n_prefix
        if key_valid is not None:
            key_valid = torch.cat([key_valid.new_ones(len(key_valid), n_prefix), key_valid], dim=1)
        if self.spae.distance_bias is None:
            return None if key_valid is None else key_valid.long()
        items = torch.cat([items.new_full((len(items), n_prefix), NO_ITEM), items], dim=1)
        return self.spae.attention_mask(items, n_queries, self.dtype or self.backbone_dtype, key_valid)

    def _decode_at(
        self, embeds: torch.Tensor, cache: DynamicCache | None, reads: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The backbone's final states at slots ``reads [B, R]`` of ``embeds`` (after what ``cache`` holds, which
        grows by every slot), under attention mask ``mask``; with ``last_layer_reads_only`` the last decoder layer
        computes only the states read (``kernels.decode_at``), unless there are as many reads as slots."""
        decoder = self.llm.get_decoder()
        if self.last_layer_reads_only and reads.shape[1] < embeds.shape[1]:
            return decode_at(decoder, embeds, cache, reads, mask)
        hidden = decoder(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=cache is not None)
        return hidden.last_hidden_state.gather(1, reads.unsqueeze(-1).expand(-1, -1, self.d_model))

    def run(
        self,
        embeds: torch.Tensor,
        items: torch.Tensor,
        reads: torch.Tensor,
        prefix_kv: KeyValues | None = None,
    ) -> torch.Tensor:
        """Float32 hidden states ``[B, R, d]`` at slots ``reads [B, R]`` of the right-padded prompt tokens ``embeds
        [B, N, d]`` after the prefix, whose history items are ``items [B, N]`` (``slot_items``); the prefix comes
        from ``prefix_kv`` when given (one computation for every group of a batch, LoRA's dropout drawn once)."""
        embeds = embeds.to(self.backbone_dtype)
        with self.autocast():
            cache = DynamicCache(config=self.llm.config) if self.prompt.n_prefix and self.prefix_cache else None
            embeds, start = self._prefixed(embeds, cache, prefix_kv)
            mask = self.attention_mask(items, embeds.shape[1])
            return self._decode_at(embeds, cache, start + reads, mask).float()

    def hidden_states(self, prompt: Prompt, reads: torch.Tensor) -> torch.Tensor:
        """States ``[B, R, d]`` read at slots ``reads [B, R]`` of ``prompt``. A read of -1 is not needed (all-position
        reads past a short history): those come last in a row, are not computed and read as zeros.

        Rows run through the backbone in groups of similar prompt length (``length_bucket_*``), each cut to its
        own longest prompt: right padding never reaches a real token under the causal mask, so the states
        are those of the whole padded batch, without computing the padding. The groups' inputs are built side by
        side in one buffer: a padded ``[B, N, d]`` batch would be mostly zeros (one 49-item history in a batch of
        3-item ones makes every row 50 slots long).
        """
        lengths = prompt.lengths
        prefix_kv = self.prefix_key_values() if self.prefix_cache and self.prompt.n_prefix else None
        groups = length_groups(lengths, self.length_bucket_tokens, self.length_bucket_padding)
        shapes = [(len(rows), int(lengths[rows].max())) for rows in groups]
        starts = [0]
        row_start = torch.empty_like(lengths)  # where each row's first slot lies in the buffer
        for rows, (n_rows, n_slots) in zip(groups, shapes, strict=True):
            row_start[rows] = starts[-1] + n_slots * torch.arange(n_rows, device=lengths.device)
            starts.append(starts[-1] + n_rows * n_slots)
        rows, slots = prompt.where
        buffer = prompt.values.new_zeros(starts[-1], self.d_model).index_put_((row_start[rows] + slots,),
                                                                             prompt.values)
        parts = []
        for group, start, shape in zip(groups, starts[:-1], shapes, strict=True):
            embeds = buffer[start : start + shape[0] * shape[1]].view(*shape, -1)
            needed = max(int((reads[group] >= 0).sum(dim=1).max()), 1)  # the group's reads, without trailing -1s
            states = self.run(embeds, prompt.items[group, : shape[1]], reads[group, :needed].clamp(min=0), prefix_kv)
            parts.append(F.pad(states, (0, 0, 0, reads.shape[1] - needed)))
        # one group is the batch in its own order; several come sorted by length and are put back
        return parts[0] if len(parts) == 1 else torch.cat(parts)[torch.cat(groups).argsort()]

    # ------------------------------------------------------------------ decoding
    def start_decoding(self, prompt: Prompt) -> Decoding:
        """Run right-padded prompts with their padding masked, keeping the cache to continue from each one's end."""
        embeds, lengths = prompt.dense(), prompt.lengths
        n_slots = embeds.shape[1]
        cache = DynamicCache(config=self.llm.config)
        embeds, start = self._prefixed(embeds, cache, None)
        real = torch.arange(n_slots, device=embeds.device) < lengths.unsqueeze(1)
        with self.autocast():  # the precision of the cached prefix and of every other backbone call
            last = self._decode_at(
                embeds.to(self.backbone_dtype),
                cache,
                (start + lengths - 1).unsqueeze(1),
                self.attention_mask(prompt.items, embeds.shape[1], real),
            )
        return Decoding(cache, prompt.items, real, self.prompt.n_prefix + lengths, last[:, 0].float())

    def extend(self, state: Decoding, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed ``token_ids [B, T]`` after each prompt's end; returns their hidden states ``[B, T, d]``."""
        steps = torch.arange(token_ids.shape[1], device=token_ids.device)
        # generated tokens come after the history, like the rest of the prompt's end: the same item index
        state.items = torch.cat([state.items, state.items[:, -1:].expand_as(token_ids)], dim=1)
        state.valid = torch.cat([state.valid, torch.ones_like(token_ids, dtype=torch.bool)], dim=1)
        with self.autocast():
            out = self.llm.get_decoder()(
                inputs_embeds=self.llm.get_input_embeddings()(token_ids),
                attention_mask=self.attention_mask(state.items, token_ids.shape[1], state.valid),
                position_ids=state.next_position.unsqueeze(1) + steps,
                cache=state.cache,
                use_cache=True,
            )
        state.next_position = state.next_position + token_ids.shape[1]
        return out.last_hidden_state.float()

    def fork(self, state: Decoding, row: int, n: int) -> Decoding:
        """``n`` copies of row ``row`` of ``state``, each to be continued apart (one user's candidate answers)."""
        fork = Decoding(DynamicCache(config=self.llm.config), state.items[row : row + 1].expand(n, -1),
                        state.valid[row : row + 1].expand(n, -1), state.next_position[row : row + 1].expand(n),
                        state.last[row : row + 1])
        for layer, cached in enumerate(state.cache.layers):
            fork.cache.update(cached.keys[row : row + 1].expand(n, -1, -1, -1),
                              cached.values[row : row + 1].expand(n, -1, -1, -1), layer)
        return fork
