"""Which candidates a generative prompt lists, and in which order: training lists drawn from a seeded generator,
evaluation lists in an order seeded by the user."""

from __future__ import annotations

import torch

ORDER_SEED_STRIDE = 1_000_003


def listing_order(keys: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A permutation of ``n`` candidate slots per key (user id), the same for every model and run with ``seed``."""
    perms = [
        torch.randperm(n, generator=torch.Generator().manual_seed(seed * ORDER_SEED_STRIDE + key))
        for key in keys.tolist()
    ]
    return torch.stack(perms).to(keys.device)


class TrainingCandidates:
    """The true next item and ``n - 1`` negatives per training row, in a shuffled order, drawn from a generator seeded
    by ``seed`` (uniform over the catalogue, or by training popularity with ``weights``)."""

    def __init__(self, n: int, n_items: int, seed: int, weights: torch.Tensor | None = None):
        self.n, self.n_items, self.weights = n, n_items, weights
        self.generator = torch.Generator().manual_seed(seed)

    def _draw(self, count: int) -> torch.Tensor:
        if self.weights is not None:
            return torch.multinomial(self.weights, count, replacement=True, generator=self.generator)
        return torch.randint(1, self.n_items, (count,), generator=self.generator)

    def __call__(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(candidates [B, n], the true item's slot [B])``."""
        batch, n, target = len(targets), self.n, targets.cpu()
        negatives = self._draw(batch * (n - 1)).view(batch, n - 1)
        clash = negatives == target.unsqueeze(1)
        while clash.any():
            negatives[clash] = self._draw(int(clash.sum()))
            clash = negatives == target.unsqueeze(1)
        candidates = torch.cat([target.unsqueeze(1), negatives], dim=1)
        order = torch.rand(batch, n, generator=self.generator).argsort(dim=1)
        listed_at = (order == 0).long().argmax(dim=1)
        return candidates.gather(1, order).to(targets.device), listed_at.to(targets.device)
