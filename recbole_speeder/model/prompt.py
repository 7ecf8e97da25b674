"""The prompt, built in one place: instruction prefix, the history's item blocks, suffix, and for generative answers
the candidate list after them.

A batch of right-padded histories becomes one packed token layout per user,
``[item 1 block][item 2 block]...[item n block][suffix][pad...]``, where an item block is its optional
textual position marker followed by its content (MRC soft tokens, or its text tokens in text-description
mode). A generative prompt continues it with ``[header][label + candidate 1]...[label + candidate N][cue][answer]``.
The instruction prefix is identical for every user, so the runtime either prepends it or serves it from a key/value
cache (``runtime.py``). Only real tokens are embedded: padding never reaches a real token under the causal mask.
Everything is index arithmetic on the whole batch: no Python loop per item.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PackedLayout:
    """Where every packed slot comes from, for a batch of ``B`` histories packed to ``N`` slots."""

    item_index: torch.Tensor  # [B, N] history position of the slot's item, -1 outside item blocks
    offset: torch.Tensor  # [B, N] token offset inside the item block, or inside the suffix
    is_suffix: torch.Tensor  # [B, N] bool
    item_end: torch.Tensor  # [B, L] slot of each item block's last token (readout for that prefix)
    last: torch.Tensor  # [B] slot of the prompt's last token (readout for the next-item prediction)

    @property
    def n_slots(self) -> int:
        return self.item_index.shape[1]


def pack_layout(block_lengths: torch.Tensor, suffix_length: int) -> PackedLayout:
    """Lay out blocks of ``block_lengths [B, L]`` tokens (0 for padding items) back to back, then the suffix."""
    ends = block_lengths.cumsum(dim=1)  # exclusive end of each block
    history_end = ends[:, -1]
    n_slots = int(history_end.max().item()) + suffix_length
    slots = torch.arange(n_slots, device=block_lengths.device).expand(block_lengths.shape[0], -1)
    item_index = torch.searchsorted(ends, slots.contiguous(), right=True)
    in_history = slots < history_end.unsqueeze(1)
    starts = ends - block_lengths
    clamped = item_index.clamp(max=block_lengths.shape[1] - 1)
    offset = torch.where(in_history, slots - starts.gather(1, clamped), slots - history_end.unsqueeze(1))
    is_suffix = ~in_history & (offset < suffix_length)
    return PackedLayout(
        item_index=torch.where(in_history, clamped, torch.full_like(clamped, -1)),
        offset=offset.clamp(min=0),
        is_suffix=is_suffix,
        item_end=ends - 1,
        last=history_end + suffix_length - 1,
    )


def slot_items(layout: PackedLayout, lengths: torch.Tensor, n_slots: int) -> torch.Tensor:
    """History item of each of the first ``n_slots`` slots ``[B, n_slots]``, for SPAE's distance bias: every slot
    after the history (suffix, generative section, padding, even past ``layout``) counts as the predicted item,
    index ``lengths`` (the number of history items)."""
    index = layout.item_index[:, :n_slots]
    items = torch.where(index >= 0, index, lengths.unsqueeze(1))
    if n_slots > index.shape[1]:
        items = torch.cat([items, lengths.unsqueeze(1).expand(-1, n_slots - index.shape[1])], dim=1)
    return items


def item_reads(layout: PackedLayout, item_seq_len: torch.Tensor) -> torch.Tensor:
    """Slot of each history item's last token ``[B, L]`` (all-position readouts), -1 past the history: not read."""
    positions = torch.arange(layout.item_end.shape[1], device=item_seq_len.device)
    return layout.item_end.masked_fill(positions >= item_seq_len.unsqueeze(1), -1)


@dataclass
class Prompt:
    """Prompts after the instruction prefix, as their real tokens, and the slots the model reads from them."""

    values: torch.Tensor  # [T, d] input embeddings of the real tokens
    where: tuple[torch.Tensor, torch.Tensor]  # their (row, slot)
    lengths: torch.Tensor  # [B] slots per prompt
    items: torch.Tensor  # [B, max(lengths)] history item of each slot (``slot_items``: SPAE's distance bias)
    item_end: torch.Tensor  # [B, L] slot of each history item's last token, -1 past the history (all positions)
    last: torch.Tensor  # [B] slot of the history's last token, suffix included: the next-item readout
    token_item: torch.Tensor  # [T] history position of each real token's item, -1 outside item blocks
    layout: PackedLayout  # the history's
    cue_end: torch.Tensor | None = None  # [B] candidate prompts: slot of the answer cue's last token
    candidate_end: torch.Tensor | None = None  # [B, N] candidate prompts: slot of each candidate's last token

    def dense(self) -> torch.Tensor:
        """The prompts as one right-padded batch ``[B, max(lengths), d]``."""
        return dense_batch(self.values, self.where, len(self.lengths), int(self.lengths.max()))


