"""Beauty: SpeederDataset's splits against RecBole's SequentialDataset's (then tiled), field by field, and the
histories that eval_exclude_history removes, read from either whole dataset.

Run from a checkout with the prepared Beauty files: python docs/results/scale-cpu/beauty_build_check.py <data_path>
"""

import sys
import time

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset

from recbole_speeder.config import Config
from recbole_speeder.data.dataset import SpeederDataset, item_interaction_counts, select_rows, tiling_window_index
from recbole_speeder.evaluation.candidates import row_histories

config = Config("Speeder", "Amazon_Beauty",
                config_dict={"data_path": sys.argv[1], "state": "ERROR", "backbone_path": "tiny-random"})
start = time.perf_counter()
ours_whole = SpeederDataset(config)
ours = ours_whole.build()
ours_s = time.perf_counter() - start
start = time.perf_counter()
theirs_whole = SequentialDataset(config)
theirs = theirs_whole.build()
theirs_s = time.perf_counter() - start
counts = item_interaction_counts(theirs[0])
keep = tiling_window_index(theirs[0].inter_feat[theirs[0].uid_field].numpy(), config["MAX_ITEM_LIST_LENGTH"])
theirs[0] = theirs[0].copy(select_rows(theirs[0].inter_feat, keep))
for name, mine, reference in zip(("train", "valid", "test"), ours, theirs, strict=True):
    assert mine.inter_feat.interaction.keys() == reference.inter_feat.interaction.keys()
    for field, values in reference.inter_feat.interaction.items():
        assert torch.equal(mine.inter_feat[field], values), (name, field)
    print(name, len(mine.inter_feat), "rows equal in", sorted(reference.inter_feat.interaction.keys()))
assert np.array_equal(ours[0].item_train_counts, counts)
for name, split in (("valid", 1), ("test", 2)):
    mine, reference = row_histories(ours_whole, ours[split]), row_histories(theirs_whole, theirs[split])
    assert all(np.array_equal(a, b) for a, b in zip(mine, reference, strict=True))
    print(f"{name}: the {len(mine)} rows' histories equal ({sum(map(len, mine))} items)")
print(f"item_train_counts equal; build s: speeder {ours_s:.1f}, recbole {theirs_s:.1f}")
