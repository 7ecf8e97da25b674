r"""SpeederTrainer: RecBole's ``Trainer`` loop run as MPO stages, with trainable-only checkpoints and resume.

MPO (progressive optimisation, ``schedule.py``): each stage of ``mpo_stages`` sets the model's active modalities,
which parameter groups (mrc, spae, head, lora) train and how history items enter training prompts, and starts from
the best valid weights of the stage before; this loop rebuilds the optimizer and scheduler over those parameters
only, resets early stopping per stage and trains a stage with ``users < 1`` on its sample of users
(``sample.py``). The run's model is the best of all stages. One stage (or ``mpo_stages: ~``) is RecBole's
``Trainer.fit``, step for step.

Checkpoints (``checkpoint.py``) hold only the parameters the groups can train; the frozen backbone is never
copied. ``<run>.safetensors`` holds the best weights of the schedule so far (what
``evaluate(load_best_model=True)`` loads); ``<run>.resume.safetensors`` adds the optimizer, scheduler, every RNG
stream, the running stage's best weights and the position (stage, epoch, batch), written at each epoch end and
every ``checkpoint_every_steps`` steps. ``resume: <file>`` continues from it with the result an unbroken run would
have given: same shuffle (the dataloader generator's state at the epoch start), the trained batches of that epoch
skipped, then the RNG states of the moment of saving.

Distributed (``--nproc``): the loss runs through a ``DistributedDataParallel`` wrapper rebuilt per stage over
the parameters that stage trains; frozen parameters and buffers are never synchronised after one initial
broadcast. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from pathlib import Path
from time import time

import numpy as np
import torch
from recbole.trainer.trainer import AbstractTrainer, Trainer
from recbole.utils import dict2str, early_stopping, set_color
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.clip_grad import clip_grad_norm_
from tqdm import tqdm

from recbole_speeder.config import LAUNCH_KEYS, plain
from recbole_speeder.errors import UsageError
from recbole_speeder.metrics import rank_invalid_last
from recbole_speeder.trainer.checkpoint import CheckpointError, pack, read_checkpoint, unpack, write_checkpoint
from recbole_speeder.trainer.distributed import (
    any_rank,
    barrier,
    broadcast_module,
    broadcast_object,
    gather_objects,
    is_distributed,
    is_main_process,
)
from recbole_speeder.trainer.rng import rng_state, set_rng_state
from recbole_speeder.trainer.sample import UserSample
from recbole_speeder.trainer.schedule import Best, MPOSchedule
from recbole_speeder.trainer.schedulers import build_scheduler
from recbole_speeder.trainer.stages import GROUPS, Stage, parse_stages
from recbole_speeder.trainer.weights import (
    frozen_bytes,
    load_trainable,
    trainable_named_parameters,
    trainable_tensors,
    warm_start,
)

BEST_SUFFIX = ".safetensors"
RESUME_SUFFIX = ".resume.safetensors"


class NonFiniteLossError(RuntimeError):
    """Training diverged: the message names the stage and step, and the last good checkpoint."""


class _LossModule(nn.Module):
    """What DDP runs forward: RecBole models train through ``calculate_loss``, not ``forward``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, interaction):
        return self.model.calculate_loss(interaction)


class _DeferredDDP(AbstractTrainer):
    """RecBole wraps DDP in ``AbstractTrainer.__init__`` over the parameters trainable at that moment, with
    CUDA-only ``device_ids``; MPO changes the trainable set per stage, so the wrapper is built per stage."""

    def __init__(self, config, model):
        self.config = config
        self.model = model


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


def replayable_config(config) -> dict:
    """The user's config values (files, dict, command line) that rebuild this run; JSON-safe."""
    return plain({k: v for k, v in config.external_config_dict.items() if k not in LAUNCH_KEYS})


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MB"


def _read_best(path: str) -> Best:
    tensors, state = read_checkpoint(path)
    return Best(tensors, state["valid_score"], state["valid_result"], state["stage"], state["epoch"],
                tuple(state["modalities"]))


