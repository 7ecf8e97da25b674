"""Train and evaluate any plugin or RecBole model with one call, and load a trained one back, like RecBole's
``quick_start``."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from logging import getLogger
from pathlib import Path

import torch
import torch.distributed as dist
from recbole.data import data_preparation
from recbole.utils import get_environment, init_logger, set_color

from recbole_speeder.allocator import keep_freed_memory
from recbole_speeder.config import Config
from recbole_speeder.config.snapshot import replayable_config
from recbole_speeder.errors import UsageError
from recbole_speeder.evaluation.protocol import (
    evaluate_test,
    exclude_history,
    fit_eval_batch_size,
    sample_eval_users,
    seed_eval_candidates,
    tag_results_with_protocol,
)
from recbole_speeder.evaluation.ranking import ranks_without_score_matrix
from recbole_speeder.trainer.checkpoint_file import read_checkpoint
from recbole_speeder.trainer.distributed import node_main_process_first, torchrun_launch
from recbole_speeder.trainer.rng import seed_run
from recbole_speeder.trainer.weights import load_trainable
from recbole_speeder.utils import create_dataset, get_model, get_trainer

# Keys that decide the frozen backbone's weights (and LoRA's shape and scale): a replay that changed them would put the
# run's trained parameters on other weights than those they were trained with. ``seed`` joins them for a
# backbone_init that draws its weights (shuffled, random).
FROZEN_WEIGHT_KEYS = ("backbone_path", "backbone_offline_copy", "backbone_init", "backbone_dtype", "backbone_layers",
                      "lora_r", "lora_alpha", "lora_target_modules")


def run(
    model: str,
    dataset: str,
    config_file_list: list[str] | None = None,
    config_dict: dict | None = None,
    saved: bool = True,
    nproc: int = 1,
    world_size: int = -1,
    ip: str = "localhost",
    port: str = "5678",
    group_offset: int = 0,
    cmd_args: list[str] | None = None,
) -> dict | None:
    """One process, one rank of a ``torchrun`` launch, or ``nproc`` spawned ranks (RecBole's distributed path);
    returns this process's result (rank 0's for spawned ranks)."""
    launch = torchrun_launch()
    if launch is not None:
        if nproc != 1 or world_size > 0:
            raise UsageError("torchrun starts the processes: drop --nproc / --world_size")
        config_dict = {**(config_dict or {}), **launch}
        return run_recbole_speeder(model, dataset, config_file_list, config_dict, saved, cmd_args=cmd_args)
    if nproc == 1 and world_size <= 0:
        return run_recbole_speeder(model, dataset, config_file_list, config_dict, saved, cmd_args=cmd_args)
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    config_dict = dict(config_dict or {})
    config_dict.update(
        {"world_size": world_size if world_size > 0 else nproc, "ip": ip, "port": port, "nproc": nproc,
         "offset": group_offset}
    )
    Config(model, dataset, config_file_list, config_dict, cmd_args=cmd_args)  # a bad value: one line, not one per rank
    kwargs = {"config_dict": config_dict, "queue": queue, "cmd_args": cmd_args, "saved": saved}
    mp.spawn(_run_rank, args=(model, dataset, config_file_list, kwargs), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def _run_rank(rank: int, model: str, dataset: str, config_file_list, kwargs: MutableMapping) -> None:
    kwargs["config_dict"]["local_rank"] = rank
    run_recbole_speeder(model, dataset, config_file_list, **kwargs)


def start_logging(config) -> None:
    """Seed and open RecBole's log for a run; every result line names its evaluation protocol."""
    keep_freed_memory(config["keep_freed_memory"])
    seed_run(config["seed"], config["reproducibility"])
    os.makedirs(os.path.join("log", str(config["model"])), exist_ok=True)  # RecBole's init_logger races between ranks
    init_logger(config)
    tag_results_with_protocol(config)


def build_data_and_model(config) -> tuple[object, tuple, torch.nn.Module]:
    """The dataset, its split loaders (seeded candidate lists) and the model, as RecBole's quick start builds them."""
    logger = getLogger()
    logger.info(config)
    with node_main_process_first(config["local_rank"]):  # one process per node prepares the data
        data = create_dataset(config)
    logger.info(data)
    fit_eval_batch_size(config, data.item_num, ranks_without_score_matrix(config, get_model(config["model"])))
    train_data, valid_data, test_data = data_preparation(config, data)
    valid_data, test_data = sample_eval_users(config, valid_data, test_data)
    seed_eval_candidates(config, valid_data, test_data)
    valid_data, test_data = exclude_history(config, data, valid_data, test_data)
    loaders = (train_data, valid_data, test_data)
    seed_run(config["seed"] + config["local_rank"], config["reproducibility"])
    with node_main_process_first(config["local_rank"]):  # ... and encodes the item features it caches
        recommender = get_model(config["model"])(config, loaders[0]._dataset).to(config["device"])
    logger.info(recommender)
    return data, loaders, recommender


