"""Speeder's RecBole dataset: the standard sequential one, built with array operations, with training windows
that tile each history and each item's training interactions counted before the tiling drops rows
(popularity-sampled negatives).

RecBole 1.2.1 builds the one-row-per-target table in a Python loop (a slice object per row, one tensor copy per
row and field), holds it for every row of the whole dataset, and splits it in Python lists, then copies the whole
training part before Speeder tiles it. Here the same splits, row for row, come from index arrays: the whole dataset
keeps each row's history as where it starts in its user's interactions (``HISTORY_START``), and a split builds the
history lists (``item_id_list``, ``timestamp_list``, ...) for the rows it keeps only, the training part after the
tiling.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset
from recbole.data.interaction import Interaction
from recbole.utils import FeatureType

LEAVE_ONE_OUT_PARTS = {"valid_and_test": 2, "valid_only": 1, "test_only": 1}
ROWS_PER_CHUNK = 1 << 20  # rows of a history table filled at once: bounds the index arrays' memory
HISTORY_START = "history_start"  # the whole dataset's column: where a row's history starts in ``history_source``


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


def history_windows(user_ids: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RecBole's augmentation as index arrays, for rows sorted by user and then time: every row with an earlier
    row of its user is a target, and its history is the up to ``window`` rows before it. ``(targets, starts,
    lengths)``: a history is the rows ``starts[i] : starts[i] + lengths[i]``."""
    rows = np.arange(len(user_ids))
    first = np.r_[True, user_ids[1:] != user_ids[:-1]]
    user_start = np.maximum.accumulate(np.where(first, rows, 0))
    targets = np.flatnonzero(~first)
    starts = np.maximum(user_start[targets], targets - window)
    return targets, starts, targets - starts


def leave_one_out_index(user_ids: np.ndarray, leave_one_num: int) -> list[np.ndarray]:
    """RecBole's ``_grouped_index`` and ``_split_index_by_leave_one_out`` as array operations, in RecBole's order:
    rows grouped by user in the order of each user's first row, each user's last ``leave_one_num`` rows (at most
    all but one) to the later parts, the very last to the last part."""
    _, first_row, inverse = np.unique(user_ids, return_index=True, return_inverse=True)
    order = np.argsort(first_row[inverse], kind="stable")
    group = inverse[order]
    sizes = np.bincount(inverse)[group]
    group_start = np.r_[0, np.flatnonzero(group[1:] != group[:-1]) + 1]
    position = np.arange(len(order)) - np.repeat(group_start, np.diff(np.r_[group_start, len(order)]))
    from_end = sizes - 1 - position
    part = np.where(from_end < np.minimum(leave_one_num, sizes - 1), leave_one_num - from_end, 0)
    return [order[part == k] for k in range(leave_one_num + 1)]


def select_rows(feat: Interaction, rows: np.ndarray) -> Interaction:
    """``feat[rows]`` without RecBole's detour through a Python list of the row numbers."""
    index = torch.as_tensor(rows)
    return Interaction({field: values[index] for field, values in feat.interaction.items()})


def history_items(dataset: SequentialDataset, rows: torch.Tensor) -> torch.Tensor:
    """``item_id_list`` of ``rows``: stored (RecBole's datasets, the splits of Speeder's), or built from where each
    history starts (the whole of Speeder's dataset)."""
    feat = dataset.inter_feat
    if HISTORY_START in feat:
        lists = dataset.history_lists(feat[HISTORY_START][rows], feat[dataset.item_list_length_field][rows],
                                      fields=[dataset.iid_field])
        return lists[dataset.item_id_list_field]
    return feat[dataset.item_id_list_field][rows]


def first_history_items(dataset: SequentialDataset, rows: torch.Tensor) -> torch.Tensor:
    """The first item of each of ``rows``' histories, without building the lists: read where a history starts
    (the whole of Speeder's dataset) or the lists' first column."""
    feat = dataset.inter_feat
    if HISTORY_START in feat:
        return dataset.history_source[dataset.iid_field][feat[HISTORY_START][rows]]
    return feat[dataset.item_id_list_field][rows, 0]


def item_interaction_counts(dataset: SequentialDataset, rows: np.ndarray | None = None) -> np.ndarray:
    """Per item id, the interactions held by a sequential dataset's one-row-per-target rows (all, or ``rows``),
    before any tiling.

    Each row holds one target; a user's first item is never a target, so it is read from the rows whose history
    is one item long.
    """
    feat = dataset.inter_feat
    rows = torch.arange(len(feat)) if rows is None else torch.as_tensor(rows)
    firsts = first_history_items(dataset, rows[feat[dataset.item_list_length_field][rows] == 1])
    items = np.concatenate([feat[dataset.iid_field][rows].numpy(), firsts.numpy()])
    return np.bincount(items, minlength=dataset.item_num)


