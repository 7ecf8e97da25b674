r"""Speeder: an efficient multimodal-LLM sequential recommender as a RecBole ``SequentialRecommender``.

Zhong et al., 2025, "A Remarkably Efficient Paradigm to Multimodal Large Language Models for Sequential
Recommendation". Each history item enters the LLM as ``mrc_tokens`` soft tokens from MRC (``mrc.py``)
instead of a long text description, with SPAE's position cues added (``spae.py``); MPO's stages live in the
trainer. The prompt is ``prefix + item blocks + suffix`` (``prompt.py``); the LLM's last hidden state goes
through a head to a user vector, and an item's score is its similarity to that item's own MRC tokens, so
ranking every item is one matmul. ``item_repr: text`` gives each history item as its text tokens instead:
the slow "MLLM with text descriptions" baseline, same model otherwise.

An MPO stage may give history items another way while it trains (``set_stage_items``: ``text``, or
``text+tokens``, each item's text followed by its soft tokens): a curriculum from words to soft tokens.
Evaluation always reads them as ``item_repr`` serves them, so every stage is scored as the model will be served.
A stage may also train on the alignment loss alone (``set_stage_loss``: ``align``, model/alignment.py): a warm-up
that teaches MRC to write tokens the LLM reads as the items' words before any ranking is learned.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from logging import getLogger

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn
from transformers import DynamicCache

from recbole_speeder.data.item_features import build_item_features, item_texts
from recbole_speeder.errors import UsageError
from recbole_speeder.model.alignment import TextAlignment
from recbole_speeder.model.backbone import (
    decode_at,
    input_token_scale,
    load_backbone,
    reads_only_supported,
    store_frozen_linears_in,
)
from recbole_speeder.model.generative import GenerativeAnswerer, distinct_histories
from recbole_speeder.model.mrc import MixtureOfModalityExperts
from recbole_speeder.model.prompt import (
    PackedLayout,
    item_reads,
    item_text_token_ids,
    length_groups,
    marker_token_ids,
    pack_layout,
    slot_items,
    text_token_ids,
)
from recbole_speeder.model.spae import NO_ITEM, SequentialPositionAwareness

NO_NATIVE_BF16 = (
    "autocast_dtype auto: this CPU has no native bf16 (AVX512-BF16 or AMX), so Speeder computes in float32; the CPU "
    "timings in README.md and BENCHMARKS.md were measured with native bf16: expect epochs about 3x longer here"
)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype that ``autocast_dtype: name`` means on ``device``; None is full float32.

    ``auto`` is bfloat16 only where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or
    AMX): there bf16 matmuls are ~3x float32 on CPU; elsewhere bf16 is emulated and slower than float32.
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
    return getattr(torch, name)  # bfloat16 or float16 (config_schema.AUTOCAST_DTYPES)


def _outside_inference_mode(scores: torch.Tensor) -> torch.Tensor:
    """Scores RecBole may edit in place (it masks the padding item and history items) once inference mode is left."""
    return scores.clone() if scores.is_inference() and not torch.is_inference_mode_enabled() else scores


class Speeder(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.item_repr = config["item_repr"]
        self.similarity = config["similarity"]
        self.train_all_positions = bool(config["train_all_positions"])
        self.temperature = float(config["temperature"])
        self.prefix_cache = bool(config["prefix_cache"])
        self.item_chunk_size = int(config["item_chunk_size"])
        self.length_bucket_tokens = int(config["length_bucket_tokens"] or 0)
        self.length_bucket_padding = float(config["length_bucket_padding"])
        self.autocast_dtype = autocast_dtype(config["autocast_dtype"], torch.device(config["device"]))
        self.inference_mode = bool(config["inference_mode"])
        self.show_progress = bool(config["show_progress"])

        # backbone
        self.llm, self.tokenizer = load_backbone(config)
        if config["autocast_frozen_weights"] and self.autocast_dtype is not None:
            store_frozen_linears_in(self.llm, self.autocast_dtype)
        embeddings = self.llm.get_input_embeddings()
        self.d_model = embeddings.embedding_dim
        self.last_layer_reads_only = bool(config["last_layer_reads_only"])
        if self.last_layer_reads_only and not reads_only_supported(self.llm.get_decoder()):
            getLogger().warning("last_layer_reads_only needs a Llama-family backbone: the last layer runs in full")
            self.last_layer_reads_only = False
        self.backbone_dtype = embeddings.weight.dtype

        # MRC: item features -> soft tokens
        texts = item_texts(dataset, list(config["item_text_fields"] or []))
        self._texts, self._max_text_tokens = texts, int(config["max_item_text_tokens"])
        features = build_item_features(config, dataset, texts)
        self.mrc = MixtureOfModalityExperts(
            features,
            n_items=self.n_items,
            d_model=self.d_model,
            n_tokens=config["mrc_tokens"],
            expert_hidden=config["expert_hidden"],
            router=config["router"],
            modalities=tuple(config["modalities"]),
            token_scale=input_token_scale(embeddings),
            dropout=config["mrc_dropout"],
            id_dim=config["id_embedding_dim"],
            id_items=self._items_with_id(dataset, int(config["id_min_interactions"])),
            id_dropout=config["id_dropout"],
        )

        # SPAE: position cues; the time gap needs the dataset's time field
        self.time_list_field = f"{config['TIME_FIELD']}{config['LIST_SUFFIX']}"
        has_time = self.time_list_field in dataset.field2type
        if config["spae_time"] and not has_time:
            getLogger().warning("spae_time is on but the dataset has no time field: time-gap cue disabled")
        self.spae = SequentialPositionAwareness(
            self.d_model,
            self.max_seq_length,
            n_heads=self.llm.config.num_attention_heads,
            absolute=config["spae_absolute"],
            relative=config["spae_relative"],
            time=config["spae_time"] and has_time,
            n_time_buckets=config["spae_time_buckets"],
            time_unit=config["spae_time_unit"],
        )
        attention = self.llm.config._attn_implementation
        if self.spae.distance_bias is not None and attention not in ("eager", "sdpa"):
            raise UsageError(f"spae_relative biases attention through its mask: use eager or sdpa, not {attention}")

        # prompt pieces, as token ids embedded by the frozen LLM table
        tokenizer = self.tokenizer
        self.register_buffer("prefix_ids", text_token_ids(tokenizer, config["prompt_prefix"]), persistent=False)
        self.register_buffer("suffix_ids", text_token_ids(tokenizer, config["prompt_suffix"]), persistent=False)
        markers = (
            marker_token_ids(tokenizer, self.max_seq_length)
            if config["spae_text_markers"]
            else torch.zeros(self.max_seq_length, 0, dtype=torch.long)
        )
        self.register_buffer("marker_ids", markers, persistent=False)
        # how history items enter the prompt: as evaluation serves them, and while an MPO stage trains
        self.served_items = "tokens" if self.item_repr == "mrc" else "text"
        self.stage_items = self.served_items
        if self.served_items == "text":
            self._build_item_text()

        self.head = nn.Sequential(nn.Dropout(config["head_dropout"]), nn.Linear(self.d_model, self.d_model))
        self.loss_fct = nn.CrossEntropyLoss()
        self._item_cache: torch.Tensor | None = None
        self._item_vector_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.prompt_token_stats = {"samples": 0, "tokens": 0}
        # predict_mode: generate (model/generative.py) lists N candidates in the prompt and decodes an answer
        self.predict_mode = config["predict_mode"]
        self.generative = None
        if self.predict_mode == "generate":
            vocabulary = self.llm.get_output_embeddings().weight.shape[0]
            self.generative = GenerativeAnswerer(config, dataset, tokenizer, self.item_repr, self.d_model, vocabulary)
        # align_loss_weight (model/alignment.py): soft tokens pulled towards the backbone's reading of the item text,
        # beside the ranking loss; an MPO stage with loss: align trains on the alignment alone
        self.align_loss_weight = float(config["align_loss_weight"])
        self.align_items_per_step = int(config["align_items_per_step"])
        self.alignment: TextAlignment | None = None  # built when a loss first needs it (the config checks item_repr)
        self.stage_loss = "rank"
        if self.align_loss_weight:
            self.alignment = TextAlignment(self.align_items_per_step)

    @staticmethod
    def _items_with_id(dataset, min_interactions: int) -> torch.Tensor | None:
        """Items with at least ``min_interactions`` training interactions (SpeederDataset counts them): the others
        get no ID expert. None: every item keeps its ID."""
        if not min_interactions:
            return None
        counts = torch.from_numpy(dataset.item_train_counts)
        keep = counts >= min_interactions
        getLogger().info(
            f"id_min_interactions {min_interactions}: {int((~keep[1:]).sum())} of {len(counts) - 1} items "
            f"({int(counts[~keep].sum())} of {int(counts.sum())} training interactions) have no ID expert; "
            "their tokens come from their content alone"
        )
        return keep

    # ------------------------------------------------------------------ parameter groups (MPO) and caches
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parts by name, so MPO stages can switch them: mrc, spae, head (with the generative pointer),
        lora."""
        lora = [p for n, p in self.llm.named_parameters() if "lora_" in n]
        return {
            "mrc": list(self.mrc.parameters()),
            "spae": list(self.spae.parameters()),
            "head": [*self.head.parameters(), *(self.generative.parameters() if self.generative else [])],
            "lora": lora,
        }

    def set_modalities(self, modalities: list[str]) -> None:
        self.mrc.set_active(modalities)
        self._item_cache = self._item_vector_cache = None

    def set_stage_items(self, items: str | None) -> None:
        """How history items enter training prompts (an MPO stage's ``items``: tokens, text or text+tokens; None:
        as served). Nothing cached depends on it: the item cache holds MRC tokens, the prefix K/V the instruction.
        """
        self.stage_items = items or self.served_items
        if "text" in self.stage_items:
            self._build_item_text()

    def set_stage_loss(self, loss: str) -> None:
        """What training minimises (an MPO stage's ``loss``): rank (the next-item loss, plus the weighted alignment
        loss when ``align_loss_weight`` > 0) or align (the alignment loss alone)."""
        if loss == "align" and self.alignment is None:
            self.alignment = TextAlignment(self.align_items_per_step)
        self.stage_loss = loss

    @property
    def history_items(self) -> str:
        """How history items enter the prompt now: the stage's way in training, as served in evaluation."""
        return self.stage_items if self.training else self.served_items

    def _build_item_text(self) -> None:
        """Each item's text token ids and lengths, built once, when items first enter a prompt as text."""
        if hasattr(self, "item_text_ids"):
            return
        ids, lengths = item_text_token_ids(self.tokenizer, self._texts, self._max_text_tokens)
        self.register_buffer("item_text_ids", ids.to(self.prefix_ids.device), persistent=False)
        self.register_buffer("item_text_len", lengths.to(self.prefix_ids.device), persistent=False)

    def train(self, mode: bool = True):
        # Weights may change between a train and an eval phase: cached item tokens and prefix K/V go stale.
        self.drop_caches()
        return super().train(mode)

    def drop_caches(self) -> None:
        """Forget the cached item tokens and prefix keys/values (the weights they came from have changed)."""
        self._item_cache = self._item_vector_cache = None
        self._prefix_kv = None

    def _autocast(self) -> AbstractContextManager:
        """Mixed precision for MRC, the backbone and the training logits (``autocast_dtype``); a no-op when off."""
        dtype = self.autocast_dtype
        return torch.autocast(torch.device(self.device).type, dtype=dtype, enabled=dtype is not None)

    def _scoring(self) -> AbstractContextManager:
        """``torch.inference_mode`` while scoring without gradients (``inference_mode``), else nothing.

        The once-per-evaluation caches are filled first, outside it, so that they are ordinary tensors.
        """
        if not self.inference_mode or torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            return nullcontext()
        self._item_vectors(self.item_tokens())
        if self.prefix_cache and self.prefix_ids.numel():
            self._prefix_key_values()
        return torch.inference_mode()

    def mean_prompt_tokens(self) -> float:
        """Mean prompt length (prefix + history + suffix tokens) over the samples seen since the last reset."""
        stats = self.prompt_token_stats
        return stats["tokens"] / max(stats["samples"], 1)

    # ------------------------------------------------------------------ items
    def item_tokens(self) -> torch.Tensor:
        """MRC tokens of every item ``[n_items, k, d]``; computed in chunks and cached while evaluating."""
        if self._item_cache is not None and not torch.is_grad_enabled():  # a loss with gradients needs fresh ones
            return self._item_cache
        ids = torch.arange(self.n_items, device=self.prefix_ids.device)
        with self._autocast():  # every item, every training step: the third-largest cost after backbone and logits
            tokens = torch.cat([self.mrc(chunk)[0] for chunk in ids.split(self.item_chunk_size)]).float()
        if not self.training and not torch.is_grad_enabled():
            self._item_cache = tokens
        return tokens

    def _item_vectors(self, item_tokens: torch.Tensor) -> torch.Tensor:
        """Output embedding of every item; computed once per evaluation, with the item tokens it comes from."""
        cached = self._item_vector_cache
        if cached is not None and cached[0] is item_tokens:
            return cached[1]
        vectors = item_tokens.mean(dim=1)
        vectors = F.normalize(vectors, dim=-1) if self.similarity == "cos" else vectors
        if item_tokens is self._item_cache:
            self._item_vector_cache = (item_tokens, vectors)
        return vectors

    def _user_vectors(self, states: torch.Tensor) -> torch.Tensor:
        users = self.head(states.float())
        users = F.normalize(users, dim=-1) if self.similarity == "cos" else users
        return users / self.temperature

    # ------------------------------------------------------------------ prompt and backbone
    def _prompt_tokens(
        self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, timestamps, item_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], PackedLayout]:
        """Input embeddings of the prompts' real tokens ``[T, d]``, their ``(row, slot)`` and the packed layout.

        Only slots that hold a token are computed: padding never reaches a real token under the causal mask,
        so it stays zero (on Beauty's training batches 7 in 8 slots of the padded batch are padding).
        """
        batch, max_len = item_seq.shape
        valid = torch.arange(max_len, device=item_seq.device) < item_seq_len.unsqueeze(1)
        n_markers, n_suffix = self.marker_ids.shape[1], self.suffix_ids.numel()
        mode = self.history_items
        content = self.content_lengths(item_seq, item_tokens, mode)
        layout = pack_layout((content + n_markers) * valid, n_suffix)

        rows, slots = ((layout.item_index >= 0) | layout.is_suffix).nonzero(as_tuple=True)
        index, offset = layout.item_index[rows, slots], layout.offset[rows, slots]
        in_item = index >= 0
        position = index.clamp(min=0)
        item_at_slot = item_seq[rows, position]
        in_marker = in_item & (offset < n_markers)
        in_content = in_item & ~in_marker
        content_offset = (offset - n_markers).clamp(min=0)

        ids = torch.zeros_like(index)
        if n_markers:
            ids = torch.where(in_marker, self.marker_ids[position, offset.clamp(max=n_markers - 1)], ids)
        if n_suffix:
            ids = torch.where(~in_item, self.suffix_ids[offset.clamp(max=n_suffix - 1)], ids)
        values = self.slot_embeddings(ids, item_at_slot, in_content, content_offset, item_tokens, mode)
        cues = self.spae.at(item_seq_len, rows, position, timestamps)
        if cues is not None:
            values = values + cues * in_item.unsqueeze(-1)
        self.prompt_token_stats["samples"] += batch
        self.prompt_token_stats["tokens"] += int((layout.last + 1).sum()) + batch * self.prefix_ids.numel()
        return values, (rows, slots), layout

    def content_lengths(self, items: torch.Tensor, item_tokens: torch.Tensor, mode: str) -> torch.Tensor:
        """Prompt tokens each of ``items`` takes when given as ``mode`` (tokens, text or text+tokens)."""
        if mode == "tokens":
            return torch.full_like(items, item_tokens.shape[1])
        lengths = self.item_text_len[items]
        return lengths + item_tokens.shape[1] if mode == "text+tokens" else lengths

    def slot_embeddings(
        self,
        ids: torch.Tensor,
        items: torch.Tensor,
        in_content: torch.Tensor,
        content_offset: torch.Tensor,
        item_tokens: torch.Tensor,
        mode: str,
    ) -> torch.Tensor:
        """Float32 input embeddings of packed prompt slots (also the generative prompt's).

        A slot with ``in_content`` holds token ``content_offset`` of item ``items`` given as ``mode``
        (``content_lengths``): its text token, its MRC soft token, or under text+tokens the text tokens first,
        then the soft tokens; every other slot embeds its token id from ``ids``.
        """
        in_text = in_soft = None
        soft_offset = content_offset
        if mode == "tokens":
            in_soft = in_content
        elif mode == "text":
            in_text = in_content
        else:  # text+tokens: the item's text, then its soft tokens
            text_len = self.item_text_len[items]
            in_text = in_content & (content_offset < text_len)
            in_soft, soft_offset = in_content & ~in_text, content_offset - text_len
        if in_text is not None:
            text_ids = self.item_text_ids[items, content_offset.clamp(max=self.item_text_ids.shape[1] - 1)]
            ids = torch.where(in_text, text_ids, ids)
        embeds = self.llm.get_input_embeddings()(ids).float()
        if in_soft is not None:
            soft = item_tokens[items, soft_offset.clamp(0, item_tokens.shape[1] - 1)]
            embeds = torch.where(in_soft.unsqueeze(-1), soft, embeds)
        return embeds

    def _llm_trains(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.llm.parameters())

    def _prefix_key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The instruction prefix's keys/values: one batch-1 forward, reused while the LLM's weights hold still."""
        if self._prefix_kv is not None and not self._llm_trains():
            return self._prefix_kv
        prefix = self.llm.get_input_embeddings()(self.prefix_ids).unsqueeze(0)
        # A cached prefix serves many batches: compute it without (LoRA) dropout, so it draws no random numbers
        # and a run resumed mid-epoch (trainer/mpo.py) gets the same prefix and the same RNG stream.
        training, cached = self.llm.training, not self._llm_trains()
        self.llm.train(training and not cached)
        with self._autocast():  # in the dtype the backbone's own keys/values will have
            cache = self.llm.get_decoder()(inputs_embeds=prefix, use_cache=True).cache
        self.llm.train(training)
        key_values = [(layer.keys, layer.values) for layer in cache.layers]
        if not self._llm_trains():
            self._prefix_kv = [(k.detach(), v.detach()) for k, v in key_values]
        return key_values

    def backbone_mask(
        self, items: torch.Tensor, n_queries: int, key_valid: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The backbone's attention mask for prompt tokens of history items ``items [B, K]`` (``slot_items``)
        after the instruction prefix, the queries being the last ``n_queries`` tokens, prefix
        included; ``key_valid [B, K]`` marks real tokens where padding precedes a query (generation).

        With SPAE's relative cue, a 4D mask carrying its item-distance bias; otherwise ``key_valid`` as the usual
        2D padding mask, or None: plain causal attention, the fast kernels' path.
        """
        n_prefix = self.prefix_ids.numel()
        if key_valid is not None:
            key_valid = torch.cat([key_valid.new_ones(len(key_valid), n_prefix), key_valid], dim=1)
        if self.spae.distance_bias is None:
            return None if key_valid is None else key_valid.long()
        items = torch.cat([items.new_full((len(items), n_prefix), NO_ITEM), items], dim=1)
        return self.spae.attention_mask(items, n_queries, self.autocast_dtype or self.backbone_dtype, key_valid)

    def _run_backbone(
        self,
        embeds: torch.Tensor,
        items: torch.Tensor | None,
        reads: torch.Tensor,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Float32 hidden states ``[B, R, d]`` at slots ``reads [B, R]`` of the right-padded prompt tokens
        ``embeds [B, N, d]`` after the prefix, whose history items are ``items [B, N]`` (``slot_items``, for SPAE's
        attention bias; None: plain causal attention, one item read alone); the prefix comes from ``prefix_kv`` when
        given, or the cache, or is prepended."""
        embeds = embeds.to(self.backbone_dtype)
        batch, n_prefix = embeds.shape[0], self.prefix_ids.numel()
        cache = None
        with self._autocast():
            if n_prefix and self.prefix_cache:
                cache = DynamicCache(config=self.llm.config)
                for layer, (keys, values) in enumerate(prefix_kv or self._prefix_key_values()):
                    cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
                n_prefix = 0  # the prompt's slots start the input
            elif n_prefix:
                prefix = self.llm.get_input_embeddings()(self.prefix_ids).expand(batch, -1, -1)
                embeds = torch.cat([prefix, embeds], dim=1)
            mask = None if items is None else self.backbone_mask(items, embeds.shape[1])
            return self._decode_at(embeds, cache, n_prefix + reads, mask).float()

    def _decode_at(
        self, embeds: torch.Tensor, cache: DynamicCache | None, reads: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The backbone's final states at slots ``reads [B, R]`` of ``embeds`` (after what ``cache`` holds, which
        grows by every slot), under attention mask ``mask`` (``backbone_mask``: SPAE's 4D distance-biased mask, a
        2D padding mask, or None for plain causal attention).

        With ``last_layer_reads_only`` the last decoder layer computes only the states read (keys/values at every
        slot: ``backbone.decode_at``, under the same mask), unless there are as many reads as slots.
        """
        decoder = self.llm.get_decoder()
        if self.last_layer_reads_only and reads.shape[1] < embeds.shape[1]:
            return decode_at(decoder, embeds, cache, reads, mask)
        hidden = decoder(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=cache is not None)
        return hidden.last_hidden_state.gather(1, reads.unsqueeze(-1).expand(-1, -1, self.d_model))

    def _hidden_states(
        self,
        values: torch.Tensor,
        where: tuple[torch.Tensor, torch.Tensor],
        lengths: torch.Tensor,
        reads: torch.Tensor,
        items: torch.Tensor,
    ) -> torch.Tensor:
        """States ``[B, R, d]`` read at slots ``reads [B, R]`` of prompts ``lengths [B]`` slots long, from their real
        tokens ``values`` at ``where = (row, slot)`` (the score prompt's, or the generative prompt's), whose history
        items are ``items [B, >= max(lengths)]`` (``slot_items``: SPAE's distance bias). A read of -1 is not needed
        (all-position reads past a short history): those come last in a row, are not computed and read as zeros.

        Rows run through the backbone in groups of similar prompt length (``length_bucket_*``), each cut to its
        own longest prompt: right padding never reaches a real token under the causal mask, so the states
        are those of the whole padded batch, without computing the padding. The groups' inputs are built side by
        side in one buffer: a padded ``[B, N, d]`` batch would be mostly zeros (one 49-item history in a batch of
        3-item ones makes every row 50 slots long).
        """
        prefix_kv = self._prefix_key_values() if self.prefix_cache and self.prefix_ids.numel() else None
        groups = length_groups(lengths, self.length_bucket_tokens, self.length_bucket_padding)
        shapes = [(len(rows), int(lengths[rows].max())) for rows in groups]
        starts = [0]
        row_start = torch.empty_like(lengths)  # where each row's first slot lies in the buffer
        for rows, (n_rows, n_slots) in zip(groups, shapes, strict=True):
            row_start[rows] = starts[-1] + n_slots * torch.arange(n_rows, device=lengths.device)
            starts.append(starts[-1] + n_rows * n_slots)
        rows, slots = where
        buffer = values.new_zeros(starts[-1], self.d_model).index_put_((row_start[rows] + slots,), values)
        parts = []
        for group, start, shape in zip(groups, starts[:-1], shapes, strict=True):
            embeds = buffer[start : start + shape[0] * shape[1]].view(*shape, -1)
            needed = max(int((reads[group] >= 0).sum(dim=1).max()), 1)  # the group's reads, without trailing -1s
            states = self._run_backbone(embeds, items[group, : shape[1]], reads[group, :needed].clamp(min=0), prefix_kv)
            parts.append(F.pad(states, (0, 0, 0, reads.shape[1] - needed)))
        # one group is the batch in its own order; several come sorted by length and are put back
        return parts[0] if len(parts) == 1 else torch.cat(parts)[torch.cat(groups).argsort()]

    def forward(
        self,
        item_seq: torch.Tensor,
        item_seq_len: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        item_tokens: torch.Tensor | None = None,
        all_positions: bool = False,
    ) -> torch.Tensor:
        """User vectors: ``[B, d]`` for the next item, or ``[B, L, d]`` read after every history item."""
        item_tokens = self.item_tokens() if item_tokens is None else item_tokens
        return self._user_vectors(self._states(item_seq, item_seq_len, timestamps, item_tokens, all_positions))

    def _states(self, item_seq, item_seq_len, timestamps, item_tokens, all_positions: bool) -> torch.Tensor:
        """The backbone's states before the user head, shaped like ``forward``'s output."""
        values, where, layout = self._prompt_tokens(item_seq, item_seq_len, timestamps, item_tokens)
        reads = item_reads(layout, item_seq_len) if all_positions else layout.last.unsqueeze(1)
        items = slot_items(layout, item_seq_len, layout.n_slots)
        states = self._hidden_states(values, where, layout.last + 1, reads, items)
        return states if all_positions else states[:, 0]

    def _inputs(self, interaction) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        timestamps = interaction[self.time_list_field] if self.time_list_field in interaction else None
        return interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], timestamps

    # ------------------------------------------------------------------ RecBole API
    def calculate_loss(self, interaction) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The next-item loss; with ``align_loss_weight``, the pair (it, weighted alignment loss), which RecBole's
        loop sums and logs apart (train_loss1, train_loss2); in an alignment stage, the alignment loss alone."""
        item_seq, item_seq_len, timestamps = self._inputs(interaction)
        if self.stage_loss == "align":
            return self.alignment.loss(self, item_seq, interaction[self.POS_ITEM_ID])
        if self.generative is not None:
            loss = self.generative.loss(self, interaction)
        else:
            item_tokens = self.item_tokens()
            states = self._states(item_seq, item_seq_len, timestamps, item_tokens, self.train_all_positions)
            loss = self._score_loss(states, item_seq, item_seq_len, interaction[self.POS_ITEM_ID], item_tokens)
        if self.align_loss_weight:
            return loss, self.align_loss_weight * self.alignment.loss(self, item_seq, interaction[self.POS_ITEM_ID])
        return loss

    def _score_loss(self, states, item_seq, item_seq_len, targets, item_tokens) -> torch.Tensor:
        """Full-softmax next-item loss of states read at the history's end ``[B, d]``, or after every history item
        ``[B, L, d]`` (all-position training); the generative loss adds it too (``generate_score_loss_weight``)."""
        if states.dim() == 3:
            # position t predicts the item after it; the last one predicts the row's target
            next_items = torch.cat([item_seq[:, 1:], torch.zeros_like(item_seq[:, :1])], dim=1)
            next_items = next_items.scatter(1, (item_seq_len - 1).unsqueeze(1), targets.unsqueeze(1))
            valid = torch.arange(item_seq.shape[1], device=item_seq.device) < item_seq_len.unsqueeze(1)
            states, targets = states[valid], next_items[valid]  # the head runs on real positions only
        users = self._user_vectors(states)
        # Logits over the real items 1..n-1 (the padding item 0 is never a target): the softmax over all items with
        # item 0 at -inf, without its column. [targets x items x d] costs as much as the backbone; the softmax
        # tolerates bf16 logits.
        with self._autocast():
            logits = (users @ self._item_vectors(item_tokens)[1:].T).float()
        return self.loss_fct(logits, targets - 1)

    def predict(self, interaction) -> torch.Tensor:
        if self.generative is not None:
            return self.generative.predict(self, interaction)
        item_seq, item_seq_len, timestamps = self._inputs(interaction)
        with self._scoring():
            # sampled evaluation repeats a user's row per candidate: one prompt per distinct history
            user_ids = interaction[self.USER_ID] if self.USER_ID in interaction else torch.zeros_like(item_seq_len)
            head, groups = distinct_histories(user_ids, item_seq, item_seq_len)
            stamps = timestamps[head] if timestamps is not None else None
            users = self.forward(item_seq[head], item_seq_len[head], stamps)[groups]
            items = self._item_vectors(self.item_tokens())[interaction[self.ITEM_ID]]
            scores = (users * items).sum(dim=-1)
        return _outside_inference_mode(scores)

    def full_sort_predict(self, interaction) -> torch.Tensor:
        if self.generative is not None:
            return self.generative.full_sort_predict(self, interaction)
        with self._scoring():
            scores = self.forward(*self._inputs(interaction)) @ self._item_vectors(self.item_tokens()).T
        return _outside_inference_mode(scores)
