"""How Speeder scores: a user vector from the backbone's last state, an output vector per item from its own MRC
tokens, their similarity over a temperature."""

from __future__ import annotations

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
