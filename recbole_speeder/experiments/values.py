"""Config values as plain yaml / json types (what sweeps hand to trials and write into their reports)."""

from __future__ import annotations

from typing import Any

import numpy as np


def plain(value: Any) -> Any:
    """Numpy scalars, tuples (hyperopt's choice of a list) and dict keys as yaml/json-safe Python values."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
