"""How the N negatives of a sampled candidate list are drawn (``candidate_negatives``).

RecBole's sampler for sequential data (``RepeatableSampler``) draws a user's N negatives with replacement and
excludes only the true item, so a list may repeat an item or hold items of the user's own history, the
validation item included. LLaRA and the MLLM recommenders after it list N distinct items that the user had
not interacted with up to the evaluated step. ``exclude_history`` draws the negatives that way, through
RecBole's own ``sampling`` (uniform, or its popularity alias table): the first N distinct allowed items of its
draws, i.e. RecBole's distribution restricted to the allowed items, without replacement. ``recbole`` keeps
RecBole's sampler as it is.

The history of an evaluated row is every item the user interacted with before its true item: the items of the
user's rows stamped earlier than the row, the items before the user's first row (that row's window), and the
row's own window, which also holds the earlier items of the same time stamp (Amazon stamps are days; only
items of that stamp beyond the window, ``MAX_ITEM_LIST_LENGTH`` back, would be missed). In a leave-one-out
split that is every training item for the validation row, and the training items plus the validation item
for the test row. Draws come from numpy's global RNG, which ``protocol.SeededCandidateSampler`` seeds per
(seed, phase, user).
"""

from __future__ import annotations

import numpy as np
import torch

from recbole_speeder.data.dataset import history_items
from recbole_speeder.errors import UsageError

NO_ITEMS = np.empty(0, dtype=np.int64)


def _windows(dataset) -> list[np.ndarray]:
    """Each row's history window (``item_id_list`` up to ``item_length``); empty for non-sequential datasets."""
    list_field = getattr(dataset, f"{dataset.iid_field}_list_field", None)
    if list_field is None or list_field not in dataset.inter_feat:
        return [NO_ITEMS] * len(dataset.inter_feat)
    lengths = dataset.inter_feat[dataset.item_list_length_field].numpy()
    return [window[:length] for window, length in zip(dataset.inter_feat[list_field].numpy(), lengths, strict=True)]


def _first_windows(dataset) -> dict[int, np.ndarray]:
    """Items before each user's first row (no row has them as its target): the window of its shortest row."""
    length_field = getattr(dataset, "item_list_length_field", None)
    if length_field is None or length_field not in dataset.inter_feat:  # not sequential: no windows
        return {}
    users = dataset.inter_feat[dataset.uid_field].numpy()
    lengths = dataset.inter_feat[length_field].numpy()
    order = np.lexsort((lengths, users))
    first = order[np.r_[True, users[order][1:] != users[order][:-1]]]
    windows = history_items(dataset, torch.from_numpy(first)).numpy()
    return {int(users[row]): window[: lengths[row]] for row, window in zip(first, windows, strict=True)}


def row_histories(full, evaluated) -> list[np.ndarray]:
    """The history (sorted distinct item ids) of every row of ``evaluated``, from ``full``: all rows of all users."""
    if full.time_field is None or full.time_field not in full.inter_feat:
        raise UsageError(
            "each user's history is read from the dataset's time field (candidate_negatives: exclude_history, "
            "eval_exclude_history: True): load it, or set candidate_negatives: recbole and eval_exclude_history: False"
        )
    users, items, times = (full.inter_feat[f].numpy() for f in (full.uid_field, full.iid_field, full.time_field))
    order = np.lexsort((times, users))
    users, items, times = users[order], items[order], times[order]
    before = _first_windows(full)
    rows_users = evaluated.inter_feat[evaluated.uid_field].numpy()
    rows_times = evaluated.inter_feat[evaluated.time_field].numpy()
    starts = np.searchsorted(users, rows_users, side="left")
    ends = np.searchsorted(users, rows_users, side="right")
    histories = []
    for user, time, start, end, window in zip(rows_users, rows_times, starts, ends, _windows(evaluated), strict=True):
        earlier = start + np.searchsorted(times[start:end], time, side="left")
        histories.append(np.unique(np.concatenate([before.get(int(user), NO_ITEMS), items[start:earlier], window])))
    return histories


class HistoryExcludingSampler:
    """RecBole's sampler, drawing N distinct negatives outside each evaluated row's history (LLaRA's rule).

    Built for one evaluation loader: its rows' histories are computed once, and every row is checked to have N
    allowed items, so an impossible list fails before training instead of looping at the first validation.
    """

    def __init__(self, sampler, evaluated, num: int):
        if not hasattr(sampler, "dataset"):
            raise UsageError(
                "candidate_negatives: exclude_history needs RecBole's repeatable sampler (repeatable: True), "
                "or set candidate_negatives: recbole"
            )
        self.sampler = sampler
        self.phase = sampler.phase
        histories = row_histories(sampler.dataset, evaluated)
        users = evaluated.inter_feat[evaluated.uid_field].numpy().tolist()
        self._check(evaluated, users, histories, num)
        self.histories: dict[int, list[np.ndarray]] = {}
        for user, history in zip(users, histories, strict=True):
            self.histories.setdefault(user, []).append(history)

    def _check(self, evaluated, users: list[int], histories: list[np.ndarray], num: int) -> None:
        """Every row must have ``num`` items that RecBole's distribution can draw, outside history and target."""
        drawable = np.zeros(self.sampler.item_num, dtype=bool)
        if self.sampler.distribution == "popularity":
            drawable[np.fromiter(self.sampler.prob, dtype=np.int64)] = True  # items with a popularity above 0
        else:
            drawable[1:] = True
        total = int(drawable.sum())
        targets = evaluated.inter_feat[evaluated.iid_field].numpy()
        for user, target, history in zip(users, targets, histories, strict=True):
            left = total - int(drawable[np.union1d(history, target)].sum())
            if left < num:
                raise UsageError(
                    f"candidate_negatives: exclude_history needs {num} distinct negatives outside each user's "
                    f"history, but user '{evaluated.id2token(evaluated.uid_field, user)}' has {left} left for its "
                    f"{self.phase} list ({len(history)} history items and the target excluded from "
                    f"{total} {self.sampler.distribution} items): lower N in eval_args.mode "
                    "or set candidate_negatives: recbole"
                )

    def sample_by_user_ids(self, user_ids, item_ids, num: int) -> torch.Tensor:
        """``num`` negatives per row in RecBole's layout: the j-th negative of row i at ``j * len(rows) + i``.

        RecBole's ``NegSampleEvalDataLoader`` calls once per user with all its rows in dataset order, so the
        k-th row of a user in a call is its k-th evaluated row.
        """
        users, targets = np.asarray(user_ids).tolist(), np.asarray(item_ids).tolist()
        negatives = np.empty((len(users), num), dtype=np.int64)
        seen: dict[int, int] = {}
        for row, (user, target) in enumerate(zip(users, targets, strict=True)):
            k = seen.get(user, 0)
            seen[user] = k + 1
            negatives[row] = self._draw(np.append(self.histories[user][k], target), num)
        return torch.from_numpy(negatives.T.reshape(-1))

    def _draw(self, excluded: np.ndarray, num: int) -> np.ndarray:
        """The first ``num`` distinct items of RecBole's draws that are not ``excluded`` (more draws while short)."""
        picked = np.empty(0, dtype=np.int64)
        size = 2 * num
        while len(picked) < num:
            draws = np.asarray(self.sampler.sampling(size), dtype=np.int64)
            picked = np.concatenate([picked, draws[~np.isin(draws, excluded)]])
            _, first = np.unique(picked, return_index=True)
            picked = picked[np.sort(first)]
            size *= 2
        return picked[:num]
