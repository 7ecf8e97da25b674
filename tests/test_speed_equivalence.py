"""Speed paths give the results of the plain ones: prefix cache, all-position training, chunked item tokens,
length-bucketed micro-batches, bf16 autocast with the frozen weights stored in bf16, and inference mode (tiny-random
backbone on ml-100k)."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from recbole.data import data_preparation
from recbole.data.interaction import Interaction
from recbole.utils import init_seed

from recbole_speeder.data.features import save_item_features
from recbole_speeder.model import Speeder
from recbole_speeder.model.runtime import autocast_dtype, length_groups
from recbole_speeder.utils import create_dataset

FLOAT32 = {"autocast_dtype": "float32"}
GENERATE = {"predict_mode": "generate", "train_all_positions": False}


BASE = {
    "backbone_path": "tiny-random",
    "show_progress": False,
    "state": "WARNING",
    "log_wandb": False,
    "modalities": ["text", "id"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """ml-100k loaded once, with random text features keyed by its item tokens (no MiniLM needed)."""
    from recbole_speeder.config import Config

    folder = tmp_path_factory.mktemp("speed")
    # loads the data only; an ID-only config needs a schedule without the text-only MPO stage
    config = Config("Speeder", "ml-100k", config_dict={**BASE, "modalities": ["id"], "mpo_stages": None})
    dataset = create_dataset(config)
    tokens = [str(t) for t in dataset.field2id_token["item_id"][1:]]
    embedding = np.random.default_rng(0).normal(size=(len(tokens), 24)).astype(np.float32)
    features = save_item_features(folder, "ml-100k", "text", tokens, embedding, encoder="random", source_sha256="-")
    base = {**BASE, "text_feature_file": str(features), "checkpoint_dir": str(folder / "saved")}
    train, valid, _ = data_preparation(Config("Speeder", "ml-100k", config_dict=base), dataset)
    # small batches keep the tests quick: 12 training windows of mixed lengths, 16 users to rank for
    rows = next(iter(train))
    lengths = rows[train._dataset.config["ITEM_LIST_LENGTH_FIELD"]]
    mixed = torch.cat([lengths.argsort()[:8], lengths.argsort()[-4:]])
    return base, train, rows[mixed], next(iter(valid))[0][torch.arange(16)]


@pytest.fixture
def build(data):
    """A Speeder in eval mode (dropout off), its weights fixed by the seed, and a train and a valid batch."""
    from recbole_speeder.config import Config

    base, train, train_batch, valid_batch = data

    def make(**overrides):
        config = Config("Speeder", "ml-100k", config_dict={**base, **overrides})
        init_seed(config["seed"], config["reproducibility"])
        model = Speeder(config, train._dataset)
        model.eval()
        if model.spae.distance_bias is not None:  # it starts at zero: give the attention masks a bias to carry
            model.spae.distance_bias.data.normal_(std=0.5)
        return model, train_batch, valid_batch

    return make


def scores(model: Speeder, interaction) -> torch.Tensor:
    with torch.no_grad():
        return model.full_sort_predict(interaction)


def test_length_groups_cover_every_row_once_within_the_budget():
    lengths = torch.tensor([3, 50, 4, 3, 12, 7, 3, 49, 5, 3])
    for budget, padding in ((24, 10.0), (1000, 0.25)):
        groups = length_groups(lengths, budget, padding)
        rows = torch.cat(groups)
        assert len(groups) > 2 and sorted(rows.tolist()) == list(range(len(lengths)))
        assert lengths[rows].tolist() == sorted(lengths.tolist())  # sorted: each group pads to its own longest
        for group in groups:
            slots = len(group) * int(lengths[group].max())
            assert len(group) == 1 or (slots <= budget and slots <= (1 + padding) * int(lengths[group].sum()))
    for budget, padding in ((0, 0.0), (10 * 50, 10.0)):  # off, or the whole batch within bounds: batch order
        assert [g.tolist() for g in length_groups(lengths, budget, padding)] == [list(range(len(lengths)))]


def test_prefix_cache_gives_the_scores_of_the_full_prompt(build):
    model, _, valid = build(**FLOAT32)
    cached = scores(model, valid)
    plain = copy.deepcopy(model)
    plain.runtime.prefix_cache = False
    assert torch.allclose(cached, scores(plain, valid), atol=1e-4)
    assert model.runtime._prefix_kv is not None  # the eval pass kept the prefix's keys/values


@pytest.mark.parametrize("item_repr", ["mrc", "text"])
def test_length_buckets_give_the_scores_loss_and_gradients_of_one_padded_batch(build, item_repr):
    model, train, valid = build(item_repr=item_repr, length_bucket_tokens=0, **FLOAT32)
    bucketed = copy.deepcopy(model)
    lengths = model.history_prompt(*model.inputs(train), model.item_tokens()).lengths
    runtime = bucketed.runtime
    runtime.length_bucket_tokens = 4 * int(lengths.max())
    assert len(length_groups(lengths, runtime.length_bucket_tokens, runtime.length_bucket_padding)) > 1
    assert torch.allclose(scores(model, valid), scores(bucketed, valid), atol=1e-4)
    losses = []
    for m in (model, bucketed):
        loss = m.calculate_loss(train)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), bucketed.parameters(), strict=True):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("item_repr", ["mrc", "text"])
def test_length_groups_read_the_states_of_the_padded_batch_through_one_backbone_call(build, item_repr):
    """The groups' side-by-side input buffer holds each row's prompt exactly as the dense padded batch does; the
    all-position reads past a history are not computed (zeros)."""
    model, train, _ = build(item_repr=item_repr, **FLOAT32)
    inputs = (*model.inputs(train), model.item_tokens())
    lengths = model.history_prompt(*inputs).lengths
    model.runtime.length_bucket_tokens = 4 * int(lengths.max())
    with torch.no_grad():
        prompt = model.history_prompt(*inputs)
        every_slot = torch.arange(int(lengths.max())).expand(len(lengths), -1)
        dense = model.runtime.run(prompt.dense(), prompt.items, every_slot)
        every_item = prompt.item_end
        assert (every_item < 0).any()
        for all_positions, reads in ((False, prompt.last.unsqueeze(1)), (True, every_item)):
            expected = dense.gather(1, reads.clamp(min=0).unsqueeze(-1).expand(-1, -1, dense.shape[-1]))
            expected[reads < 0] = 0
            states = model._states(*inputs, all_positions=all_positions)
            assert torch.allclose(states.view_as(expected), expected, atol=1e-4)


def test_frozen_weights_kept_in_the_autocast_dtype_give_the_same_scores_loss_and_gradients(build):
    recast, train, valid = build(autocast_dtype="bfloat16", autocast_frozen_weights=False)
    stored, _, _ = build(autocast_dtype="bfloat16")
    decoder = stored.llm.get_decoder().layers.named_parameters()
    frozen = [p for n, p in decoder if n.endswith(("proj.weight", "base_layer.weight"))]  # LoRA's A/B train
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in recast.llm.parameters())
    assert stored.llm.get_input_embeddings().weight.dtype == torch.float32  # only the decoder layers' linears
    assert torch.equal(scores(recast, valid), scores(stored, valid))
    for m in (recast, stored):
        m.calculate_loss(train).backward()
    for (name, p), q in zip(recast.named_parameters(), stored.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def test_all_position_loss_is_the_mean_of_one_prefix_at_a_time(build):
    """One forward over a history trains every next-item prediction, exactly: no cue depends on the history's end."""
    model, train, _ = build(**FLOAT32)
    rows = train[torch.arange(4)]  # the shortest windows: one forward per prefix follows
    with torch.no_grad():
        all_positions = model.calculate_loss(rows)
        model.train_all_positions = False
        item_seq, item_seq_len, timestamps = model.inputs(rows)
        targets = rows[model.POS_ITEM_ID]
        per_prefix = []
        for row in range(len(rows)):
            n = int(item_seq_len[row])
            history = torch.cat([item_seq[row, :n], targets[row : row + 1]])
            for t in range(1, n + 1):  # the prefix of t items predicts item t + 1
                prefix = Interaction(
                    {
                        model.ITEM_SEQ: item_seq[row : row + 1],
                        model.ITEM_SEQ_LEN: torch.tensor([t]),
                        model.time_list_field: timestamps[row : row + 1],
                        model.POS_ITEM_ID: history[t : t + 1],
                    }
                )
                per_prefix.append(model.calculate_loss(prefix).item())
    assert len(per_prefix) == int(item_seq_len.sum()) > len(rows)
    assert all_positions.item() == pytest.approx(float(np.mean(per_prefix)), rel=1e-4)


