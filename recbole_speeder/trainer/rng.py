"""Seeding, deterministic kernels, and every random stream a training step draws from, captured and restored so a
resumed run matches an unbroken one.

Dropout draws from torch's global generator, RecBole's negative samplers from numpy's, some transforms from
python's; the training shuffle has its own ``torch.Generator`` on the dataloader (handled by the trainer).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from recbole.utils import init_seed


def seed_run(seed: int, reproducibility: bool) -> None:
    """RecBole's ``init_seed``, plus torch's deterministic kernels when ``reproducibility`` is on.

    RecBole's flag only pins cuDNN, and two identical CPU runs still differed: the backward of Speeder's
    ``item_tokens[items, offset]`` is ``index_put_(accumulate=True)``, which on CPU adds a repeated item's
    gradients with parallel atomics, in whatever order the threads get there. Deterministic mode runs it
    serially. ``warn_only``: an op without a deterministic kernel warns instead of ending the run; on GPU that
    leaves the attention backward nondeterministic (docs/mpo_trainer.md). New tensors are not NaN-filled: that
    guard costs time on every epoch and nothing here reads memory it did not write (the rerun test would see it).
    """
    init_seed(seed, reproducibility)
    if reproducibility and torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspace
    torch.use_deterministic_algorithms(bool(reproducibility), warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


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
