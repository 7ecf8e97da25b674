"""SPAE, Sequential Position Awareness Enhancement: where and when each history item sits.

Three cues, each switchable for ablations, none making the prompt longer. Two are added to each history item's
tokens: its absolute index from the history start and a log-scaled bucket of the time gap since the previous item.
Both depend only on the item and the ones before it, so a prefix of a history gets the same cues wherever the
history ends.

The third, relative position, is a learned bias inside attention, per head, by the distance in items between the
token that attends and the token it attends to (ALiBi-like, learned instead of a fixed slope). It is not an input
cue because an input cue of recency ("this is the k-th item from the end") depends on where the history ends: with
all-position training one forward reads a prediction after every item, and each of those predictions must see
what evaluating its prefix alone would see. A distance between two items of the prefix is the same either way.
"""

from __future__ import annotations

import torch
from torch import nn

NO_ITEM = -1  # item index of a token outside the history and before it (the instruction prefix): never biased


def time_gap_buckets(timestamps: torch.Tensor, lengths: torch.Tensor, n_buckets: int, unit: float) -> torch.Tensor:
    """Bucket ``1 + floor(log2(1 + gap / unit))`` of the gap to the previous item; 0 for the first item and pads.

    Log buckets because gaps in purchase logs span minutes to years.
    """
    gaps = (timestamps[:, 1:] - timestamps[:, :-1]).clamp(min=0).float() / unit
    buckets = 1 + torch.floor(torch.log2(1 + gaps)).long()
    buckets = torch.cat([torch.zeros_like(buckets[:, :1]), buckets], dim=1).clamp(max=n_buckets - 1)
    positions = torch.arange(timestamps.shape[1], device=timestamps.device)
    return buckets.masked_fill(positions >= lengths.unsqueeze(1), 0)


class SequentialPositionAwareness(nn.Module):
    def __init__(
        self,
        d_model: int,
        max_len: int,
        n_heads: int,
        absolute: bool = True,
        relative: bool = True,
        time: bool = True,
        n_time_buckets: int = 32,
        time_unit: float = 3600.0,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.n_time_buckets, self.time_unit = n_time_buckets, time_unit
        self.absolute = nn.Embedding(max_len, d_model) if absolute else None
        self.time_gap = nn.Embedding(n_time_buckets, d_model) if time else None
        for table in (self.absolute, self.time_gap):
            if table is not None:
                nn.init.normal_(table.weight, std=init_std)
        # [heads, item distance 0..max_len]; zero at start, so the pretrained attention is untouched until it learns
        self.distance_bias = nn.Parameter(torch.zeros(n_heads, max_len + 1)) if relative else None

    def at(
        self, lengths: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, timestamps: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Input cues ``[n, d]`` of the history items at ``positions`` of rows ``rows``; None when both are off.

        Only the items that are there are looked up (a padded batch of histories is mostly padding).
        """
        out = None
        if self.absolute is not None:
            out = self.absolute(positions)
        if self.time_gap is not None and timestamps is not None:
            buckets = time_gap_buckets(timestamps, lengths, self.n_time_buckets, self.time_unit)[rows, positions]
            out = self.time_gap(buckets) if out is None else out + self.time_gap(buckets)
        return out

    def forward(self, lengths: torch.Tensor, max_len: int, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """Input cues ``[B, L, d]`` of right-padded histories of ``lengths`` items (zeros where both are off)."""
        grid = torch.arange(max_len, device=lengths.device)
        rows = torch.arange(len(lengths), device=lengths.device).repeat_interleave(max_len)
        positions = grid.repeat(len(lengths))
        cues = self.at(lengths, rows, positions, timestamps)
        return torch.zeros(()) if cues is None else cues.view(len(lengths), max_len, -1)

    def attention_mask(
        self, items: torch.Tensor, n_queries: int, dtype: torch.dtype, key_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Additive attention mask ``[B, heads, n_queries, K]``: causal, with the learned bias by item distance.

        ``items [B, K]`` is the history item of every token (0-based), ``NO_ITEM`` for the instruction prefix; the
        tokens after the history (suffix, candidates, answers, padding) count as the predicted item, index = history
        length, so a query after the history is at distance 1 from the last item. The queries are the last
        ``n_queries`` tokens (a cache holds the ones before). A query and a key that both belong to items get the
        bias of their distance; a key that is masked (after the query, or not ``key_valid``) gets ``dtype``'s
        minimum, which keeps every row finite.
        """
        n_keys, n_distances = items.shape[1], self.distance_bias.shape[1]
        queries = items[:, n_keys - n_queries :]
        key_pos = torch.arange(n_keys, device=items.device)
        visible = key_pos <= (n_keys - n_queries + torch.arange(n_queries, device=items.device)).unsqueeze(1)
        visible = visible.unsqueeze(0) if key_valid is None else visible & key_valid.bool().unsqueeze(1)
        biased = (queries.unsqueeze(2) >= 0) & (items.unsqueeze(1) >= 0)
        distance = (queries.unsqueeze(2) - items.unsqueeze(1)).clamp(0, n_distances - 1)  # [B, Q, K]
        # one lookup gives the whole mask: the table's last two columns are "no bias" and "masked"
        index = torch.where(visible, torch.where(biased, distance, n_distances), n_distances + 1)
        heads = self.distance_bias.shape[0]
        fixed = torch.tensor([0.0, torch.finfo(dtype).min], dtype=dtype, device=items.device).expand(heads, 2)
        table = torch.cat([self.distance_bias.to(dtype), fixed], dim=1)
        return nn.functional.embedding(index, table.T).permute(0, 3, 1, 2)
