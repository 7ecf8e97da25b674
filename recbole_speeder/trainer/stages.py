"""MPO stage specs: which modalities are active, which parameter groups train, how history items enter the prompt,
on how many users and on which loss, stage by stage.

``mpo_stages`` is a list of dicts (yaml, or a python literal on the command line) or a compact string
``name:modalities:train:epochs:learning_rate:items:users:loss`` per stage, stages separated by ``,`` and list items
by ``+``, e.g. ``words:text:all:1::text+tokens:0.1,full:all:all:10:5e-4``. Trailing or empty fields take their
defaults. ``~`` means one stage of ``epochs`` that trains every group with every modality: RecBole's plain loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from logging import getLogger

from recbole_speeder.config_schema import ITEM_INPUTS, MODALITIES
from recbole_speeder.errors import UsageError

GROUPS = ("mrc", "spae", "head", "lora")
STAGE_KEYS = ("name", "modalities", "train", "epochs", "learning_rate", "items", "users", "loss")
# rank: the next-item loss (plus the alignment loss when align_loss_weight > 0); align: the alignment loss alone
STAGE_LOSSES = ("rank", "align")
ALL = "all"


@dataclass(frozen=True)
class Stage:
    name: str
    modalities: tuple[str, ...]
    train: tuple[str, ...]
    epochs: int
    learning_rate: float
    items: str | None = None  # how history items enter training prompts (ITEM_INPUTS); None: as the model serves
    users: float = 1.0  # the fraction of training users (all their rows) the stage trains on, drawn with the seed
    loss: str = "rank"  # what the stage minimises (STAGE_LOSSES)

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
    """``name:modalities:train:epochs:lr:items:users:loss`` stages separated by ``,``; list items joined by ``+``."""
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
            elif key in ("learning_rate", "users"):
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
    with a warning, so one schedule serves every modality ablation; a stage left with none is an error.
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
        if len(active) < len(wanted):
            dropped = [m for m in wanted if m not in modalities]
            if not active:
                raise UsageError(
                    f"mpo_stages stage '{name}': none of its modalities {list(wanted)} is configured "
                    f"(modalities: {list(modalities)})"
                )
            if warn:
                getLogger().warning(
                    f"MPO stage '{name}': modalities {dropped} are not configured; the stage uses {active}"
                )
        train = _names(item.get("train"), index, "train", GROUPS) or GROUPS
        stage_epochs = item.get("epochs", epochs)
        if isinstance(stage_epochs, bool) or not isinstance(stage_epochs, int) or stage_epochs < 1:
            raise UsageError(f"mpo_stages stage '{name}': epochs must be an integer >= 1, not {stage_epochs!r}")
        lr = item.get("learning_rate", learning_rate)
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
            raise UsageError(f"mpo_stages stage '{name}': learning_rate must be a positive number, not {lr!r}")
        items = item.get("items")
        if items is not None and items not in ITEM_INPUTS:
            raise UsageError(f"mpo_stages stage '{name}': items must be one of {', '.join(ITEM_INPUTS)}, not {items!r}")
        users = item.get("users", 1.0)
        if isinstance(users, bool) or not isinstance(users, int | float) or not 0 < users <= 1:
            raise UsageError(f"mpo_stages stage '{name}': users must be a fraction > 0 and <= 1, not {users!r}")
        loss = item.get("loss", "rank")
        if loss not in STAGE_LOSSES:
            raise UsageError(f"mpo_stages stage '{name}': loss must be one of {', '.join(STAGE_LOSSES)}, not {loss!r}")
        stages.append(Stage(name, active, train, stage_epochs, float(lr), items, float(users), loss))
    names = [stage.name for stage in stages]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"mpo_stages: stage names must be unique; repeated: {duplicates}")
    return stages
