"""k-core filtering: every user and every item keeps at least k interactions."""

from __future__ import annotations

import numpy as np

from dataset_prep.interactions import Interactions


def kcore(inter: Interactions, k: int) -> Interactions:
    """Drop users and items with fewer than ``k`` interactions, repeating until nothing changes.

    One pass is not enough: dropping a rare item can push its users below ``k``, and so on; the fixed
    point is the (unique) largest subset in which every user and item has ``k`` interactions.
    """
    if k <= 1:
        return inter
    keep = np.ones(len(inter), dtype=bool)
    n_users, n_items = len(inter.user_tokens), len(inter.item_tokens)
    while True:
        user_count = np.bincount(inter.users[keep], minlength=n_users)
        item_count = np.bincount(inter.items[keep], minlength=n_items)
        still = keep & (user_count[inter.users] >= k) & (item_count[inter.items] >= k)
        if still.sum() == keep.sum():
            return inter.take(keep)
        keep = still
