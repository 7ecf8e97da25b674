"""Where the plugin's yaml defaults live, in a source checkout and in an installed wheel."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def properties_dir() -> Path:
    """``properties/`` sits at the repository top; a wheel ships it as ``recbole_speeder/properties``."""
    for candidate in (_PACKAGE_DIR / "properties", _PACKAGE_DIR.parent / "properties"):
        if (candidate / "overall.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"recbole_speeder properties/ not found beside {_PACKAGE_DIR}")
