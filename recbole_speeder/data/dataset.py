"""Speeder's RecBole dataset: the standard sequential one, with training windows that tile each history and each
item's training interactions counted before the tiling drops rows (popularity-sampled negatives)."""

from __future__ import annotations

import numpy as np
from recbole.data.dataset import SequentialDataset


def tiling_window_index(user_ids: np.ndarray, window: int) -> np.ndarray:
    """Rows to keep so that one forward per kept row trains every next-item target exactly once.

    RecBole's augmentation makes one row per target, each holding the (up to ``window``) items before it.
    With all-position training a row trains all of its positions, so only every ``window``-th row per user,
    counted back from the user's last one, is needed. Rows of a user must be in time order.
    """
    order = np.argsort(user_ids, kind="stable")
    sorted_users = user_ids[order]
    group_start = np.r_[0, np.flatnonzero(sorted_users[1:] != sorted_users[:-1]) + 1]
    group_size = np.diff(np.r_[group_start, len(user_ids)])
    position = np.arange(len(user_ids)) - np.repeat(group_start, group_size)
    rank_from_end = np.repeat(group_size, group_size) - 1 - position
    return np.sort(order[rank_from_end % window == 0])


def item_interaction_counts(dataset: SequentialDataset) -> np.ndarray:
    """Per item id, the interactions held by a sequential dataset's one-row-per-target rows (before any tiling).

    Each row holds one target; a user's first item is never a target, so it is read from the rows whose history
    is one item long.
    """
    feat = dataset.inter_feat
    firsts = feat[dataset.item_id_list_field][feat[dataset.item_list_length_field] == 1, 0]
    items = np.concatenate([feat[dataset.iid_field].numpy(), firsts.numpy()])
    return np.bincount(items, minlength=dataset.item_num)


class SpeederDataset(SequentialDataset):
    def build(self):
        datasets = super().build()
        train = datasets[0]
        train.item_train_counts = item_interaction_counts(train)  # copies of the split keep it
        if not self.config["train_all_positions"]:
            return datasets
        users = train.inter_feat[train.uid_field].numpy()
        keep = tiling_window_index(users, self.config["MAX_ITEM_LIST_LENGTH"])
        self.logger.info(
            f"all-position training: {len(keep)} of {len(users)} training rows tile every history "
            f"(window {self.config['MAX_ITEM_LIST_LENGTH']})"
        )
        datasets[0] = train.copy(train.inter_feat[keep])
        return datasets
