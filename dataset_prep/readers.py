"""Readers for the official Amazon review releases (2014, 2018, 2023) and a generic TSV/CSV + JSONL layout.

Each reader streams two files line by line and yields only compact values: ``(user, item, time, rating)``
tuples for interactions and :class:`ItemMeta` records for the items that are wanted, so multi-GB raw files
never need to fit in memory.
"""

from __future__ import annotations

import ast
import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from dataset_prep.errors import DatasetPrepError
from dataset_prep.lines import LineErrors, iter_lines, require_file

Review = tuple[str, str, float, float]  # user token, item token, unix seconds, rating (NaN when absent)
NO_RATING = float("nan")


@dataclass
class ItemMeta:
    """The item fields that reach the ``.item`` file; empty/None when the source lacks them."""

    item: str
    title: str = ""
    brand: str = ""
    categories: list[str] = field(default_factory=list)
    price: float | None = None
    description: str = ""
    image_url: str = ""


class Reader(Protocol):
    def describe(self) -> str: ...

    def reviews(self, errors: LineErrors, show_progress: bool = True) -> Iterator[Review]: ...

    def metadata(self, wanted: set[str], errors: LineErrors, show_progress: bool = True
                 ) -> Iterator[ItemMeta]: ...


def decode_record(text: str) -> dict:
    """JSON first; the 2014 metadata (and some 2014 review dumps) are Python literals instead."""
    try:
        record = json.loads(text)
    except ValueError:
        try:
            record = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
            raise ValueError(f"neither JSON nor a Python literal ({type(err).__name__})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    return record


def parse_time(value: object) -> float:
    """Unix seconds from a number or an ISO-8601 date (naive dates are taken as UTC)."""
    if isinstance(value, bool):
        raise ValueError(f"bad timestamp {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    try:
        stamp = datetime.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"bad timestamp {value!r}") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


def parse_price(value: object) -> float | None:
    """2014/2023 give numbers, 2018 gives strings like ``"$9.99"``; ranges and junk count as missing."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip().lstrip("$").replace(",", ""))
        except ValueError:
            return None
    return None


def _text(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value if v)
    return "" if value is None else str(value)


def _unique(values: list) -> list[str]:
    seen: dict[str, None] = {}
    for value in values:
        text = "" if value is None else str(value).strip()
        if text:
            seen.setdefault(text, None)
    return list(seen)


def _first(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return str(value[0]) if value else ""
    return "" if value is None else str(value)


def _require(record: dict, key: str) -> object:
    value = record.get(key)
    if value is None or value == "":
        raise ValueError(f"missing '{key}'")
    return value


# --- the official releases -------------------------------------------------------------------------------

def _review_2014(record: dict) -> Review:
    rating = record.get("overall")
    return (str(_require(record, "reviewerID")), str(_require(record, "asin")),
            parse_time(_require(record, "unixReviewTime")),
            NO_RATING if rating is None else float(rating))


def _meta_2014(record: dict) -> ItemMeta:
    paths = record.get("categories") or []
    levels = [level for path in paths for level in (path if isinstance(path, list) else [path])]
    return ItemMeta(
        item=str(_require(record, "asin")),
        title=_text(record.get("title")),
        brand=_text(record.get("brand")),
        categories=_unique(levels),
        price=parse_price(record.get("price")),
        description=_text(record.get("description")),
        image_url=_text(record.get("imUrl")),
    )


def _meta_2018(record: dict) -> ItemMeta:
    image = (_first(record.get("imageURLHighRes")) or _first(record.get("imageURL"))
             or _first(record.get("image")))
    return ItemMeta(
        item=str(_require(record, "asin")),
        title=_text(record.get("title")),
        brand=_text(record.get("brand")),
        categories=_unique(record.get("category") or []),
        price=parse_price(record.get("price")),
        description=_text(record.get("description")),
        image_url=image,
    )


def _review_2023(record: dict) -> Review:
    rating = record.get("rating")
    item = record.get("parent_asin") or _require(record, "asin")
    return (str(_require(record, "user_id")), str(item), parse_time(_require(record, "timestamp")) / 1000.0,
            NO_RATING if rating is None else float(rating))


def _image_2023(images: object) -> str:
    """The MAIN picture's large version, else the first picture's."""
    if not isinstance(images, list) or not images:
        return ""
    main = next((im for im in images if isinstance(im, dict) and im.get("variant") == "MAIN"), images[0])
    return _text(main.get("large") or main.get("hi_res")) if isinstance(main, dict) else ""


def _meta_2023(record: dict) -> ItemMeta:
    details = record.get("details") if isinstance(record.get("details"), dict) else {}
    return ItemMeta(
        item=str(_require(record, "parent_asin")),
        title=_text(record.get("title")),
        brand=_text(record.get("store") or details.get("Brand")),
        categories=_unique(record.get("categories") or [record.get("main_category")]),
        price=parse_price(record.get("price")),
        description=_text(record.get("description")),
        image_url=_image_2023(record.get("images")),
    )


@dataclass(frozen=True)
class Release:
    """File names and field parsers of one official release."""

    name: str
    reviews_file: str  # format string with {category}
    meta_file: str
    meta_key: str  # the metadata field holding the item id, for the cheap pre-filter
    review: Callable[[dict], Review]
    meta: Callable[[dict], ItemMeta]


RELEASES: dict[str, Release] = {
    "2014": Release("2014", "reviews_{category}_5.json.gz", "meta_{category}.json.gz", "asin",
                    _review_2014, _meta_2014),
    "2018": Release("2018", "{category}_5.json.gz", "meta_{category}.json.gz", "asin",
                    _review_2014, _meta_2018),
    "2023": Release("2023", "{category}.jsonl.gz", "meta_{category}.jsonl.gz", "parent_asin",
                    _review_2023, _meta_2023),
}


def locate(directory: Path, name: str) -> Path | None:
    """``name`` in ``directory``, also accepted without its ``.gz`` (users often gunzip raw files)."""
    for candidate in (directory / name, directory / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


@dataclass
class AmazonReader:
    """One official release's review file + metadata file."""

    release: Release
    reviews_path: Path
    meta_path: Path

    @classmethod
    def from_dir(cls, release: str, category: str, directory: Path) -> AmazonReader:
        spec = RELEASES[release]
        names = [spec.reviews_file.format(category=category), spec.meta_file.format(category=category)]
        paths = [locate(directory, name) for name in names]
        if None in paths:
            missing = [n for n, p in zip(names, paths, strict=True) if p is None]
            raise DatasetPrepError(f"{release} release files not found in {directory}: {', '.join(missing)}")
        return cls(spec, paths[0], paths[1])

    def describe(self) -> str:
        return f"Amazon {self.release.name}: {self.reviews_path.name} + {self.meta_path.name}"

    def reviews(self, errors: LineErrors, show_progress: bool = True) -> Iterator[Review]:
        path = require_file(self.reviews_path, "review file")
        for lineno, text in iter_lines(path, errors, desc=path.name, show_progress=show_progress):
            try:
                yield self.release.review(decode_record(text))
            except (ValueError, TypeError) as err:
                errors.report(path, lineno, str(err))

    def metadata(self, wanted: set[str], errors: LineErrors, show_progress: bool = True
                 ) -> Iterator[ItemMeta]:
        path = require_file(self.meta_path, "metadata file")
        # Skip lines for unwanted items before the (slow) full parse; a line the regex misses is parsed.
        key = re.compile(r"""["']""" + re.escape(self.release.meta_key) + r"""["']\s*:\s*["']([^"']+)["']""")
        seen: set[str] = set()
        for lineno, text in iter_lines(path, errors, desc=path.name, show_progress=show_progress):
            found = key.search(text)
            if found and (found.group(1) not in wanted or found.group(1) in seen):
                continue
            try:
                meta = self.release.meta(decode_record(text))
            except (ValueError, TypeError, AttributeError) as err:
                errors.report(path, lineno, str(err))
                continue
            if meta.item in wanted and meta.item not in seen:  # 2018 metadata repeats some items
                seen.add(meta.item)
                yield meta


# --- generic: interactions TSV/CSV + item JSON lines -----------------------------------------------------

INTERACTION_FILES = ("interactions.tsv.gz", "interactions.tsv", "interactions.csv.gz", "interactions.csv")
ITEM_FILES = ("items.jsonl", "items.jsonl.gz")
# Metadata keys tried in order for each ItemMeta field (the shared Beauty copy keeps categories in
# "attributes", brand first when the metadata had one).
META_KEYS = {
    "title": ("title", "name"),
    "brand": ("brand", "store"),
    "categories": ("categories", "category", "attributes"),
    "price": ("price",),
    "description": ("description",),
    "image_url": ("image_url", "imUrl", "image"),
}


@dataclass
class GenericReader:
    """An interactions table with a header row + item metadata as JSON lines keyed by ``item_key``."""

    interactions_path: Path
    items_path: Path | None
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"
    rating_col: str = "rating"  # used only when the header has it
    item_key: str | None = None  # metadata key of the item id; defaults to item_col

    @classmethod
    def from_dir(cls, directory: Path, **columns: str) -> GenericReader:
        interactions = next((p for p in (directory / n for n in INTERACTION_FILES) if p.is_file()), None)
        if interactions is None:
            raise DatasetPrepError(f"no {' / '.join(INTERACTION_FILES)} in {directory}")
        items = next((p for p in (directory / n for n in ITEM_FILES) if p.is_file()), None)
        return cls(interactions, items, **columns)

    def describe(self) -> str:
        items = self.items_path.name if self.items_path else "no item metadata"
        return f"generic: {self.interactions_path.name} + {items}"

    def _separator(self) -> str:
        return "," if ".csv" in self.interactions_path.name else "\t"

    def reviews(self, errors: LineErrors, show_progress: bool = True) -> Iterator[Review]:
        path = require_file(self.interactions_path, "interactions file")
        sep = self._separator()
        split: Callable[[str], list[str]] = (
            (lambda line: line.rstrip("\r\n").split("\t")) if sep == "\t"
            else (lambda line: next(csv.reader([line])))
        )
        lines = iter_lines(path, errors, desc=path.name, show_progress=show_progress)
        header = next(lines, None)
        if header is None:
            raise DatasetPrepError(f"{path} is empty; it needs a header row")
        columns = split(header[1])
        wanted = [self.user_col, self.item_col, self.time_col]
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise DatasetPrepError(f"{path} has no column {', '.join(missing)}; its columns are "
                                   f"{', '.join(columns)} (set the column names with --user-col/--item-col/"
                                   "--time-col)")
        u, i, t = (columns.index(c) for c in wanted)
        r = columns.index(self.rating_col) if self.rating_col in columns else None
        for lineno, text in lines:
            row = split(text)
            if len(row) != len(columns):
                errors.report(path, lineno, f"{len(row)} fields, the header has {len(columns)}")
                continue
            if not row[u] or not row[i]:
                errors.report(path, lineno, "empty user or item id")
                continue
            try:
                rating = NO_RATING if r is None or not row[r] else float(row[r])
                yield row[u], row[i], parse_time(row[t]), rating
            except ValueError as err:
                errors.report(path, lineno, str(err))

    def metadata(self, wanted: set[str], errors: LineErrors, show_progress: bool = True
                 ) -> Iterator[ItemMeta]:
        if self.items_path is None:
            return
        path = require_file(self.items_path, "item metadata file")
        key = self.item_key or self.item_col
        seen: set[str] = set()
        for lineno, text in iter_lines(path, errors, desc=path.name, show_progress=show_progress):
            try:
                record = decode_record(text)
                meta = _generic_meta(str(_require(record, key)), record)
            except (ValueError, TypeError) as err:
                errors.report(path, lineno, str(err))
                continue
            if meta.item in wanted and meta.item not in seen:
                seen.add(meta.item)
                yield meta


def _generic_meta(item: str, record: dict) -> ItemMeta:
    def pick(name: str) -> object:
        return next((record[k] for k in META_KEYS[name] if record.get(k) not in (None, "", [])), None)

    categories = pick("categories")
    if categories is not None and not isinstance(categories, list):
        categories = [categories]
    return ItemMeta(
        item=item,
        title=_text(pick("title")),
        brand=_text(pick("brand")),
        categories=_unique([c for level in categories or [] for c in (level if isinstance(level, list)
                                                                         else [level])]),
        price=parse_price(pick("price")),
        description=_text(pick("description")),
        image_url=_first(pick("image_url")),
    )
