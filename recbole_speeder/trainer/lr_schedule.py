"""Per-stage learning-rate schedules over a stage's optimizer steps (rebuilt at every MPO stage)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def build_scheduler(optimizer: Optimizer, name: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warm-up over ``warmup_steps``, then constant, linear decay to 0, or cosine decay to 0
    (``config.choices.LR_SCHEDULERS``)."""
    warmup = max(int(warmup_steps or 0), 0)
    total = max(int(total_steps), 1)

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if name == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 1.0 - progress if name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
