"""The one template that turns an item's metadata into the text Speeder reads.

Used for the text embedding (MRC's text expert) and for the text-description baseline, so both see the
same words: ``"<title>; brand: <brand>; categories: <categories>"``; empty fields are left out.
"""

from __future__ import annotations

from collections.abc import Mapping

# Fields whose value is written bare (no "name: " label) at the start of the text.
LEADING_FIELDS = ("title", "movie_title", "name")


def format_item_text(fields: Mapping[str, object]) -> str:
    parts = []
    for name, value in fields.items():
        text = _clean(value)
        if not text:
            continue
        parts.append(text if name in LEADING_FIELDS else f"{name.replace('_', ' ')}: {text}")
    return "; ".join(parts)


def _clean(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value if str(v).strip())
    if isinstance(value, float) and value != value:  # NaN from pandas
        return ""
    return " ".join(str(value).split())
