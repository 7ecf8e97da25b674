"""RecBole atomic files (``.inter``, ``.item``): written atomically, read back exactly as RecBole reads them.

RecBole loads atomic files with ``pandas.read_csv(sep="\\t", engine="python")``, i.e. csv quoting rules:
a field that starts with ``"`` would lose its quotes. Writing with ``csv.QUOTE_MINIMAL`` wraps any field
containing ``"`` in quotes and doubles the inner ones, which read_csv undoes, so titles like
``12" Ruler`` or ``"Best" Brush`` survive. Tabs and newlines are folded into single spaces first.
Known limit (pandas, not the file): a value that is exactly ``NA``, ``None``, ``null``, ``N/A``, ``nan``
(pandas' default NA strings) or empty is read by RecBole as missing and becomes its ``[PAD]`` token.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from dataset_prep.interactions import Interactions
from dataset_prep.readers import ItemMeta

_DIALECT = {"delimiter": "\t", "quotechar": '"', "quoting": csv.QUOTE_MINIMAL, "lineterminator": "\n"}
CATEGORY_SEPARATOR = ", "


def clean_text(value: object) -> str:
    """One line of text: every run of whitespace (tabs, newlines, U+2028...) becomes one space."""
    return " ".join(str(value).split())


def format_number(value: float) -> str:
    if math.isnan(value):
        return ""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def write_table(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> Path:
    """Write to ``<path>.<pid>.tmp`` then rename, so a crash never leaves a half-written atomic file and processes
    preparing the same dataset (the first rank of each node, on shared storage) never mix their bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write("\t".join(header) + "\n")
        csv.writer(handle, **_DIALECT).writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def write_inter(path: Path, inter: Interactions) -> Path:
    """``user_id:token item_id:token [rating:float] timestamp:float``; rating only when the source has one."""
    with_rating = inter.has_rating
    rating = ["rating:float"] if with_rating else []
    header = ["user_id:token", "item_id:token", *rating, "timestamp:float"]
    users = [clean_text(t) for t in inter.user_tokens]
    items = [clean_text(t) for t in inter.item_tokens]

    def rows() -> Iterable[list[str]]:
        columns = (inter.users.tolist(), inter.items.tolist(), inter.ratings.tolist(), inter.times.tolist())
        for user, item, rating, time in zip(*columns, strict=True):
            rating_cell = [format_number(rating)] if with_rating else []
            yield [users[user], items[item], *rating_cell, format_number(time)]

    return write_table(path, header, rows())


def write_items(path: Path, items: list[ItemMeta]) -> Path:
    """``item_id title brand categories`` (tokens) + ``price``/``description``/``image_url`` when present."""
    columns = ["item_id:token", "title:token", "brand:token", "categories:token"]
    has_price = any(m.price is not None for m in items)
    has_description = any(m.description.strip() for m in items)
    has_image = any(m.image_url.strip() for m in items)
    columns += (["price:float"] if has_price else []) + (["description:token"] if has_description else [])
    columns += ["image_url:token"] if has_image else []

    def rows() -> Iterable[list[str]]:
        for meta in items:
            row = [meta.item, meta.title, meta.brand, CATEGORY_SEPARATOR.join(meta.categories)]
            row = [clean_text(v) for v in row]
            if has_price:
                row.append("" if meta.price is None else format_number(meta.price))
            if has_description:
                row.append(clean_text(meta.description))
            if has_image:
                row.append(clean_text(meta.image_url))
            yield row

    return write_table(path, columns, rows())


def read_table(path: Path) -> list[dict[str, str]]:
    """Rows of an atomic file as ``{field name: text}`` (header types dropped), parsed as RecBole does."""
    with open(path, encoding="utf-8", newline="") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        names = [column.split(":")[0] for column in header]
        return [dict(zip(names, row, strict=True)) for row in csv.reader(handle, **_DIALECT)]
