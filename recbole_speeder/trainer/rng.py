"""Every random stream a training step draws from, captured and restored so a resumed run matches an unbroken one.

Dropout draws from torch's global generator, RecBole's negative samplers from numpy's, some transforms from
python's; the training shuffle has its own ``torch.Generator`` on the dataloader (handled by the trainer).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
