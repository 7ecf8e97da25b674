"""Generative-evaluation metrics, registered in RecBole's metric registry: ``VHR``, ``ValidRatio``, ``HR``.

MLLM recommenders (LLaRA, A-LLMRec, Speeder) answer with one candidate, or with text that names none; RecBole's
metrics only see a ranking. The answer reaches the evaluator as scores (``model/generative/``): the chosen
candidate on top, and an answer naming no candidate as a row without any finite score. RecBole would rank such a
row by an arbitrary tie-break, so a lucky invalid answer could hit; :func:`rank_invalid_last` (``SpeederTrainer``
applies it to every evaluation batch) puts the true item below every other item instead: an invalid answer is a
miss for ``Hit@k``, ``NDCG@k`` and ``MRR@k`` at every k. That row is also how the metrics below recognise it:
the true item alone holds the lowest score, which no other row can show, because RecBole scores the padding
item (column 0) ``-inf`` in both full and sampled evaluation. From RecBole's ``rec.meanrank`` (the true item's
rank, and the rank at which the lowest score begins) and ``rec.topk`` (is the top-1 item the true one) each user
is valid or not, and correct or not:

- ``validratio`` = valid answers / users;
- ``hr@1`` = correct answers / valid answers (LLaRA's HitRatio@1, measured on valid answers only);
- ``vhr@1`` = valid and correct answers / users (Speeder's VHR@1; equals ``hr@1 * validratio``).

A scoring model (SASRec, BERT4Rec, Speeder with ``predict_mode: score``) always gives finite candidate scores,
so its ValidRatio is 1 and its VHR@1 is its Hit@1. RecBole builds its registry once, at import, from the
classes of ``recbole.evaluator.metrics``; :func:`register_metrics` adds ours to the same dictionaries, which the
plugin ``Config`` calls before RecBole checks the ``metrics`` list.
"""

from __future__ import annotations

import numpy as np
import torch
from recbole.evaluator import register
from recbole.evaluator.base_metric import AbstractMetric
from recbole.utils import EvaluatorType


class _AnswerMetric(AbstractMetric):
    """Per-user validity and correctness of the top-1 answer, from RecBole's collected ranking data."""

    metric_type = EvaluatorType.RANKING
    metric_need = ["rec.topk", "rec.meanrank"]
    key = ""

    def used_info(self, dataobject) -> tuple[np.ndarray, np.ndarray]:
        """``valid`` and ``correct`` booleans per user."""
        topk = dataobject.get("rec.topk")
        # rec.meanrank = (rank sum of the true items, argmin of the descending scores, number of true items); the
        # argmin is the count of items above the lowest score, so one true item alone at the bottom ranks one after
        # it; with any other item at the bottom too (a tie) the true item's average rank is larger.
        rank, above_lowest, n_true = dataobject.get("rec.meanrank").T
        valid = ~((n_true == 1) & (rank == above_lowest + 1))
        correct = valid & topk[:, 0].to(torch.bool)
        return valid.numpy(), correct.numpy()

    def calculate_metric(self, dataobject) -> dict[str, float]:
        valid, correct = self.used_info(dataobject)
        return {self.key: round(float(self.value(valid, correct)), self.decimal_place)}

    @staticmethod
    def value(valid: np.ndarray, correct: np.ndarray) -> float:
        raise NotImplementedError


class VHR(_AnswerMetric):
    """Valid hit ratio at 1: share of users whose answer names a candidate and that candidate is the true item."""

    key = "vhr@1"

    @staticmethod
    def value(valid: np.ndarray, correct: np.ndarray) -> float:
        return correct.mean() if len(correct) else 0.0


class ValidRatio(_AnswerMetric):
    """Share of users whose answer names one of the candidates."""

    key = "validratio"

    @staticmethod
    def value(valid: np.ndarray, correct: np.ndarray) -> float:
        return valid.mean() if len(valid) else 0.0


class HR(_AnswerMetric):
    """Hit ratio at 1 among valid answers (LLaRA's HitRatio@1); 0 when no answer is valid."""

    key = "hr@1"

    @staticmethod
    def value(valid: np.ndarray, correct: np.ndarray) -> float:
        return correct.sum() / valid.sum() if valid.any() else 0.0


PLUGIN_METRICS = (VHR, ValidRatio, HR)


def rank_invalid_last(scores: torch.Tensor, positive_u: torch.Tensor, positive_i: torch.Tensor) -> torch.Tensor:
    """Rows of ``scores [users, items]`` without a finite score (answers naming no candidate), in place: every item
    scores 0 and the true item ``-inf``, so it ranks last and the row is a miss at every cut-off."""
    invalid = ~torch.isfinite(scores).any(dim=1)
    if bool(invalid.any()):
        scores[invalid] = 0.0
        true_invalid = invalid[positive_u]
        scores[positive_u[true_invalid], positive_i[true_invalid]] = float("-inf")
    return scores


def register_metrics() -> None:
    """Add the plugin's metrics to RecBole's registry (idempotent); names are case-insensitive as in RecBole."""
    for metric in PLUGIN_METRICS:
        name = metric.__name__.lower()
        register.metrics_dict[name] = metric
        register.metric_information[name] = metric.metric_need
        register.metric_types[name] = metric.metric_type
        if metric.smaller and name not in register.smaller_metrics:
            register.smaller_metrics.append(name)
