"""A stage's sample of training users (``users`` of an MPO stage): a slow stage, such as one that reads every history
item as text, stays affordable by training on a fraction of the users.

The users are drawn once from the run's seed and the stage's index, so a rerun or a resumed run draws the same
ones. Each epoch shuffles their rows with the training loader's own generator, whose state at the epoch start the
resume checkpoint already holds: a resumed epoch replays the same order and skips its trained batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from recbole_speeder.trainer.distributed import is_distributed

SEED_STRIDE = 1_000_003  # one stream of draws per stage index


def shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s share of ``order``, padded by wrapping (as ``DistributedSampler`` does) so that every rank
    gets as many rows, hence as many batches: DDP ranks must step together."""
    total = math.ceil(len(order) / world_size) * world_size
    padded = order.repeat(math.ceil(total / len(order)))[:total]
    return padded[rank::world_size]


class UserSample:
    """The rows of a seeded fraction of the training users, in batches as RecBole's training loader gives them.

    Shares the loader's ``generator`` (the shuffle's state, saved in resume checkpoints), batch step and
    ``collate_fn`` (negative sampling and transforms). ``stage`` (the stage's index) gives each stage its own draw.
    """

    def __init__(self, loader, fraction: float, seed: int, stage: int):
        self.loader = loader
        self.generator = loader.generator
        self.shuffle = loader.shuffle
        users = loader._dataset.inter_feat[loader._dataset.uid_field]
        distinct = users.unique()
        n_users = max(1, round(fraction * len(distinct)))
        draw = torch.Generator().manual_seed(seed * SEED_STRIDE + stage)
        drawn = torch.randperm(len(distinct), generator=draw)[:n_users]
        self.n_users, self.n_all_users = n_users, len(distinct)
        self.rows = torch.isin(users, distinct[drawn]).nonzero().squeeze(1)

    def _rows_of_epoch(self) -> torch.Tensor:
        order = self.rows[torch.randperm(len(self.rows), generator=self.generator)] if self.shuffle else self.rows
        if not is_distributed():
            return order
        return shard(order, torch.distributed.get_rank(), torch.distributed.get_world_size())

    def __len__(self) -> int:
        n_rows = len(self.rows)
        if is_distributed():
            n_rows = math.ceil(n_rows / torch.distributed.get_world_size())
        return math.ceil(n_rows / self.loader.step)

    def __iter__(self) -> Iterator:
        for batch in self._rows_of_epoch().split(self.loader.step):
            yield self.loader.collate_fn(batch.tolist())
