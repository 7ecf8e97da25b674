"""MRC, SPAE, prompt packing and training-window tiling, on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recbole_speeder.data.dataset import tiling_window_index
from recbole_speeder.errors import UsageError
from recbole_speeder.model.backbone import input_token_scale
from recbole_speeder.model.mrc import MixtureOfModalityExperts
from recbole_speeder.model.prompt import pack_layout, slot_items
from recbole_speeder.model.spae import NO_ITEM, SequentialPositionAwareness, time_gap_buckets


def make_mrc(router: str = "learned", **kwargs) -> MixtureOfModalityExperts:
    torch.manual_seed(0)
    n_items = 6
    text = torch.randn(n_items, 8)
    text_mask = torch.tensor([False, True, True, False, True, True])  # item 3 has no text
    image = torch.randn(n_items, 4)
    image_mask = torch.tensor([False, True, False, False, True, False])  # only items 1 and 4 have images
    return MixtureOfModalityExperts(
        {"text": (text, text_mask), "image": (image, image_mask)},
        n_items=n_items,
        d_model=16,
        n_tokens=2,
        expert_hidden=8,
        router=router,
        dropout=0.0,
        **kwargs,
    ).eval()


def test_mrc_router_masks_missing_modalities():
    mrc = make_mrc()
    tokens, weights = mrc(torch.arange(6))
    assert tokens.shape == (6, 2, 16)
    assert torch.allclose(weights[1:].sum(-1), torch.ones(5))
    names = list(mrc.modalities)
    text, image, ident = names.index("text"), names.index("image"), names.index("id")
    assert weights[3, text] == 0 and weights[2, image] == 0 and weights[5, image] == 0
    assert weights[1, image] > 0 and weights[4, image] > 0
    assert torch.all(weights[0] == 0), "the padding item gets no modality"
    assert torch.all(weights[1:, ident] > 0)


def test_mrc_uniform_router_weighs_available_modalities_equally():
    weights = make_mrc(router="uniform")(torch.tensor([1, 2, 3]))[1]
    assert torch.allclose(weights[0], torch.full((3,), 1 / 3))  # text, image, id
    assert torch.allclose(weights[1].sort().values, torch.tensor([0.0, 0.5, 0.5]))  # no image
    assert torch.allclose(weights[2].sort().values, torch.tensor([0.0, 0.0, 1.0]))  # id only


def test_mrc_active_modalities_restrict_the_mixture_and_outputs():
    mrc = make_mrc()
    full_tokens, _ = mrc(torch.tensor([1, 4]))
    mrc.set_active(["text"])
    tokens, weights = mrc(torch.tensor([1, 3, 4]))
    assert torch.allclose(weights[:, list(mrc.modalities).index("text")], torch.tensor([1.0, 0.0, 1.0]))
    assert not torch.allclose(tokens[[0, 2]], full_tokens)
    report = mrc.router_weights(torch.tensor([1]))
    assert set(report) == {"text", "image", "id"} and report["image"].item() == 0
    with pytest.raises(ValueError, match="not configured"):
        mrc.set_active(["audio"])


def test_mrc_refuses_a_modality_without_features():
    with pytest.raises(ValueError, match="no features"):
        MixtureOfModalityExperts({}, n_items=3, d_model=4, modalities=("text", "id"))


def test_id_init_text_starts_the_id_table_from_the_texts_principal_components():
    """With as many components as the text has dimensions the rows keep the texts' geometry (pairwise distances up
    to one scale) at the random table's spread; fewer components are uncorrelated, largest variance first; an item
    without text keeps its random row, and the text rows do not depend on the seed."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(40, 8, generator=generator) * torch.linspace(3, 0.5, 8)
    present = torch.ones(40, dtype=torch.bool)
    present[[0, 7, 19]] = False  # the padding item and two items without text
    rows = present.nonzero().squeeze(1)

    def id_table(id_init: str, id_dim: int, seed: int = 0) -> torch.Tensor:
        torch.manual_seed(seed)
        mrc = MixtureOfModalityExperts({"text": (text, present)}, n_items=40, d_model=16, modalities=("text", "id"),
                                       id_dim=id_dim, id_init=id_init)
        return mrc.experts["id"].embedding.weight.detach()

    full = id_table("text", 8)
    centred = text[rows] - text[rows].mean(dim=0)
    off_diagonal = ~torch.eye(len(rows), dtype=torch.bool)
    ratio = (torch.cdist(full[rows], full[rows]) / torch.cdist(centred, centred).fill_diagonal_(1.0))[off_diagonal]
    assert torch.allclose(ratio, ratio[0].expand(len(ratio)), rtol=1e-4)
    assert full[rows].std().item() == pytest.approx(0.02, rel=1e-4)
    covariance = torch.cov(id_table("text", 2)[rows].T)
    assert covariance[0, 0] > covariance[1, 1] and abs(covariance[0, 1].item()) < 1e-9
    random = id_table("random", 8)
    assert torch.equal(full[~present], random[~present]) and not torch.equal(full[rows], random[rows])
    reseeded = id_table("text", 8, seed=1)
    assert torch.equal(reseeded[rows], full[rows]) and not torch.equal(reseeded[~present], full[~present])


