r"""SpeederTrainer: RecBole's ``Trainer`` loop run as MPO stages (``mpo.py``), with trainable-only checkpoints and
resume (``checkpointing.py``) and DDP (``distributed.py``).

Each stage of ``mpo_stages`` sets the model's active modalities and which parameter groups (mrc, spae, head, lora)
train, and starts from the best valid weights of the stage before; this loop rebuilds the optimizer and the
learning-rate schedule over those parameters only and resets early stopping per stage. The run's model is the best
of all stages. One stage (or ``mpo_stages: ~``) is RecBole's ``Trainer.fit``, step for step.

Distributed (``--nproc``, torchrun): the loss runs through a ``DistributedDataParallel`` wrapper rebuilt per stage
over the parameters that stage trains; frozen parameters and buffers are never synchronised after one initial
broadcast.
"""

from __future__ import annotations

import os
from pathlib import Path
from time import time

import numpy as np
import torch
from recbole.trainer.trainer import Trainer
from recbole.utils import dict2str, early_stopping, set_color
from torch import nn
from tqdm import tqdm

from recbole_speeder.config.stages import Stage, parse_stages
from recbole_speeder.errors import UsageError
from recbole_speeder.evaluation.metrics import rank_invalid_last
from recbole_speeder.evaluation.ranking import (
    RankingCollector,
    rank_all_items,
    rank_candidates,
    ranks_without_score_matrix,
)
from recbole_speeder.trainer.checkpoint_file import CheckpointError
from recbole_speeder.trainer.checkpointing import BEST_SUFFIX, RESUME_SUFFIX, RunCheckpoints
from recbole_speeder.trainer.distributed import (
    DeferredDDP,
    any_rank,
    barrier,
    broadcast_module,
    broadcast_object,
    is_distributed,
    wrap_ddp,
)
from recbole_speeder.trainer.lazy_adam import LazyAdam, clip_grad_norm_, sparse_grad_parameters
from recbole_speeder.trainer.lr_schedule import build_scheduler
from recbole_speeder.trainer.mpo import MPOSchedule
from recbole_speeder.trainer.rng import set_rng_state
from recbole_speeder.trainer.weights import frozen_bytes, trainable_named_parameters


class NonFiniteLossError(RuntimeError):
    """Training diverged: the message names the stage and step, and the last good checkpoint."""


class SpeederTrainer(RunCheckpoints, Trainer, DeferredDDP):
    def __init__(self, config, model):
        os.makedirs(config["checkpoint_dir"], exist_ok=True)  # RecBole's check-then-create races between ranks
        super().__init__(config, model)
        self.eval_collector = RankingCollector(config)
        self.ranking_chunk_size = int(config["ranking_chunk_size"])
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

    def _build_optimizer(self, **kwargs):
        """RecBole's optimizer, but ``LazyAdam`` when a trainable embedding gives sparse gradients
        (``lazy_id_update``, whose config rule allows only learner adam or adamw): Adam/AdamW for every
        parameter, touching only the rows a step used."""
        sparse = {id(p) for p in sparse_grad_parameters(self.model)}
        params = list(kwargs.get("params", self.model.parameters()))
        if not any(id(p) in sparse for p in params):
            return super()._build_optimizer(**{**kwargs, "params": params})
        return LazyAdam(params, lr=kwargs.get("learning_rate", self.learning_rate), weight_decay=self.weight_decay,
                        decoupled_weight_decay=self.learner.lower() == "adamw")

    # ------------------------------------------------------------------ stages
    @property
    def stages(self) -> list[Stage]:
        return self.schedule.stages

    def _enter_stage(self, train_data) -> None:
        """The current stage's modalities and trainable groups (``mpo.py``), and this loop's optimizer, scheduler,
        early stopping and DDP wrapper for it."""
        stage = self.stages[self.stage_index]
        resume = self._resume
        fresh = resume is None or resume["optimizer"] is None
        if fresh:
            self.best_valid_score = -np.inf if self.valid_metric_bigger else np.inf
            self.best_valid_result = None
            self.cur_step = 0
        self.trainable = self.schedule.enter(self.model, self.stage_index)
        self.optimizer = self._build_optimizer(params=self.trainable, learning_rate=stage.learning_rate)
        self.scheduler = build_scheduler(
            self.optimizer, self.config["lr_scheduler"], self.config["warmup_steps"],
            stage.epochs * len(train_data),
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
            find_unused = self.config["ddp_find_unused_parameters"] is not False
            self.distributed_model = wrap_ddp(self.model, self.device, find_unused)
        n_params = sum(p.numel() for p in self.trainable)
        self.logger.info(
            set_color(f"MPO stage {self.stage_index + 1}/{len(self.stages)} '{stage.name}'", "green")
            + f": modalities {list(stage.modalities)}, training {list(stage.train)} ({n_params} parameters), "
            f"{stage.epochs} epochs of {len(train_data)} batches, lr {stage.learning_rate:g}"
            + (f", from epoch {self.stage_epoch} batch {self.batch_index}" if not fresh else "")
        )

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
            if not self.config["single_spec"] and train_data.shuffle:  # DDP's sampler
                train_data.sampler.set_epoch(epoch_idx)
            train_loss = self._train_epoch(train_data, epoch_idx, show_progress=show_progress)
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
        """RecBole's epoch over the trainable parameters only, resumable at any batch and guarded against NaN."""
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


    def _ranks_sparsely(self) -> bool:
        """Whether this evaluation ranks without a ``[users x items]`` matrix (``evaluation/ranking.py``): a
        similarity-scoring model, ranking metrics, none of which needs every score."""
        return ranks_without_score_matrix(self.config, self.model)

    def _full_sort_batch_eval(self, batched_data):
        if not self._ranks_sparsely():
            return self._invalid_answers_miss(*super()._full_sort_batch_eval(batched_data))
        interaction, history_index, positive_u, positive_i = batched_data
        users, items = self.model.full_sort_factors(interaction.to(self.device))
        ranking = rank_all_items(users, items, positive_u, positive_i, history_index, self.ranking_chunk_size,
                                 self._topk_items())
        return interaction, ranking, positive_u, positive_i

    def _neg_sample_batch_eval(self, batched_data):
        if not self._ranks_sparsely():
            return self._invalid_answers_miss(*super()._neg_sample_batch_eval(batched_data))
        interaction, row_idx, positive_u, positive_i = batched_data
        batch_size = interaction.length
        if batch_size <= self.test_batch_size:
            scores = self.model.predict(interaction.to(self.device))
        else:
            scores = self._spilt_predict(interaction, batch_size)
        items = interaction[self.config["ITEM_ID_FIELD"]]
        ranking = rank_candidates(row_idx, items, scores, positive_u, positive_i, int(positive_u[-1]) + 1,
                                  self.tot_item_num, self._topk_items())
        return interaction, ranking, positive_u, positive_i

    def _topk_items(self) -> int | None:
        """The longest cut-off, where a metric reads the recommended items themselves."""
        return max(self.eval_collector.topk) if self.eval_collector.needs_items() else None

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