def loss_and_gradients(model: Speeder, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """One training loss and its gradients; a generative model draws its negatives from a freshly seeded generator."""
    model.zero_grad()
    if model.generative is not None:
        model.generative.training_candidates.generator.manual_seed(0)
    loss = model.calculate_loss(batch)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("item_repr", ["mrc", "text"])
def test_generative_loss_in_length_buckets_equals_one_padded_batch(build, item_repr):
    model, train, _ = build(item_repr=item_repr, length_bucket_tokens=0, **GENERATE, **FLOAT32)
    plain_loss, plain = loss_and_gradients(model, train)
    calls = []
    run = model.runtime.run
    model.runtime.run = lambda *args: calls.append(1) or run(*args)
    model.runtime.length_bucket_tokens = 1024
    loss, gradients = loss_and_gradients(model, train)
    assert len(calls) > 1  # several length groups
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert gradients.keys() == plain.keys() and any("lora" in name for name in gradients)
    for name, grad in gradients.items():
        assert torch.allclose(grad, plain[name], atol=1e-5, rtol=1e-4), name


def test_generative_window_loss_is_score_mode_loss_plus_the_per_row_answer(build):
    """``train_all_positions`` in generative mode: one forward gives score mode's all-position loss and the answer
    of the window's target as the per-row prompt gives it; the candidate list after the history is invisible to
    the history's states (causal attention)."""
    model, train, _ = build(predict_mode="generate", **FLOAT32)
    answerer = model.generative
    weight = answerer.score_loss_weight
    assert model.train_all_positions and weight > 0
    loss, gradients = loss_and_gradients(model, train)
    answerer.score_loss_weight, model.train_all_positions = 0.0, False
    answer_loss, answer = loss_and_gradients(model, train)  # the same negatives, one answer per row
    model.generative, model.train_all_positions = None, True
    score_loss, score = loss_and_gradients(model, train)  # score mode
    assert loss == pytest.approx(answer_loss + weight * score_loss, rel=1e-5)
    assert gradients.keys() == answer.keys() | score.keys()
    for name, grad in gradients.items():
        expected = answer.get(name, 0) + weight * score.get(name, 0)
        assert torch.allclose(grad, expected, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize(
    "mode",
    [{}, GENERATE, {**GENERATE, "item_repr": "text"}, {**GENERATE, "item_repr": "text", "spae_relative": False}],
    ids=["score", "mrc", "text", "text-no-bias"],
)
def test_last_layer_at_the_reads_gives_the_states_of_the_full_last_layer(build, mode):
    """Loss, gradients and scores with the last decoder layer run at the read slots only, against the full layer,
    under SPAE's item-distance attention bias (random, nonzero: the 4D mask every layer gets) or, without it, plain
    causal attention and the padding mask of decoding; text mode's title scores continue from the cache the prompt
    pass leaves."""
    full, train, valid = build(last_layer_reads_only=False, **mode, **FLOAT32)
    bias = full.spae.distance_bias
    assert (bias is None) == (mode.get("spae_relative") is False)
    assert bias is None or bool((bias != 0).all())
    reads_only = copy.deepcopy(full)
    reads_only.runtime.last_layer_reads_only = True
    rows_in_last_mlp = {}
    results = {}
    for name, model in (("full", full), ("reads", reads_only)):
        mlp = model.llm.get_decoder().layers[-1].mlp
        rows_in_last_mlp[name] = 0

        def count(_module, inputs, _name=name):
            rows_in_last_mlp[_name] += inputs[0].shape[:-1].numel()

        hook = mlp.register_forward_pre_hook(count)
        loss, gradients = loss_and_gradients(model, train)
        with torch.no_grad():
            if model.generative is None:
                answers = model.full_sort_predict(valid)
            else:
                item_seq, item_seq_len, timestamps = model.inputs(valid)
                candidates = torch.arange(1, 6).repeat(len(valid), 1) + 5 * torch.arange(len(valid)).unsqueeze(1)
                answers = model.generative.answer_scores(model, item_seq, item_seq_len, timestamps, candidates)
        hook.remove()
        results[name] = loss, gradients, answers
    assert rows_in_last_mlp["reads"] < rows_in_last_mlp["full"]
    (loss, gradients, answers), (plain_loss, plain, plain_answers) = results["reads"], results["full"]
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert gradients.keys() == plain.keys()
    assert bias is None or "spae.distance_bias" in gradients
    for name, grad in gradients.items():
        assert torch.allclose(grad, plain[name], atol=1e-5, rtol=1e-4), name
    assert torch.allclose(answers, plain_answers, atol=1e-4)


def test_chunked_item_tokens_equal_one_pass(build):
    model, _, _ = build(**FLOAT32)
    with torch.no_grad():
        whole = model.item_tokens()
        model.runtime.drop_caches()
        model.item_chunk_size = 97
        chunked = model.item_tokens()
    assert torch.allclose(whole, chunked, atol=1e-6)


def test_inference_mode_scores_equal_no_grad_and_fill_the_caches(build):
    model, _, valid = build(inference_mode=False)
    reference = scores(model, valid)
    model.runtime.inference_mode = True
    model.train(False)  # drops the caches
    fast = scores(model, valid)
    cached = model.runtime._cache["item_tokens"]
    assert model.runtime.holds("item_tokens", cached) and model.runtime._prefix_kv is not None
    assert not cached.is_inference()  # caches are filled outside inference mode: usable anywhere
    assert torch.equal(reference, fast)
    fast[:, 0] = -torch.inf  # RecBole masks the padding item in place: the scores must not be inference tensors
    with torch.inference_mode():  # a caller's own inference mode is kept, caches and all
        assert torch.equal(model.full_sort_predict(valid), reference)


def test_bf16_autocast_scores_agree_with_float32(build):
    model, train, valid = build(**FLOAT32)
    bf16 = copy.deepcopy(model)
    bf16.runtime.dtype = torch.bfloat16
    full, mixed = scores(model, valid), scores(bf16, valid)
    top_full, top_mixed = full.topk(10).indices, mixed.topk(10).indices
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top_full, top_mixed, strict=True)])
    assert torch.corrcoef(torch.stack([full[:, 1:].flatten(), mixed[:, 1:].flatten()]))[0, 1] > 0.99
    assert overlap > 0.8, overlap
    with torch.no_grad():
        assert bf16.calculate_loss(train).item() == pytest.approx(model.calculate_loss(train).item(), rel=0.02)


