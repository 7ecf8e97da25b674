"""Rebuild config, data and model from a Speeder checkpoint, like RecBole's ``load_data_and_model``."""

from __future__ import annotations

import os

from recbole_speeder.trainer.checkpoint import read_checkpoint
from recbole_speeder.trainer.weights import load_trainable


def load_speeder(checkpoint: str | os.PathLike, config_dict: dict | None = None):
    """``(config, model, dataset, train_data, valid_data, test_data)`` for a best or resume checkpoint.

    The checkpoint stores the run's own config values (not the frozen backbone): the backbone is loaded from
    ``backbone_path`` again and the trained parameters are copied in. ``config_dict`` overrides values, e.g.
    ``data_path`` when the data moved. Data and loaders are built as the run built them (``quick_start``), so a
    sampled mode (``uni19``) scores the run's own seeded candidate lists. The model is in eval mode with the
    checkpoint's active modalities.
    """
    from recbole_speeder.config import Config
    from recbole_speeder.quick_start import build_data_and_model, start_logging

    tensors, state = read_checkpoint(checkpoint)
    config = Config(state["model"], state["dataset"], config_dict={**state["config"], **(config_dict or {})})
    start_logging(config)
    dataset, (train_data, valid_data, test_data), model = build_data_and_model(config)
    load_trainable(model, tensors, str(checkpoint))
    model.set_modalities(state["modalities"])
    model.eval()
    return config, model, dataset, train_data, valid_data, test_data
