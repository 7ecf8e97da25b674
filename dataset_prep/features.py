"""Item feature files built from a dataset's ``.item`` file, in the format of recbole_speeder.data.features.

Working from the written ``.item`` (not the raw metadata) means the texts hashed here are the texts anyone
can rebuild from the atomic files, so the model can call :func:`build_text_features` itself when no
feature file exists, and the freshness check agrees with what prepare wrote.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataset_prep.atomic import read_table
from dataset_prep.download import fetch_images
from dataset_prep.errors import DatasetPrepError
from recbole_speeder.data import encoders
from recbole_speeder.data.features import feature_path, is_fresh, save_item_features, source_hash
from recbole_speeder.data.item_text import format_item_text

log = logging.getLogger(__name__)

TEXT_FIELDS = ("title", "brand", "categories")
MODALITIES = ("text", "image")
TextEncoder = Callable[[list[str]], np.ndarray]
ImageEncoder = Callable[[list[Path | None]], tuple[np.ndarray, np.ndarray]]


@dataclass
class FeatureOptions:
    """How features are built. ``text_model`` names the sentence encoder (a sentence-transformers folder or hub
    id; None: the packaged all-MiniLM-L6-v2); ``text_encoder``/``image_encoder`` replace the real models (tests,
    other encoders) and are recorded in the manifest by their qualified name. ``out_dir`` writes the feature files
    and their manifest there instead of beside the ``.item`` file, so features of two encoders can sit side by
    side."""

    modalities: Sequence[str] = MODALITIES
    device: str = "cpu"
    batch_size: int = 64
    offline: bool = False
    image_cache: Path | None = None  # default <dataset_dir>/images
    workers: int = 16
    show_progress: bool = True
    text_model: str | None = None
    out_dir: Path | None = None
    text_encoder: TextEncoder | None = None
    image_encoder: ImageEncoder | None = None

    def __post_init__(self) -> None:
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown:
            raise DatasetPrepError(f"unknown feature modality {', '.join(sorted(unknown))}; "
                                   f"choose from {', '.join(MODALITIES)}")


def _name(encoder: Callable) -> str:
    return f"{encoder.__module__}.{getattr(encoder, '__qualname__', type(encoder).__name__)}"


def item_rows(dataset_dir: Path, dataset_name: str) -> list[dict[str, str]]:
    path = Path(dataset_dir) / f"{dataset_name}.item"
    if not path.is_file():
        raise DatasetPrepError(f"{path} not found; prepare the dataset first: python -m dataset_prep prepare")
    return read_table(path)


def item_texts(rows: list[dict[str, str]], fields: Sequence[str] = TEXT_FIELDS) -> list[str]:
    """The text the encoder sees per item, through the one template the model also uses."""
    return [format_item_text({name: row.get(name, "") for name in fields}) for row in rows]


def build_text_features(dataset_dir: str | Path, dataset_name: str, options: FeatureOptions | None = None,
                        fields: Sequence[str] = TEXT_FIELDS) -> Path:
    """``<Dataset>.text_emb.npz`` rows in ``.item`` order; skipped when fresh.

    The hash covers each item id with its text, so re-keying the same items (e.g. ASINs instead of
    integer ids) also rebuilds the file.
    """
    options = options or FeatureOptions()
    rows = item_rows(Path(dataset_dir), dataset_name)
    ids, texts = [r["item_id"] for r in rows], item_texts(rows, fields)
    digest = source_hash([f"{i}\t{t}" for i, t in zip(ids, texts, strict=True)])
    return _encode_unless_fresh(dataset_dir, dataset_name, "text", ids, texts, digest, options)


def build_image_features(dataset_dir: str | Path, dataset_name: str, options: FeatureOptions | None = None
                         ) -> Path | None:
    """``<Dataset>.image_emb.npz`` from the ``image_url`` column; None when no image can be had.

    The hash covers each item id, its URL and whether its image is on disk, so images that arrive later (a run
    with network after an offline one) make the file stale and it is rebuilt.
    """
    options = options or FeatureOptions()
    dataset_dir = Path(dataset_dir)
    rows = item_rows(dataset_dir, dataset_name)
    urls = [row.get("image_url", "") for row in rows]
    if not any(urls):
        log.info("no image URLs in %s.item: no image features", dataset_name)
        return None
    paths = fetch_images(urls, options.image_cache or dataset_dir / "images", workers=options.workers,
                         offline=options.offline, show_progress=options.show_progress)
    if all(p is None for p in paths):
        log.warning("no item image could be fetched%s: no image features",
                    " (offline and none cached)" if options.offline else "")
        return None
    ids = [r["item_id"] for r in rows]
    present = [int(p is not None) for p in paths]
    digest = source_hash([f"{i}\t{u}\t{p}" for i, u, p in zip(ids, urls, present, strict=True)])
    return _encode_unless_fresh(dataset_dir, dataset_name, "image", ids, paths, digest, options)


def _encode_unless_fresh(dataset_dir: str | Path, dataset_name: str, modality: str, ids: list[str],
                         inputs: list, digest: str, options: FeatureOptions) -> Path:
    """The modality's feature file: kept when its manifest hash and encoder match, else encoded and written.

    Text encoders return the embedding; image encoders return it with a mask of the items that have an image.
    """
    out_dir = options.out_dir or dataset_dir
    path = feature_path(out_dir, dataset_name, modality)
    custom = getattr(options, f"{modality}_encoder")
    if modality == "text":
        default = functools.partial(encoders.encode_texts, model=options.text_model)
        default_name = encoders.text_encoder_name(options.text_model)
    else:
        default, default_name = encoders.encode_images, encoders.IMAGE_ENCODER_NAME
    name = _name(custom) if custom else default_name
    if is_fresh(out_dir, dataset_name, modality, digest, name):
        log.info("%s features up to date: %s", modality, path)
        return path
    encode = custom or functools.partial(default, batch_size=options.batch_size, device=options.device,
                                         show_progress=options.show_progress)
    encoded = encode(inputs)
    embedding, mask = encoded if modality == "image" else (encoded, None)
    return save_item_features(out_dir, dataset_name, modality, ids, embedding, mask, encoder=name,
                              source_sha256=digest)


def build_features(dataset_dir: str | Path, dataset_name: str, options: FeatureOptions | None = None
                   ) -> dict[str, Path]:
    """Every requested modality that can be built, keyed by modality."""
    options = options or FeatureOptions()
    built: dict[str, Path] = {}
    if "text" in options.modalities:
        built["text"] = build_text_features(dataset_dir, dataset_name, options)
    if "image" in options.modalities:
        image = build_image_features(dataset_dir, dataset_name, options)
        if image is not None:
            built["image"] = image
    return built
