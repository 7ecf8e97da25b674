"""What each speed setting of Speeder is worth: one training step and one full-ranking batch per variant.

Every variant is Speeder with one config change from the defaults (properties/model/Speeder.yaml), measured side
by side with the defaults on the same windows and users of the real Amazon Beauty data; the epoch estimate scales
the step and batch times to one pass over the training windows and one validation pass.

    python bench/ablation.py --data_path=dataset/
    python bench/ablation.py --data_path=dataset/ --variants=no_buckets,float32 --no_write
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run_recbole_speeder.py: before torch loads OpenMP
if __package__ in (None, ""):  # `python bench/ablation.py` from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recbole.data import data_preparation  # noqa: E402

from bench.efficiency import check_data, quiet_config, shared_backbone  # noqa: E402
from bench.measure import adam, median, paired_ratio, paired_timings, scoring, training_step  # noqa: E402
from bench.report import command_line, machine_line, publish, run_cli, utc_now  # noqa: E402
from bench.workload import build_workload  # noqa: E402
from recbole_speeder.config import Config  # noqa: E402
from recbole_speeder.errors import UsageError  # noqa: E402
from recbole_speeder.experiments.variants import VARIANTS as NAMED_VARIANTS  # noqa: E402
from recbole_speeder.model import Speeder  # noqa: E402
from recbole_speeder.trainer.rng import seed_run  # noqa: E402
from recbole_speeder.utils import create_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# name -> (config change, what it switches off or on)
VARIANTS = {
    "default": ({}, "the shipped defaults"),
    "no_buckets": ({"length_bucket_tokens": 0}, "whole batch padded to its longest prompt"),
    "float32": ({"autocast_dtype": "float32"}, "no bf16 autocast"),
    "bfloat16": ({"autocast_dtype": "bfloat16"}, "bf16 autocast even where the CPU has no native bf16"),
    "recast_weights": ({"autocast_frozen_weights": False}, "frozen weights recast by autocast at every call"),
    "no_prefix_cache": ({"prefix_cache": False}, "instruction prefix recomputed for every row"),
    "no_inference_mode": ({"inference_mode": False}, "scoring under RecBole's torch.no_grad only"),
    "full_last_layer": ({"last_layer_reads_only": False}, "the last decoder layer computed at every slot"),
    "no_lora": ({"lora_r": 0}, "LLM fully frozen"),
    "lora_all": (NAMED_VARIANTS["lora-all"],
                 "LoRA on every linear layer of the decoder (attention and MLP), not only q and v"),
    "layers_1": ({"backbone_layers": 1}, "1 decoder layer"),
    "layers_4": ({"backbone_layers": 4}, "4 decoder layers"),
    "layers_8": ({"backbone_layers": 8}, "8 decoder layers"),
    "layers_30": ({"backbone_layers": 30}, "the full 30-layer SmolLM2"),
    "mrc_tokens_2": ({"mrc_tokens": 2}, "2 soft tokens per item"),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", default="dataset/", help="RecBole data_path holding <dataset>/ (dataset_prep)")
    parser.add_argument("--dataset", default="Amazon_Beauty", help="dataset name (default Amazon_Beauty)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument(
        "--train_rows", type=int, default=None, help="training windows per step (default: train_batch_size, 256)"
    )
    parser.add_argument(
        "--eval_users", type=int, default=None, help="users per evaluation batch (default: eval_batch_size, 1024)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md", help="file the run is appended to")
    parser.add_argument("--no_write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_data(args.data_path, args.dataset)
    shared_backbone()
    names = ["default"] + [v for v in args.variants.split(",") if v != "default"]
    with tempfile.TemporaryDirectory() as workdir:
        base = quiet_config(args.data_path, workdir)
        config = Config("Speeder", args.dataset, config_dict=base)
        seed_run(config["seed"], config["reproducibility"])
        train, valid, _ = data_preparation(config, create_dataset(config))
        train_rows = args.train_rows or config["train_batch_size"]
        eval_users = args.eval_users or config["eval_batch_size"]
        work = build_workload(train, valid, train_rows, eval_users, 2, config["seed"])
        models = {}
        for name in names:
            print(f"building {name} ...", flush=True)
            variant = Config("Speeder", args.dataset, config_dict={**base, **VARIANTS[name][0]})
            seed_run(variant["seed"], variant["reproducibility"])
            models[name] = Speeder(variant, train._dataset)

        print(f"{len(names)} variants, {args.repeats} rounds ...", flush=True)
        steps = {name: training_step(model, adam(model), work.train) for name, model in models.items()}
        # variants differ widely in memory (no_buckets, layers_30): one settling call before each timed one
        train_times = paired_timings(steps, args.repeats, settle=1)
        for model in models.values():
            model.eval()
        scores = {name: scoring(model, work.users) for name, model in models.items()}
        rank_times = paired_timings(scores, args.repeats, settle=1)
        n_steps = -(-len(train._dataset) // len(work.train))
        n_batches = -(-len(valid._dataset) // len(work.users))
    lines = [
        "| variant | change | train step (s) | vs default | full-ranking batch (s) | vs default | epoch estimate (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        change, what = VARIANTS[name]
        setting = ", ".join(f"`{k}: {v}`" for k, v in change.items()) or "–"
        epoch = n_steps * median(train_times[name]) + n_batches * median(rank_times[name])
        lines.append(
            f"| {name} ({what}) | {setting} | {median(train_times[name]):.3f} "
            f"| {paired_ratio(train_times[name], train_times['default']):.2f}x | {median(rank_times[name]):.3f} "
            f"| {paired_ratio(rank_times[name], rank_times['default']):.2f}x | {epoch:.0f} |"
        )
    text = (
        "\n".join(
            [
                f"### {utc_now()}, ablation",
                "",
                f"`{command_line()}`",
                "",
                f"Machine: {machine_line()}.",
                "",
                f"{len(work.train)} training windows per step, {len(work.users)} users per batch, median of "
                f"{args.repeats} paired rounds, each timed call after an untimed one of the same variant; 'vs "
                f"default' is time relative to the defaults (above 1 = slower). "
                f"Epoch estimate: {n_steps} training steps of {len(work.train)} + {n_batches} "
                f"validation batches of {len(work.users)}, model time only.",
                "",
                *lines,
            ]
        )
        + "\n"
    )
    publish(text, args.output, write=not args.no_write)


if __name__ == "__main__":
    run_cli(main)
