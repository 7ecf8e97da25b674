"""The candidate-list protocol (uni19 / pop19), Speeder's generative answers and the VHR / ValidRatio / HR metrics."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from recbole.data import data_preparation
from recbole.evaluator import Collector, Evaluator
from recbole.utils import init_seed

from recbole_speeder.config import Config
from recbole_speeder.data.features import save_item_features
from recbole_speeder.errors import UsageError
from recbole_speeder.protocol import seed_eval_candidates
from recbole_speeder.quick_start import run_recbole_speeder
from recbole_speeder.utils import create_dataset, get_model

DATASET = "toyproto"
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
    init_seed(config["seed"], config["reproducibility"])
    train, valid, test = data_preparation(config, create_dataset(config))
    seed_eval_candidates(config, valid, test)
    init_seed(config["seed"], config["reproducibility"])
    return config, get_model(model)(config, train._dataset), valid, test


def evaluate_scores(config, scores: torch.Tensor, positives: torch.Tensor) -> dict:
    """RecBole's own collector and evaluator on a ``[users, items]`` score matrix with one positive per user."""
    collector = Collector(config)
    collector.eval_batch_collect(scores, None, torch.arange(len(positives)), positives)
    return Evaluator(config).evaluate(collector.get_data_struct())


def candidate_lists(calls: list[tuple[torch.Tensor, torch.Tensor]]) -> set[tuple[int, tuple[int, ...]]]:
    """(user, sorted candidate ids) for every user of every recorded ``predict`` call."""
    lists = set()
    for users, items in calls:
        for user in users.unique().tolist():
            lists.add((user, tuple(sorted(items[users == user].tolist()))))
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

    speeder = results["Speeder"]
    assert speeder["test_result"]["validratio"] == 1.0
    assert speeder["test_result"]["vhr@1"] == speeder["test_result"]["hit@1"]
    assert "uni19: 20 candidates" in speeder["eval_protocol"] and "constrained" in speeder["eval_protocol"]
    assert speeder["test_cost"]["prompt_tokens"] > 20 and speeder["test_cost"]["generated_tokens"] == 0
    assert speeder["test_result_full"]["validratio"] == 1.0  # full ranking beside: top-20 retrieved, then answered


def test_sasrec_uni19_through_the_run_script_equals_recbole_own_run(toy_dict, monkeypatch, tmp_path):
    from recbole.quick_start import run_recbole

    monkeypatch.chdir(tmp_path)
    # the same settings for both: the plugin's overall.yaml (e.g. train_neg_sample_args: ~), then the toy protocol
    overall = yaml.safe_load((Path(__file__).resolve().parents[1] / "properties" / "overall.yaml").read_text())
    same = {**overall, **toy_dict, "eval_candidates": "recbole", "metrics": ["Hit", "NDCG", "MRR"]}
    ours = run_recbole_speeder("SASRec", DATASET, config_dict=same, saved=False)
    monkeypatch.setattr(sys, "argv", ["run_recbole"])  # RecBole's Config parses --key=value flags from sys.argv
    theirs = run_recbole("SASRec", DATASET, config_dict=same, saved=False)
    assert ours["test_result"]["hit@1"] == theirs["test_result"]["hit@1"]
    assert dict(ours["test_result"]) == dict(theirs["test_result"])
    assert dict(ours["best_valid_result"]) == dict(theirs["best_valid_result"])


# ------------------------------------------------------------------------------------------------ generative
@pytest.fixture(scope="module")
def free_speeder(toy_dict):
    config, model, valid, _ = build("Speeder", toy_dict, predict_mode="generate", train_all_positions=False,
                                    generate_decoder="free")
    return config, model, valid


