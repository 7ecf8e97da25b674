"""Shared fixtures: tiny Speeder configs on RecBole's bundled ml-100k, MiniLM features computed once."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """One MiniLM encoding of ml-100k's item texts per test session (RecBole's copy may be read-only)."""
    return tmp_path_factory.mktemp("features")


@pytest.fixture
def tiny_config(tmp_path, feature_cache):
    """A factory for plugin Configs of a tiny-random-backbone Speeder on a small slice of ml-100k."""
    from recbole_speeder.config import Config

    def make(model: str = "Speeder", dataset: str = "ml-100k", **overrides):
        config_dict = {
            "backbone_path": "tiny-random",
            "epochs": 1,
            "show_progress": False,
            "checkpoint_dir": str(tmp_path / "saved"),
            "feature_cache_dir": str(feature_cache),
            "log_wandb": False,
            "state": "WARNING",
            # a ml-100k subset: users with 20-30 ratings (about 170 of 943), histories up to 20 items
            "user_inter_num_interval": "[20,30]",
            "MAX_ITEM_LIST_LENGTH": 20,
            "mpo_stages": None,  # one stage of `epochs`: MPO schedules are tested in test_trainer.py
        }
        config_dict.update(overrides)
        return Config(model, dataset, config_dict=config_dict)

    return make
