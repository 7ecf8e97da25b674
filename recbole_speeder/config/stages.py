"""The grammar of ``mpo_stages``: which modalities are active and which parameter groups train, stage by stage.

``mpo_stages`` is a list of dicts (yaml, or a python literal on the command line) or a compact string
``name:modalities:train:epochs:learning_rate`` per stage, stages separated by ``,`` and list items by ``+``, e.g.
``text:text:mrc+spae+head:1,full:all:all:10:5e-4``. Trailing or empty fields take their defaults. ``~`` means one
stage of ``epochs`` that trains every group with every modality: RecBole's plain loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from logging import getLogger

from recbole_speeder.config.choices import GROUPS, MODALITIES
from recbole_speeder.errors import UsageError

STAGE_KEYS = ("name", "modalities", "train", "epochs", "learning_rate")
ALL = "all"


@dataclass(frozen=True)
class Stage:
    name: str
    modalities: tuple[str, ...]
    train: tuple[str, ...]
    epochs: int
    learning_rate: float

    def to_dict(self) -> dict:
        return {**asdict(self), "modalities": list(self.modalities), "train": list(self.train)}


def _split_list(text: str) -> list[str] | None:
    text = text.strip()
    if not text:
        return None
    if text == ALL:
        return [ALL]
    return [item.strip() for item in text.split("+") if item.strip()]


def parse_compact(text: str) -> list[dict]:
    """``name:modalities:train:epochs:lr`` stages separated by ``,``; list items joined by ``+``."""
    stages = []
    for index, chunk in enumerate(part for part in text.split(",") if part.strip()):
        fields = [f.strip() for f in chunk.split(":")]
        if len(fields) > len(STAGE_KEYS):
            raise UsageError(
                f"mpo_stages stage {index} '{chunk}' has {len(fields)} fields; expected {':'.join(STAGE_KEYS)}"
            )
        spec: dict = {}
        for key, value in zip(STAGE_KEYS, fields, strict=False):
            if not value:
                continue
            if key in ("modalities", "train"):
                spec[key] = _split_list(value)
            elif key == "epochs":
                spec[key] = _number(value, int, index, key)
            elif key == "learning_rate":
                spec[key] = _number(value, float, index, key)
            else:
                spec[key] = value
        stages.append(spec)
    return stages


def _number(text: str, kind: type, index: int, key: str):
    try:
        return kind(text)
    except ValueError:
        raise UsageError(f"mpo_stages stage {index}: {key} must be a number, not '{text}'") from None


def _names(values, index: int, key: str, allowed: Sequence[str]) -> tuple[str, ...] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = _split_list(values) or []
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        raise UsageError(f"mpo_stages stage {index}: {key} must be a list of names, not {values!r}")
    if list(values) == [ALL]:
        return None
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise UsageError(f"mpo_stages stage {index}: unknown {key} {unknown}; choose from {list(allowed)} or 'all'")
    if not values:
        raise UsageError(f"mpo_stages stage {index}: {key} is empty")
    return tuple(dict.fromkeys(values))


def parse_stages(
    spec, *, epochs: int, learning_rate: float, modalities: Sequence[str], warn: bool = True
) -> list[Stage]:
    """Validated stages; ``modalities`` are the model's configured ones (defaults and the allowed set).

    A stage modality the model was not built with (e.g. ``image`` under ``modalities: [text, id]``) is dropped
    with a warning, and a stage left with none is skipped, so one schedule serves every modality ablation (the
    default's text stages under ``modalities: [id]``); a schedule left with no stage is an error.
    ``warn=False`` only checks: the config does so when it is built, the trainer warns when it runs.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "~", "none", "null")):
        return [Stage("full", tuple(modalities), GROUPS, int(epochs), float(learning_rate))]
    if isinstance(spec, str):
        spec = parse_compact(spec)
    if not isinstance(spec, list | tuple) or not spec:
        raise UsageError(f"mpo_stages must be a non-empty list of stage dicts, a compact string or ~, not {spec!r}")
    stages = []
    for index, item in enumerate(spec):
        if not isinstance(item, dict):
            raise UsageError(f"mpo_stages stage {index} must be a dict with keys {list(STAGE_KEYS)}, not {item!r}")
        unknown = [key for key in item if key not in STAGE_KEYS]
        if unknown:
            raise UsageError(f"mpo_stages stage {index}: unknown key(s) {unknown}; allowed: {list(STAGE_KEYS)}")
        name = str(item.get("name") or f"stage{index}")
        wanted = _names(item.get("modalities"), index, "modalities", MODALITIES) or tuple(modalities)
        active = tuple(m for m in wanted if m in modalities)
        train = _names(item.get("train"), index, "train", GROUPS) or GROUPS
        stage_epochs = item.get("epochs", epochs)
        if isinstance(stage_epochs, bool) or not isinstance(stage_epochs, int) or stage_epochs < 1:
            raise UsageError(f"mpo_stages stage '{name}': epochs must be an integer >= 1, not {stage_epochs!r}")
        lr = item.get("learning_rate", learning_rate)
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
            raise UsageError(f"mpo_stages stage '{name}': learning_rate must be a positive number, not {lr!r}")
        if len(active) < len(wanted) and warn:
            dropped = [m for m in wanted if m not in modalities]
            uses = f"the stage uses {list(active)}" if active else "the stage is skipped"
            getLogger().warning(f"MPO stage '{name}': modalities {dropped} are not configured; {uses}")
        if active:
            stages.append(Stage(name, active, train, stage_epochs, float(lr)))
    if not stages:
        raise UsageError(f"mpo_stages: no stage has a configured modality (modalities: {list(modalities)})")
    names = [stage.name for stage in stages]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"mpo_stages: stage names must be unique; repeated: {duplicates}")
    return stages
