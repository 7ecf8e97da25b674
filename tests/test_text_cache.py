"""Item text embeddings cached per text, in shards: only missing texts are encoded, and a killed encoding resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from recbole_speeder.data.text_cache import TextEmbeddingCache

from .conftest import REPO

FAKE_ENCODER = '''
import hashlib, sys, time
import numpy as np

def vector(text):
    seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).normal(size=4).astype(np.float32)

def encode(texts, delay=0.0):
    time.sleep(delay)
    return np.stack([vector(text) for text in texts])
'''


def fake_encoder():
    namespace: dict = {}
    exec(FAKE_ENCODER, namespace)  # noqa: S102 - the same encoder in this process and in the killed one
    return namespace["encode"]


def test_only_texts_the_cache_lacks_are_encoded_a_shard_at_a_time(tmp_path):
    encode, calls = fake_encoder(), []

    def counting(texts):
        calls.append(list(texts))
        return encode(texts)

    cache = TextEmbeddingCache(tmp_path, "fake", shard_size=3)
    texts = [f"item {i}" for i in range(8)] + ["item 0"]  # a repeated text is encoded once
    embedding = cache.embed(texts, counting, show_progress=False)
    assert np.array_equal(embedding, encode(texts))
    assert sorted(t for call in calls for t in call) == sorted(set(texts)) and max(map(len, calls)) == 3
    assert len(list(tmp_path.glob("shard-*.npz"))) == 3
    calls.clear()
    edited = [*texts[:4], "item 4, a new title", *texts[5:]]
    assert np.array_equal(cache.embed(edited, counting, show_progress=False), encode(edited))
    assert calls == [["item 4, a new title"]]  # one edited title: that item alone
    calls.clear()
    other = TextEmbeddingCache(tmp_path, "another encoder", shard_size=3)  # keys hold the encoder's name
    other.embed(texts[:2], counting, show_progress=False)
    assert calls == [texts[:2]]


def test_an_encoding_killed_half_way_resumes_to_the_same_array(tmp_path):
    texts = [f"title {i}" for i in range(12)]
    script = tmp_path / "encode.py"
    script.write_text(FAKE_ENCODER + f'''
sys.path.insert(0, {str(REPO)!r})
from recbole_speeder.data.text_cache import TextEmbeddingCache
cache = TextEmbeddingCache({str(tmp_path / "cache")!r}, "fake", shard_size=3)
cache.embed({texts!r}, lambda chunk: encode(chunk, delay=0.5), show_progress=False)
''')
    process = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "cache").glob("shard-*.npz"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    written = len(list((tmp_path / "cache").glob("shard-*.npz")))
    assert 2 <= written < 4, "killed too late to test a resume"

    encode, encoded = fake_encoder(), []
    resumed = TextEmbeddingCache(tmp_path / "cache", "fake", shard_size=3).embed(
        texts, lambda chunk: encoded.extend(chunk) or encode(chunk), show_progress=False)
    assert len(encoded) == 12 - 3 * written  # what the killed run finished is not encoded again
    whole = TextEmbeddingCache(tmp_path / "whole", "fake", shard_size=3).embed(texts, encode, show_progress=False)
    assert np.array_equal(resumed, whole) and np.array_equal(resumed, encode(texts))
