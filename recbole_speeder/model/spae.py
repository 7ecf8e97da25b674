"""SPAE, Sequential Position Awareness Enhancement: where and when each history item sits.

Three additive cues per history item, each switchable for ablations, all added to that item's tokens so
the prompt gets no longer: its absolute index from the history start, its recency (distance to the
prediction step), and a log-scaled bucket of the time gap since the previous item.
"""

from __future__ import annotations

import torch
from torch import nn


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
        self.relative = nn.Embedding(max_len + 1, d_model) if relative else None
        self.time_gap = nn.Embedding(n_time_buckets, d_model) if time else None
        for table in (self.absolute, self.relative, self.time_gap):
            if table is not None:
                nn.init.normal_(table.weight, std=init_std)

    def at(
        self, lengths: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, timestamps: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Cues ``[n, d]`` of the history items at ``positions`` of rows ``rows``; None when every cue is off.

        Only the items that are there are looked up (a padded batch of histories is mostly padding). Recency counts
        back from the last history item (1 = most recent), which is the item just before the prediction step.
        """
        out = None
        if self.absolute is not None:
            out = self.absolute(positions)
        if self.relative is not None:
            recency = (lengths[rows] - positions).clamp(min=0, max=self.relative.num_embeddings - 1)
            out = self.relative(recency) if out is None else out + self.relative(recency)
        if self.time_gap is not None and timestamps is not None:
            buckets = time_gap_buckets(timestamps, lengths, self.n_time_buckets, self.time_unit)[rows, positions]
            out = self.time_gap(buckets) if out is None else out + self.time_gap(buckets)
        return out

    def forward(self, lengths: torch.Tensor, max_len: int, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """Additive ``[B, L, d]`` for right-padded histories of ``lengths`` items (zeros where all cues are off)."""
        grid = torch.arange(max_len, device=lengths.device)
        rows = torch.arange(len(lengths), device=lengths.device).repeat_interleave(max_len)
        positions = grid.repeat(len(lengths))
        cues = self.at(lengths, rows, positions, timestamps)
        return torch.zeros(()) if cues is None else cues.view(len(lengths), max_len, -1)
