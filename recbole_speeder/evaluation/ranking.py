"""Ranking without a ``[users x items]`` score matrix.

RecBole's evaluation builds every batch's scores over the whole catalogue (and, in sampled modes, a matrix of
``-inf`` with the candidates' scores put in), then a same-sized matrix of positives to read the top-k's hits. At a
million items and a batch of a thousand users that is gigabytes per batch. Here full ranking scores the catalogue
in chunks of ``ranking_chunk_size`` items, keeping each positive's exact rank (items scoring higher, and equal ones
with a lower id: a fixed tie order, where RecBole's ``topk`` has none) and, when a metric needs recommended items, a
running top-k; sampled modes rank each row's own candidates only. :class:`RankingCollector` turns a
:class:`Ranking` into what RecBole's metrics read (``rec.topk``, ``rec.items``), so Hit, NDCG, MRR, Recall,
Precision, MAP and the item-list metrics are computed by RecBole's own code; metrics that need every score (GAUC,
AUC) keep RecBole's dense path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from recbole.evaluator.collector import Collector
from recbole.evaluator.register import Register
from recbole.utils import EvaluatorType

DENSE_NEEDS = ("rec.meanrank", "rec.score", "data.label")  # what a Ranking cannot give


@dataclass
class Ranking:
    """One evaluation batch ranked: the rank of each positive in its row (0 = first; ``n_items`` when its score is
    not finite, so it is a miss at every cut-off) and, when asked for, each row's top-k items, best first."""

    positive_u: torch.Tensor
    positive_rank: torch.Tensor
    n_rows: int
    topk_items: torch.Tensor | None = None

    def hits(self, k: int) -> torch.Tensor:
        """RecBole's ``rec.topk`` for cut-offs up to ``k``: ``[rows, k + 1]``, 1 where a positive sits at that
        position of the row's ranking, then the row's number of positives."""
        result = torch.zeros(self.n_rows, k + 1, dtype=torch.int, device=self.positive_rank.device)
        ranked = self.positive_rank < k
        result[self.positive_u[ranked], self.positive_rank[ranked]] = 1
        result[:, k] = torch.bincount(self.positive_u, minlength=self.n_rows).int()
        return result


def _higher(scores: torch.Tensor, ids: torch.Tensor, true_score: torch.Tensor, true_id: torch.Tensor) -> torch.Tensor:
    """Per row of ``scores [P, C]`` (items ``ids``, ``[C]`` or ``[P, C]``): how many items rank before the row's
    positive (score ``true_score``, id ``true_id``): a higher score, or an equal one and a lower id. Ties are rare,
    so the ids are compared only when some score ties."""
    true_score = true_score.unsqueeze(1)
    before = scores > true_score
    ties = scores == true_score
    if bool(ties.any()):
        before |= ties & (ids < true_id.unsqueeze(1))
    return before.sum(dim=1)


def _missing_last(rank: torch.Tensor, true_score: torch.Tensor, n_items: int) -> torch.Tensor:
    """A positive without a finite score is ranked after every item."""
    return torch.where(torch.isfinite(true_score), rank, torch.full_like(rank, n_items))


