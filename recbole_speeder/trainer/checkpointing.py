"""What a training run writes and reads back: its best checkpoint, its resume checkpoint, a warm start.

Checkpoints (``checkpoint_file.py``) hold only the parameters the MPO groups can train (``weights.py``); the frozen
backbone is never copied. ``<run>.safetensors`` holds the best weights of the schedule so far (what
``evaluate(load_best_model=True)`` loads); ``<run>.resume.safetensors`` adds the optimizer, scheduler, every RNG
stream, the running stage's best weights and the position (stage, epoch, batch), written at each epoch end and
every ``checkpoint_every_steps`` steps. ``resume: <file>`` continues from it with the result an unbroken run would
have given: same shuffle (the dataloader generator's state at the epoch start), the trained batches of that epoch
skipped, then the RNG states of the moment of saving. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from recbole.utils import set_color

from recbole_speeder.config.snapshot import replayable_config
from recbole_speeder.trainer.checkpoint_file import CheckpointError, pack, read_checkpoint, unpack, write_checkpoint
from recbole_speeder.trainer.distributed import any_rank, gather_objects, is_distributed, is_main_process
from recbole_speeder.trainer.mpo import Best
from recbole_speeder.trainer.rng import rng_state
from recbole_speeder.trainer.weights import load_trainable, trainable_tensors, warm_start

BEST_SUFFIX = ".safetensors"
RESUME_SUFFIX = ".resume.safetensors"


def resolve_resume_file(path: str | os.PathLike) -> Path:
    """A resume checkpoint, or a folder: its newest ``*.resume.safetensors``."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob(f"*{RESUME_SUFFIX}"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise CheckpointError(f"no *{RESUME_SUFFIX} checkpoint in {path}")
        return found[-1]
    if not path.is_file():
        raise CheckpointError(f"resume checkpoint {path} does not exist")
    return path


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MB"


def _read_best(path: str) -> Best:
    tensors, state = read_checkpoint(path)
    return Best(tensors, state["valid_score"], state["valid_result"], state["stage"], state["epoch"],
                tuple(state["modalities"]))


