"""Plugin-first lookups of models, trainers and datasets, falling back to RecBole's."""

from __future__ import annotations

import importlib
from pathlib import Path

from recbole.data import create_dataset as recbole_create_dataset
from recbole.utils import ModelType
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_speeder.errors import UsageError


def get_model(model_name: str) -> type:
    """A plugin model class by name, else RecBole's; an unknown name is a UsageError."""
    plugin_models = importlib.import_module("recbole_speeder.model")
    if hasattr(plugin_models, model_name):
        return getattr(plugin_models, model_name)
    try:
        return recbole_get_model(model_name)
    except (ValueError, ModuleNotFoundError):  # RecBole's search ends importing lightgbm/xgboost models
        raise UsageError(
            f"unknown model '{model_name}': use Speeder or a RecBole model name (e.g. SASRec, BERT4Rec)"
        ) from None


def get_trainer(model_type: ModelType, model_name: str) -> type:
    plugin_trainers = importlib.import_module("recbole_speeder.trainer")
    trainer = getattr(plugin_trainers, f"{model_name}Trainer", None)
    return trainer or recbole_get_trainer(model_type, model_name)


def ensure_atomic_files(config) -> None:
    """Fail early, in one line, when the dataset's atomic files are missing; prepare Amazon ones."""
    data_dir = Path(config["data_path"])
    name = config["dataset"]
    suffixes = config["benchmark_filename"] or [None]
    wanted = [data_dir / (f"{name}.{s}.inter" if s else f"{name}.inter") for s in suffixes]
    if all(path.is_file() for path in wanted):
        return
    if name.startswith("Amazon_"):
        from dataset_prep import DatasetPrepError, ensure_dataset

        try:
            ensure_dataset(name, data_dir.parent, raw_dir=config["raw_dir"], offline=bool(config["offline"]))
        except DatasetPrepError as err:
            raise UsageError(str(err)) from None
        return
    raise UsageError(
        f"dataset '{name}' not found: expected {wanted[0]} (set --data_path to the folder holding {name}/)"
    )


def create_dataset(config):
    """The plugin's ``<Model>Dataset`` when there is one, else RecBole's choice."""
    ensure_atomic_files(config)
    plugin_datasets = importlib.import_module("recbole_speeder.data.dataset")
    dataset_class = getattr(plugin_datasets, f"{config['model']}Dataset", None)
    if dataset_class is None:
        return recbole_create_dataset(config)
    return dataset_class(config)
