"""The candidate-list protocol (uni19 / pop19), Speeder's generative answers and the VHR / ValidRatio / HR metrics."""

from __future__ import annotations

import copy
import functools
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from recbole.data import data_preparation
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.evaluator import Collector, Evaluator
from torch.utils.data import DataLoader

import recbole_speeder.model.generative.answerer as answerer_module
from recbole_speeder.config import Config
from recbole_speeder.data.features import save_item_features
from recbole_speeder.errors import UsageError
from recbole_speeder.evaluation.metrics import rank_invalid_last
from recbole_speeder.evaluation.protocol import SeededCandidateSampler, recbole_sampler, seed_eval_candidates
from recbole_speeder.model.generative.decoding import named_candidate
from recbole_speeder.quick_start import run_recbole_speeder
from recbole_speeder.trainer import SpeederTrainer
from recbole_speeder.trainer.rng import seed_run
from recbole_speeder.utils import create_dataset, get_model

DATASET = "toyproto"
REPO = Path(__file__).resolve().parents[1]
USERS, ITEMS, LENGTH = 30, 40, 12


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    """A small sequential dataset (atomic files + random text features) that trains in seconds."""
    root = tmp_path_factory.mktemp("data")
    folder = root / DATASET
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in range(USERS):
        start = rng.integers(ITEMS)
        for step in range(LENGTH):
            item = (start + step * (user % 3 + 1) + rng.integers(2)) % ITEMS
            rows.append(f"u{user}\ti{item}\t{1_000_000 + 3600 * (user * LENGTH + step)}")
    (folder / f"{DATASET}.inter").write_text("\n".join(rows) + "\n")
    words = ["red", "blue", "lamp", "soap", "cream", "brush", "gel", "mask"]
    (folder / f"{DATASET}.item").write_text(
        "item_id:token\ttitle:token_seq\n"
        + "".join(f"i{i}\t{words[i % 8]} {words[(i // 8) % 8]} {i}\n" for i in range(ITEMS))
    )
    embedding = rng.normal(size=(ITEMS, 16)).astype(np.float32)
    save_item_features(folder, DATASET, "text", [f"i{i}" for i in range(ITEMS)], embedding, encoder="random",
                       source_sha256="toy")
    return root


@pytest.fixture(scope="module")
def toy_dict(toy_root, tmp_path_factory) -> dict:
    """Config dict of the uni19 protocol on the toy dataset; Speeder keys are ignored by RecBole's models."""
    return {
        "data_path": str(toy_root),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni19"},
        "metrics": ["Hit", "NDCG", "MRR", "VHR", "ValidRatio", "HR"],
        "topk": [1, 5, 10],
        "valid_metric": "NDCG@10",
        "MAX_ITEM_LIST_LENGTH": 8,
        "epochs": 1,
        "train_batch_size": 128,
        "show_progress": False,
        "state": "WARNING",
        "log_wandb": False,
        "eval_full_beside": False,
        "checkpoint_dir": str(tmp_path_factory.mktemp("saved")),
        "backbone_path": "tiny-random",
        "item_text_fields": ["title"],
        "modalities": ["text", "id"],
        "mpo_stages": None,
        "text_feature_file": str(toy_root / DATASET / f"{DATASET}.text_emb.npz"),
    }


def build(model: str, config_dict: dict, **overrides):
    config = Config(model, DATASET, config_dict={**config_dict, **overrides})
    seed_run(config["seed"], config["reproducibility"])
    train, valid, test = data_preparation(config, create_dataset(config))
    seed_eval_candidates(config, valid, test)
    seed_run(config["seed"], config["reproducibility"])
    return config, get_model(model)(config, train._dataset), valid, test


def evaluate_scores(config, scores: torch.Tensor, positives: torch.Tensor) -> dict:
    """RecBole's own collector and evaluator on a ``[users, items]`` score matrix with one positive per user, rows
    without a finite score (invalid answers) ranked as ``SpeederTrainer`` ranks them."""
    users = torch.arange(len(positives))
    collector = Collector(config)
    collector.eval_batch_collect(rank_invalid_last(scores.clone(), users, positives), None, users, positives)
    return Evaluator(config).evaluate(collector.get_data_struct())


def floats(result) -> dict[str, float]:
    return {key: float(value) for key, value in result.items()}


def candidate_lists(calls: list[tuple[torch.Tensor, torch.Tensor]]) -> set[tuple[int, tuple[int, ...]]]:
    """(user, sorted candidate ids) for every user of every recorded ``predict`` call."""
    lists = set()
    for users, items in calls:
        for user in users.unique().tolist():
            lists.add((user, tuple(sorted(items[users == user].tolist()))))
    return lists


def raw_sequences(toy_root: Path) -> dict[str, list[str]]:
    """Each user's item tokens in time order, read from the atomic file (the toy's time stamps never tie)."""
    lines = (toy_root / DATASET / f"{DATASET}.inter").read_text().splitlines()[1:]
    sequences: dict[str, list[str]] = {}
    for user, item, _ in sorted((line.split("\t") for line in lines), key=lambda row: (row[0], float(row[2]))):
        sequences.setdefault(user, []).append(item)
    return sequences