class RunCheckpoints:
    """The checkpoint half of ``SpeederTrainer``: it reads and writes the trainer's position, optimizer, scheduler
    and MPO schedule, which the loop keeps."""

    def _identity(self) -> dict:
        return {
            "model": self.config["model"],
            "dataset": self.config["dataset"],
            "config": replayable_config(self.config),
            "stages": [stage.to_dict() for stage in self.stages],
            "modalities": list(self.stages[self.stage_index].modalities),
            "backbone_bytes_not_saved": self.frozen_bytes,
        }

    def _save_best(self, epoch_idx: int, score, result) -> None:
        """The stage's best weights so far: kept in memory, and on disk when they are the schedule's best."""
        if not self.schedule.record(self.model, self.stage_index, epoch_idx, score, result) or not self.saved:
            return
        if is_main_process():
            state = {
                **self._identity(),
                "kind": "best",
                "stage": self.stages[self.stage_index].name,
                "epoch": epoch_idx,
                "global_step": self.global_step,
                "valid_score": score,
                "valid_result": result,
            }
            size = write_checkpoint(self.saved_model_file, self.schedule.best.tensors, pack(state, "state", {}))
            self.logger.info(set_color("Saving current best", "blue") + f": {self.saved_model_file} ({_mb(size)})")
        self._best_file_written = True

    def _save_resume(self, done: bool) -> None:
        """The resume checkpoint at the current position (``done``: the stage is over)."""
        if not self.saved:
            return
        if any_rank(any(not bool(torch.isfinite(p).all()) for p in self.trainable), self.device):
            self._diverged("non-finite trainable parameters", self.epochs_done, self.batch_index)
        rng = gather_objects(rng_state())  # every rank's streams: a resumed DDP run continues each of them
        if not is_main_process():
            return
        tensors = trainable_tensors(self.model)
        stage = self.stages[self.stage_index]
        state = {
            **self._identity(),
            "kind": "resume",
            "position": {
                "stage": self.stage_index,
                "stage_name": stage.name,
                "epoch": self.stage_epoch,
                "batch": self.batch_index,
                "stage_done": done,
            },
            "global_step": self.global_step,
            "epochs_done": self.epochs_done,
            "best_valid_score": self.best_valid_score,
            "best_valid_result": self.best_valid_result,
            "cur_step": self.cur_step,
            "stage_results": self.schedule.results,
            "epoch_loss": self._epoch_loss,
            "best_file": Path(self.saved_model_file).name,  # beside this file: the run folder may move
            "world_size": len(rng),
        }
        state = pack(state, "state", tensors)
        state["optimizer"] = None if done else pack(self.optimizer.state_dict(), "optimizer", tensors)
        state["scheduler"] = None if done else pack(self.scheduler.state_dict(), "scheduler", tensors)
        state["rng"] = pack(rng, "rng", tensors)
        state["sampler"] = pack(self._sampler_state, "sampler", tensors)
        stage_best = self.schedule.stage_best  # a finished stage's best is already the model's weights
        state["stage_best"] = None if stage_best is None else pack(vars(stage_best), "stage_best", tensors)
        size = write_checkpoint(self.resume_file, tensors, state)
        self.logger.info(
            set_color("Saving resume checkpoint", "blue")
            + f": {self.resume_file} ({_mb(size)}: trainable parameters, optimizer and RNG states; the frozen "
            f"{_mb(self.frozen_bytes)} backbone is not copied) at stage '{stage.name}', epoch {self.stage_epoch}, "
            f"batch {self.batch_index}, step {self.global_step}"
        )

    def _check_written_for_this_run(self, path: str | os.PathLike, state: dict) -> None:
        for key in ("model", "dataset"):
            if state.get(key) != self.config[key]:
                raise CheckpointError(f"{path} was written for {key} '{state.get(key)}', not '{self.config[key]}'")

    def init_from(self, checkpoint: str) -> None:
        """Start training from another run's weights (``init_from``), those this model shares with it; the
        schedule, optimizer and early stopping start afresh, unlike ``resume``."""
        tensors, state = read_checkpoint(checkpoint)
        self._check_written_for_this_run(checkpoint, state)
        kept, ignored = warm_start(self.model, tensors, checkpoint)
        best = state.get("kind") == "best"
        origin = f"best of stage '{state['stage']}', valid {state['valid_score']}" if best else "a resume checkpoint"
        self.logger.info(
            f"init_from {checkpoint} ({origin}): trainable parameters copied; kept at their initialisation: "
            f"{kept or 'none'}; in the checkpoint, not in this model: {ignored or 'none'}"
        )

    def resume_checkpoint(self, resume_file):
        """Load a resume checkpoint; the next ``fit`` continues from its position."""
        path = resolve_resume_file(resume_file)
        tensors, state = read_checkpoint(path)
        if state.get("kind") != "resume":
            raise CheckpointError(f"{path} holds the best weights only; resume from the run's *{RESUME_SUFFIX} file")
        if "stage_best" not in state:
            raise CheckpointError(f"{path} was written before MPO kept the best weights of every stage: start afresh")
        self._check_written_for_this_run(path, state)
        position = state["position"]
        saved_names = [s["name"] for s in state["stages"]][: position["stage"] + 1]
        names = [s.name for s in self.stages][: len(saved_names)]
        if saved_names != names:
            raise CheckpointError(f"{path} was written with MPO stages {saved_names}; mpo_stages now starts {names}")
        load_trainable(self.model, tensors, str(path))
        self.resume_file = str(path)
        self.saved_model_file = str(path.parent / state["best_file"])
        self._best_file_written = Path(self.saved_model_file).is_file()
        # the schedule's best as the best file has it: a file written after this checkpoint holds the replayed
        # epochs' best, and its own score, so weights and score always agree
        self.schedule.best = _read_best(self.saved_model_file) if self._best_file_written else None
        stage_best = unpack(state["stage_best"], tensors)
        self.schedule.stage_best = None if stage_best is None else Best(**stage_best)
        self.schedule.results = state["stage_results"]
        self.stage_index, self.stage_epoch, self.batch_index = position["stage"], position["epoch"], position["batch"]
        self.global_step, self.epochs_done = state["global_step"], state["epochs_done"]
        self.best_valid_score, self.best_valid_result = state["best_valid_score"], state["best_valid_result"]
        self.cur_step = state["cur_step"]
        self._epoch_loss = unpack(state["epoch_loss"], tensors)
        rng = unpack(state["rng"], tensors)
        rank = torch.distributed.get_rank() if is_distributed() else 0
        if len(rng) != (torch.distributed.get_world_size() if is_distributed() else 1):
            self.logger.warning(f"{path} was written by {len(rng)} processes: the resumed RNG streams differ")
        self._resume = {
            "optimizer": unpack(state["optimizer"], tensors),
            "scheduler": unpack(state["scheduler"], tensors),
            "rng": rng[rank % len(rng)],
            "sampler": unpack(state["sampler"], tensors),
        }
        if position["stage_done"]:
            self.stage_index, self.stage_epoch, self.batch_index = self.stage_index + 1, 0, 0
        self.logger.info(
            f"Checkpoint {path} loaded: resuming at stage {self.stage_index + 1}/{len(self.stages)}, "
            f"epoch {self.stage_epoch}, batch {self.batch_index} (step {self.global_step})"
        )

    def _load_best(self, model_file: str | None) -> None:
        if model_file is None and not self._best_file_written:
            self.schedule.load_best(self.model)
            self.logger.info("Loading the best weights kept in memory (saved=False)")
            return
        path = model_file or self.saved_model_file
        tensors, state = read_checkpoint(path)
        load_trainable(self.model, tensors, str(path))
        self.model.set_modalities(state["modalities"])
        self.logger.info(f"Loading model structure and parameters from {path}")
