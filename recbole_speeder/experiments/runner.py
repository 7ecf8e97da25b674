"""One isolated train-and-test run: the unit of ``--compare`` and of every tuning trial.

It builds data and model with ``quick_start`` (same Config, dataset, seeded candidates, trainer and test) and
adds what experiments need: fresh log handlers and seeds per run, a checkpoint folder of its own, a callback
after every validation, parameter counts, timings, a fingerprint of the evaluation split, and the test set
scored under several protocols (full ranking and a sampled ``uniN``) from the same best weights.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from recbole.data.dataloader import NegSampleEvalDataLoader
from recbole.data.utils import create_samplers
from recbole.utils import set_color

from recbole_speeder.config import Config
from recbole_speeder.config.snapshot import replayable_config
from recbole_speeder.errors import UsageError
from recbole_speeder.evaluation.protocol import (
    describe_protocol,
    full_ranking_loader,
    is_sampled,
    measured_evaluate,
    seed_eval_candidates,
)
from recbole_speeder.quick_start import build_data_and_model, start_logging
from recbole_speeder.utils import get_trainer

SAMPLED_MODE = re.compile(r"^(uni|pop)\d+$")


@dataclass
class RunResult:
    """What one run measured; plain values only, so it can be written to json and sent between processes."""

    model: str
    seed: int  # the config's seed: what a repeat over seeds varies (experiments/seeds.py)
    valid_metric: str
    valid_score_bigger: bool
    best_valid_score: float
    best_valid_result: dict[str, float]
    test: dict[str, dict[str, float]]  # protocol ("full", "uni19") -> metric -> value
    protocols: dict[str, str]  # protocol -> one-line description
    eval_seconds: dict[str, float]  # protocol -> wall time of the test pass (best-checkpoint load included)
    prompt_tokens_per_user: dict[str, float]  # protocol -> prompt tokens an LLM recommender read per test user
    train_seconds: float  # trainer.fit: all epochs with their per-epoch validation
    epochs: int
    params_trainable: int
    params_frozen: int
    eval_split: str  # hash of the valid and test (user, target item) pairs: equal rows used the same split
    test_users: int
    log_file: str | None
    config: dict = field(default_factory=dict)  # the user's config values that rebuild this run

    def to_dict(self) -> dict:
        return asdict(self)


def check_sampled_mode(mode: str | None) -> str | None:
    """``uni19`` / ``pop99`` style, or None / "none" for no sampled evaluation."""
    if mode in (None, "", "none"):
        return None
    if not SAMPLED_MODE.match(mode):
        raise UsageError(f"sampled evaluation mode must look like uni19 or pop99 (or none), not '{mode}'")
    return mode


@contextmanager
def isolated_logging() -> Iterator[None]:
    """RecBole's ``init_logger`` adds handlers only to a root logger without any (``basicConfig``): each run starts
    from none, so it gets its own log file; the caller's handlers come back afterwards."""
    root = logging.getLogger()
    outer_handlers, outer_level = list(root.handlers), root.level
    root.handlers = []
    try:
        yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers = outer_handlers
        root.setLevel(outer_level)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts as the model is built, before any MPO stage switches groups."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def eval_split_fingerprint(*loaders) -> str:
    """Hash of the (user, target item) tokens of each evaluation split: the same for every model on one split.

    Training rows are left out on purpose: Speeder keeps only the rows that tile each history
    (``SpeederDataset``) and still trains the same targets.
    """
    digest = hashlib.sha1()
    for loader in loaders:
        data = loader._dataset
        users = data.id2token(data.uid_field, data.inter_feat[data.uid_field].numpy())
        items = data.id2token(data.iid_field, data.inter_feat[data.iid_field].numpy())
        pairs = sorted(f"{user}\t{item}" for user, item in zip(users, items, strict=True))  # sampled loaders re-sort
        digest.update("\n".join(pairs).encode() + b"|")
    return digest.hexdigest()[:10]


def sampled_test_loader(config, dataset, built_loaders, mode: str) -> NegSampleEvalDataLoader:
    """The test split as RecBole's candidate lists of ``mode`` (e.g. uni19: true item + 19 uniform negatives).

    Built from a copy of the run's config with only the test mode changed; candidates are seeded per user
    (``eval_candidates``), so every model of a comparison ranks the same candidates for each user.
    """
    sampled = copy.copy(config)
    sampled.final_config_dict = copy.deepcopy(config.final_config_dict)
    sampled.final_config_dict["eval_args"]["mode"]["test"] = mode
    sampled._set_eval_neg_sample_args("test")
    built = [loader._dataset for loader in built_loaders]
    test_sampler = create_samplers(sampled, dataset, built)[2]
    loader = NegSampleEvalDataLoader(sampled, built[2], test_sampler, shuffle=False)
    seed_eval_candidates(sampled, loader)
    return loader


def protocol_loaders(config, dataset, loaders, sampled_mode: str | None) -> dict[str, tuple[object, str]]:
    """Full ranking, the run's own sampled test mode if it has one, and ``sampled_mode``; each with its protocol."""
    test_data = loaders[2]
    own = config["eval_args"]["mode"]["test"] if is_sampled(test_data) else None
    full = full_ranking_loader(config, test_data)
    out: dict[str, tuple[object, str]] = {"full": (full, describe_protocol(config, full=True))}
    if own:
        out[own] = (test_data, describe_protocol(config))
    if sampled_mode and sampled_mode != own:
        loader = sampled_test_loader(config, dataset, loaders, sampled_mode)
        out[sampled_mode] = (loader, describe_protocol(loader.config))
    return out


def train_and_test(
    model: str,
    dataset: str,
    config_files: list[str] | None = None,
    config_dict: dict | None = None,
    cmd_args: list[str] | None = None,
    *,
    checkpoint_subdir: str | None = None,
    sampled_mode: str | None = None,
    on_valid: Callable[[int, float], None] | None = None,
    title: str | None = None,
) -> RunResult:
    """Train ``model`` on ``dataset``, pick the best epoch on valid, and test it under each protocol.

    ``checkpoint_subdir`` is joined to ``checkpoint_dir`` so runs never share a checkpoint path;
    ``on_valid(epoch, valid_score)`` is RecBole's ``callback_fn``. Errors propagate: the caller decides what a
    failed run means.
    """
    with isolated_logging():
        config = Config(model, dataset, config_files, config_dict, cmd_args=cmd_args)
        if checkpoint_subdir:
            config["checkpoint_dir"] = os.path.join(config["checkpoint_dir"], checkpoint_subdir)
        start_logging(config)
        logger = logging.getLogger()
        log_file = next((h.baseFilename for h in logger.handlers if isinstance(h, logging.FileHandler)), None)
        if title:
            logger.info(set_color(title, "green"))
        data, loaders, recommender = build_data_and_model(config)
        train_data, valid_data, test_data = loaders
        trainable, frozen = count_parameters(recommender)
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, recommender)
        try:
            start = time.perf_counter()
            best_valid_score, best_valid_result = trainer.fit(
                train_data, valid_data, saved=True, show_progress=config["show_progress"], callback_fn=on_valid
            )
            train_seconds = time.perf_counter() - start
            test, protocols, seconds, tokens = {}, {}, {}, {}
            evaluations = protocol_loaders(config, data, loaders, sampled_mode)
            for i, (name, (loader, protocol)) in enumerate(evaluations.items()):
                result, cost = measured_evaluate(
                    trainer, loader, load_best_model=i == 0, show_progress=config["show_progress"]
                )
                # not "test result": the protocol tag of the logger would label every line with the run's own mode
                logger.info(set_color(f"tested under {name}", "yellow") + f" [{protocol}]: {dict(result)}")
                test[name], protocols[name], seconds[name] = dict(result), protocol, cost.seconds
                if cost.prompt_tokens:
                    tokens[name] = cost.per_user()["prompt_tokens"]
            return RunResult(
                model=config["model"],
                seed=int(config["seed"]),
                valid_metric=config["valid_metric"],
                valid_score_bigger=bool(config["valid_metric_bigger"]),
                best_valid_score=float(best_valid_score),
                best_valid_result=dict(best_valid_result or {}),
                test=test,
                protocols=protocols,
                eval_seconds=seconds,
                prompt_tokens_per_user=tokens,
                train_seconds=train_seconds,
                epochs=len(trainer.train_loss_dict),
                params_trainable=trainable,
                params_frozen=frozen,
                eval_split=eval_split_fingerprint(valid_data, test_data),
                test_users=test_data.sample_size,
                log_file=os.path.abspath(log_file) if log_file else None,
                config={"model": config["model"], "dataset": config["dataset"], **replayable_config(config)},
            )
        finally:
            del trainer, recommender
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