def loader_lists(loader) -> dict[str, list[str]]:
    """User token -> its candidate item tokens in one pass over a sampled loader, the true item first (RecBole's
    order)."""
    data = loader._dataset
    lists: dict[str, list[str]] = {}
    for interaction, *_ in loader:
        users = data.id2token(data.uid_field, interaction[data.uid_field].numpy())
        items = data.id2token(data.iid_field, interaction[data.iid_field].numpy())
        for user, item in zip(users, items, strict=True):
            lists.setdefault(user, []).append(item)
    return lists


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_match_a_direct_numpy_computation(toy_dict):
    config = Config("SASRec", DATASET, config_dict=toy_dict)
    rng = np.random.default_rng(1)
    users, items, n = 60, 50, 20
    positives = rng.integers(1, items, users)
    scores = np.full((users, items), -np.inf)
    for u in range(users):
        negatives = rng.choice(np.setdiff1d(np.arange(1, items), positives[u]), n - 1, replace=False)
        scores[u, np.r_[positives[u], negatives]] = rng.normal(size=n)
    result = evaluate_scores(config, torch.tensor(scores), torch.tensor(positives))
    rank = 1 + (scores > scores[np.arange(users), positives][:, None]).sum(axis=1)
    for k in (1, 5, 10):
        assert result[f"hit@{k}"] == pytest.approx((rank <= k).mean(), abs=1e-4)
        assert result[f"ndcg@{k}"] == pytest.approx(np.where(rank <= k, 1 / np.log2(rank + 1), 0).mean(), abs=1e-4)
        assert result[f"mrr@{k}"] == pytest.approx(np.where(rank <= k, 1 / rank, 0).mean(), abs=1e-4)
    assert result["validratio"] == 1.0 and result["vhr@1"] == result["hr@1"] == result["hit@1"]

    invalid = rng.random(users) < 0.3  # these users' answers named no candidate
    scores[invalid] = -np.inf
    result = evaluate_scores(config, torch.tensor(scores), torch.tensor(positives))
    correct = ~invalid & (scores.argmax(axis=1) == positives)
    assert result["validratio"] == pytest.approx((~invalid).mean(), abs=1e-4)
    assert result["vhr@1"] == pytest.approx(correct.mean(), abs=1e-4)
    assert result["hr@1"] == pytest.approx(correct.sum() / (~invalid).sum(), abs=1e-4)
    assert result["vhr@1"] < result["hr@1"]
    rank = np.where(invalid, np.inf, rank)  # an invalid answer is a miss at every cut-off, never a lucky tie
    for k in (1, 5, 10):
        assert result[f"hit@{k}"] == pytest.approx((rank <= k).mean(), abs=1e-4)
        assert result[f"ndcg@{k}"] == pytest.approx(np.where(rank <= k, 1 / np.log2(rank + 1), 0).mean(), abs=1e-4)
        assert result[f"mrr@{k}"] == pytest.approx(np.where(rank <= k, 1 / rank, 0).mean(), abs=1e-4)


def test_an_all_invalid_batch_is_a_miss_at_every_cutoff_in_sampled_and_full_ranking(toy_dict, monkeypatch):
    config, model, valid, _ = build("Speeder", toy_dict, predict_mode="generate", train_all_positions=False,
                                    generate_answer="label", generate_decoder="free", topk=[1, 10, 20, 30])
    monkeypatch.setattr(answerer_module, "greedy", lambda runtime, logits, state, first, *_: ([[] for _ in first], 0))
    trainer = SpeederTrainer(config, model)
    full = FullSortEvalDataLoader(config, valid._dataset, recbole_sampler(valid))
    for loader in (valid, full):  # 20 candidates: Hit@20 and Hit@30 would be 1 for any ranking of the list
        result = trainer.evaluate(loader, load_best_model=False)
        assert result["validratio"] == result["vhr@1"] == result["hr@1"] == 0
        assert [result[f"{m}@{k}"] for m in ("hit", "ndcg", "mrr") for k in (1, 10, 20, 30)] == [0] * 12


def test_llara_validity_needs_exactly_one_candidate_title_in_the_answer():
    titles = ["lip gloss", "lip gloss set", "red soap", "blue lamp"]
    assert named_candidate("red soap", titles, "llara") == 2
    assert named_candidate("i would pick red soap next", titles, "llara") == 2
    assert named_candidate("a green brush", titles, "llara") == -1  # no title
    assert named_candidate("red soap or blue lamp", titles, "llara") == -1  # two titles
    assert named_candidate("lip gloss", titles, "llara") == 0
    assert named_candidate("lip gloss set", titles, "llara") == -1  # holds "lip gloss" too: two, as in LLaRA
    assert named_candidate("red soap", ["", "red soap"], "llara") == 1  # an empty title never counts
    assert named_candidate("i would pick red soap next", titles, "exact") == -1
    assert named_candidate("red soap", titles, "exact") == 2