def run_recbole_speeder(
    model: str | None = None,
    dataset: str | None = None,
    config_file_list: list[str] | None = None,
    config_dict: dict | None = None,
    saved: bool = True,
    queue=None,
    cmd_args: list[str] | None = None,
) -> dict:
    """Train on the train split, pick the best epoch on valid, report test; returns both results."""
    config = Config(model, dataset, config_file_list, config_dict, cmd_args=cmd_args)
    start_logging(config)
    logger = getLogger()
    _, (train_data, valid_data, test_data), recommender = build_data_and_model(config)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, recommender)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    test = evaluate_test(trainer, config, test_data, load_best_model=saved, show_progress=config["show_progress"])
    test_result = test["test_result"]
    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    if hasattr(recommender, "mean_prompt_tokens"):
        logger.info(set_color("mean prompt tokens per sample", "blue") + f": {recommender.mean_prompt_tokens():.1f}")
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    result = {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        **test,  # test_result, its protocol and per-user cost; the full-ranking result beside it
        "checkpoint": trainer.saved_model_file if saved else None,  # what load_model rebuilds the trained model from
    }
    if not config["single_spec"]:
        dist.destroy_process_group()
    if config["local_rank"] == 0 and queue is not None:
        queue.put(result)
    return result


def objective_function(config_dict: dict | None = None, config_file_list: list[str] | None = None,
                       saved: bool = True) -> dict:
    """One tuning trial: best valid score and results, test result alongside (never tuned on)."""
    result = run_recbole_speeder(config_dict=config_dict, config_file_list=config_file_list, saved=saved)
    return {key: result[key] for key in ("model", "best_valid_score", "valid_score_bigger",
                                         "best_valid_result", "test_result")}



# ---------------------------------------------------------------------------------------------- loading a trained run
def load_speeder(checkpoint: str | os.PathLike, config_dict: dict | None = None):
    """``(config, model, dataset, train_data, valid_data, test_data)`` for a best or resume checkpoint.

    The checkpoint stores the run's own config values (not the frozen backbone): the backbone is loaded from
    ``backbone_path`` again and the trained parameters are copied in. ``config_dict`` overrides values, e.g.
    ``data_path`` when the data moved or an evaluation key; an override of a key that decides the frozen weights
    (:data:`FROZEN_WEIGHT_KEYS`, and ``seed`` under a shuffled or random backbone) is refused, since the trained
    parameters would land on other weights. Data and loaders are built as the run built them, so a sampled mode
    (``uni19``) scores the run's own seeded candidate lists. The model is in eval mode with the checkpoint's
    active modalities.
    """
    tensors, state = read_checkpoint(checkpoint)
    # the checkpoint holds the weights: a warm start's source (init_from) is not read again, nor needed
    saved = {**state["config"], "init_from": None}
    overrides = dict(config_dict or {})
    if overrides:
        _check_replay_overrides(checkpoint, state["model"], state["dataset"], saved, overrides)
    config, dataset, loaders, model = _rebuild(state["model"], state["dataset"], {**saved, **overrides})
    load_trainable(model, tensors, str(checkpoint))
    model.set_modalities(state["modalities"])
    model.eval()
    return config, model, dataset, *loaders


def _check_replay_overrides(checkpoint, model: str, dataset: str, saved: dict, overrides: dict) -> None:
    """Refuse overrides that would rebuild other frozen weights than the run's (compared as the configs read them)."""
    run = Config(model, dataset, config_dict=dict(saved))
    replay = Config(model, dataset, config_dict={**saved, **overrides})
    frozen = [*FROZEN_WEIGHT_KEYS, *(["seed"] if run["backbone_init"] != "pretrained" else [])]
    for key in (k for k in frozen if k in overrides and replay[k] != run[k]):
        raise UsageError(
            f"{checkpoint} was trained on the frozen backbone that {key}={run[key]!r} builds; {key}={replay[key]!r} "
            "would put its trained parameters on other weights: leave it out of the overrides"
        )


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


def load_tester(checkpoint: str | os.PathLike, config_dict: dict | None = None):
    """:func:`load_model` and a trainer ready to test it: the training data's statistics collected, as ``fit``
    collects them, for the metrics that read them (RecBole's AveragePopularity, TailPercentage, ...).

    Returns ``(config, trainer, dataset, valid_data, test_data)``.
    """
    config, model, dataset, train_data, valid_data, test_data = load_model(checkpoint, config_dict)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.eval_collector.data_collect(train_data)
    return config, trainer, dataset, valid_data, test_data


def _rebuild(model: str, dataset: str, config_dict: dict):
    config = Config(model, dataset, config_dict=config_dict)
    start_logging(config)
    data, loaders, recommender = build_data_and_model(config)
    return config, data, loaders, recommender