def test_id_init_auto_starts_from_text_only_where_the_items_have_text_features():
    """The default: the text start where the text expert has features, the random start without them."""
    text = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    present = torch.arange(10) > 0

    def id_table(id_init: str, modalities: tuple[str, ...], mask: torch.Tensor = present) -> torch.Tensor:
        torch.manual_seed(0)
        mrc = MixtureOfModalityExperts({"text": (text, mask)}, n_items=10, d_model=16, modalities=modalities,
                                       id_dim=4, id_init=id_init)
        return mrc.experts["id"].embedding.weight.detach()

    assert torch.equal(id_table("auto", ("text", "id")), id_table("text", ("text", "id")))
    assert not torch.equal(id_table("auto", ("text", "id")), id_table("random", ("text", "id")))
    assert torch.equal(id_table("auto", ("id",)), id_table("random", ("id",)))
    no_text = torch.zeros(10, dtype=torch.bool)
    assert torch.equal(id_table("auto", ("text", "id"), no_text), id_table("random", ("text", "id"), no_text))


def test_id_init_text_needs_the_text_and_id_modalities_and_the_default_does_not():
    from recbole_speeder.config import Config

    with pytest.raises(UsageError, match="id_init: text starts the ID table from the text features"):
        Config("Speeder", "ml-100k", config_dict={"id_init": "text", "modalities": ["id"], "state": "WARNING"})
    default = Config("Speeder", "ml-100k", config_dict={"modalities": ["id"], "state": "WARNING"})
    assert default["id_init"] == "auto"  # the default never asks for text the configuration lacks


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_soft_tokens_start_at_the_size_of_the_embedded_text_tokens(family):
    # Gemma multiplies its embedding table by sqrt(hidden) in the layer: the table's own std is 25x too small there
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    embeddings = AutoModelForCausalLM.from_config(config).get_input_embeddings()
    embedded = embeddings(torch.arange(512)).float()
    scale = input_token_scale(embeddings)
    assert scale == pytest.approx(float(embedded.std()), rel=1e-3)
    mrc = make_mrc(token_scale=scale)
    tokens = mrc(torch.arange(1, 6))[0]
    assert float(tokens.std()) == pytest.approx(scale, rel=0.25)


def test_time_gap_buckets_follow_the_log2_rule():
    hour = 3600.0
    timestamps = torch.tensor([[0.0, 0.0, hour, 3 * hour, 1000 * hour, 0.0]])
    buckets = time_gap_buckets(timestamps, torch.tensor([5]), n_buckets=8, unit=hour)
    expected = [0, 1 + math.floor(math.log2(1)), 1 + math.floor(math.log2(2)), 1 + math.floor(math.log2(3)), 7, 0]
    assert buckets.tolist() == [expected]  # 1000 h is clamped to the last bucket; the pad gets 0


@pytest.mark.parametrize("switch", ["absolute", "time"])
def test_each_spae_input_cue_changes_the_output(switch):
    lengths, timestamps = torch.tensor([3, 2]), torch.tensor([[0.0, 10.0, 1e6], [0.0, 5e4, 0.0]])
    torch.manual_seed(0)
    full = SequentialPositionAwareness(8, max_len=3, n_heads=2)
    flags = {"absolute": True, "time": True, switch: False}
    torch.manual_seed(0)
    ablated = SequentialPositionAwareness(8, max_len=3, n_heads=2, **flags)
    ablated.load_state_dict(full.state_dict(), strict=False)
    assert not torch.allclose(full(lengths, 3, timestamps), ablated(lengths, 3, timestamps))
    off = SequentialPositionAwareness(8, max_len=3, n_heads=2, absolute=False, time=False)
    assert torch.count_nonzero(off(lengths, 3, timestamps)) == 0