class SpeederTrainer(Trainer, _DeferredDDP):
    def __init__(self, config, model):
        os.makedirs(config["checkpoint_dir"], exist_ok=True)  # RecBole's check-then-create races between ranks
        super().__init__(config, model)
        if not hasattr(model, "parameter_groups"):
            raise UsageError(f"SpeederTrainer needs a model with parameter_groups(); {type(model).__name__} has none")
        stages = parse_stages(
            config["mpo_stages"],
            epochs=config["epochs"],
            learning_rate=config["learning_rate"],
            modalities=list(model.mrc.modalities),
        )
        self.schedule = MPOSchedule(stages, model.parameter_groups(), bool(self.valid_metric_bigger))
        capable = {id(p) for _, p in trainable_named_parameters(model)}
        stray = [(name, p) for name, p in model.named_parameters() if p.requires_grad and id(p) not in capable]
        if stray:
            names = [name for name, _ in stray]
            self.logger.warning(f"{len(names)} trainable parameters are in no MPO group and stay frozen: {names[:3]}")
            for _, param in stray:
                param.requires_grad_(False)
        self.epochs = sum(stage.epochs for stage in self.stages)
        self.checkpoint_every_steps = int(config["checkpoint_every_steps"] or 0)
        self.frozen_bytes = frozen_bytes(model)
        stem = broadcast_object(os.path.splitext(self.saved_model_file)[0])  # rank 0's time stamp names the run
        self.saved_model_file = stem + BEST_SUFFIX
        self.resume_file = stem + RESUME_SUFFIX
        self.saved = True
        self.stage_index = self.stage_epoch = self.batch_index = 0
        self.global_step = self.epochs_done = 0
        self.trainable: list[nn.Parameter] = []
        self.stage_data = None  # the running stage's training batches: the loader, or a UserSample of it
        self.scheduler = None
        self.distributed_model = None
        self._best_file_written = False
        self._epoch_loss = None
        self._sampler_state: torch.Tensor | None = None
        self._resume: dict | None = None
        if config["init_from"] and config["resume"]:
            self.logger.info(f"init_from {config['init_from']} is skipped: the resume checkpoint holds the weights")
        elif config["init_from"]:
            self.init_from(config["init_from"])
        broadcast_module(model)
        if config["resume"]:
            self.resume_checkpoint(config["resume"])

    # ------------------------------------------------------------------ stages
    @property
    def stages(self) -> list[Stage]:
        return self.schedule.stages

    def _enter_stage(self, train_data) -> None:
        """The current stage's modalities, item input and trainable groups (``schedule.py``), and this loop's
        training batches, optimizer, scheduler, early stopping and DDP wrapper for it."""
        stage = self.stages[self.stage_index]
        resume = self._resume
        fresh = resume is None or resume["optimizer"] is None
        if fresh:
            self.best_valid_score = -np.inf if self.valid_metric_bigger else np.inf
            self.best_valid_result = None
            self.cur_step = 0
        self.trainable = self.schedule.enter(self.model, self.stage_index)
        self.stage_data = train_data
        if stage.users < 1:
            self.stage_data = UserSample(train_data, stage.users, self.config["seed"], self.stage_index)
        self.optimizer = self._build_optimizer(params=self.trainable, learning_rate=stage.learning_rate)
        self.scheduler = build_scheduler(
            self.optimizer, self.config["lr_scheduler"], self.config["warmup_steps"],
            stage.epochs * len(self.stage_data),
        )
        self.eval_step = min(self.config["eval_step"], stage.epochs)
        if not fresh:
            try:
                self.optimizer.load_state_dict(resume["optimizer"])
                self.scheduler.load_state_dict(resume["scheduler"])
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"resume checkpoint does not fit stage '{stage.name}' ({err})") from None
            resume["optimizer"] = None
        self.distributed_model = None  # drop the previous stage's reducer (and its autograd hooks) first
        if is_distributed():
            self.distributed_model = self._wrap_ddp()
        n_params = sum(p.numel() for p in self.trainable)
        sample = self.stage_data
        users = f", {sample.n_users} of {sample.n_all_users} users" if isinstance(sample, UserSample) else ""
        self.logger.info(
            set_color(f"MPO stage {self.stage_index + 1}/{len(self.stages)} '{stage.name}'", "green")
            + f": modalities {list(stage.modalities)}, items as {self.model.stage_items}, training "
            f"{list(stage.train)} ({n_params} parameters), {stage.epochs} epochs of {len(sample)} batches{users}, "
            f"lr {stage.learning_rate:g}"
            + (f", from epoch {self.stage_epoch} batch {self.batch_index}" if not fresh else "")
        )

    def _wrap_ddp(self) -> DistributedDataParallel:
        """DDP over this stage's trainable parameters only; frozen ones and buffers are ignored.

        Some parameters of a trained group can be unused in a stage (the image expert while only text is
        active, the router under ``router: uniform``): ``ddp_find_unused_parameters`` lets DDP skip them.
        """
        wrapper = _LossModule(self.model)
        ignore = [f"model.{n}" for n, p in self.model.named_parameters() if not p.requires_grad]
        ignore += [f"model.{n}" for n, _ in self.model.named_buffers()]  # never broadcast at init or per forward
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, ignore)
        return DistributedDataParallel(
            wrapper,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.config["ddp_find_unused_parameters"] is not False,
        )

    # ------------------------------------------------------------------ training loop
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """All MPO stages (from the resume position, if any). The model ends with the best weights of the whole
        schedule, whose valid score and result are returned."""
        self.saved = saved
        self.eval_collector.data_collect(train_data)
        if self.config["train_neg_sample_args"].get("dynamic", False):
            train_data.get_model(self.model)
        if verbose:
            self.logger.info(set_color(self.schedule.describe(), "blue"))
        while self.stage_index < len(self.stages):
            self._enter_stage(train_data)
            self._run_stage(train_data, valid_data, verbose, show_progress, callback_fn)
            self.stage_index += 1
            self.stage_epoch = 0
        barrier()  # rank 0 has written the best checkpoint before any rank loads it
        best = self.schedule.best
        if best is not None:
            self.schedule.load_best(self.model)
            if best.score is not None:
                self.best_valid_score, self.best_valid_result = best.score, best.result
        if verbose:
            self.logger.info(set_color("MPO stages", "blue") + f": {self.schedule.summary(self.valid_metric)}")
        self._add_hparam_to_tensorboard(self.best_valid_score)
        return self.best_valid_score, self.best_valid_result

    def _run_stage(self, train_data, valid_data, verbose: bool, show_progress: bool, callback_fn) -> None:
        stage = self.stages[self.stage_index]
        while self.stage_epoch < stage.epochs:
            epoch_idx = self.epochs_done
            start = time()
            if not self.config["single_spec"] and train_data.shuffle:  # DDP's sampler; a user sample shards itself
                train_data.sampler.set_epoch(epoch_idx)
            train_loss = self._train_epoch(self.stage_data, epoch_idx, show_progress=show_progress)
            self.train_loss_dict[epoch_idx] = sum(train_loss) if isinstance(train_loss, tuple) else train_loss
            if verbose:
                output = self._generate_train_loss_output(epoch_idx, start, time(), train_loss)
                self.logger.info(f"[{stage.name}] {output}")
            self._add_train_loss_to_tensorboard(epoch_idx, train_loss)
            self.epochs_done += 1
            self.stage_epoch += 1
            self.batch_index = 0
            self._epoch_loss = None
            self._sampler_state = train_data.generator.get_state()
            stop = self._validate(valid_data, epoch_idx, verbose, show_progress, callback_fn)
            done = stop or self.stage_epoch == stage.epochs
            if done:  # the next stage starts from this one's best weights
                self.schedule.finish_stage(self.model, self.stage_index, self.stage_epoch)
            self._save_resume(done)
            if stop:
                break

    def _validate(self, valid_data, epoch_idx: int, verbose: bool, show_progress: bool, callback_fn) -> bool:
        """RecBole's per-epoch validation and early stopping; returns whether the stage stops."""
        stage = self.stages[self.stage_index]
        if self.eval_step <= 0 or not valid_data:
            self._save_best(epoch_idx, None, None)  # no validation: the latest epoch is the best, as in RecBole
            return False
        if self.stage_epoch % self.eval_step:
            return False
        start = time()
        valid_score, valid_result = self._valid_epoch(valid_data, show_progress=show_progress)
        self.best_valid_score, self.cur_step, stop_flag, update_flag = early_stopping(
            valid_score, self.best_valid_score, self.cur_step, max_step=self.stopping_step,
            bigger=self.valid_metric_bigger,
        )
        if verbose:
            self.logger.info(
                f"[{stage.name}] " + set_color(f"epoch {epoch_idx} evaluating", "green")
                + f" [{set_color('time', 'blue')}: {time() - start:.2f}s, {set_color('valid_score', 'blue')}: "
                f"{valid_score:f}]"
            )
            self.logger.info(f"[{stage.name}] " + set_color("valid result", "blue") + ": \n" + dict2str(valid_result))
        self.tensorboard.add_scalar(f"Valid_score/{stage.name}", valid_score, epoch_idx)
        self.wandblogger.log_metrics({**valid_result, "valid_step": epoch_idx}, head="valid")
        if update_flag:
            self._save_best(epoch_idx, valid_score, valid_result)
            self.best_valid_result = valid_result
        if callback_fn:
            callback_fn(epoch_idx, valid_score)
        if stop_flag and verbose:
            self.logger.info(
                f"MPO stage '{stage.name}' stopped early; best eval result in epoch "
                f"{epoch_idx - self.cur_step * self.eval_step}"
            )
        return stop_flag

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        """RecBole's epoch over the trainable parameters only, resumable at any batch and guarded against NaN.

        ``train_data``: the stage's batches (``stage_data``), whose ``generator`` is the training loader's."""
        self.model.train()
        loss_func = loss_func or self.distributed_model or self.model.calculate_loss
        resume, self._resume = self._resume, None
        if resume is not None:
            train_data.generator.set_state(resume["sampler"])
        self._sampler_state = train_data.generator.get_state()
        start = self.batch_index
        total_loss = self._epoch_loss if start else None
        batches = iter(train_data)
        for _ in range(start):  # a resumed epoch: same shuffle, its trained batches skipped
            next(batches)
        if resume is not None:
            set_rng_state(resume["rng"])
        if show_progress:
            batches = tqdm(
                batches, total=len(train_data), initial=start, ncols=100,
                desc=set_color(f"Train {epoch_idx:>5}", "pink"),
            )
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.enable_scaler)
        for batch_idx, interaction in enumerate(batches, start=start):
            interaction = interaction.to(self.device)
            self.optimizer.zero_grad()
            with torch.autocast(device_type=self.device.type, enabled=self.enable_amp):
                losses = loss_func(interaction)
            if isinstance(losses, tuple):
                loss = sum(losses)
                loss_tuple = tuple(per_loss.item() for per_loss in losses)
                if total_loss is not None:
                    loss_tuple = tuple(map(sum, zip(total_loss, loss_tuple, strict=True)))
                total_loss = loss_tuple
            else:
                loss = losses
                total_loss = losses.item() if total_loss is None else total_loss + losses.item()
            if any_rank(not bool(torch.isfinite(loss.detach()).all()), self.device):
                self._diverged(f"non-finite training loss ({loss.item()})", epoch_idx, batch_idx)
            scaler.scale(loss).backward()
            if self.clip_grad_norm:
                scaler.unscale_(self.optimizer)
                clip_grad_norm_(self.trainable, **self.clip_grad_norm)
            scaler.step(self.optimizer)
            scaler.update()
            self.scheduler.step()
            self.global_step += 1
            self.batch_index = batch_idx + 1
            self._epoch_loss = total_loss
            every = self.checkpoint_every_steps
            if every and self.global_step % every == 0 and self.batch_index < len(train_data):
                self._save_resume(done=False)
        return total_loss

    def _diverged(self, what: str, epoch_idx: int, batch_idx: int) -> None:
        stage = self.stages[self.stage_index]
        last = (
            f"the last good checkpoint is {self.resume_file}"
            if self.saved and Path(self.resume_file).is_file()
            else "no resume checkpoint was written yet"
        )
        message = (
            f"{what} in MPO stage '{stage.name}' ({self.stage_index + 1}/{len(self.stages)}), epoch {epoch_idx}, "
            f"step {self.global_step + 1} (batch {batch_idx} of the epoch); training stopped and {last}. "
            "Lower learning_rate or set clip_grad_norm, then continue with --resume=<checkpoint>"
        )
        self.logger.error(message)
        raise NonFiniteLossError(message)

    # ------------------------------------------------------------------ checkpoints
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

    def _full_sort_batch_eval(self, batched_data):
        return self._invalid_answers_miss(*super()._full_sort_batch_eval(batched_data))

    def _neg_sample_batch_eval(self, batched_data):
        return self._invalid_answers_miss(*super()._neg_sample_batch_eval(batched_data))

    @staticmethod
    def _invalid_answers_miss(interaction, scores, positive_u, positive_i) -> tuple:
        """A generative answer that names no candidate ranks the true item last (``metrics.rank_invalid_last``)."""
        if scores.dim() == 2:  # a ranking; value metrics (eval_type VALUE) get one score per row
            rank_invalid_last(scores, positive_u, positive_i)
        return interaction, scores, positive_u, positive_i

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        """RecBole's evaluation; the best model comes from our trainable-only checkpoint."""
        if not eval_data:
            return None
        if load_best_model:
            self._load_best(model_file)
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)


__all__ = ["GROUPS", "NonFiniteLossError", "SpeederTrainer"]
