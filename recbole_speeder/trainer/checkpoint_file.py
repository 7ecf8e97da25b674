"""Checkpoint files: one safetensors file of tensors plus a JSON training state, written atomically.

Tensors (trainable parameters, optimizer moments, RNG states) live in the safetensors body; everything else
(position, scores, optimizer hyper-parameters, the config needed to rebuild the run) is JSON in its metadata,
with each tensor replaced by a reference (``pack``/``unpack``). Nothing is pickled, so loading a checkpoint
never runs code. The metadata also holds a format tag and a SHA-256 over every tensor's name, dtype, shape
and bytes: a truncated or corrupted file is refused with one line instead of loading garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from recbole_speeder.errors import UsageError

FORMAT = "recbole-speeder-checkpoint"
VERSION = 1


class CheckpointError(UsageError):
    """A checkpoint that cannot be used: missing, truncated, corrupted, or written for another model/config."""


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], state: dict) -> int:
    """Write atomically (temp file beside it, fsync, ``os.replace``) and return the file's size in bytes.

    A run killed mid-write leaves the previous checkpoint intact, never a half-written one.
    """
    path = Path(path)
    cpu = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "sha256": tensor_digest(cpu),
        "state": json.dumps(state),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(cpu, str(tmp), metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (on CPU) and state of a checkpoint, after checking its format tag and checksum."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"checkpoint {path} is truncated or not a safetensors file ({err})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a recbole-speeder checkpoint (no '{FORMAT}' tag)")
    if metadata.get("version") != str(VERSION):
        found = metadata.get("version")
        raise CheckpointError(f"checkpoint {path} has format version {found}; this code reads {VERSION}")
    if tensor_digest(tensors) != metadata.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupted: its tensors do not match the stored checksum")
    try:
        state = json.loads(metadata["state"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupted: unreadable state ({err})") from None
    return tensors, state


def pack(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able skeleton of ``obj`` whose tensors (and arrays) move into ``tensors`` under dotted keys."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        # safetensors has no uint32 in every version; numpy's MT19937 key is uint32, so widen losslessly
        tensors[prefix] = torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())
        return {"__ndarray__": prefix, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: pack(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, pack(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint state ({prefix})")


def unpack(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of ``pack``."""
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    try:
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    except KeyError as err:
        raise CheckpointError(f"checkpoint state refers to a missing tensor {err}") from None
    if "__tuple__" in obj:
        return tuple(unpack(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: unpack(v, tensors) for k, v in obj["__items__"]}
    return {k: unpack(v, tensors) for k, v in obj.items()}