class SpeederDataset(SequentialDataset):
    def data_augmentation(self):
        """RecBole's one row per target, each history kept as where it starts among its user's interactions
        (sorted by user and time, in ``history_source``); the history lists are built per split (``build``)."""
        self.logger.debug("data_augmentation")
        self._aug_presets()
        self._check_field("uid_field", "time_field")
        self.sort(by=[self.uid_field, self.time_field], ascending=True)
        targets, starts, lengths = history_windows(self.inter_feat[self.uid_field].numpy(), self.max_item_list_len)
        self.history_source = {field: values for field, values in self.inter_feat.interaction.items()
                               if field != self.uid_field}
        rows = select_rows(self.inter_feat, targets)
        rows.update(Interaction({self.item_list_length_field: torch.from_numpy(lengths),
                                 HISTORY_START: torch.from_numpy(starts)}))
        self.inter_feat = rows

    @property
    def item_counter(self) -> Counter:
        """RecBole's count of each item as a row's target, taken before the tiling (``train_all_positions``) keeps
        fewer training rows: RecBole's popularity metrics (AveragePopularity, TailPercentage) read it, and see the
        same counts as for RecBole's own sequential models."""
        untiled = getattr(self, "untiled_targets", None)
        return Counter(untiled.numpy()) if untiled is not None else super().item_counter

    def history_lists(self, starts: torch.Tensor, lengths: torch.Tensor,
                      fields: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The list fields (of every field, or of ``fields``) of rows whose histories start at ``starts`` and hold
        ``lengths`` items: RecBole's table, zero-padded to ``MAX_ITEM_LIST_LENGTH``."""
        starts, lengths = starts.numpy(), lengths.numpy()
        offsets = np.arange(self.max_item_list_len)
        lists = {}
        for field in fields or list(self.history_source):
            values = self.history_source[field]
            list_field = getattr(self, f"{field}_list_field")
            list_len = self.field2seqlen[list_field]
            shape = (len(starts), *((list_len,) if isinstance(list_len, int) else list_len))
            if (self.field2type[field] in (FeatureType.FLOAT, FeatureType.FLOAT_SEQ)
                    and field in self.config["numerical_features"]):
                shape += (2,)
            filled = torch.zeros(shape, dtype=values.dtype)
            for lo in range(0, len(starts), ROWS_PER_CHUNK):
                hi = lo + ROWS_PER_CHUNK
                valid = offsets < lengths[lo:hi, None]
                source = (starts[lo:hi, None] + offsets)[valid]
                filled[lo:hi][torch.from_numpy(valid)] = values[torch.from_numpy(source)]
            lists[list_field] = filled
        return lists

    def leave_one_out(self, group_by, leave_one_mode):
        """RecBole's leave-one-out split, the same parts; the training part counted, then tiled before it is
        copied (``train_all_positions``)."""
        if group_by is None:
            raise ValueError("leave one out strategy require a group field")
        if leave_one_mode not in LEAVE_ONE_OUT_PARTS:
            raise NotImplementedError(f"The leave_one_mode [{leave_one_mode}] has not been implemented.")
        parts = leave_one_out_index(self.inter_feat[group_by].numpy(), LEAVE_ONE_OUT_PARTS[leave_one_mode])
        empty = np.zeros(0, dtype=np.int64)
        if leave_one_mode == "valid_only":
            parts.append(empty)
        elif leave_one_mode == "test_only":
            parts = [parts[0], empty, parts[1]]
        self._drop_unused_col()
        counts = item_interaction_counts(self, parts[0])
        targets = self.inter_feat[self.iid_field][torch.as_tensor(parts[0])]
        parts[0] = self._training_rows(parts[0])
        datasets = [self.copy(select_rows(self.inter_feat, index)) for index in parts]
        datasets[0].item_train_counts, datasets[0].untiled_targets = counts, targets
        return datasets

    def build(self):
        datasets = super().build()
        train = datasets[0]
        if not hasattr(train, "item_train_counts"):  # a split other than leave-one-out
            train.item_train_counts = item_interaction_counts(train)
            train.untiled_targets = train.inter_feat[self.iid_field]
            rows = train._training_rows(np.arange(len(train.inter_feat)))
            datasets[0] = train.copy(select_rows(train.inter_feat, rows))
        for split in datasets:
            if HISTORY_START in split.inter_feat:  # RecBole's benchmark files bring their own lists
                feat = split.inter_feat
                feat.update(Interaction(self.history_lists(feat[HISTORY_START], feat[self.item_list_length_field])))
                feat.drop(HISTORY_START)
        return datasets

    def _training_rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows of the training part that training reads: all, or under ``train_all_positions`` the tiling."""
        if not self.config["train_all_positions"]:
            return rows
        users = self.inter_feat[self.uid_field][torch.as_tensor(rows)].numpy()
        keep = rows[tiling_window_index(users, self.config["MAX_ITEM_LIST_LENGTH"])]
        self.logger.info(
            f"all-position training: {len(keep)} of {len(rows)} training rows tile every history "
            f"(window {self.config['MAX_ITEM_LIST_LENGTH']})"
        )
        return keep
