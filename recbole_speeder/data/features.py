"""Item feature files: the contract between ``dataset_prep`` and the Speeder model.

One file per modality sits beside the atomic files, ``<data_path>/<Dataset>/<Dataset>.<modality>_emb.npz``,
with three arrays:

- ``item_id``   (str,     [N])    the item token exactly as written in ``<Dataset>.item`` / ``.inter``;
- ``embedding`` (float32, [N, D]) one row per item;
- ``mask``      (bool,    [N])    False where the modality is missing for that item (e.g. a dead image URL).

``<Dataset>.features.json`` (the manifest) records, per modality, the encoder, its dimension, the item count
and a hash of the source text/URLs, so that stale files are detected and rebuilt.
Rows are keyed by token rather than by position because RecBole re-numbers items when it loads a dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recbole_speeder.errors import UsageError

MANIFEST_SUFFIX = ".features.json"


class FeatureFileError(UsageError):
    """A feature file that does not fit the dataset it is loaded for."""


@dataclass
class ItemFeatures:
    """One modality's features aligned to RecBole's internal item ids (row 0 is the padding item)."""

    embedding: np.ndarray  # float32 [n_items, D]
    mask: np.ndarray  # bool [n_items]


def feature_path(dataset_dir: str | os.PathLike, dataset_name: str, modality: str) -> Path:
    return Path(dataset_dir) / f"{dataset_name}.{modality}_emb.npz"


def manifest_path(dataset_dir: str | os.PathLike, dataset_name: str) -> Path:
    return Path(dataset_dir) / f"{dataset_name}{MANIFEST_SUFFIX}"


def source_hash(items: list[str]) -> str:
    """Hash of the inputs an encoder saw (texts or URLs, in item order)."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Write beside ``path`` under this process's own name, then rename: processes writing the same file (ranks of
    nodes sharing storage) never mix their bytes, and a reader never sees half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_item_features(
    dataset_dir: str | os.PathLike,
    dataset_name: str,
    modality: str,
    item_ids: list[str],
    embedding: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    encoder: str,
    source_sha256: str,
) -> Path:
    """Write one modality's feature file atomically and record it in the manifest."""
    embedding = np.asarray(embedding, dtype=np.float32)
    if embedding.ndim != 2 or embedding.shape[0] != len(item_ids):
        raise FeatureFileError(
            f"{modality} embedding has shape {embedding.shape}, expected ({len(item_ids)}, D)"
        )
    mask = np.ones(len(item_ids), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    path = feature_path(dataset_dir, dataset_name, modality)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(
        path,
        lambda h: np.savez(h, item_id=np.asarray(item_ids, dtype=str), embedding=embedding, mask=mask),
    )
    manifest = read_manifest(dataset_dir, dataset_name)
    manifest[modality] = {
        "file": path.name,
        "encoder": encoder,
        "dim": int(embedding.shape[1]),
        "n_items": len(item_ids),
        "n_present": int(mask.sum()),
        "source_sha256": source_sha256,
    }
    body = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    _atomic_write(manifest_path(dataset_dir, dataset_name), lambda h: h.write(body))
    return path


def read_manifest(dataset_dir: str | os.PathLike, dataset_name: str) -> dict:
    path = manifest_path(dataset_dir, dataset_name)
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def is_fresh(dataset_dir: str | os.PathLike, dataset_name: str, modality: str, sha256: str, encoder: str) -> bool:
    """True when the modality's file exists and was built from the same inputs by the same encoder."""
    entry = read_manifest(dataset_dir, dataset_name).get(modality)
    return (
        entry is not None
        and entry.get("source_sha256") == sha256
        and entry.get("encoder") == encoder
        and feature_path(dataset_dir, dataset_name, modality).exists()
    )


def load_item_features(path: str | os.PathLike, id2token: np.ndarray) -> ItemFeatures:
    """Load a feature file and re-order it to RecBole's item ids.

    ``id2token`` is ``dataset.field2id_token[item_field]``: token of each internal id, ``[PAD]`` at 0.
    Every dataset item must have a row; rows for items RecBole filtered out are ignored.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            tokens = data["item_id"].astype(str)
            embedding = data["embedding"].astype(np.float32)
            mask = data["mask"].astype(bool) if "mask" in data else np.ones(len(tokens), dtype=bool)
    except (OSError, KeyError, ValueError) as err:
        raise FeatureFileError(f"cannot read item feature file {path}: {err}") from err
    if embedding.ndim != 2 or len(embedding) != len(tokens) or len(mask) != len(tokens):
        raise FeatureFileError(
            f"{path}: item_id has {len(tokens)} rows, embedding {embedding.shape}, mask {mask.shape}; "
            "they must have the same number of rows"
        )
    row_of = {token: row for row, token in enumerate(tokens)}
    dataset_tokens = [str(t) for t in id2token[1:]]
    missing = [t for t in dataset_tokens if t not in row_of]
    if missing:
        raise FeatureFileError(
            f"{path} has {len(tokens)} rows but the dataset has {len(dataset_tokens)} items; "
            f"{len(missing)} items have no row (e.g. {missing[:3]}). Rebuild it with `python -m dataset_prep`."
        )
    rows = np.array([row_of[t] for t in dataset_tokens], dtype=np.int64)
    aligned = np.zeros((len(id2token), embedding.shape[1]), dtype=np.float32)
    aligned_mask = np.zeros(len(id2token), dtype=bool)
    aligned[1:] = embedding[rows]
    aligned_mask[1:] = mask[rows]
    return ItemFeatures(aligned, aligned_mask)
