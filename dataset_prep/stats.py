"""The statistics table printed after preparation (and compared with published figures in the tests)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataset_prep.interactions import Interactions


@dataclass
class PrepStats:
    dataset: str
    source: str
    users: int
    items: int
    interactions: int
    mean_length: float
    median_length: float
    sparsity: float  # 1 - interactions / (users * items)
    lines_read: int  # interactions read from the raw file
    skipped_lines: int  # malformed raw lines skipped (reviews and metadata)
    duplicates: int  # repeated (user, item) interactions removed
    kcore: int
    kcore_removed: int  # interactions removed by the k-core filter
    items_without_meta: int

    @classmethod
    def of(cls, inter: Interactions, **counts: object) -> PrepStats:
        lengths = inter.sequence_lengths()
        users, items = len(lengths), len(np.unique(inter.items))
        return cls(
            users=users, items=items, interactions=len(inter),
            mean_length=float(lengths.mean()) if users else 0.0,
            median_length=float(np.median(lengths)) if users else 0.0,
            sparsity=1.0 - len(inter) / (users * items) if users and items else 1.0,
            **counts,
        )

    def table(self) -> str:
        rows = [
            ("users", f"{self.users:,}"),
            ("items", f"{self.items:,}"),
            ("interactions", f"{self.interactions:,}"),
            ("mean sequence length", f"{self.mean_length:.2f}"),
            ("median sequence length", f"{self.median_length:g}"),
            ("sparsity", f"{100 * self.sparsity:.4f}%"),
            ("interactions read", f"{self.lines_read:,}"),
            ("malformed lines skipped", f"{self.skipped_lines:,}"),
            ("duplicates removed", f"{self.duplicates:,}"),
            (f"removed by {self.kcore}-core", f"{self.kcore_removed:,}"),
            ("items without metadata", f"{self.items_without_meta:,}"),
        ]
        width = max(len(name) for name, _ in rows)
        value_width = max(len(value) for _, value in rows)
        lines = [f"{self.dataset} ({self.source})"]
        lines += [f"  {name:<{width}}  {value:>{value_width}}" for name, value in rows]
        return "\n".join(lines)