def test_free_text_answers_are_parsed_by_the_configured_validity_rule(toy_dict):
    answers = {}
    for rule in ("exact", "llara"):
        _, model, _, _ = build("Speeder", toy_dict, predict_mode="generate", train_all_positions=False,
                               item_repr="text", generate_decoder="free", generate_validity=rule)
        answerer = model.generative
        candidates = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
        title = functools.partial(model.prompt.item_text, model.tokenizer)
        texts = [f"i pick {title(2)} now", title(6), "nothing listed"]
        tokens = [model.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        answers[rule] = answerer._parse(model, tokens, candidates).tolist()
    assert answers == {"exact": [-1, 2, -1], "llara": [1, 2, -1]}


# ------------------------------------------------------------------------------------------------ candidates
@pytest.mark.parametrize("mode", ["uni19", "pop9"])
def test_seeded_candidates_ignore_the_global_rng_and_recbole_draws_do_not(toy_dict, mode):
    eval_args = {**toy_dict["eval_args"], "mode": mode}
    lists = {}
    for seeding in ("seeded", "recbole"):
        config, _, _, test = build("SASRec", toy_dict, eval_args=eval_args, eval_candidates=seeding)
        passes = []
        for burn in (0, 7):  # whatever ran before (epochs, validations) moved numpy's global RNG
            np.random.seed(burn)
            batches = list(test)
            passes.append(candidate_lists([(b[0][config["USER_ID_FIELD"]], b[0][config["ITEM_ID_FIELD"]])
                                           for b in batches]))
        lists[seeding] = passes
    n = int(mode[3:]) + 1
    assert len(lists["seeded"][0]) == USERS and all(len(c) == n for _, c in lists["seeded"][0])
    assert lists["seeded"][0] == lists["seeded"][1]
    assert lists["recbole"][0] != lists["recbole"][1]


@pytest.mark.parametrize("mode", ["uni19", "pop9"])
def test_exclude_history_lists_distinct_items_outside_the_history_and_recbole_does_not(toy_dict, toy_root, mode):
    """The history is everything before the evaluated item: the train items for valid, and the valid item too for
    test."""
    sequences = raw_sequences(toy_root)
    n = int(mode[3:]) + 1
    clashes = {}
    for negatives in ("exclude_history", "recbole"):
        _, _, valid, test = build("SASRec", toy_dict, eval_args={**toy_dict["eval_args"], "mode": mode},
                                  candidate_negatives=negatives)
        clashes[negatives] = 0
        for loader, step in ((valid, -2), (test, -1)):
            lists = loader_lists(loader)
            assert len(lists) == USERS
            for user, (target, *others) in lists.items():
                assert target == sequences[user][step] and len(others) == n - 1
                seen = set(sequences[user][:step]) | {target}
                clashes[negatives] += len(set(others) & seen) + len(others) - len(set(others))
    assert clashes["exclude_history"] == 0
    assert clashes["recbole"] > 0  # history items and repeats: the lists LLaRA's protocol never draws


@pytest.mark.parametrize("mode", ["uni19", "pop19"])
def test_exclude_history_draws_follow_recbole_distribution_restricted_to_allowed_items(toy_dict, toy_root, mode):
    """A row's first negative: uniform over the allowed items, or their RecBole popularity (alpha 1: the count)."""
    _, _, valid, _ = build("SASRec", toy_dict, eval_args={**toy_dict["eval_args"], "mode": mode})
    data, sampler = valid._dataset, valid._sampler.sampler  # the history-excluding sampler under the seeding
    user, target = (int(data.inter_feat[field][0]) for field in (data.uid_field, data.iid_field))
    seen = data.token2id(data.iid_field, raw_sequences(toy_root)[data.id2token(data.uid_field, user)][:-1])
    counts = np.bincount(recbole_sampler(valid).dataset.inter_feat[data.iid_field].numpy(), minlength=data.item_num)
    allowed = np.ones(data.item_num)
    allowed[[0, *seen]] = 0  # the padding item, the history and the target (the valid row's target is seq[-2])
    expected = {"uni19": allowed, "pop19": allowed * counts}
    expected = {name: weights / weights.sum() for name, weights in expected.items()}
    np.random.seed(0)
    draws = 20_000
    first = [int(sampler.sample_by_user_ids([user], [target], 1)) for _ in range(draws)]
    observed = np.bincount(first, minlength=data.item_num) / draws
    distance = {name: 0.5 * np.abs(observed - p).sum() for name, p in expected.items()}
    assert distance[mode] < 0.03 and max(distance.values()) > 0.05  # total variation, with 20k draws ~0.01


def test_eval_users_keeps_the_same_seeded_users_with_the_lists_the_full_run_gives_them(toy_dict, tmp_path, monkeypatch):
    """A budget protocol for slow answers: a sample of users, the same for every model, each with its own list."""
    from recbole_speeder.quick_start import build_data_and_model

    monkeypatch.chdir(tmp_path)
    loaders = {}
    for name, overrides in (("all", {}), ("SASRec", {"eval_users": 9}), ("Speeder", {"eval_users": 9}),
                            ("other seed", {"eval_users": 9, "seed": 7}), ("too many", {"eval_users": 99})):
        config = Config("Speeder" if name == "Speeder" else "SASRec", DATASET, config_dict={**toy_dict, **overrides})
        _, (_, valid, test), _ = build_data_and_model(config)
        loaders[name] = {"valid": loader_lists(valid), "test": loader_lists(test)}
    full = loaders["all"]
    assert len(full["test"]) == USERS and loaders["too many"] == full
    for phase in ("valid", "test"):
        kept = loaders["SASRec"][phase]
        assert len(kept) == 9 and set(kept) == set(loaders["Speeder"][phase]) == set(loaders["SASRec"]["test"])
        assert kept == loaders["Speeder"][phase] == {user: full[phase][user] for user in kept}
    assert set(loaders["other seed"]["test"]) != set(loaders["SASRec"]["test"])


def draw_negatives(sampler, users: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A DataLoader ``collate_fn``: the users of a batch and their 19 negatives, drawn in a worker process."""
    ids = torch.tensor(users)
    return ids, sampler.sample_by_user_ids(ids, torch.ones_like(ids), 19)


def test_seeded_sampler_pickles_copies_and_draws_the_same_lists_in_spawned_workers(toy_dict):
    _, _, _, test = build("SASRec", toy_dict)
    seeded = test._sampler
    assert isinstance(seeded, SeededCandidateSampler)
    users = torch.arange(1, USERS + 1)
    drawn = seeded.sample_by_user_ids(users, torch.ones_like(users), 19)
    for clone in (pickle.loads(pickle.dumps(seeded)), copy.copy(seeded), copy.deepcopy(seeded)):
        assert (clone.seed, clone.phase) == (seeded.seed, "test")
        assert torch.equal(clone.sample_by_user_ids(users, torch.ones_like(users), 19), drawn)
    # spawned workers (the start method on macOS and Windows, and of CUDA users) get a pickled copy of the sampler
    workers = DataLoader(users.tolist(), batch_size=4, collate_fn=functools.partial(draw_negatives, seeded),
                         num_workers=2, multiprocessing_context="spawn")
    batches = list(workers)
    assert len(batches) == -(-USERS // 4)
    for ids, negatives in batches:
        assert torch.equal(negatives, draw_negatives(seeded, ids.tolist())[1])


def test_every_model_scores_the_same_candidates_and_constrained_answers_are_all_valid(toy_dict, monkeypatch, tmp_path):
    """SASRec, BERT4Rec (two epochs: more validation draws) and generative Speeder through the run script."""
    calls: dict[str, list] = {}
    for name in ("SASRec", "BERT4Rec", "Speeder"):
        cls = get_model(name)
        original = cls.predict

        def recording(self, interaction, _original=original, _name=name):
            calls.setdefault(_name, []).append((interaction[self.USER_ID].cpu(), interaction[self.ITEM_ID].cpu()))
            return _original(self, interaction)

        monkeypatch.setattr(cls, "predict", recording)
    monkeypatch.chdir(tmp_path)  # RecBole writes log/ and log_tensorboard/ into the working directory
    results = {
        "SASRec": run_recbole_speeder("SASRec", DATASET, config_dict=toy_dict, saved=False),
        "BERT4Rec": run_recbole_speeder("BERT4Rec", DATASET, config_dict={**toy_dict, "epochs": 2}, saved=False),
        "Speeder": run_recbole_speeder("Speeder", DATASET, saved=False, config_dict={
            **toy_dict, "predict_mode": "generate", "train_all_positions": False, "eval_full_beside": True}),
    }
    lists = {name: candidate_lists(recorded) for name, recorded in calls.items()}
    assert len(lists["SASRec"]) == 2 * USERS  # a valid and a test list per user, the same at every validation
    assert lists["SASRec"] == lists["BERT4Rec"] == lists["Speeder"]
    assert all(len(set(items)) == 20 for _, items in lists["SASRec"])  # distinct (candidate_negatives default)

    speeder = results["Speeder"]
    assert speeder["test_result"]["validratio"] == 1.0
    assert speeder["test_result"]["vhr@1"] == speeder["test_result"]["hit@1"]
    assert "uni19: 20 candidates" in speeder["eval_protocol"] and "constrained" in speeder["eval_protocol"]
    assert speeder["test_cost"]["prompt_tokens"] > 20 and speeder["test_cost"]["generated_tokens"] == 0
    assert speeder["test_result_full"]["validratio"] == 1.0  # full ranking beside: top-20 retrieved, then answered


@pytest.mark.parametrize("mode", ["uni19", "full"])
def test_sasrec_through_the_run_script_equals_recbole_own_run(toy_dict, monkeypatch, tmp_path, mode):
    """With the plugin's protocol switches at RecBole's behaviour (eval_exclude_history off by default)."""
    from recbole.quick_start import run_recbole

    monkeypatch.chdir(tmp_path)
    # the same settings for both: the plugin's overall.yaml (e.g. train_neg_sample_args: ~), then the toy protocol
    overall = yaml.safe_load((Path(__file__).resolve().parents[1] / "properties" / "overall.yaml").read_text())
    same = {**overall, **toy_dict, "eval_candidates": "recbole", "candidate_negatives": "recbole",
            "metrics": ["Hit", "NDCG", "MRR"], "eval_args": {**toy_dict["eval_args"], "mode": mode}}
    ours = run_recbole_speeder("SASRec", DATASET, config_dict=same, saved=False)
    monkeypatch.setattr(sys, "argv", ["run_recbole"])  # RecBole's Config parses --key=value flags from sys.argv
    theirs = run_recbole("SASRec", DATASET, config_dict=same, saved=False)
    assert ours["test_result"]["hit@1"] == theirs["test_result"]["hit@1"]
    assert dict(ours["test_result"]) == dict(theirs["test_result"])
    assert dict(ours["best_valid_result"]) == dict(theirs["best_valid_result"])


def test_eval_exclude_history_never_ranks_a_seen_item(toy_root, toy_dict, monkeypatch, tmp_path):
    """Every valid and test row loses exactly the items its user saw before the evaluated one (the evaluated item
    itself never), read beyond the MAX_ITEM_LIST_LENGTH window; scores there are -inf for any model, and each
    user's rank can only improve against the same model ranking every item."""
    from recbole_speeder.evaluation.protocol import exclude_history
    from recbole_speeder.quick_start import load_model
    from recbole_speeder.utils import get_trainer

    full = {**toy_dict, "eval_args": {**toy_dict["eval_args"], "mode": "full"}, "eval_exclude_history": True}
    config = Config("SASRec", DATASET, config_dict=full)
    data = create_dataset(config)
    _, valid, test = exclude_history(config, data, *data_preparation(config, data))
    sequences = raw_sequences(toy_root)
    assert LENGTH - 2 > config["MAX_ITEM_LIST_LENGTH"]  # the valid row's history is longer than its window
    for loader, back in ((valid, 2), (test, 1)):
        for interaction, (rows, items), _, positive_i in loader:
            for row in range(len(interaction)):
                user = sequences[data.id2token("user_id", int(interaction["user_id"][row]))]
                target = data.id2token("item_id", int(positive_i[row]))
                assert target == user[-back]
                expected = set(user[:-back]) - {target}
                assert set(data.id2token("item_id", items[rows == row].numpy())) == expected

    monkeypatch.chdir(tmp_path)
    trained = run_recbole_speeder("SASRec", DATASET, config_dict=full)
    assert "each user's history items excluded" in trained["eval_protocol"]
    config, model, _, _, _, test = load_model(trained["checkpoint"])
    trainer = get_trainer(config["MODEL_TYPE"], "SASRec")(config, model)
    excluded = trainer.evaluate(test, load_best_model=False)
    assert floats(excluded) == floats(trained["test_result"])
    batch = next(iter(test))
    with torch.no_grad():
        _, scores, positive_u, positive_i = trainer._full_sort_batch_eval(batch)
    rows, items = batch[1]
    assert len(items) and torch.isinf(scores[rows, items]).all()
    assert torch.isfinite(scores[positive_u, positive_i]).all()
    config, model, _, _, _, test = load_model(trained["checkpoint"], {"eval_exclude_history": False})
    every = get_trainer(config["MODEL_TYPE"], "SASRec")(config, model).evaluate(test, load_best_model=False)
    assert all(excluded[k] >= every[k] for k in every) and any(excluded[k] > every[k] for k in every)


@pytest.mark.parametrize("mode", ["full", "uni19"])
def test_speeder_evaluation_without_the_matrix_equals_recbole_dense_path(toy_dict, monkeypatch, mode):
    """A tiny Speeder's valid metrics, history excluded, with 7-item chunks, against the same trainer ranking the
    dense ``[users x items]`` scores; a metric that needs every score (GAUC) takes the dense path by itself."""
    from recbole_speeder.evaluation.protocol import exclude_history
    from recbole_speeder.trainer import SpeederTrainer
    from recbole_speeder.utils import create_dataset

    overrides = {"eval_args": {**toy_dict["eval_args"], "mode": mode}, "eval_exclude_history": mode == "full",
                 "metrics": ["Hit", "NDCG", "MRR", "ShannonEntropy"], "ranking_chunk_size": 7,
                 "metric_decimal_place": 12}
    config, model, valid, _ = build("Speeder", toy_dict, **overrides)
    full = create_dataset(config)
    data_preparation(config, full)  # builds it: the histories are read from its interaction tensors
    (valid,) = exclude_history(config, full, valid)
    trainer = SpeederTrainer(config, model)
    assert trainer._ranks_sparsely()
    sparse = floats(trainer.evaluate(valid, load_best_model=False))
    monkeypatch.setattr(SpeederTrainer, "_ranks_sparsely", lambda self: False)
    dense = floats(trainer.evaluate(valid, load_best_model=False))
    assert sparse == dense and sparse["hit@10"] > 0
    monkeypatch.undo()
    gauc = {**overrides, "metrics": ["GAUC"], "valid_metric": "GAUC"}
    gauc = SpeederTrainer(*build("Speeder", toy_dict, **gauc)[:2])
    assert not gauc._ranks_sparsely()


FULL = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"}


@pytest.mark.parametrize(("model", "overrides", "expected"), [
    ("SASRec", {"eval_args": FULL}, 5),  # 5 users x 41 items fit the budget, 6 do not
    ("SASRec", {"eval_args": FULL, "eval_batch_size": 1024}, 1024),  # set by the user: kept
    ("Speeder", {"eval_args": FULL, "metrics": ["Hit", "NDCG"]}, 1024),  # ranks in item chunks: the default stays
    ("Speeder", {"eval_args": FULL}, 5),  # VHR reads every score: a [users x items] matrix
    ("SASRec", {}, 20),  # uni19: never less than one candidate list
], ids=["recbole-full", "user-set", "speeder-chunks", "speeder-dense", "recbole-uni19"])
def test_an_unset_eval_batch_size_is_fitted_to_the_catalogue_where_a_batch_scores_every_item(
        toy_dict, caplog, model, overrides, expected):
    """``eval_scores_per_batch`` bounds a batch's [users x items] scores when ``eval_batch_size`` is not set, and
    the metrics do not depend on it."""
    from recbole_speeder.quick_start import build_data_and_model
    from recbole_speeder.utils import get_trainer

    settings = {**toy_dict, "eval_scores_per_batch": 6 * (ITEMS + 1) - 1, **overrides}
    config = Config(model, DATASET, config_dict=settings)
    with caplog.at_level("INFO"):
        _, (_, valid, _), recommender = build_data_and_model(config)
    assert config["eval_batch_size"] == expected
    assert (f"eval_batch_size: {expected} (not set" in caplog.text) == (expected != 1024)
    if overrides.get("eval_args") is FULL:
        assert max(batch[0].length for batch in valid) == min(expected, USERS)
    if expected < USERS and overrides.get("eval_args") is FULL:
        fitted = get_trainer(config["MODEL_TYPE"], model)(config, recommender).evaluate(valid, load_best_model=False)
        config = Config(model, DATASET, config_dict={**settings, "eval_batch_size": 1024})
        _, (_, valid, _), recommender = build_data_and_model(config)
        whole = get_trainer(config["MODEL_TYPE"], model)(config, recommender).evaluate(valid, load_best_model=False)
        assert fitted == whole


def test_retest_reproduces_a_runs_test_and_tests_the_checkpoint_under_other_keys(toy_dict, tmp_path, monkeypatch,
                                                                                  capsys):
    """A RecBole and a Speeder checkpoint tested again: the run's own result, then another decoder and user sample."""
    from recbole_speeder.experiments.retest import main, retest

    monkeypatch.chdir(tmp_path)
    saved = {**toy_dict, "checkpoint_dir": str(tmp_path / "saved")}
    runs = {
        "SASRec": run_recbole_speeder("SASRec", DATASET, config_dict=saved),
        "Speeder": run_recbole_speeder("Speeder", DATASET, config_dict={
            **saved, "predict_mode": "generate", "train_all_positions": False}),
    }
    checkpoints = {"SASRec": next((tmp_path / "saved").glob("SASRec-*.pth")),
                   "Speeder": next((tmp_path / "saved").glob("Speeder-*[0-9].safetensors"))}
    for name, checkpoint in checkpoints.items():
        again = retest(str(checkpoint), {})
        assert again["model"] == name and dict(again["test_result"]) == dict(runs[name]["test_result"])
        assert again["eval_protocol"] == runs[name]["eval_protocol"]
    # metrics that read the training data's statistics, which fit() collects and a retest has not run
    popularity = retest(str(checkpoints["SASRec"]), {"metrics": ["NDCG", "AveragePopularity", "TailPercentage"],
                                                     "tail_ratio": 2})["test_result"]
    assert popularity["ndcg@10"] == runs["SASRec"]["test_result"]["ndcg@10"]
    assert popularity["averagepopularity@10"] > 0 and 0 <= popularity["tailpercentage@10"] <= 1

    out = tmp_path / "free.json"
    free = main([str(checkpoints["Speeder"]), "--generate_decoder=free", "--eval_users=7", f"--out={out}"])
    assert "free decoder" in free["eval_protocol"] and "at most 7 users drawn with seed 2020" in free["eval_protocol"]
    assert free["test_cost"]["generated_tokens"] > 0 and 0 <= free["test_result"]["validratio"] <= 1
    assert json.loads(out.read_text())["test_result"] == {k: float(v) for k, v in free["test_result"].items()}
    capsys.readouterr()
    for flags in (["--eval_users=many"], ["eval_users=7"]):
        with pytest.raises(SystemExit) as stop:
            main([str(checkpoints["SASRec"]), *flags])
        assert stop.value.code == 2
    assert [line.startswith("error: ") for line in capsys.readouterr().err.splitlines()] == [True, True]
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.pth")])


def test_the_popularity_prior_probe_reranks_a_trained_speeder_by_its_training_counts(toy_dict, tmp_path,
                                                                                     monkeypatch):
    """research/popularity_prior.py: beta 0 is the run's own ranking; a large beta ranks by popularity alone."""
    monkeypatch.chdir(tmp_path)
    full = {**toy_dict, "checkpoint_dir": str(tmp_path / "saved"), "metrics": ["Hit", "NDCG"],
            "eval_args": {**toy_dict["eval_args"], "mode": "full"}}
    run = run_recbole_speeder("Speeder", DATASET, config_dict=full)
    checkpoint = next((tmp_path / "saved").glob("Speeder-*[0-9].safetensors"))
    out = tmp_path / "prior.json"
    done = subprocess.run([sys.executable, str(REPO / "research" / "popularity_prior.py"), str(checkpoint),
                           "--betas=0,100", f"--out={out}"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    prior = json.loads(out.read_text())
    assert prior["valid"]["0.0"]["ndcg@10"] == pytest.approx(run["best_valid_result"]["ndcg@10"])
    assert prior["valid"]["100.0"]["averagepopularity@10"] > prior["valid"]["0.0"]["averagepopularity@10"]
    assert "0.0" in prior["test"]


@pytest.mark.parametrize("metrics", [["Hit", "NDCG"], ["Hit", "NDCG", "VHR"]], ids=["chunked-ranking", "score-matrix"])
def test_slices_split_the_full_ranking_test_by_target_popularity_and_pair_each_run_with_the_first(
        toy_root, toy_dict, tmp_path, monkeypatch, capsys, metrics):
    """Two runs' test users by slice: RecBole's own full-ranking numbers over all users, slices that partition them
    by the target's training count (every interaction but the valid and test targets) and paired differences.
    Ranking metrics alone let Speeder rank in item chunks; VHR needs every score, so it scores a matrix."""
    from recbole_speeder.experiments.slices import POPULARITY_EDGES, bucket_labels, main

    monkeypatch.chdir(tmp_path)
    saved = {**toy_dict, "checkpoint_dir": str(tmp_path / "saved"), "eval_full_beside": True, "metrics": metrics}
    runs = {"sasrec": run_recbole_speeder("SASRec", DATASET, config_dict=saved),
            "speeder": run_recbole_speeder("Speeder", DATASET, config_dict=saved)}
    checkpoints = [f"sasrec={next((tmp_path / 'saved').glob('SASRec-*.pth'))}",
                   f"speeder={next((tmp_path / 'saved').glob('Speeder-*[0-9].safetensors'))}"]
    out = tmp_path / "slices.json"
    report = main([*checkpoints, f"--out={out}"])
    assert json.loads(out.read_text()) == report
    for name, run in runs.items():  # the ranks reproduce the run's full-ranking test
        assert report["recbole_results"][name]["ndcg@10"] == pytest.approx(run["test_result_full"]["ndcg@10"])

    # independently: each user's last interaction is the test target, the one before the valid target
    rows = [line.split("\t") for line in (toy_root / DATASET / f"{DATASET}.inter").read_text().splitlines()[1:]]
    by_user: dict[str, list] = {}
    for user, item, stamp in rows:
        by_user.setdefault(user, []).append((float(stamp), item))
    histories = [[item for _, item in sorted(events)] for events in by_user.values()]
    trained = [item for items in histories for item in items[:-2]]
    counts = np.array([trained.count(items[-1]) for items in histories])
    expected = dict(zip(*np.unique(bucket_labels(counts, POPULARITY_EDGES), return_counts=True), strict=True))
    table = [line.split(" | ") for line in report["by_target_popularity"][2:]]
    got = {cells[0].lstrip("| "): int(cells[1]) for cells in table}
    assert got.pop("all") == USERS and got == expected
    all_row = table[-1]
    sasrec, speeder = float(all_row[2]), float(all_row[3].split(" (")[0])
    difference = float(all_row[3].split("(")[1].split(" ± ")[0])
    assert sasrec == pytest.approx(runs["sasrec"]["test_result_full"]["ndcg@10"], abs=1e-4)
    assert difference == pytest.approx(speeder - sasrec, abs=2e-4)
    assert "history length" in capsys.readouterr().out

    with pytest.raises(SystemExit) as stop:
        main(checkpoints[:1])
    assert stop.value.code == 2 and "at least two checkpoints" in capsys.readouterr().err


def test_slices_combine_gives_each_slices_mean_and_std_over_seed_reports(tmp_path, capsys):
    """``--combine``: per slice, each model's mean ± sample std over the reports, and later models as a multiple of
    the first; reports that slice other users are refused."""
    from recbole_speeder.experiments.slices import (
        HISTORY_EDGES,
        Ranked,
        bucket_labels,
        bucket_order,
        main,
        per_user_metrics,
        slice_means,
    )

    rng = np.random.default_rng(0)
    history = rng.integers(1, 30, 200)
    labels = bucket_labels(history, HISTORY_EDGES)

    def run() -> Ranked:
        return Ranked(np.arange(200), np.arange(200), history, rng.integers(0, 11, 200), np.zeros(1), {})

    seeds = [{"base": run(), "other": run()} for _ in range(3)]
    paths = []
    for i, runs in enumerate(seeds):
        paths.append(tmp_path / f"seed{i}.json")
        metrics = {name: per_user_metrics(run.ranks) for name, run in runs.items()}
        paths[-1].write_text(json.dumps({"slices": {"history length": slice_means(metrics, labels,
                                                                                    bucket_order(HISTORY_EDGES))}}))
    lines = main(["--combine", *map(str, paths)])["combined"]
    assert lines == capsys.readouterr().out.strip().splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ") for line in lines[2:]}
    assert set(rows) == {*labels, "all"} and int(rows["all"][1]) == 200
    label = labels[0]
    ndcg = {name: [np.where(r[name].ranks < 10, 1 / np.log2(r[name].ranks + 2.0), 0)[labels == label].mean()
                   for r in seeds] for name in ("base", "other")}
    for column, name in ((2, "base"), (3, "other")):  # the ndcg@10 columns
        assert rows[label][column].startswith(f"{np.mean(ndcg[name]):.4f} ± {np.std(ndcg[name], ddof=1):.4f}")
    assert rows[label][3].endswith(f"({np.mean(ndcg['other']) / np.mean(ndcg['base']):.2f}x)")

    shifted = json.loads(paths[0].read_text())
    shifted["slices"]["history length"]["all"]["users"] += 1
    paths[0].write_text(json.dumps(shifted))
    with pytest.raises(SystemExit) as stop:
        main(["--combine", *map(str, paths)])
    assert stop.value.code == 2 and "other users" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ generative
@pytest.fixture(scope="module")
def free_speeder(toy_dict):
    config, model, valid, _ = build("Speeder", toy_dict, predict_mode="generate", train_all_positions=False,
                                    generate_answer="label", generate_decoder="free")
    return config, model, valid


def test_an_invalid_free_answer_counts_as_a_miss(free_speeder, monkeypatch):
    config, model, _ = free_speeder
    model.eval()
    tokenizer = model.tokenizer
    candidates = torch.stack([torch.randperm(model.n_items - 1)[:20] + 1 for _ in range(3)])
    truth_slot = torch.tensor([0, 3, 7])
    answers = [" A.", " zz", " C"]  # right; names no candidate; a wrong candidate
    monkeypatch.setattr(answerer_module, "greedy", lambda *_: (
        [tokenizer(text, add_special_tokens=False)["input_ids"] for text in answers], 3))
    item_seq = torch.randint(1, model.n_items, (3, config["MAX_ITEM_LIST_LENGTH"]))
    with torch.no_grad():
        scores = model.generative.answer_scores(model, item_seq, torch.full((3,), item_seq.shape[1]), None, candidates)
    assert torch.isinf(scores[1]).all() and torch.isfinite(scores[[0, 2]]).all()
    assert scores[0].argmax() == 0 and scores[2].argmax() == 2
    matrix = torch.full((3, model.n_items), float("-inf")).scatter(1, candidates, scores)
    result = evaluate_scores(config, matrix, candidates[torch.arange(3), truth_slot])
    assert result["validratio"] == pytest.approx(2 / 3, abs=1e-4)
    assert result["vhr@1"] == pytest.approx(1 / 3, abs=1e-4)
    assert result["hr@1"] == pytest.approx(1 / 2, abs=1e-4)


def test_item_token_answers_choose_among_every_word_and_item_and_only_a_listed_one_is_valid(toy_dict, monkeypatch):
    config, model, valid, _ = build("Speeder", toy_dict, predict_mode="generate", train_all_positions=False,
                                    generate_answer="item", generate_copy="none", generate_decoder="free")
    answerer = model.generative
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    candidates = torch.tensor([[5, 9, 13], [5, 9, 13], [5, 9, 13]])
    item_seq = torch.randint(1, model.n_items, (3, config["MAX_ITEM_LIST_LENGTH"]))
    model.eval()
    with torch.no_grad():  # the extended vocabulary: every word, then items 1..n-1, scored by the score head
        last = torch.randn(3, model.d_model)
        logits = answerer._answer_logits(model, last, model.item_tokens())
        expected = model.head.users(last) @ model.item_vectors(model.item_tokens())[1:].T
    assert logits.shape == (3, vocab + model.n_items - 1)
    assert torch.allclose(logits[:, vocab:], expected, atol=1e-5)

    designed = torch.zeros(3, vocab + model.n_items - 1)
    designed[0, vocab + 9 - 1] = 5.0  # item 9, listed second
    designed[1, 17] = 5.0  # a word
    designed[2, vocab + 20 - 1] = 5.0  # item 20, not listed
    monkeypatch.setattr(answerer, "_answer_logits", lambda *_: designed.clone())
    with torch.no_grad():
        free = answerer.answer_scores(model, item_seq, torch.full((3,), item_seq.shape[1]), None, candidates)
        answerer.decoder = "constrained"
        constrained = answerer.answer_scores(model, item_seq, torch.full((3,), item_seq.shape[1]), None, candidates)
    assert free[0].argmax() == 1 and free[0, 1] == 1.0 and torch.isinf(free[1:]).all()
    assert torch.equal(free[0, [0, 2]], constrained[0, [0, 2]])
    assert torch.isfinite(constrained).all() and constrained[2].unique().numel() == 1  # all three tie below item 20

    answerer.decoder = "free"
    model.train()
    monkeypatch.undo()
    batch = next(iter(valid))[0]
    loss = model.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.head[1].weight.grad is not None
    model.zero_grad()
    _, text, _, _ = build("Speeder", toy_dict, predict_mode="generate", train_all_positions=False, item_repr="text")
    assert text.generative.answer == "title" and text.generative.copy_bias is None  # item answers are MRC mode's


def test_the_copy_bias_lifts_only_listed_items_trains_with_the_head_and_makes_free_answers_listed(toy_dict):
    config, model, valid, _ = build("Speeder", toy_dict, predict_mode="generate", train_all_positions=False,
                                    generate_decoder="free")  # item answers with the copy bias: the defaults
    answerer, bias = model.generative, model.generative.copy_bias
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    candidates = torch.tensor([[5, 9, 13], [2, 9, 4]])
    listed = torch.zeros(2, vocab + model.n_items - 1, dtype=torch.bool)
    listed.scatter_(1, vocab + candidates - 1, True)
    model.eval()
    last = torch.randn(2, model.d_model)
    with torch.no_grad():
        copied = answerer._answer_logits(model, last, model.item_tokens(), candidates)
        answerer.copy_bias = None
        plain = answerer._answer_logits(model, last, model.item_tokens(), candidates)
        answerer.copy_bias = bias
    lift = copied - plain
    assert torch.all(lift[~listed] == 0)
    assert torch.allclose(lift[listed], torch.tensor(math.log(vocab + model.n_items - 1)))

    model.train()
    batch = next(iter(valid))[0]
    model.calculate_loss(batch).backward()
    assert bias.grad is not None and bias.grad != 0
    assert id(bias) in {id(p) for p in model.parameter_groups()["head"]}
    model.zero_grad()

    model.eval()
    with torch.no_grad():  # a large enough lift: every free answer is a listed item, the constrained decoder's
        bias.fill_(1e4)
        seq = torch.randint(1, model.n_items, (2, config["MAX_ITEM_LIST_LENGTH"]))
        lengths = torch.full((2,), seq.shape[1])
        free = answerer.answer_scores(model, seq, lengths, None, candidates)
        answerer.decoder = "constrained"
        constrained = answerer.answer_scores(model, seq, lengths, None, candidates)
    assert torch.isfinite(free).all() and torch.equal(free.argmax(dim=1), constrained.argmax(dim=1))
    _, labels, _, _ = build("Speeder", toy_dict, predict_mode="generate", generate_answer="label")
    assert labels.generative.copy_bias is None  # a copy bonus is for item answers


def test_training_prompts_list_the_true_item_among_seeded_shuffled_negatives(free_speeder):
    config, model, _ = free_speeder
    answerer = model.generative
    targets = torch.randint(1, model.n_items, (64,))
    draws = []
    for _ in range(2):
        answerer.training_candidates.generator.manual_seed(config["seed"])
        draws.append(answerer.training_candidates(targets))
    (candidates, slot), (again, slot_again) = draws
    assert torch.equal(candidates, again) and torch.equal(slot, slot_again)
    assert candidates.shape == (64, 20)
    assert torch.equal(candidates[torch.arange(64), slot], targets)
    assert ((candidates == targets.unsqueeze(1)).sum(dim=1) == 1).all()
    assert len(slot.unique()) > 5  # the true item's label varies


def test_generative_training_step_and_free_decoding_run(free_speeder):
    config, model, valid = free_speeder
    model.train()
    batch = next(iter(valid))[0]
    loss = model.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in model.mrc.parameters())
    model.eval()
    before = model.generative.generated_tokens
    with torch.no_grad():
        scores = model.predict(batch)
    assert scores.shape == (len(batch),) and model.generative.generated_tokens > before
    model.zero_grad()


def test_text_mode_title_scores_equal_a_direct_forward(toy_dict):
    """Cache, attention masks (padding, SPAE's distance bias) and positions of the decoding path agree with one plain
    forward per candidate."""
    config, model, _, _ = build("Speeder", toy_dict, predict_mode="generate", train_all_positions=False,
                                item_repr="text", autocast_dtype="float32")  # the reference runs in float32
    model.eval()
    model.spae.distance_bias.data.normal_(std=0.5)  # it starts at zero
    answerer = model.generative
    item_seq = torch.tensor([[3, 5, 7, 0, 0, 0, 0, 0], [2, 4, 6, 8, 10, 12, 14, 16]])
    item_seq_len = torch.tensor([3, 8])
    candidates = torch.tensor([[1, 9, 11], [13, 15, 17]])
    with torch.no_grad():
        scores = answerer.answer_scores(model, item_seq, item_seq_len, None, candidates)
        prompt = answerer._prompt(model, item_seq, item_seq_len, None, model.item_tokens(), candidates)
        embeds, items, lengths = prompt.dense(), prompt.items, prompt.lengths
        prefix = model.llm.get_input_embeddings()(model.prompt.prefix_ids).float()
        for row in range(2):
            for slot, item in enumerate(candidates[row].tolist()):
                answer, length = answerer._answer_tokens(model, torch.tensor([item]), torch.zeros(1, dtype=torch.long))
                answer = answer[0, : int(length)]
                tokens = model.llm.get_input_embeddings()(answer[:-1]).float()
                sequence = torch.cat([prefix, embeds[row, : lengths[row]], tokens]).unsqueeze(0)
                answer_items = items[row, lengths[row] - 1].expand(len(tokens))  # after the history, like the list
                slot_items = torch.cat([items[row, : lengths[row]], answer_items]).unsqueeze(0)
                mask = model.runtime.attention_mask(slot_items, sequence.shape[1])
                hidden = model.llm.get_decoder()(inputs_embeds=sequence, attention_mask=mask).last_hidden_state
                hidden = hidden[0, -len(answer):]
                logprobs = answerer._lm_logits(model, hidden).log_softmax(dim=-1)
                expected = logprobs.gather(1, answer.unsqueeze(1)).mean()
                assert scores[row, slot] == pytest.approx(float(expected), abs=1e-4)


def test_score_mode_predict_runs_one_prompt_per_user_and_agrees_with_full_sort(toy_dict):
    _, model, valid, _ = build("Speeder", toy_dict)
    model.eval()
    batch = next(iter(valid))[0]
    with torch.no_grad():
        before = model.prompt.stats["samples"]
        pointwise = model.predict(batch)
        assert model.prompt.stats["samples"] - before == len(batch) // 20
        full = model.full_sort_predict(batch)
    assert torch.allclose(full[torch.arange(len(batch)), batch[model.ITEM_ID]], pointwise, atol=1e-5)


def test_protocol_mistakes_are_one_line_usage_errors(toy_dict):
    generate = {"predict_mode": "generate", "train_all_positions": False}
    with pytest.raises(UsageError, match="predict_mode: expected one of score, generate"):
        build("Speeder", toy_dict, predict_mode="beam")
    with pytest.raises(UsageError, match="eval_batch_size >= 20"):
        build("Speeder", toy_dict, eval_batch_size=10, **generate)
    with pytest.raises(UsageError, match="letters has 26 labels"):  # 30 > 40 items - 11 in a history: not LLaRA's
        build("Speeder", toy_dict, eval_args={**toy_dict["eval_args"], "mode": "uni29"},
              candidate_negatives="recbole", **generate)
    with pytest.raises(UsageError, match="eval_candidates: expected one of seeded, recbole"):
        build("SASRec", toy_dict, eval_candidates="fixed")
    with pytest.raises(UsageError, match="candidate_negatives: expected one of exclude_history, recbole"):
        build("SASRec", toy_dict, candidate_negatives="llara")
    with pytest.raises(UsageError, match=r"eval_batch_size \(10\) is smaller than one valid candidate list \(20 "):
        build("SASRec", toy_dict, eval_batch_size=10)
    with pytest.raises(UsageError, match=r"exclude_history needs 35 distinct negatives outside each user's history, "
                                         r"but user 'u0' has 30 left for its valid list \(9 history items and the "
                                         r"target excluded from 40 uniform items\)"):
        build("SASRec", toy_dict, eval_args={**toy_dict["eval_args"], "mode": "uni35"})
    with pytest.raises(UsageError, match="generate_validity: llara .* needs item_repr: text"):
        build("Speeder", toy_dict, generate_validity="llara", generate_decoder="free", **generate)
    with pytest.raises(UsageError, match="generate_validity: expected one of exact, llara"):
        build("Speeder", toy_dict, generate_validity="fuzzy", **generate)
    _, model, _, _ = build("Speeder", toy_dict, **generate)
    with pytest.raises(UsageError, match="are not single, distinct tokens"):
        model.generative._single_tokens([*"ABCDEFGHIJKLMNOPQRS", "antidisestablishmentarianism"], "custom")
