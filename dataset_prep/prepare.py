"""Raw reviews -> RecBole atomic files + item features: :func:`prepare_dataset` for any reader,
:func:`ensure_dataset` for the three Amazon benchmarks the run script knows by name."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from dataset_prep.atomic import write_inter, write_items
from dataset_prep.download import DownloadError, download_file
from dataset_prep.errors import DatasetPrepError
from dataset_prep.features import FeatureOptions, build_features
from dataset_prep.interactions import Interactions
from dataset_prep.kcore import kcore
from dataset_prep.lines import LineErrors, OnError
from dataset_prep.readers import (
    INTERACTION_FILES,
    RELEASES,
    AmazonReader,
    GenericReader,
    ItemMeta,
    Reader,
    locate,
)
from dataset_prep.stats import PrepStats

log = logging.getLogger(__name__)

# RecBole dataset name -> category in the official 2014 file names.
DATASETS = {
    "Amazon_Beauty": "Beauty",
    "Amazon_Sports_and_Outdoors": "Sports_and_Outdoors",
    "Amazon_Toys_and_Games": "Toys_and_Games",
}
OFFICIAL_2014_URL = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/{file}"


@dataclass
class PrepOptions:
    kcore: int = 5
    on_error: OnError = "skip"
    features: FeatureOptions = field(default_factory=FeatureOptions)


@dataclass
class PrepResult:
    dataset_dir: Path
    stats: PrepStats
    features: dict[str, Path]


def prepare_dataset(reader: Reader, dataset: str, data_path: str | Path, options: PrepOptions | None = None
                    ) -> PrepResult:
    """Read, deduplicate, k-core, order by time, write ``<data_path>/<dataset>/<dataset>.inter/.item`` and
    the item feature files."""
    options = options or PrepOptions()
    show = options.features.show_progress
    errors = LineErrors(options.on_error)
    raw = Interactions.collect(reader.reviews(errors, show))
    if not len(raw):
        raise DatasetPrepError(f"no interactions could be read from {reader.describe()}")
    unique = raw.deduplicate()
    kept = kcore(unique, options.kcore).chronological()
    if not len(kept):
        raise DatasetPrepError(f"nothing is left after the {options.kcore}-core filter "
                               f"({len(unique):,} interactions read); lower --kcore")
    item_tokens = kept.item_set()
    found = {m.item: m for m in reader.metadata(set(item_tokens), errors, show)}
    items = [found.get(token) or ItemMeta(token) for token in item_tokens]

    dataset_dir = Path(data_path) / dataset
    write_inter(dataset_dir / f"{dataset}.inter", kept)
    write_items(dataset_dir / f"{dataset}.item", items)
    stats = PrepStats.of(
        kept, dataset=dataset, source=reader.describe(), lines_read=len(raw), skipped_lines=errors.total,
        duplicates=len(raw) - len(unique), kcore=options.kcore, kcore_removed=len(unique) - len(kept),
        items_without_meta=len(item_tokens) - len(found),
    )
    features = build_features(dataset_dir, dataset, options.features)
    return PrepResult(dataset_dir, stats, features)


def _raw_reader(raw_dir: Path, dataset: str, category: str, explicit: bool) -> Reader | None:
    """Official 2014 files in ``raw_dir``, else a generic layout in ``raw_dir/<dataset>/`` (or in ``raw_dir``
    itself when the caller named it: then it is this dataset's folder)."""
    release = RELEASES["2014"]
    names = (release.reviews_file.format(category=category), release.meta_file.format(category=category))
    if all(locate(raw_dir, name) for name in names):
        return AmazonReader.from_dir("2014", category, raw_dir)
    for folder in (raw_dir / dataset, raw_dir) if explicit else (raw_dir / dataset,):
        if any((folder / name).is_file() for name in INTERACTION_FILES):
            return GenericReader.from_dir(folder)
    return None


def _download_2014(raw_dir: Path, dataset: str, category: str, urls: dict[str, str], offline: bool,
                   show_progress: bool) -> Reader:
    release = RELEASES["2014"]
    files = {"reviews": release.reviews_file.format(category=category),
             "meta": release.meta_file.format(category=category)}
    sources = {role: urls.get(role, OFFICIAL_2014_URL.format(file=name)) for role, name in files.items()}
    instead = (f"place {files['reviews']} and {files['meta']} (from {sources['reviews'].rsplit('/', 1)[0]}/) "
               f"in {raw_dir}/, or interactions.tsv.gz + items.jsonl in {raw_dir / dataset}/, then run again")
    if offline:
        raise DatasetPrepError(f"{dataset}: no raw data and offline: {instead}")
    for role, name in files.items():
        if locate(raw_dir, name) is None:
            try:
                download_file(sources[role], raw_dir / name, show_progress=show_progress)
            except DownloadError as err:
                raise DatasetPrepError(f"{dataset}: download failed ({err}): {instead}") from None
    return AmazonReader.from_dir("2014", category, raw_dir)


def ensure_dataset(dataset: str, data_path: str | Path, *, raw_dir: str | Path | None = None,
                   urls: dict[str, str] | None = None, offline: bool = False,
                   options: PrepOptions | None = None) -> Path:
    """``<data_path>/<dataset>``, preparing its atomic + feature files first if they are missing.

    Raw files are looked for in ``raw_dir`` (default ``<data_path>/raw``): the official 2014 5-core
    reviews + metadata, or a generic interactions/items layout; failing that the official files are
    downloaded (``urls`` may override ``{"reviews": ..., "meta": ...}``). ``options`` tunes k-core,
    malformed-line handling and features (modalities, encoders).
    """
    dataset_dir = Path(data_path) / dataset
    if (dataset_dir / f"{dataset}.inter").is_file() and (dataset_dir / f"{dataset}.item").is_file():
        return dataset_dir
    if dataset not in DATASETS:
        raise DatasetPrepError(f"{dataset_dir} has no {dataset}.inter/.item and dataset_prep builds only "
                               f"{', '.join(DATASETS)} by name; use python -m dataset_prep prepare")
    unknown = set(urls or {}) - {"reviews", "meta"}
    if unknown:
        raise ValueError(f"urls keys must be 'reviews' and/or 'meta', not {', '.join(sorted(unknown))}")
    options = options or PrepOptions()
    options = dataclasses.replace(
        options, features=dataclasses.replace(options.features, offline=offline or options.features.offline))
    category = DATASETS[dataset]
    raw = Path(raw_dir) if raw_dir is not None else Path(data_path) / "raw"
    reader = _raw_reader(raw, dataset, category, explicit=raw_dir is not None) or _download_2014(
        raw, dataset, category, urls or {}, options.features.offline, options.features.show_progress)
    log.info("preparing %s from %s", dataset, reader.describe())
    result = prepare_dataset(reader, dataset, data_path, options)
    log.info("%s", result.stats.table())
    return dataset_dir
