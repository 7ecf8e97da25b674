"""The prompt around a user's history: instruction prefix, per-item blocks, suffix, and their packing.

A batch of right-padded histories becomes one packed token layout per user,
``[item 1 block][item 2 block]...[item n block][suffix][pad...]``, where an item block is its optional
textual position marker followed by its content (MRC soft tokens, or its text tokens in text-description
mode). The instruction prefix is identical for every user, so it is either prepended or served from a
key/value cache by the model. Everything is index arithmetic on the whole batch: no Python loop per item.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def dense_batch(
    values: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor], n_rows: int, n_slots: int
) -> torch.Tensor:
    """Real tokens ``values [T, d]`` at ``where = (row, slot)`` as one right-padded batch ``[n_rows, n_slots, d]``,
    zeros elsewhere: for a backbone call that needs the whole batch at once (decoding with a cache)."""
    return values.new_zeros(n_rows, n_slots, values.shape[-1]).index_put_(where, values)


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
