"""Config values written as text (``--compare`` variants, ``.hyper`` files) and back to plain yaml types."""

from __future__ import annotations

import ast
from typing import Any

import numpy as np
import yaml


def parse_value(text: str) -> Any:
    """A Python literal (``1e-3``, ``[1, 2]``, ``'a'``) like RecBole's command line, else yaml (``true``,
    ``[text, id]``), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if value is None and text.strip().lower() not in ("~", "null", "none") else value


def plain(value: Any) -> Any:
    """Numpy scalars, tuples (hyperopt's choice of a list) and dict keys as yaml/json-safe Python values."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
