"""Per-item text, features and checks, read through a RecBole dataset for the Speeder model."""

from __future__ import annotations

import os
from logging import getLogger
from pathlib import Path

import numpy as np
import torch
from recbole.utils import FeatureType

from recbole_speeder.data.features import (
    ItemFeatures,
    feature_path,
    load_item_features,
    read_manifest,
    save_item_features,
    source_hash,
)
from recbole_speeder.data.item_text import format_item_text
from recbole_speeder.data.text_cache import TextEmbeddingCache
from recbole_speeder.errors import UsageError

AUTO_TEXT_ENCODER = "all-MiniLM-L6-v2 (auto, from .item text)"


def item_texts(dataset, fields: list[str]) -> list[str]:
    """Text of items 1..n-1 (RecBole ids) from ``fields`` of the ``.item`` file, by the shared template.

    RecBole stores token fields as ids; they are mapped back to their strings here. Items without a
    ``.item`` row (or datasets without one) fall back to their raw token, so every item has some text.
    """
    id2token = dataset.field2id_token[dataset.iid_field]
    item_feat = dataset.item_feat
    usable = [f for f in fields if item_feat is not None and f in item_feat.columns]
    missing = [f for f in fields if f not in usable]
    if missing:
        getLogger().warning(f"item_text_fields {missing} are not in the dataset's .item file; left out")
    columns = {field: _field_strings(dataset, field) for field in usable}
    texts = []
    for item_id in range(1, len(id2token)):
        text = format_item_text({field: columns[field][item_id] for field in usable})
        texts.append(text or f"item {id2token[item_id]}")
    return texts


def _field_strings(dataset, field: str) -> list[str]:
    """String value of ``field`` per item row; ``item_feat`` is a DataFrame before ``build()``, tensors after."""
    rows = dataset.item_feat[field].tolist()
    kind = dataset.field2type[field]
    if kind == FeatureType.TOKEN:
        vocab = dataset.field2id_token[field]
        return ["" if int(v) == 0 else str(vocab[int(v)]) for v in rows]
    if kind == FeatureType.TOKEN_SEQ:
        vocab = dataset.field2id_token[field]
        return [" ".join(str(vocab[int(t)]) for t in np.ravel(row) if int(t) != 0) for row in rows]
    if kind == FeatureType.FLOAT_SEQ:
        return [" ".join(f"{t:g}" for t in np.ravel(row)) for row in rows]
    return [f"{v:g}" for v in rows]


def _cache_dir(config) -> Path:
    """``feature_cache_dir`` if set, else beside the dataset when writable, else the user cache."""
    if config["feature_cache_dir"]:
        return Path(config["feature_cache_dir"]) / config["dataset"]
    data_dir = Path(config["data_path"])
    if os.access(data_dir, os.W_OK):
        return data_dir
    return Path.home() / ".cache" / "recbole_speeder" / config["dataset"]


def text_features(config, dataset, texts: list[str]) -> ItemFeatures:
    """The text modality: a prepared feature file if one exists, else MiniLM over ``texts``, cached."""
    id2token = dataset.field2id_token[dataset.iid_field]
    name = config["dataset"]
    explicit = config["text_feature_file"]
    prepared = Path(explicit) if explicit else feature_path(config["data_path"], name, "text")
    if explicit and not prepared.is_file():
        raise UsageError(f"text_feature_file {prepared} does not exist")
    entry = read_manifest(prepared.parent, name).get("text", {})
    if prepared.is_file() and (explicit or entry.get("encoder") != AUTO_TEXT_ENCODER):
        return load_item_features(prepared, id2token)
    return _cached_text_features(config, dataset, texts)


def _cached_text_features(config, dataset, texts: list[str]) -> ItemFeatures:
    """The cached ``<dataset>.text_emb.npz`` when it was built from the same texts; else their embeddings from the
    per-text cache beside it (``text_cache.py``), which encodes on the run's device only the texts it lacks, saved
    as that file again."""
    id2token = dataset.field2id_token[dataset.iid_field]
    name, cache = config["dataset"], _cache_dir(config)
    cached, sha = feature_path(cache, name, "text"), source_hash(texts)
    if not (cached.is_file() and read_manifest(cache, name).get("text", {}).get("source_sha256") == sha):
        from recbole_speeder.data.encoders import encode_texts

        device = str(config["device"])
        shards = TextEmbeddingCache(cache / f"{name}.text_cache", AUTO_TEXT_ENCODER)
        embedding = shards.embed(texts, lambda chunk: encode_texts(chunk, device=device, show_progress=False),
                                 show_progress=config["show_progress"])
        tokens = [str(t) for t in id2token[1:]]
        save_item_features(cache, name, "text", tokens, embedding, encoder=AUTO_TEXT_ENCODER, source_sha256=sha)
    return load_item_features(cached, id2token)


def image_features(config, dataset) -> ItemFeatures | None:
    """The image modality from its feature file, or None when the dataset has no images."""
    explicit = config["image_feature_file"]
    path = Path(explicit) if explicit else feature_path(config["data_path"], config["dataset"], "image")
    if explicit and not path.is_file():
        raise UsageError(f"image_feature_file {path} does not exist")
    if not path.is_file():
        return None
    return load_item_features(path, dataset.field2id_token[dataset.iid_field])


def build_item_features(config, dataset, texts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Feature tables the MRC experts read, keyed by modality, aligned to RecBole ids (row 0 = padding).

    A configured image modality on a dataset without images gets an all-missing mask, so one MPO schedule
    serves datasets with and without images.
    """
    modalities = list(config["modalities"])
    tables: dict[str, ItemFeatures] = {}
    if "text" in modalities:
        tables["text"] = text_features(config, dataset, texts)
    if "image" in modalities:
        image = image_features(config, dataset)
        if image is None:
            getLogger().warning("no image features for this dataset: the image expert is masked out for every item")
            n_items = len(dataset.field2id_token[dataset.iid_field])
            image = ItemFeatures(np.zeros((n_items, 1), dtype=np.float32), np.zeros(n_items, dtype=bool))
        tables["image"] = image
    return {m: (torch.from_numpy(f.embedding), torch.from_numpy(f.mask)) for m, f in tables.items()}