class PromptBuilder(nn.Module):
    """The prompt's fixed token ids (prefix, suffix, position markers, item texts) and the prompts built from them.

    ``item_repr: mrc`` gives each history item as its MRC soft tokens, ``text`` as its text tokens (the slow
    text-description baseline). Token ids are embedded by the backbone's own input table, passed to each call.
    """

    def __init__(self, config, tokenizer, max_seq_length: int, texts: list[str]):
        super().__init__()
        self.item_repr = config["item_repr"]
        self.register_buffer("prefix_ids", text_token_ids(tokenizer, config["prompt_prefix"]), persistent=False)
        self.register_buffer("suffix_ids", text_token_ids(tokenizer, config["prompt_suffix"]), persistent=False)
        markers = (
            marker_token_ids(tokenizer, max_seq_length)
            if config["spae_text_markers"]
            else torch.zeros(max_seq_length, 0, dtype=torch.long)
        )
        self.register_buffer("marker_ids", markers, persistent=False)
        if self.item_repr == "text":
            ids, lengths = item_text_token_ids(tokenizer, texts, int(config["max_item_text_tokens"]))
            self.register_buffer("item_text_ids", ids, persistent=False)
            self.register_buffer("item_text_len", lengths, persistent=False)
        self.stats = {"samples": 0, "tokens": 0}  # prompts built and their tokens, the prefix included

    @property
    def n_prefix(self) -> int:
        return self.prefix_ids.numel()

    def content_lengths(self, items: torch.Tensor, item_tokens: torch.Tensor) -> torch.Tensor:
        """Prompt tokens each of ``items`` takes: its soft tokens, or its text tokens."""
        if self.item_repr == "mrc":
            return torch.full_like(items, item_tokens.shape[1])
        return self.item_text_len[items]

    def embed_slots(
        self,
        embed: nn.Module,
        ids: torch.Tensor,
        items: torch.Tensor,
        in_content: torch.Tensor,
        content_offset: torch.Tensor,
        item_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """Float32 input embeddings of packed slots: a slot with ``in_content`` holds token ``content_offset`` of item
        ``items`` (its soft token, or its text token); every other slot embeds its token id from ``ids``."""
        if self.item_repr == "text":
            text_ids = self.item_text_ids[items, content_offset.clamp(max=self.item_text_ids.shape[1] - 1)]
            return embed(torch.where(in_content, text_ids, ids)).float()
        soft = item_tokens[items, content_offset.clamp(0, item_tokens.shape[1] - 1)]
        return torch.where(in_content.unsqueeze(-1), soft, embed(ids).float())

    def history(
        self, embed: nn.Module, item_seq: torch.Tensor, item_seq_len: torch.Tensor, item_tokens: torch.Tensor
    ) -> Prompt:
        """The prompts of right-padded histories ``[B, L]``: their item blocks and the suffix, packed."""
        batch, max_len = item_seq.shape
        valid = torch.arange(max_len, device=item_seq.device) < item_seq_len.unsqueeze(1)
        n_markers, n_suffix = self.marker_ids.shape[1], self.suffix_ids.numel()
        content = self.content_lengths(item_seq, item_tokens)
        layout = pack_layout((content + n_markers) * valid, n_suffix)

        rows, slots = ((layout.item_index >= 0) | layout.is_suffix).nonzero(as_tuple=True)
        index, offset = layout.item_index[rows, slots], layout.offset[rows, slots]
        in_item = index >= 0
        position = index.clamp(min=0)
        in_marker = in_item & (offset < n_markers)
        ids = torch.zeros_like(index)
        if n_markers:
            ids = torch.where(in_marker, self.marker_ids[position, offset.clamp(max=n_markers - 1)], ids)
        if n_suffix:
            ids = torch.where(~in_item, self.suffix_ids[offset.clamp(max=n_suffix - 1)], ids)
        content_offset = (offset - n_markers).clamp(min=0)
        values = self.embed_slots(embed, ids, item_seq[rows, position], in_item & ~in_marker, content_offset,
                                  item_tokens)
        self.stats["samples"] += batch
        self.stats["tokens"] += int((layout.last + 1).sum()) + batch * self.n_prefix
        return Prompt(
            values=values,
            where=(rows, slots),
            lengths=layout.last + 1,
            items=slot_items(layout, item_seq_len, layout.n_slots),
            item_end=item_reads(layout, item_seq_len),
            last=layout.last,
            token_item=index,
            layout=layout,
        )

    def with_candidates(
        self,
        embed: nn.Module,
        history: Prompt,
        item_seq_len: torch.Tensor,
        candidates: torch.Tensor,
        item_tokens: torch.Tensor,
        header_ids: torch.Tensor,
        lead_ids: torch.Tensor,
        cue_ids: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_len: torch.Tensor,
    ) -> Prompt:
        """``history`` continued by ``header, N candidate blocks, cue, answer`` per row (generative answers): a block
        is the candidate's lead token (``lead_ids [B, N]``: its label or a separator) and its content; ``answer_ids
        [B, A]`` (``answer_len`` of them real) are the teacher-forced answer tokens, none when decoding."""
        batch, n = candidates.shape
        n_header, n_cue = header_ids.numel(), cue_ids.numel()
        blocks = torch.cat(
            [
                torch.full((batch, 1), n_header, device=candidates.device),
                1 + self.content_lengths(candidates, item_tokens),
                torch.full((batch, 1), n_cue, device=candidates.device),
                answer_len.unsqueeze(1),
            ],
            dim=1,
        )
        layout = pack_layout(blocks, 0)
        section_len = layout.last + 1
        real = torch.arange(layout.n_slots, device=section_len.device) < section_len.unsqueeze(1)
        rows, slots = real.nonzero(as_tuple=True)
        block, offset = layout.item_index[rows, slots], layout.offset[rows, slots]
        listed = (block - 1).clamp(0, n - 1)
        in_candidate = (block >= 1) & (block <= n)
        ids = torch.zeros_like(block)
        if n_header:
            ids = torch.where(block == 0, header_ids[offset.clamp(max=n_header - 1)], ids)
        if n_cue:
            ids = torch.where(block == n + 1, cue_ids[offset.clamp(max=n_cue - 1)], ids)
        if answer_ids.shape[1]:
            ids = torch.where(block == n + 2, answer_ids[rows, offset.clamp(max=answer_ids.shape[1] - 1)], ids)
        ids = torch.where(in_candidate & (offset == 0), lead_ids[rows, listed], ids)
        section = self.embed_slots(embed, ids, candidates[rows, listed], in_candidate & (offset >= 1),
                                   (offset - 1).clamp(min=0), item_tokens)
        self.stats["tokens"] += int((section_len - answer_len).sum())
        history_len = history.last + 1
        lengths = history_len + section_len
        block_end = layout.item_end
        return Prompt(
            values=torch.cat([history.values, section]),
            where=(torch.cat([history.where[0], rows]), torch.cat([history.where[1], history_len[rows] + slots])),
            lengths=lengths,
            items=slot_items(history.layout, item_seq_len, int(lengths.max())),
            item_end=history.item_end,
            last=history.last,
            token_item=torch.cat([history.token_item, torch.full_like(rows, -1)]),
            layout=history.layout,
            cue_end=history_len + block_end[:, n + 1],
            candidate_end=history_len.unsqueeze(1) + block_end[:, 1 : n + 1],
        )

    def item_text(self, tokenizer, item: int) -> str:
        """An item's text as the prompt gives it (text mode)."""
        return tokenizer.decode(self.item_text_ids[item, : self.item_text_len[item]], skip_special_tokens=True)


def dense_batch(
    values: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor], n_rows: int, n_slots: int
) -> torch.Tensor:
    """Real tokens ``values [T, d]`` at ``where = (row, slot)`` as one right-padded batch ``[n_rows, n_slots, d]``,
    zeros elsewhere: for a backbone call that needs the whole batch at once (decoding with a cache)."""
    return values.new_zeros(n_rows, n_slots, values.shape[-1]).index_put_(where, values)