def test_mrc_skipping_dead_experts_equals_the_full_mixture():
    """Experts that no item can use (images of a text-only dataset, inactive modalities) are not computed."""
    from recbole_speeder.model.mrc import MixtureOfModalityExperts

    torch.manual_seed(0)
    n_items, d, k = 7, 16, 2
    text_mask = torch.tensor([False, True, True, False, True, True, True])
    features = {
        "text": (torch.randn(n_items, 8), text_mask),
        "image": (torch.randn(n_items, 4), torch.zeros(n_items, dtype=bool)),
    }
    mrc = MixtureOfModalityExperts(
        features, n_items=n_items, d_model=d, n_tokens=k, expert_hidden=8, dropout=0.0
    ).eval()
    ids = torch.arange(n_items)

    def reference() -> torch.Tensor:  # every expert run, dead ones masked out by the router
        outs = torch.stack(
            [
                mrc.experts[m](ids) if m == "id" else mrc.experts[m](getattr(mrc, f"{m}_features")[ids])
                for m in mrc.modalities
            ],
            dim=-2,
        )
        logits = mrc.router_score(outs.view(n_items, -1, k, d).mean(-2)).squeeze(-1) + mrc.modality_bias
        weights = torch.softmax(logits.masked_fill(~mrc._available(ids), float("-inf")), dim=-1).nan_to_num(0.0)
        return mrc.out_norm(((weights.unsqueeze(-1) * outs).sum(-2)).view(n_items, k, d))

    with torch.no_grad():
        for active in (["text", "image", "id"], ["text"], ["image"]):
            mrc.set_active(active)
            assert torch.allclose(mrc(ids)[0], reference(), atol=1e-6), active


@pytest.mark.parametrize("native", [True, False])
def test_autocast_dtype_resolves_auto_by_hardware_and_warns_when_the_cpu_lacks_bf16(native, monkeypatch, caplog):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert autocast_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    assert ("no native bf16" in caplog.text) is not native
    assert autocast_dtype("float32", cpu) is None
    assert autocast_dtype("bfloat16", cpu) == torch.bfloat16 and autocast_dtype("float16", cpu) == torch.float16
