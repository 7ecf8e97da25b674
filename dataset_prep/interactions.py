"""Interactions held as int ids in numpy arrays: deduplication and chronological order.

Tokens (reviewer ids, ASINs) are interned once into a dict; everything per interaction is a fixed-size
number (about 20 bytes), so tens of millions of reviews fit where their JSON records would not.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from dataset_prep.readers import Review


@dataclass
class Interactions:
    """Parallel arrays, one row per interaction; ``users``/``items`` index ``user_tokens``/``item_tokens``.

    Row order is arrival order (the order the raw file listed them), which breaks timestamp ties, so
    same-day reviews keep the order the release gave them.
    """

    users: np.ndarray  # int32
    items: np.ndarray  # int32
    times: np.ndarray  # float64, unix seconds
    ratings: np.ndarray  # float32, NaN when the source has no rating
    user_tokens: list[str]
    item_tokens: list[str]

    @classmethod
    def collect(cls, reviews: Iterable[Review]) -> Interactions:
        user_ids: dict[str, int] = {}
        item_ids: dict[str, int] = {}
        users, items, times, ratings = array("i"), array("i"), array("d"), array("f")
        for user, item, time, rating in reviews:
            users.append(user_ids.setdefault(user, len(user_ids)))
            items.append(item_ids.setdefault(item, len(item_ids)))
            times.append(time)
            ratings.append(rating)
        return cls(np.frombuffer(users, dtype=np.int32), np.frombuffer(items, dtype=np.int32),
                   np.frombuffer(times, dtype=np.float64), np.frombuffer(ratings, dtype=np.float32),
                   list(user_ids), list(item_ids))

    def __len__(self) -> int:
        return len(self.users)

    @property
    def has_rating(self) -> bool:
        return bool(len(self)) and not np.isnan(self.ratings).all()

    def take(self, rows: np.ndarray) -> Interactions:
        """The given rows (indices or a boolean mask), tokens shared."""
        return Interactions(self.users[rows], self.items[rows], self.times[rows], self.ratings[rows],
                            self.user_tokens, self.item_tokens)

    def deduplicate(self) -> Interactions:
        """Keep one interaction per (user, item): the earliest, as a repeated review is not a new choice."""
        order = np.lexsort((np.arange(len(self)), self.times, self.items, self.users))
        pairs = np.stack([self.users[order], self.items[order]])
        first = np.ones(len(self), dtype=bool)
        first[1:] = (pairs[:, 1:] != pairs[:, :-1]).any(axis=0)
        return self.take(np.sort(order[first]))

    def chronological(self) -> Interactions:
        """Grouped by user, each user's history in time order (ties in arrival order)."""
        return self.take(np.lexsort((np.arange(len(self)), self.times, self.users)))

    def item_set(self) -> list[str]:
        """Tokens of the items present, in order of first appearance."""
        _, first = np.unique(self.items, return_index=True)
        return [self.item_tokens[i] for i in self.items[np.sort(first)]]

    def sequence_lengths(self) -> np.ndarray:
        return np.bincount(self.users)[np.unique(self.users)]
