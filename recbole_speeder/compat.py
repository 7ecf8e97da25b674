"""RecBole 1.2.1 fixes for numpy 2 / torch >= 2.6 and its own bugs, each the smallest change that makes it run.

``apply_compat()`` is idempotent and is called by the plugin's ``Config`` before RecBole does any work, so
users of ``recbole_speeder`` never need to patch RecBole themselves. The pandas 3 breakage (``token_seq``
columns crash and padding ids stay unfilled, dataset.py:1217 and 648) is handled by pinning ``pandas<3``.
"""

from __future__ import annotations

import functools
import types
import warnings

import numpy as np
import torch


def _restore_numpy_aliases() -> None:
    # configurator.py:630 (Config.compatibility_settings) reads np.float_, np.complex_ and np.unicode_,
    # removed in numpy 2.0: every Config() raised AttributeError.
    for alias, target in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if alias not in np.__dict__:
            setattr(np, alias, target)


def _trust_recbole_checkpoints() -> None:
    # trainer.py:323 and :583 torch.load() RecBole's own checkpoints, which pickle the Config object.
    # torch >= 2.6 defaults to weights_only=True and refuses them. Only RecBole's trainer module gets a
    # torch whose load() trusts the file; torch.load stays strict for everyone else.
    import recbole.trainer.trainer as recbole_trainer

    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)
    proxy.load = functools.partial(torch.load, weights_only=False)
    recbole_trainer.torch = proxy


def _undo_global_anomaly_detection() -> None:
    # sine.py:25 calls torch.autograd.set_detect_anomaly(True) at import time, which every import of
    # recbole.model.sequential_recommender triggers: a measured 1.6x slowdown of every backward pass.
    import recbole.model.sequential_recommender  # noqa: F401  (the import is what turns it on)

    torch.autograd.set_detect_anomaly(False)


def _quiet_known_warnings() -> None:
    # dataset.py fills NaNs with chained inplace fillna, which pandas 2.x flags on every load with a
    # screen-long FutureWarning; behaviour is correct under the pinned pandas<3.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")


def _collect_item_counts() -> None:
    # collector.py:227 (Collector.get_data_struct) calls .cpu() on every collected resource, but data_collect keeps
    # the training item counts as a Counter ("data.count_items"): every evaluation with AveragePopularity or
    # TailPercentage raised AttributeError. Tensors still move to the CPU; other values pass through unchanged.
    from recbole.evaluator.collector import Collector

    original = Collector.get_data_struct

    def get_data_struct(self):
        resources = self.data_struct._data_dict
        kept = {key: value for key, value in resources.items() if not isinstance(value, torch.Tensor)}
        for key in kept:
            del resources[key]
        struct = original(self)
        resources.update(kept)
        struct._data_dict.update(kept)
        return struct

    Collector.get_data_struct = get_data_struct


@functools.cache
def apply_compat() -> None:
    """Apply every fix once per process."""
    _quiet_known_warnings()
    _restore_numpy_aliases()
    _trust_recbole_checkpoints()
    _undo_global_anomaly_detection()
    _collect_item_counts()
