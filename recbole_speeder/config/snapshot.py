"""A run's config as plain values: what checkpoints, sweep trials and comparison reports store to rebuild it."""

from __future__ import annotations

from typing import Any

import numpy as np

# Keys that belong to one launch (resuming, distributed ranks, the device), not to what a run computes: replays of a
# run (checkpoints, retests) and sweeps' trials leave them out.
LAUNCH_KEYS = ("resume", "local_rank", "world_size", "nproc", "ip", "port", "offset", "init_method", "gpu_id",
               "use_gpu")


def plain(value: Any) -> Any:
    """A config value as yaml/json types: dict keys as strings, tuples (hyperopt's choice of a list) as lists, numpy
    scalars as Python numbers, any other object as its string."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def replayable_config(config) -> dict:
    """The user's config values (files, dict, command line) that rebuild this run; JSON-safe."""
    return plain({k: v for k, v in config.external_config_dict.items() if k not in LAUNCH_KEYS})