def test_an_invalid_free_answer_counts_as_a_miss(free_speeder, monkeypatch):
    config, model, _ = free_speeder
    model.eval()
    tokenizer = model.tokenizer
    candidates = torch.stack([torch.randperm(model.n_items - 1)[:20] + 1 for _ in range(3)])
    truth_slot = torch.tensor([0, 3, 7])
    answers = [" A.", " zz", " C"]  # right; names no candidate; a wrong candidate
    monkeypatch.setattr(model.generative, "_greedy", lambda *_: [
        tokenizer(text, add_special_tokens=False)["input_ids"] for text in answers])
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


def test_training_prompts_list_the_true_item_among_seeded_shuffled_negatives(free_speeder):
    config, model, _ = free_speeder
    answerer = model.generative
    targets = torch.randint(1, model.n_items, (64,))
    draws = []
    for _ in range(2):
        answerer.generator.manual_seed(config["seed"])
        draws.append(answerer._training_candidates(targets))
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
    """Cache, padding mask and positions of the decoding path agree with one plain forward per candidate."""
    config, model, _, _ = build("Speeder", toy_dict, predict_mode="generate", train_all_positions=False,
                                item_repr="text", autocast_dtype="float32")  # the reference runs in float32
    model.eval()
    answerer = model.generative
    item_seq = torch.tensor([[3, 5, 7, 0, 0, 0, 0, 0], [2, 4, 6, 8, 10, 12, 14, 16]])
    item_seq_len = torch.tensor([3, 8])
    candidates = torch.tensor([[1, 9, 11], [13, 15, 17]])
    with torch.no_grad():
        scores = answerer.answer_scores(model, item_seq, item_seq_len, None, candidates)
        prompt = answerer._prompt(model, item_seq, item_seq_len, None, model.item_tokens(), candidates)
        embeds, lengths = prompt.dense(), prompt.lengths
        prefix = model.llm.get_input_embeddings()(model.prefix_ids).float()
        for row in range(2):
            for slot, item in enumerate(candidates[row].tolist()):
                answer, length = answerer._answer_tokens(model, torch.tensor([item]), torch.zeros(1, dtype=torch.long))
                answer = answer[0, : int(length)]
                tokens = model.llm.get_input_embeddings()(answer[:-1]).float()
                sequence = torch.cat([prefix, embeds[row, : lengths[row]], tokens]).unsqueeze(0)
                hidden = model.llm.get_decoder()(inputs_embeds=sequence).last_hidden_state[0, -len(answer):]
                logprobs = answerer._lm_logits(model, hidden).log_softmax(dim=-1)
                expected = logprobs.gather(1, answer.unsqueeze(1)).mean()
                assert scores[row, slot] == pytest.approx(float(expected), abs=1e-4)


def test_score_mode_predict_runs_one_prompt_per_user_and_agrees_with_full_sort(toy_dict):
    _, model, valid, _ = build("Speeder", toy_dict)
    model.eval()
    batch = next(iter(valid))[0]
    with torch.no_grad():
        before = model.prompt_token_stats["samples"]
        pointwise = model.predict(batch)
        assert model.prompt_token_stats["samples"] - before == len(batch) // 20
        full = model.full_sort_predict(batch)
    assert torch.allclose(full[torch.arange(len(batch)), batch[model.ITEM_ID]], pointwise, atol=1e-5)


def test_protocol_mistakes_are_one_line_usage_errors(toy_dict):
    generate = {"predict_mode": "generate", "train_all_positions": False}
    with pytest.raises(UsageError, match="predict_mode must be one of"):
        build("Speeder", toy_dict, predict_mode="beam")
    with pytest.raises(UsageError, match="eval_batch_size >= 20"):
        build("Speeder", toy_dict, eval_batch_size=10, **generate)
    with pytest.raises(UsageError, match="letters has 26 labels"):
        build("Speeder", toy_dict, eval_args={**toy_dict["eval_args"], "mode": "uni29"}, **generate)
    with pytest.raises(UsageError, match="eval_candidates must be one of"):
        build("SASRec", toy_dict, eval_candidates="fixed")
