"""Soft tokens aligned with the LLM's own reading of each item's text (``align_loss_weight``).

A route for the backbone's pretrained knowledge to reach the ranking without putting text in the prompt: an
item's MRC soft tokens, read by the backbone after the instruction prefix, should leave the hidden state that the
item's text leaves there, at its last token. The LLM then meets a soft token where it would meet the words, and
whatever its layers know about those words applies. The targets are read once per run, the first time a loss needs
them, by the backbone's own weights (``backbone_init`` applied, so the shuffled control aligns to a shuffled
reading; LoRA off, so they stay fixed while LoRA trains) and kept in memory, not in checkpoints.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from logging import getLogger
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

if TYPE_CHECKING:
    from recbole_speeder.model.speeder import Speeder

TARGET_BATCH = 256  # item texts per backbone call while reading the targets


def adapters_off(llm: nn.Module) -> AbstractContextManager:
    """The base model's weights: peft's ``disable_adapter`` on a LoRA-wrapped backbone, else nothing to switch."""
    return llm.disable_adapter() if hasattr(llm, "disable_adapter") else nullcontext()


class TextAlignment(nn.Module):
    """1 - cosine between the backbone's state after an item's soft tokens and after its text.

    Both states are centred on the mean text state first: a decoder's states share a few large dimensions, which
    would make any two of them look alike. Each step aligns at most ``items_per_step`` of the batch's items (its
    histories and targets), drawn at random, so the cost stays a small fraction of the step's.
    """

    def __init__(self, items_per_step: int):
        super().__init__()
        self.items_per_step = items_per_step
        # [n_items, d] text states less their mean (row 0, the padding item, unused); read at the first loss
        self.register_buffer("targets", None, persistent=False)
        self.register_buffer("target_mean", None, persistent=False)

    def loss(self, model: Speeder, item_seq: torch.Tensor, next_items: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            self._read_targets(model)
        items = torch.cat([item_seq.flatten(), next_items]).unique()
        items = items[items > 0]
        items = items[torch.randperm(len(items), device=items.device)[: self.items_per_step]]
        with model._autocast():
            soft = model.mrc(items)[0].float()  # [K, k, d]
        reads = soft.new_full((len(items), 1), soft.shape[1] - 1, dtype=torch.long)
        states = model._run_backbone(soft, None, reads)[:, 0]
        cosine = F.cosine_similarity(states - self.target_mean, self.targets[items], dim=-1)
        return (1 - cosine).mean()

    @torch.no_grad()
    def _read_targets(self, model: Speeder) -> None:
        """Every item's state at its last text token, after the prefix, with the base weights and no dropout."""
        model._build_item_text()
        ids, lengths = model.item_text_ids, model.item_text_len
        n_items = len(ids)
        getLogger().info(f"alignment: reading {n_items - 1} item texts with the backbone (LoRA off) once")
        training = model.llm.training
        model.llm.train(False)
        states = []
        with adapters_off(model.llm):
            model.drop_caches()  # a cached prefix may hold LoRA's keys/values
            for start in tqdm(range(1, n_items, TARGET_BATCH), desc="alignment targets", unit="batch",
                              disable=not model.show_progress):
                rows = slice(start, start + TARGET_BATCH)
                width = int(lengths[rows].max())
                embeds = model.llm.get_input_embeddings()(ids[rows, :width]).float()
                reads = (lengths[rows] - 1).unsqueeze(1)
                states.append(model._run_backbone(embeds, None, reads)[:, 0])
            model.drop_caches()
        model.llm.train(training)
        states = torch.cat([states[0].new_zeros(1, states[0].shape[1]), *states])
        self.target_mean = states[1:].mean(dim=0)
        self.targets = states - self.target_mean
