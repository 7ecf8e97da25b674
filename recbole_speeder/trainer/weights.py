"""Which parameters a checkpoint holds: those the MPO groups can train, never the frozen backbone."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from recbole_speeder.trainer.checkpoint_file import CheckpointError

PREFIX = "model."


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter in ``model.parameter_groups()`` (LoRA, MRC with its ID table,
    SPAE, head), in ``named_parameters`` order."""
    capable = {id(p) for params in model.parameter_groups().values() for p in params}
    return [(name, p) for name, p in model.named_parameters() if id(p) in capable]


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {PREFIX + name: p.detach() for name, p in trainable_named_parameters(model)}


def frozen_bytes(model: nn.Module) -> int:
    """Bytes of the parameters no group trains (the backbone): what a checkpoint leaves out."""
    capable = {id(p) for _, p in trainable_named_parameters(model)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in capable)


def load_trainable(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy a checkpoint's ``model.*`` tensors into the model; any missing, extra or misshapen one is refused."""
    shared, missing, extra = _match(model, tensors, source)
    if missing or extra:
        example = (missing or extra)[0]
        raise CheckpointError(
            f"checkpoint {source} does not fit this model: {len(missing)} parameters missing, {len(extra)} unexpected "
            f"(e.g. '{example}'); was it written with another config (lora_r, modalities, mrc_tokens, backbone)?"
        )
    _copy(shared)


def warm_start(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> tuple[list[str], list[str]]:
    """Copy the trainable parameters a checkpoint shares with the model (``init_from``): a score-mode run can start
    a generative one, whose copy bias keeps its own initialisation. Returns ``(kept at init, ignored from the
    checkpoint)``; a misshapen parameter, or a checkpoint sharing none, is refused."""
    shared, missing, extra = _match(model, tensors, source)
    if not shared:
        raise CheckpointError(f"checkpoint {source} shares no trainable parameter with this model")
    _copy(shared)
    return missing, extra


def _match(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str
) -> tuple[list[tuple[nn.Parameter, torch.Tensor]], list[str], list[str]]:
    """``(parameter, stored tensor)`` pairs of the trainable parameters the checkpoint holds (each of the same
    shape, or refused), and the names of the missing and the unexpected ones."""
    wanted = dict(trainable_named_parameters(model))
    stored = {name[len(PREFIX):]: t for name, t in tensors.items() if name.startswith(PREFIX)}
    for name in (n for n in wanted if n in stored):
        if stored[name].shape != wanted[name].shape:
            raise CheckpointError(
                f"checkpoint {source} does not fit this model: '{name}' has shape {tuple(stored[name].shape)}, "
                f"the model {tuple(wanted[name].shape)}"
            )
    shared = [(param, stored[name]) for name, param in wanted.items() if name in stored]
    return shared, [n for n in wanted if n not in stored], [n for n in stored if n not in wanted]


def _copy(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    with torch.no_grad():
        for param, tensor in pairs:
            param.copy_(tensor)
