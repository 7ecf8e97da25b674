"""The benchmark's inputs: one fixed sample of training windows and of evaluation users, shared by every model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from recbole.data.interaction import Interaction


@dataclass
class Workload:
    train: Interaction  # training windows as RecBole's train loader builds them (tiled for all-position training)
    users: Interaction  # validation users, one row each, as the full-ranking loader builds them
    candidates: Interaction  # ``users`` repeated once per candidate (true item + uniform negatives), as RecBole's
    # sampled evaluation feeds ``predict``
    n_candidates: int
    train_targets: int  # next-item predictions in ``train`` when every position trains (Speeder's loss)


def build_workload(
    train_loader, valid_loader, train_rows: int, eval_users: int, n_candidates: int, seed: int
) -> Workload:
    """Draw the rows once with ``seed``: the same windows and users go to every model, in the same order."""
    rng = np.random.default_rng(seed)
    dataset, n_train, n_users = train_loader._dataset, len(train_loader._dataset), len(valid_loader._dataset)
    train_index = rng.choice(n_train, size=min(train_rows, n_train), replace=False)
    user_index = rng.choice(n_users, size=min(eval_users, n_users), replace=False)
    train = train_loader.collate_fn(np.sort(train_index))
    users = valid_loader.collate_fn(np.sort(user_index))[0]
    candidates = candidate_rows(users, n_candidates, dataset.iid_field, dataset.item_num, rng)
    targets = int(train[dataset.config["ITEM_LIST_LENGTH_FIELD"]].sum())
    return Workload(train, users, candidates, n_candidates, targets)


def candidate_rows(
    users: Interaction, n_candidates: int, item_field: str, n_items: int, rng: np.random.Generator
) -> Interaction:
    """Each user's row ``n_candidates`` times: its true next item, then uniform negatives (never the true item)."""
    truth = users[item_field].numpy()
    negatives = rng.integers(1, n_items - 1, size=(len(truth), n_candidates - 1))
    negatives = negatives + (negatives >= truth[:, None])  # skip the true item, stay uniform over the others
    items = np.concatenate([truth[:, None], negatives], axis=1)
    rows = users.repeat_interleave(n_candidates)
    rows.update(Interaction({item_field: torch.from_numpy(items.reshape(-1))}))
    return rows