def _merge_topk(best: tuple[torch.Tensor, torch.Tensor] | None, scores: torch.Tensor, ids: torch.Tensor, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top-k ``(scores, items)`` after one more chunk ``scores [B, C]`` of items ``ids`` (``[C]`` or
    ``[B, C]``)."""
    values, where = scores.topk(min(k, scores.shape[1]), dim=1)
    items = ids[where] if ids.dim() == 1 else ids.gather(1, where)
    if best is not None:
        values, items = torch.cat([best[0], values], dim=1), torch.cat([best[1], items], dim=1)
        values, where = values.topk(min(k, values.shape[1]), dim=1)
        items = items.gather(1, where)
    return values, items


def _own_scores(users: torch.Tensor, items: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``(users * items).sum(-1)`` through the same matrix product that scores the chunks (a diagonal block at a
    time), so a positive's score carries the rounding of its entry in the ranking."""
    blocks = [torch.mm(users[i : i + block], items[i : i + block].T).diagonal() for i in range(0, len(users), block)]
    return torch.cat(blocks) if blocks else users.new_zeros(0)


def rank_all_items(
    users: torch.Tensor,
    items: torch.Tensor,
    positive_u: torch.Tensor,
    positive_i: torch.Tensor,
    excluded: tuple[torch.Tensor, torch.Tensor] | None,
    chunk_size: int,
    topk: int | None = None,
) -> Ranking:
    """Full ranking of ``items [n_items, d]`` for ``users [B, d]`` (scores ``users @ items.T``), ``chunk_size``
    items at a time. Item 0 (padding) and the ``(row, item)`` pairs of ``excluded`` are never ranked; a positive's
    score is its own dot product. ``topk``: also keep each row's best ``topk`` items."""
    n_rows, n_items = users.shape[0], items.shape[0]
    positive_u, positive_i = positive_u.to(users.device), positive_i.to(users.device)
    true_score = _own_scores(users[positive_u], items[positive_i])
    rank = torch.zeros_like(positive_u)
    one_per_row = torch.equal(positive_u, torch.arange(n_rows, device=users.device))  # sequential rows: no gather
    best = None
    if excluded is not None:  # sorted by item, so each chunk takes a slice
        rows, cols = (index.to(users.device) for index in excluded)
        order = cols.argsort()
        rows, cols = rows[order], cols[order]
    for start in range(0, n_items, chunk_size):
        stop = min(start + chunk_size, n_items)
        scores = users @ items[start:stop].T
        if start == 0:
            scores[:, 0] = float("-inf")
        if excluded is not None:
            lo, hi = torch.searchsorted(cols, torch.tensor([start, stop], device=cols.device)).tolist()
            scores[rows[lo:hi], cols[lo:hi] - start] = float("-inf")
        ids = torch.arange(start, stop, device=users.device)
        if topk:
            best = _merge_topk(best, scores, ids, topk)
        rows_scores = scores if one_per_row else scores[positive_u]
        rank += _higher(rows_scores, ids, true_score, positive_i)
        own = (positive_i >= start) & (positive_i < stop)  # a positive's own entry is not an item before it, even
        own_scores = rows_scores[own.nonzero().squeeze(1), positive_i[own] - start]  # where rounding lifts it
        rank[own] -= (own_scores > true_score[own]).long()
    return Ranking(positive_u, _missing_last(rank, true_score, n_items), n_rows, best[1] if best else None)


def rank_candidates(
    rows: torch.Tensor,
    items: torch.Tensor,
    scores: torch.Tensor,
    positive_u: torch.Tensor,
    positive_i: torch.Tensor,
    n_rows: int,
    n_items: int,
    topk: int | None = None,
) -> Ranking:
    """Sampled ranking: each row ranks only its listed candidates (``rows``, ``items``, ``scores``, one entry per
    candidate, as RecBole's sampled loaders give them); items not listed rank after every candidate, and an item
    listed twice in a row counts once."""
    device = scores.device
    rows, items = rows.to(device), items.to(device)
    positive_u, positive_i = positive_u.to(device), positive_i.to(device)
    key, order = (rows * (n_items + 1) + items).sort(stable=True)  # by row, then item
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    order = order[first]
    rows, items, scores = rows[order], items[order], scores[order].float()
    counts = torch.bincount(rows, minlength=n_rows)
    slot = torch.arange(len(rows), device=device) - (torch.cumsum(counts, 0) - counts)[rows]
    width = int(counts.max()) if len(rows) else 1
    padded = torch.full((n_rows, width), float("-inf"), device=device)
    padded_items = torch.full((n_rows, width), n_items, dtype=items.dtype, device=device)  # padding ranks last
    padded[rows, slot], padded_items[rows, slot] = scores, items
    row_scores, row_items = padded[positive_u], padded_items[positive_u]
    listed = row_items == positive_i.unsqueeze(1)
    true_score = torch.where(listed, row_scores, torch.full_like(row_scores, float("-inf"))).amax(dim=1)
    rank = _higher(row_scores, row_items, true_score, positive_i)
    best = _merge_topk(None, padded, padded_items, topk)[1] if topk else None
    return Ranking(positive_u, _missing_last(rank, true_score, n_items), n_rows, best)


def ranks_without_score_matrix(config, model) -> bool:
    """Whether evaluation ranks here rather than through RecBole's ``[users x items]`` scores: the model (a class or
    an instance) scores by user-item similarity under ``config`` (``ranks_by_similarity``), the metrics rank, and
    none of them needs every score."""
    by_similarity = getattr(model, "ranks_by_similarity", None)
    register = Register(config)
    return (by_similarity is not None and by_similarity(config) and config["eval_type"] == EvaluatorType.RANKING
            and not any(register.need(key) for key in DENSE_NEEDS))


class RankingCollector(Collector):
    """RecBole's collector, which also takes a :class:`Ranking` in place of a batch's score matrix."""

    def needs_items(self) -> bool:
        return bool(self.register.need("rec.items"))

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i) -> None:
        if not isinstance(scores_tensor, Ranking):
            return super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        if self.needs_items():
            self.data_struct.update_tensor("rec.items", scores_tensor.topk_items)
        if self.register.need("rec.topk"):
            self.data_struct.update_tensor("rec.topk", scores_tensor.hits(max(self.topk)))
