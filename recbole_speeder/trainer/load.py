"""Rebuild config, data and model from a checkpoint, like RecBole's ``load_data_and_model``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from recbole_speeder.errors import UsageError
from recbole_speeder.trainer.checkpoint import read_checkpoint
from recbole_speeder.trainer.mpo import replayable_config
from recbole_speeder.trainer.weights import load_trainable


def load_speeder(checkpoint: str | os.PathLike, config_dict: dict | None = None):
    """``(config, model, dataset, train_data, valid_data, test_data)`` for a best or resume checkpoint.

    The checkpoint stores the run's own config values (not the frozen backbone): the backbone is loaded from
    ``backbone_path`` again and the trained parameters are copied in. ``config_dict`` overrides values, e.g.
    ``data_path`` when the data moved. Data and loaders are built as the run built them (``quick_start``), so a
    sampled mode (``uni19``) scores the run's own seeded candidate lists. The model is in eval mode with the
    checkpoint's active modalities.
    """
    tensors, state = read_checkpoint(checkpoint)
    # the checkpoint holds the weights: a warm start's source (init_from) is not read again, nor needed
    values = {**state["config"], **(config_dict or {}), "init_from": None}
    config, dataset, loaders, model = _rebuild(state["model"], state["dataset"], values)
    load_trainable(model, tensors, str(checkpoint))
    model.set_modalities(state["modalities"])
    model.eval()
    return config, model, dataset, *loaders


def load_recbole_model(checkpoint: str | os.PathLike, config_dict: dict | None = None):
    """The same for a RecBole model's ``.pth`` checkpoint (SASRec, BERT4Rec, ... trained by the run script).

    RecBole pickles its config object in the file, so only load checkpoints you trust (as with RecBole's own
    ``load_data_and_model``). The run's own config values are replayed, ``config_dict`` overriding them.
    """
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        run_config = saved["config"]
        own = replayable_config(run_config)
    except (OSError, KeyError, AttributeError, RuntimeError) as err:
        raise UsageError(f"{checkpoint} is not a RecBole checkpoint ({err})") from None
    model_name, dataset_name = run_config["model"], run_config["dataset"]
    config, dataset, loaders, model = _rebuild(model_name, dataset_name, {**own, **(config_dict or {})})
    model.load_state_dict(saved["state_dict"])
    model.load_other_parameter(saved.get("other_parameter"))
    model.eval()
    return config, model, dataset, *loaders


def load_model(checkpoint: str | os.PathLike, config_dict: dict | None = None):
    """:func:`load_speeder` for a ``.safetensors`` checkpoint, :func:`load_recbole_model` for anything else."""
    if not Path(checkpoint).is_file():
        raise UsageError(f"checkpoint {checkpoint} does not exist")
    load = load_speeder if Path(checkpoint).suffix == ".safetensors" else load_recbole_model
    return load(checkpoint, config_dict)


def _rebuild(model: str, dataset: str, config_dict: dict):
    from recbole_speeder.config import Config
    from recbole_speeder.quick_start import build_data_and_model, start_logging

    config = Config(model, dataset, config_dict=config_dict)
    start_logging(config)
    data, loaders, recommender = build_data_and_model(config)
    return config, data, loaders, recommender
