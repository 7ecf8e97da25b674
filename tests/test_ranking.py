"""Ranking without a ``[users x items]`` matrix (evaluation/ranking.py) gives RecBole's own metric inputs."""

from __future__ import annotations

import pytest
import torch
from recbole.evaluator import Collector

from recbole_speeder.evaluation.ranking import RankingCollector, rank_all_items, rank_candidates

METRICS = ["Hit", "NDCG", "MRR", "Recall", "Precision", "MAP", "ShannonEntropy"]
TOPK = [1, 5, 10]


def plain_config(**overrides) -> dict:
    """What RecBole's collector and evaluator read, without a dataset."""
    return {"metrics": METRICS, "topk": TOPK, "device": "cpu", "metric_decimal_place": 12,
            "eval_args": {"mode": "full"}, **overrides}


def collected(collector, scores, positive_u, positive_i) -> dict[str, torch.Tensor]:
    collector.eval_batch_collect(scores, None, positive_u, positive_i)
    struct = collector.get_data_struct()
    return {key: struct.get(key) for key in ("rec.topk", "rec.items")}


def random_case(seed: int, rows: int = 37, n_items: int = 101, d: int = 8):
    """Users and items with distinct scores, one positive per row, and seen items to exclude (never the positive,
    never the padding item)."""
    generator = torch.Generator().manual_seed(seed)
    users, items = torch.randn(rows, d, generator=generator), torch.randn(n_items, d, generator=generator)
    positive_u = torch.arange(rows)
    positive_i = torch.randint(1, n_items, (rows,), generator=generator)
    seen_u = torch.randint(0, rows, (300,), generator=generator)
    seen_i = torch.randint(1, n_items, (300,), generator=generator)
    keep = seen_i != positive_i[seen_u]
    return users, items, positive_u, positive_i, (seen_u[keep], seen_i[keep])


@pytest.mark.parametrize("chunk_size", [1, 7, 100, 101, 4096])
def test_chunked_full_ranking_collects_what_recbole_collects_from_the_dense_matrix(chunk_size):
    users, items, positive_u, positive_i, seen = random_case(seed=chunk_size)
    dense = users @ items.T
    dense[:, 0] = float("-inf")
    dense[seen] = float("-inf")
    config = plain_config()
    expected = collected(Collector(config), dense, positive_u, positive_i)
    ranking = rank_all_items(users, items, positive_u, positive_i, seen, chunk_size, topk=max(TOPK))
    got = collected(RankingCollector(config), ranking, positive_u, positive_i)
    assert torch.equal(got["rec.topk"], expected["rec.topk"])
    assert torch.equal(got["rec.items"], expected["rec.items"])
    assert int(expected["rec.topk"][:, :-1].sum()) > 0  # some positives reach a top 10: the check has hits to see


def test_sampled_ranking_scores_only_the_listed_items_as_recbole_ranks_its_dense_rows():
    """Rows of 20 candidates (the true item first, as RecBole lists them), one row listing a negative twice."""
    generator = torch.Generator().manual_seed(3)
    rows, n_items, per_row = 9, 500, 20
    candidates = torch.stack([torch.randperm(n_items - 1, generator=generator)[:per_row] + 1 for _ in range(rows)])
    candidates[4, 7] = candidates[4, 6]
    row_idx = torch.arange(rows).repeat_interleave(per_row)
    items = candidates.flatten()
    scores = torch.randn(rows, n_items, generator=generator)[row_idx, items]  # one score per (row, item)
    positive_u, positive_i = torch.arange(rows), candidates[:, 0]
    dense = torch.full((rows, n_items), float("-inf"))
    dense[row_idx, items] = scores
    config = plain_config(eval_args={"mode": "uni19"})
    expected = collected(Collector(config), dense, positive_u, positive_i)
    ranking = rank_candidates(row_idx, items, scores, positive_u, positive_i, rows, n_items, topk=max(TOPK))
    got = collected(RankingCollector(config), ranking, positive_u, positive_i)
    assert torch.equal(got["rec.topk"], expected["rec.topk"])
    assert torch.equal(got["rec.items"], expected["rec.items"])


def test_ties_rank_the_lower_id_first_and_a_positive_without_a_finite_score_misses():
    items = torch.tensor([[0.0], [1.0], [1.0], [1.0], [0.5]])  # items 1-3 tie for every user
    users = torch.tensor([[1.0], [1.0], [float("nan")]])
    positive_u, positive_i = torch.tensor([0, 1, 2]), torch.tensor([2, 4, 1])
    ranking = rank_all_items(users, items, positive_u, positive_i, None, chunk_size=2, topk=3)
    assert ranking.positive_rank.tolist() == [1, 3, 5]  # after item 1; after items 1-3; not ranked at all
    assert sorted(ranking.topk_items[0].tolist()) == [1, 2, 3]  # tied items in the list: in torch.topk's order
    hits = ranking.hits(2)
    assert hits.tolist() == [[0, 1, 1], [0, 0, 1], [0, 0, 1]]

