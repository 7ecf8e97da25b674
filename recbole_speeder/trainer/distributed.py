"""Multi-process runs (``torchrun``, or ``--nproc`` / ``--world_size``): process group setup, the few collectives
the trainer needs, and its DDP wrapper.

RecBole 1.2.1's ``Config._init_device`` hard-codes the NCCL backend, puts every rank on ``cuda:<local_rank>``
and asserts one listed GPU per process, so a CPU run (or one GPU per node-local rank on gloo) cannot start.
``init_distributed_device`` replaces that branch: ``dist_backend`` picks the backend (~ = nccl when ranks get
GPUs, gloo otherwise). Under ``torchrun`` the ranks join the launcher's store (``init_method: env://``); RecBole's
own path (``--nproc``) starts a TCP store at ``ip:port``. Every helper here is a no-op without a process group, so a
plain run never calls ``barrier()`` or any other collective.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from recbole.trainer.trainer import AbstractTrainer
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from recbole_speeder.errors import UsageError


def init_distributed_device(config_dict: dict) -> None:
    """RecBole's distributed ``_init_device``, with a configurable backend and CPU ranks."""
    gpu_id = config_dict.get("gpu_id")
    gpu_id = ",".join(map(str, gpu_id)) if isinstance(gpu_id, tuple | list) else str(gpu_id or "")
    config_dict["gpu_id"] = gpu_id
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
    local_rank, nproc = int(config_dict["local_rank"]), int(config_dict.get("nproc") or 1)
    use_cuda = bool(config_dict.get("use_gpu")) and bool(gpu_id) and torch.cuda.is_available()
    backend = config_dict.get("dist_backend") or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise UsageError("dist_backend=nccl needs GPUs (use_gpu and a gpu_id); use gloo on CPU")
    if use_cuda and len(gpu_id.split(",")) < nproc:
        raise UsageError(f"nproc={nproc} needs {nproc} GPUs in gpu_id, got '{gpu_id}'")
    init_method = config_dict.get("init_method") or (
        f"tcp://{config_dict.get('ip') or 'localhost'}:{config_dict.get('port') or 5678}"
    )
    dist.init_process_group(
        backend=backend,
        rank=local_rank + int(config_dict.get("offset") or 0),
        world_size=int(config_dict["world_size"]),
        init_method=init_method,
    )
    if use_cuda:
        torch.cuda.set_device(local_rank)
    config_dict["device"] = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    config_dict["single_spec"] = False
    if local_rank != 0:
        config_dict["state"] = "error"
        config_dict["show_progress"] = False
        config_dict["verbose"] = False


def torchrun_launch() -> dict | None:
    """The launch keys of a process that ``torchrun`` started in a group of several (its environment: RANK,
    LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), or None for any other process."""
    env = os.environ
    if "LOCAL_RANK" not in env or int(env.get("WORLD_SIZE", "1")) < 2:
        return None
    local_rank = int(env["LOCAL_RANK"])
    return {
        "local_rank": local_rank,
        "world_size": int(env["WORLD_SIZE"]),
        "nproc": int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
        "offset": int(env.get("RANK", local_rank)) - local_rank,
        "init_method": "env://",  # torchrun's agent holds the store at MASTER_ADDR:MASTER_PORT
    }


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Global rank 0 (or no process group): the only process that writes files."""
    return not is_distributed() or dist.get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextmanager
def node_main_process_first(local_rank: int) -> Iterator[None]:
    """The first process of each node runs the block before the others: it prepares the data and encodes the item
    features once, and the others read what it wrote (each node does it, in case nodes share no storage)."""
    first = local_rank == 0
    if is_distributed() and not first:
        barrier()
    yield
    if is_distributed() and first:
        barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any, so all ranks take the same branch."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank, once: per-rank seeds make randomly built parts differ."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


class LossModule(nn.Module):
    """What DDP runs forward: RecBole models train through ``calculate_loss``, not ``forward``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, interaction):
        return self.model.calculate_loss(interaction)


class DeferredDDP(AbstractTrainer):
    """RecBole wraps DDP in ``AbstractTrainer.__init__`` over the parameters trainable at that moment, with
    CUDA-only ``device_ids``; MPO changes the trainable set per stage, so the wrapper is built per stage."""

    def __init__(self, config, model):
        self.config = config
        self.model = model


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool) -> DistributedDataParallel:
    """DDP over the model's trainable parameters only (a stage's); frozen ones and buffers are ignored.

    Some parameters of a trained group can be unused in a stage (the image expert while only text is active, the
    router under ``router: uniform``): ``find_unused_parameters`` (``ddp_find_unused_parameters``) lets DDP skip them.
    """
    wrapper = LossModule(model)
    ignore = [f"model.{n}" for n, p in model.named_parameters() if not p.requires_grad]
    ignore += [f"model.{n}" for n, _ in model.named_buffers()]  # never broadcast at init or per forward
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, ignore)
    return DistributedDataParallel(
        wrapper,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )
