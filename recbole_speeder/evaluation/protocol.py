"""The evaluation protocol around RecBole's trainer: seeded candidate lists, seen items, protocol tags, cost.

RecBole's sampled modes (``eval_args.mode: uni19`` / ``pop19``: the true item plus 19 uniform or popularity
negatives) draw the negatives from the global numpy RNG while a batch is collated, so which candidates a user
gets depends on everything that consumed that RNG before (epochs run, validations, the model's own init). With
``eval_candidates: seeded`` each user's negatives come from an RNG seeded by ``(seed, phase, user)`` and nothing
else: every model, epoch and batch size sees the same 20 candidates per user, and the global RNG is untouched.
``eval_candidates: recbole`` keeps RecBole's own draws (what ``run_recbole`` would do). Which items may be
negatives is ``candidate_negatives`` (``candidates.py``): LLaRA's rule by default, or RecBole's sampler as it is.

Full ranking of a sequential model ranks every item, the user's own history included (RecBole's behaviour);
``eval_exclude_history: True`` removes each evaluated row's history items from the ranking, as RecBole does for
general models and as the field's sequential benchmarks do (``filter_viewed``), for every model the run script
trains: it is the loader, not the model, that carries the items to remove.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader, NegSampleEvalDataLoader
from recbole.utils import set_color

from recbole_speeder.errors import UsageError
from recbole_speeder.evaluation.candidates import HistoryExcludingSampler, row_histories

PHASE_IDS = {"train": 0, "valid": 1, "test": 2}


# ---------------------------------------------------------------------------------------------- candidates
class SeededCandidateSampler:
    """RecBole's sampler, drawing each call's negatives from an RNG seeded by (seed, phase, the call's users).

    RecBole's ``NegSampleEvalDataLoader`` samples once per user, so a user's candidates depend only on that
    key. The global numpy state is saved and restored around every draw.
    """

    def __init__(self, sampler, seed: int):
        self.sampler = sampler
        self.seed = int(seed)

    def sample_by_user_ids(self, user_ids, item_ids, num):
        key = np.concatenate([[self.seed, PHASE_IDS.get(self.sampler.phase, 3)], np.asarray(user_ids, dtype=np.int64)])
        state = np.random.get_state()
        np.random.seed((key % 2**32).astype(np.uint32))
        try:
            return self.sampler.sample_by_user_ids(user_ids, item_ids, num)
        finally:
            np.random.set_state(state)

    def __getattr__(self, name: str):
        # pickle and copy build the object without __init__ and then look up __setstate__ & co: with no
        # ``sampler`` yet, delegating would look ``sampler`` up here again, forever
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)


def is_sampled(loader) -> bool:
    """True for RecBole's candidate-list loaders (``uniN`` / ``popN``), False for full ranking."""
    if not isinstance(loader, NegSampleEvalDataLoader):
        return False
    args = loader.neg_sample_args
    return args["distribution"] != "none" and args["sample_num"] != "none"


def recbole_sampler(loader):
    """The RecBole sampler under the plugin's wrappers: what a full-ranking loader over the same split takes."""
    sampler = loader._sampler
    while isinstance(sampler, (SeededCandidateSampler, HistoryExcludingSampler)):
        sampler = sampler.sampler
    return sampler


class HistoryExcludingFullSortLoader(FullSortEvalDataLoader):
    """Full ranking without each row's history items (``eval_exclude_history``): every item the user interacted
    with before the evaluated one (``candidates.row_histories``), never the evaluated item itself. Its batches carry
    them as RecBole's ``history_index``, whose scores RecBole's trainer sets to ``-inf``, as for general models."""

    def __init__(self, config, evaluated, sampler, full):
        histories = row_histories(full, evaluated)
        targets = evaluated.inter_feat[evaluated.iid_field].numpy()
        self.histories = [history[history != target] for history, target in zip(histories, targets, strict=True)]
        super().__init__(config, evaluated, sampler, shuffle=False)

    def collate_fn(self, index):
        interaction, _, positive_u, positive_i = super().collate_fn(index)
        histories = [torch.from_numpy(self.histories[row]) for row in np.asarray(index).tolist()]
        rows = torch.repeat_interleave(torch.arange(len(histories)), torch.tensor([len(h) for h in histories]))
        items = torch.cat(histories) if histories else torch.zeros(0, dtype=torch.long)
        return interaction, (rows, items.long()), positive_u, positive_i


def exclude_history(config, full, *loaders) -> tuple:
    """The loaders, their sequential full-ranking ones without each row's history items when
    ``eval_exclude_history`` asks for it; ``full`` is the whole dataset, which holds every user's history."""
    if not config["eval_exclude_history"]:
        return loaders
    return tuple(
        HistoryExcludingFullSortLoader(config, loader._dataset, loader._sampler, full)
        if type(loader) is FullSortEvalDataLoader and loader.is_sequential else loader
        for loader in loaders
    )


def full_ranking_loader(config, loader):
    """The loader's users under full ranking: the loader itself, or a full-ranking loader over its split when it
    samples candidate lists (without history items under ``eval_exclude_history``)."""
    if not is_sampled(loader):
        return loader
    sampler = recbole_sampler(loader)
    full = FullSortEvalDataLoader(config, loader._dataset, sampler)
    (full,) = exclude_history(config, sampler.dataset, full)
    return full


def check_list_batches(config) -> None:
    """A model scores (a generative one answers) each user's whole candidate list in one evaluation batch."""
    for phase in ("valid", "test"):
        n = candidate_count(config, phase)
        if n is not None and n > config["eval_batch_size"]:
            raise UsageError(
                f"eval_batch_size ({config['eval_batch_size']}) is smaller than one {phase} candidate list "
                f"({n} = true item + {n - 1} negatives): set eval_batch_size >= {n}"
            )


def fit_eval_batch_size(config, n_items: int, ranks_in_chunks: bool) -> None:
    """RecBole's full ranking holds ``[eval_batch_size x items]`` scores and as large a matrix of hits per batch
    (4 GB each at a million items and 1,024 users), and its sampled modes a ``-inf`` matrix of that width. When the
    user did not set ``eval_batch_size``, lower it so one batch scores at most ``eval_scores_per_batch`` (user,
    item) pairs, keeping a whole candidate list per batch. A model that ranks in item chunks (``ranks_in_chunks``)
    holds ``[eval_batch_size x ranking_chunk_size]`` at any catalogue size and keeps it."""
    if ranks_in_chunks or "eval_batch_size" in config.external_config_dict:
        return
    chosen, budget = config["eval_batch_size"], config["eval_scores_per_batch"]
    one_list = max(candidate_count(config, phase) or 1 for phase in ("valid", "test"))
    fitted = max(budget // n_items, one_list)
    if fitted < chosen:
        config["eval_batch_size"] = fitted
        logging.getLogger().info(
            f"eval_batch_size: {fitted} (not set; {chosen} users x {n_items:,} items would pass eval_scores_per_batch"
            f" = {budget:,} scores per batch)"
        )


def seed_eval_candidates(config, *loaders) -> None:
    """Make the sampled evaluation loaders draw their negatives by ``candidate_negatives``, from per-user seeded
    RNGs with ``eval_candidates: seeded``; loaders already set up and full-ranking ones are left as they are."""
    seeding, negatives = config["eval_candidates"], config["candidate_negatives"]
    check_list_batches(config)
    for loader in loaders:
        if not is_sampled(loader) or recbole_sampler(loader) is not loader._sampler:
            continue
        sampler = loader._sampler
        if negatives == "exclude_history":
            sampler = HistoryExcludingSampler(sampler, loader._dataset, loader.neg_sample_num)
        if seeding == "seeded":
            sampler = SeededCandidateSampler(sampler, config["seed"])
        loader._sampler = sampler


def sample_eval_users(config, valid_data, test_data) -> tuple:
    """With ``eval_users: N``, the valid and test loaders keep the same N users, drawn from a generator seeded by
    ``seed`` alone: every model and run with that seed evaluates the same users. Call it before
    :func:`seed_eval_candidates`: a kept user's candidate list is then the one the full run gives it (its draw is
    seeded by the user, its history read from the whole dataset). For slow answers (text-description prompts) on a
    budget; the log's protocol line names the sample."""
    wanted = config["eval_users"]
    users = test_data._dataset.inter_feat[test_data._dataset.uid_field].unique()
    if wanted is None or wanted >= len(users):
        if wanted is not None:
            logging.getLogger().info(f"eval_users: {wanted} >= the {len(users)} users: every user is evaluated")
        return valid_data, test_data
    kept = users[torch.randperm(len(users), generator=torch.Generator().manual_seed(config["seed"]))[:wanted]]
    return _keep_users(valid_data, kept), _keep_users(test_data, kept)


def _keep_users(loader, users: torch.Tensor):
    """The same kind of evaluation loader over the rows of ``users`` only."""
    dataset = loader._dataset
    rows = torch.isin(dataset.inter_feat[dataset.uid_field], users)
    return type(loader)(loader.config, dataset.copy(dataset.inter_feat[rows]), loader._sampler, shuffle=False)


def candidate_count(config, phase: str = "test") -> int | None:
    """Candidates per user in ``phase`` (true item + sampled negatives), None for full ranking."""
    args = config[f"{phase}_neg_sample_args"] or {}
    if args.get("distribution") in (None, "none") or args.get("sample_num") in (None, "none"):
        return None
    return int(args["sample_num"]) + 1


# ---------------------------------------------------------------------------------------------- protocol text
def describe_protocol(config, phase: str = "test", full: bool = False) -> str:
    """One line naming the candidates (N, sampler, seeding) and how the model answers (score or decoder)."""
    n = None if full else candidate_count(config, phase)
    mode = config["predict_mode"] or "score"
    if n is None:
        candidates = "full ranking of all items"
        if config["eval_exclude_history"]:
            candidates += ", each user's history items excluded"
        if mode == "generate":
            candidates += f" (the score head's top {config['generate_candidates']} are listed to the LLM)"
    else:
        args = config[f"{phase}_neg_sample_args"]
        seeding = config["eval_candidates"] or "seeded"
        candidates = (
            f"{config['eval_args']['mode'][phase]}: {n} candidates = true item + {n - 1} {args['distribution']} "
            f"negatives ({config['candidate_negatives']}, {seeding} draws, seed {config['seed']})"
        )
    if config["eval_users"] is not None:
        candidates += f", at most {config['eval_users']} users drawn with seed {config['seed']} (eval_users)"
    answer = f"generate, {config['generate_decoder']} decoder" if mode == "generate" else "score"
    if mode == "generate" and config["generate_decoder"] == "free":
        answer += f", {config['generate_validity']} validity"
    if config["item_repr"]:
        answer += f", item_repr {config['item_repr']}"
    return f"{candidates}; answers: {answer}"


class ProtocolTag(logging.Filter):
    """Writes the protocol next to every result line RecBole's trainer and the run script log."""

    PHRASES = (("valid result", "valid"), ("best valid", "valid"), ("test result", "test"))

    def __init__(self, config):
        super().__init__()
        self.tags = {phase: describe_protocol(config, phase) for phase in ("valid", "test")}

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "[protocol:" not in record.msg:
            for phrase, phase in self.PHRASES:
                if phrase in record.msg:
                    record.msg = record.msg.replace(phrase, f"{phrase} [protocol: {self.tags[phase]}]", 1)
                    break
        return True


def tag_results_with_protocol(config) -> None:
    """Install :class:`ProtocolTag` on the root logger (the one RecBole logs to), replacing an earlier one."""
    logger = logging.getLogger()
    for old in [f for f in logger.filters if isinstance(f, ProtocolTag)]:
        logger.removeFilter(old)
    logger.addFilter(ProtocolTag(config))


# ---------------------------------------------------------------------------------------------- cost and test
@dataclass
class InferenceCost:
    """What one evaluation pass cost, totals and per evaluated user."""

    users: int
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    counts_tokens: bool = True  # False for models without a prompt (SASRec, BERT4Rec)

    def per_user(self) -> dict[str, float | None]:
        """Means per evaluated user; token counts are None for models without a prompt."""
        n = max(self.users, 1)
        return {
            "prompt_tokens": self.prompt_tokens / n if self.counts_tokens else None,
            "generated_tokens": self.generated_tokens / n if self.counts_tokens else None,
            "seconds": self.seconds / n,
        }

    def __str__(self) -> str:
        per = self.per_user()
        tokens = (
            f"{per['prompt_tokens']:.1f} prompt tokens, {per['generated_tokens']:.1f} generated tokens, "
            if self.counts_tokens
            else ""
        )
        return f"{tokens}{per['seconds']:.4f} s per user ({self.users} users, {self.seconds:.1f} s)"


def _token_counters(model) -> tuple[int, int]:
    """(prompt tokens, generated tokens) counted so far by an LLM recommender (``token_counts``); zeros for others."""
    return model.token_counts() if hasattr(model, "token_counts") else (0, 0)


def measured_evaluate(trainer, eval_data, **kwargs) -> tuple[dict, InferenceCost]:
    """``trainer.evaluate`` plus its wall-clock time and the tokens the model read and wrote."""
    prompt0, generated0 = _token_counters(trainer.model)
    start = time.perf_counter()
    result = trainer.evaluate(eval_data, **kwargs)
    seconds = time.perf_counter() - start
    prompt1, generated1 = _token_counters(trainer.model)
    counts = hasattr(trainer.model, "token_counts")
    return result, InferenceCost(eval_data.sample_size, prompt1 - prompt0, generated1 - generated0, seconds, counts)


def evaluate_test(trainer, config, test_data, load_best_model: bool, show_progress: bool) -> dict:
    """Test on the configured protocol; with a sampled mode and ``eval_full_beside``, on the full ranking too.

    Returns ``test_result`` (and ``test_result_full``), each logged with its protocol and per-user cost.
    """
    logger = logging.getLogger()
    result, cost = measured_evaluate(trainer, test_data, load_best_model=load_best_model, show_progress=show_progress)
    logger.info(set_color("inference cost", "blue") + f" [{describe_protocol(config)}]: {cost}")
    out = {"test_result": result, "test_cost": cost.per_user(), "eval_protocol": describe_protocol(config)}
    if is_sampled(test_data) and config["eval_full_beside"]:
        full, full_cost = measured_evaluate(trainer, full_ranking_loader(config, test_data), load_best_model=False,
                                            show_progress=show_progress)
        protocol = describe_protocol(config, full=True)
        logger.info(set_color("inference cost", "blue") + f" [{protocol}]: {full_cost}")
        logger.info(set_color("test result (beside)", "yellow") + f" [protocol: {protocol}]: {full}")
        out.update(test_result_full=full, test_cost_full=full_cost.per_user(), eval_protocol_full=protocol)
    return out