def test_spae_attention_bias_follows_the_item_distance_under_the_causal_mask():
    spae = SequentialPositionAwareness(8, max_len=4, n_heads=2)
    with torch.no_grad():
        spae.distance_bias.copy_(torch.tensor([[10.0, 11.0, 12.0, 13.0, 14.0], [20.0, 21.0, 22.0, 23.0, 24.0]]))
    # prefix (2 tokens), item 0 (2 tokens), item 1, item 2, then the suffix: the predicted item, index 3
    items = torch.tensor([[NO_ITEM, NO_ITEM, 0, 0, 1, 2, 3]])
    low = torch.finfo(torch.float32).min
    mask = spae.attention_mask(items, n_queries=5, dtype=torch.float32)  # the prefix is in a cache
    assert mask.shape == (1, 2, 5, 7)
    head = mask[0, 1]
    assert head[0].tolist() == [0.0, 0.0, 20.0] + [low] * 4  # item 0's first token: the prefix, itself
    assert head[3].tolist() == [0.0, 0.0, 22.0, 22.0, 21.0, 20.0, low]  # item 2 sees items 0 and 1 at 2 and 1
    assert head[4].tolist() == [0.0, 0.0, 23.0, 23.0, 22.0, 21.0, 20.0]  # the suffix sees the last item at 1
    assert torch.equal(mask[0, 0, 4], torch.tensor([0.0, 0.0, 13.0, 13.0, 12.0, 11.0, 10.0]))
    # a prefix query attends the prefix only, unbiased; a padding key stays masked even after the query
    whole = spae.attention_mask(items, n_queries=7, dtype=torch.float32, key_valid=torch.tensor([[1] * 5 + [0, 1]]))
    assert whole[0, 0, 1].tolist() == [0.0, 0.0] + [low] * 5
    assert whole[0, 0, 6].tolist() == [0.0, 0.0, 13.0, 13.0, 12.0, low, 10.0]
    # only distances count: where the history goes on (item 3, then the suffix), its items' rows stay as they were
    longer = spae.attention_mask(torch.tensor([[NO_ITEM, NO_ITEM, 0, 0, 1, 2, 3, 4]]), 6, torch.float32)
    assert torch.equal(longer[..., :4, :7], mask[..., :4, :])


def test_pack_layout_places_blocks_back_to_back_then_the_suffix():
    layout = pack_layout(torch.tensor([[2, 3, 0], [1, 0, 0]]), suffix_length=2)
    assert layout.n_slots == 7
    assert layout.item_index.tolist() == [[0, 0, 1, 1, 1, -1, -1], [0, -1, -1, -1, -1, -1, -1]]
    assert layout.offset[0, :5].tolist() == [0, 1, 0, 1, 2]
    assert layout.is_suffix.tolist() == [
        [False] * 5 + [True, True],
        [False, True, True, False, False, False, False],
    ]
    assert layout.item_end[0, :2].tolist() == [1, 4]
    assert layout.last.tolist() == [6, 2]
    # for SPAE's distance bias, everything after the history (here up to slot 8) is the predicted item
    assert slot_items(layout, torch.tensor([2, 1]), 8).tolist() == [[0, 0, 1, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1]]


def test_tiling_windows_cover_every_target_once():
    window = 3
    users = np.array([7] * 8 + [2] * 2 + [5])  # rows of each user in time order, targets 1..n
    keep = tiling_window_index(users, window)
    for user in (7, 2, 5):
        rows = np.flatnonzero(users == user)
        kept_ranks = sorted(len(rows) - 1 - np.searchsorted(rows, keep[np.isin(keep, rows)]))
        covered = set()
        for rank in kept_ranks:  # a kept row trains its own target and the window - 1 before it
            last = len(rows) - rank
            covered.update(range(max(1, last - window + 1), last + 1))
        assert covered == set(range(1, len(rows) + 1))
        assert len(kept_ranks) == math.ceil(len(rows) / window)
