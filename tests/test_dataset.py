"""SpeederDataset builds RecBole's sequential splits with array operations: the same rows, in the same order, as
RecBole 1.2.1's own SequentialDataset (then tiled for all-position training), and the same training counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from recbole.data.dataset import SequentialDataset

from recbole_speeder.data.dataset import (
    HISTORY_START,
    SpeederDataset,
    item_interaction_counts,
    leave_one_out_index,
    select_rows,
    tiling_window_index,
)
from recbole_speeder.evaluation.candidates import row_histories


def assert_same_rows(ours, theirs) -> None:
    assert ours.inter_feat.interaction.keys() == theirs.inter_feat.interaction.keys()
    for field, values in theirs.inter_feat.interaction.items():
        assert ours.inter_feat[field].dtype == values.dtype, field
        assert torch.equal(ours.inter_feat[field], values), field


@pytest.mark.parametrize("split", ["valid_and_test", "valid_only", "test_only"])
@pytest.mark.parametrize("all_positions", [False, True])
def test_the_splits_are_recboles_row_for_row(tiny_config, split, all_positions):
    config = tiny_config(MAX_ITEM_LIST_LENGTH=5, train_all_positions=all_positions, user_inter_num_interval="[5,40]",
                         eval_args={"split": {"LS": split}, "order": "TO", "group_by": "user",
                                    "mode": {"valid": "full", "test": "full"}})
    ours_whole, theirs_whole = SpeederDataset(config), SequentialDataset(config)
    ours, theirs = ours_whole.build(), theirs_whole.build()
    # the whole dataset keeps where each history starts, not the lists: the splits build those for their rows
    assert ours_whole.item_id_list_field not in ours_whole.inter_feat and HISTORY_START in ours_whole.inter_feat
    assert not any(HISTORY_START in split.inter_feat for split in ours)
    for mine, reference in zip(row_histories(ours_whole, ours[2]), row_histories(theirs_whole, theirs[2]), strict=True):
        assert np.array_equal(mine, reference)  # each test row's history, its users' first items included
    assert np.array_equal(item_interaction_counts(ours_whole), item_interaction_counts(theirs_whole))
    assert len(theirs[0].inter_feat[theirs[0].item_id_list_field][0]) == 5  # ml-100k rows slide past the window
    counts, targets = item_interaction_counts(theirs[0]), theirs[0].item_counter
    if all_positions:
        users = theirs[0].inter_feat[theirs[0].uid_field].numpy()
        keep = tiling_window_index(users, 5)
        assert 0 < len(keep) < len(users)
        theirs[0] = theirs[0].copy(select_rows(theirs[0].inter_feat, keep))
    for mine, reference in zip(ours, theirs, strict=True):
        assert_same_rows(mine, reference)
    assert np.array_equal(ours[0].item_train_counts, counts)
    assert ours[0].item_counter == targets  # the popularity metrics' counts, before tiling
    assert len(ours[1].inter_feat) == (0 if split == "test_only" else len(theirs[1].inter_feat))


def test_leave_one_out_index_is_recboles_split_for_short_and_long_users():
    """Users with one and two rows keep them in training and test as RecBole does; order follows first rows."""
    rng = np.random.default_rng(0)
    users = rng.permutation(np.repeat(np.arange(40), rng.integers(1, 9, size=40)))
    reference = SequentialDataset.__new__(SequentialDataset)
    for parts in (1, 2):
        expected = reference._split_index_by_leave_one_out(reference._grouped_index(users), leave_one_num=parts)
        ours = leave_one_out_index(users, parts)
        assert [part.tolist() for part in ours] == expected
