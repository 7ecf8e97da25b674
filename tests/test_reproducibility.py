"""``reproducibility: True``: the same command run twice, in two processes, trains and tests bit for bit the same."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from recbole_speeder.trainer.checkpoint_file import read_checkpoint

from .conftest import REPO

RERUN = [
    "--model=Speeder", "--dataset=ml-100k", "--backbone_path=tiny-random", "--epochs=2", "--mpo_stages=~",
    "--show_progress=False",
    # 33 items (those rated by at least 300 users) in 940 histories: each training batch repeats every item
    # hundreds of times, so the threads of a parallel accumulating backward collide on nearly every run
    "--item_inter_num_interval=[300,inf)",
    "--loss_decimal_place=12", "--metric_decimal_place=12",  # compare more than the 4 digits logged by default
]


def run_once(folder: Path, feature_cache: Path) -> tuple[str, list[str], str, dict[str, torch.Tensor]]:
    """``run_recbole_speeder.py`` in a fresh process: its log, logged train losses, test result line, best weights."""
    folder.mkdir()
    # Two threads that spin briefly before they sleep, as OpenMP's threads do by default: they start a parallel
    # kernel together, so a race between them shows on nearly every run (the run script's passive waiting alone
    # hid it in about half the runs here).
    env = {**os.environ, "OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "10000"}
    done = subprocess.run(
        [sys.executable, str(REPO / "run_recbole_speeder.py"), *RERUN, f"--feature_cache_dir={feature_cache}",
         f"--checkpoint_dir={folder / 'saved'}"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (log_file,) = (folder / "log" / "Speeder").glob("*.log")
    log = log_file.read_text()
    losses = re.findall(r"train loss: ([0-9.]+)", log)
    tests = re.findall(r"test result \[protocol: [^]]*\]: (.+)", log)
    (best,) = (folder / "saved").glob("*[0-9].safetensors")
    assert len(losses) == 2 and tests, log[-3000:]
    return log, losses, tests[-1], read_checkpoint(best)[0]


def test_two_runs_of_one_command_give_identical_losses_results_and_weights(tmp_path):
    # a fresh feature cache, as on a user's first two runs: the first encodes the item texts, the second loads them
    cache = tmp_path / "features"
    first_log, *first = run_once(tmp_path / "first", cache)
    second_log, *second = run_once(tmp_path / "second", cache)
    encoding = "encoding 33 item texts"
    assert encoding in first_log and encoding not in second_log

    (losses, test, weights), (losses_again, test_again, weights_again) = first, second
    assert losses == losses_again
    assert test == test_again
    assert weights.keys() == weights_again.keys()
    assert all(torch.equal(weights[name], weights_again[name]) for name in weights)
