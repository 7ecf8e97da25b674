"""Item text embeddings cached per text and written in shards as they are encoded.

A catalogue of millions of items takes hours to encode on a CPU. Each shard file holds the embeddings of up to
``shard_size`` texts keyed by a hash of the encoder and the text, written atomically as soon as it is encoded:
a killed run keeps every finished shard and the next run encodes only what is missing, and an edited title (or a
new item) is encoded alone, whatever the catalogue. Shards are never rewritten, so runs sharing the folder cannot
corrupt each other; a text encoded twice by two runs is simply found twice.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from logging import getLogger
from pathlib import Path

import numpy as np
from tqdm import tqdm

SHARD_SIZE = 2048  # texts per shard: at most this many are encoded again after a kill


def text_key(encoder: str, text: str) -> str:
    """The cache key of ``text`` as ``encoder`` reads it."""
    return hashlib.sha256(f"{encoder}\0{text}".encode()).hexdigest()[:32]


class TextEmbeddingCache:
    """The shards of one folder: ``shard-*.npz`` files with arrays ``key`` (str) and ``embedding`` (float32)."""

    def __init__(self, folder: str | os.PathLike, encoder: str, shard_size: int = SHARD_SIZE):
        self.folder, self.encoder, self.shard_size = Path(folder), encoder, shard_size

    def _load(self) -> tuple[dict[str, int], np.ndarray | None]:
        """Every cached key's row in the concatenated embeddings."""
        keys: list[np.ndarray] = []
        vectors: list[np.ndarray] = []
        for shard in sorted(self.folder.glob("shard-*.npz")):
            with np.load(shard, allow_pickle=False) as data:
                keys.append(data["key"].astype(str))
                vectors.append(data["embedding"].astype(np.float32))
        if not keys:
            return {}, None
        return {key: row for row, key in enumerate(np.concatenate(keys))}, np.concatenate(vectors)

    def _write_shard(self, keys: list[str], embedding: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{time.time_ns()}-{os.getpid()}"
        tmp = self.folder / f".{name}.tmp"
        with open(tmp, "wb") as handle:
            np.savez(handle, key=np.asarray(keys, dtype=str), embedding=np.asarray(embedding, dtype=np.float32))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.folder / f"{name}.npz")

    def embed(self, texts: list[str], encode: Callable[[list[str]], np.ndarray], show_progress: bool = True
              ) -> np.ndarray:
        """``[len(texts), D]`` embeddings: cached ones read, the missing ones encoded a shard at a time."""
        keys = [text_key(self.encoder, text) for text in texts]
        rows, cached = self._load()
        missing = list({key: text for key, text in zip(keys, texts, strict=True) if key not in rows}.items())
        if missing:
            logger = getLogger()
            logger.info(f"encoding {len(missing)} item texts with {self.encoder} ({len(texts) - len(missing)} of "
                        f"{len(texts)} cached); shards in {self.folder}")
            start = time.perf_counter()
            with tqdm(total=len(missing), desc="text embeddings", unit="item", disable=not show_progress) as bar:
                for first in range(0, len(missing), self.shard_size):
                    chunk = missing[first : first + self.shard_size]
                    self._write_shard([key for key, _ in chunk], encode([text for _, text in chunk]))
                    bar.update(len(chunk))
            seconds = time.perf_counter() - start
            logger.info(f"encoded {len(missing)} item texts in {seconds:.1f} s ({len(missing) / seconds:.0f} items/s)")
            rows, cached = self._load()
        return cached[[rows[key] for key in keys]] if texts else np.zeros((0, 0), dtype=np.float32)
