"""How Speeder scores: a user vector from the backbone's last state, an output vector per item from its own MRC
tokens, their similarity over a temperature; and the sampled softmax that trains it without every item."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ScoreHead(nn.Sequential):
    """Dropout and a linear map from the last hidden state to the user vector (parameters ``head.0``, ``head.1``).

    An item's output vector is the mean of its MRC tokens, the same tokens it enters prompts as, so ranking every
    item is one matmul; ``similarity: cos`` normalises both sides, and scores are divided by ``temperature``.
    """

    def __init__(self, d_model: int, dropout: float, similarity: str, temperature: float):
        super().__init__(nn.Dropout(dropout), nn.Linear(d_model, d_model))
        self.similarity, self.temperature = similarity, temperature

    def users(self, states: torch.Tensor) -> torch.Tensor:
        """User vectors ``[..., d]`` of hidden states ``[..., d]``, divided by the temperature."""
        users = self(states.float())
        users = F.normalize(users, dim=-1) if self.similarity == "cos" else users
        return users / self.temperature

    def items(self, item_tokens: torch.Tensor) -> torch.Tensor:
        """Output vectors ``[n_items, d]`` of every item's MRC tokens ``[n_items, k, d]``."""
        vectors = item_tokens.mean(dim=1)
        return F.normalize(vectors, dim=-1) if self.similarity == "cos" else vectors


def next_item_targets(item_seq: torch.Tensor, item_seq_len: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """All-position training: the item after every history position ``[B, L]`` (the row's target after its last) and
    which positions are real."""
    next_items = torch.cat([item_seq[:, 1:], torch.zeros_like(item_seq[:, :1])], dim=1)
    next_items = next_items.scatter(1, (item_seq_len - 1).unsqueeze(1), targets.unsqueeze(1))
    valid = torch.arange(item_seq.shape[1], device=item_seq.device) < item_seq_len.unsqueeze(1)
    return next_items, valid


class SharedNegatives:
    """``sampled_softmax_negatives`` items drawn per training batch, shared by all its targets, uniform over the
    catalogue or by training popularity (``sampled_softmax_distribution``), with every item's log-probability for
    the logQ correction. A draw costs O(negatives) (popularity: a binary search in the cumulative counts), not
    O(catalogue); it comes from torch's global generator, which seeding and resume already cover."""

    def __init__(self, n: int, distribution: str, train_counts: np.ndarray):
        self.n, self.uniform = n, distribution == "uniform"
        counts = torch.from_numpy(np.asarray(train_counts, dtype=np.float64))
        counts = torch.ones_like(counts) if self.uniform else counts
        counts[0] = 0  # the padding item
        self.cumulative = counts.cumsum(0)
        self.log_q = torch.log(counts / counts.sum()).float()  # -inf for items never drawn

    def draw(self, device: torch.device) -> torch.Tensor:
        if self.uniform:
            return torch.randint(1, len(self.cumulative), (self.n,)).to(device)
        point = torch.rand(self.n, dtype=torch.float64) * self.cumulative[-1]
        return torch.searchsorted(self.cumulative, point, right=True).to(device)


def sampled_softmax_loss(users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                         targets: torch.Tensor, negative_ids: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each target ``[T]`` (vectors ``positives [T, d]``) against shared negatives ``[S, d]`` (ids
    ``negative_ids``), logits of user vectors ``[T, d]`` corrected by ``-log q`` of each item's sampling
    probability ``log_q`` (indexed by item id), a negative that is the row's own target masked out."""
    positive = (users * positives).sum(dim=-1, keepdim=True) - log_q[targets].unsqueeze(1)
    negative = users @ negatives.T - log_q[negative_ids].unsqueeze(0)
    negative = negative.masked_fill(negative_ids.unsqueeze(0) == targets.unsqueeze(1), -math.inf)
    logits = torch.cat([positive, negative], dim=1).float()  # the softmax in float32, as the full one's
    return torch.nn.functional.cross_entropy(logits, torch.zeros_like(targets))
