"""MPO, progressive optimisation: what each stage trains, the weights a stage hands to the next, and the best
weights of the whole schedule. The loop that runs the stages is ``trainer.py``; their grammar ``config/stages.py``.

Each stage sets the active modalities and the trained parameter groups, and starts from the best valid weights of
the stage before (progressive: a stage builds on what the one before learned best). The run's model is the best of
every stage, not of the last: a later stage that only makes things worse (a learning rate too high, a modality that
does not help) does not cost the run its best model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recbole_speeder.config.stages import Stage
from recbole_speeder.errors import UsageError
from recbole_speeder.trainer.weights import PREFIX, load_trainable, trainable_named_parameters


@dataclass
class Best:
    """Trainable weights that scored best on valid, and where they come from."""

    tensors: dict[str, torch.Tensor]  # ``model.<name>``, as checkpoints hold them
    score: float | None  # None: trained without validation, the latest epoch counts as the best
    result: dict | None
    stage: str
    epoch: int  # the run's epoch index, as the logs count them
    modalities: tuple[str, ...]  # the stage's active modalities, which the weights were scored with

    def describe(self, metric: str) -> str:
        where = f"at stage '{self.stage}' epoch {self.epoch}"
        if self.score is None:
            return f"latest weights (no validation) {where}"
        return f"best valid {metric} {self.score} {where}"


class MPOSchedule:
    """The stages of a run, stage by stage, and the best weights they produce."""

    def __init__(self, stages: list[Stage], groups: dict[str, list[nn.Parameter]], bigger: bool):
        for stage in stages:
            if not any(groups[group] for group in stage.train):
                raise UsageError(
                    f"MPO stage '{stage.name}' trains nothing: groups {list(stage.train)} have no parameters "
                    "(lora needs lora_r > 0)"
                )
        self.stages, self.groups, self.bigger = stages, groups, bigger
        self.stage_best: Best | None = None  # of the running stage: the next one starts from it
        self.best: Best | None = None  # of the whole schedule: the run's model
        self.results: list[dict] = []  # per finished stage: its epochs and best valid score and result

    def describe(self) -> str:
        lines = [
            f"MPO: {len(self.stages)} stage(s); each starts from the weights that scored best on valid in the one "
            "before, with a fresh optimizer over its trainable groups and fresh early stopping; the run keeps the "
            "best weights of all stages"
        ]
        for i, stage in enumerate(self.stages):
            lines.append(
                f"  {i + 1}. {stage.name}: modalities {list(stage.modalities)}, train {list(stage.train)}, "
                f"{stage.epochs} epochs, lr {stage.learning_rate:g}"
            )
        return "\n".join(lines)

    def enter(self, model: nn.Module, index: int) -> list[nn.Parameter]:
        """Switch the model to stage ``index``: its active modalities, and only its groups train. Returns the
        parameters that train, in ``model.parameters()`` order."""
        stage = self.stages[index]
        model.set_modalities(list(stage.modalities))
        train_ids = {id(p) for group in stage.train for p in self.groups[group]}
        for _, param in trainable_named_parameters(model):
            param.requires_grad_(id(param) in train_ids)
        return [p for p in model.parameters() if p.requires_grad]

    def record(self, model: nn.Module, index: int, epoch: int, score: float | None, result: dict | None) -> bool:
        """The model's weights are the best of stage ``index`` so far: keep them. Returns whether they are also the
        best of the whole schedule (strictly better than its best so far; without validation, always)."""
        stage = self.stages[index]
        tensors = {PREFIX + n: p.detach().clone() for n, p in trainable_named_parameters(model)}
        self.stage_best = Best(tensors, score, result, stage.name, epoch, stage.modalities)
        if self.best is None or score is None or self.best.score is None or self._better(score, self.best.score):
            self.best = self.stage_best
            return True
        return False

    def _better(self, score: float, than: float) -> bool:
        return score > than if self.bigger else score < than

    def finish_stage(self, model: nn.Module, index: int, epochs: int) -> None:
        """End stage ``index`` after ``epochs`` epochs: its best weights go into the model for the next stage."""
        best, name = self.stage_best, self.stages[index].name
        self.results.append({
            "stage": name,
            "epochs": epochs,
            "best_valid_score": best.score if best else None,
            "best_valid_result": best.result if best else None,
        })
        if best is not None:
            load_trainable(model, best.tensors, f"best weights of stage '{name}'")
        self.stage_best = None

    def load_best(self, model: nn.Module) -> None:
        """The best weights of the whole schedule, with the modalities they were scored with, into the model."""
        if self.best is None:
            raise UsageError("no best weights yet: run fit() first")
        load_trainable(model, self.best.tensors, f"best weights (stage '{self.best.stage}')")
        model.set_modalities(list(self.best.modalities))

    def summary(self, metric: str) -> str:
        """One line: each finished stage's best valid score, then the schedule's best and where it came from."""
        parts = [f"{r['stage']}: {r['epochs']} epochs, best {metric} {r['best_valid_score']}" for r in self.results]
        if self.best is not None:
            parts.append(f"kept the {self.best.describe(metric)}")
        return "; ".join(parts)