def marker_token_ids(tokenizer, max_len: int) -> torch.Tensor:
    """Token ids of the textual position markers " 01.", " 02.", ... as ``[max_len, m]``.

    Numbers are zero-padded so every marker tokenizes to the same length; any that does not is left-padded
    with its own first token.
    """
    width = len(str(max_len))
    encoded = [
        tokenizer(f" {i + 1:0{width}d}.", add_special_tokens=False)["input_ids"] for i in range(max_len)
    ]
    m = max(len(ids) for ids in encoded)
    return torch.tensor([[ids[0]] * (m - len(ids)) + ids for ids in encoded], dtype=torch.long)


def text_token_ids(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return torch.tensor(ids, dtype=torch.long)


def item_text_token_ids(tokenizer, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item text token ids ``[n_items, max_tokens]`` (right-padded with 0) and their lengths.

    Row 0 (the padding item) stays empty. An item whose text is empty gets a single separator token so
    that it still occupies a slot in the history.
    """
    ids = torch.zeros(len(texts) + 1, max_tokens, dtype=torch.long)
    lengths = torch.zeros(len(texts) + 1, dtype=torch.long)
    fallback = tokenizer(";", add_special_tokens=False)["input_ids"][:1]
    encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    for row, tokens in enumerate(encoded, start=1):
        tokens = tokens or fallback
        ids[row, : len(tokens)] = torch.tensor(tokens)
        lengths[row] = len(tokens)
    return ids, lengths
