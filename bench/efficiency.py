"""Speeder against the same model in text-description mode (and SASRec for reference), side by side.

Measured in one process on one fixed sample of the real Amazon Beauty data (``dataset_prep``'s output): prompt
tokens per sample, training windows/s (forward + backward + optimizer step), users/s for full ranking and for the
20-candidate protocol (``predict`` on each user's row repeated per candidate), and peak memory. Both Speeder modes
share the backbone object and every speed path (length-bucketed micro-batches without per-item padding, prefix
K/V cache, bf16 autocast where native); only ``item_repr`` differs. Results are appended to BENCHMARKS.md.

    python -m dataset_prep prepare --source generic --category Beauty \\
        --input ../shared/data/amazon_beauty/derived --out dataset/ --features text
    python bench/efficiency.py --data_path=dataset/
    python bench/efficiency.py --data_path=dataset/ --backbone_layers=30 --train_rows=32 --no_write

Any other ``--key=value`` is a config override for both Speeder modes (e.g. ``--autocast_dtype=float32``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run_recbole_speeder.py: before torch loads OpenMP
if __package__ in (None, ""):  # `python bench/efficiency.py` from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from recbole.data import data_preparation  # noqa: E402

from bench.measure import adam, median, paired_ratio, paired_timings, peak_rss, scoring, training_step  # noqa: E402
from bench.report import ModelRow, publish, run_cli, section, workload_parser  # noqa: E402
from bench.workload import Workload, build_workload  # noqa: E402
from recbole_speeder.config import Config  # noqa: E402
from recbole_speeder.errors import UsageError  # noqa: E402
from recbole_speeder.trainer.rng import seed_run  # noqa: E402
from recbole_speeder.utils import create_dataset, get_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# models whose configs agree on these share one backbone object; the model may store the frozen weights in its
# autocast dtype, so the autocast keys are among them
BACKBONE_KEYS = (  # every key load_backbone reads: two configs that differ in one get two backbones
    "backbone_path",
    "backbone_offline_copy",
    "backbone_layers",
    "backbone_dtype",
    "backbone_init",
    "seed",  # backbone_init's permutation and LoRA's initialisation
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "autocast_dtype",
    "autocast_frozen_weights",
)
PREPARE_HINT = (
    "python -m dataset_prep prepare --source generic --category Beauty "
    "--input ../shared/data/amazon_beauty/derived --out {data_path} --features text"
)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = workload_parser(
        __doc__.split("\n\n")[0],
        eval_users_default=None,
        eval_users_help="users per inference batch (default: eval_batch_size, 1024)",
        train_rows_help="training windows per step (default: train_batch_size, 256)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no_text", action="store_true", help="skip the text-description mode (no ratios)")
    parser.add_argument("--profile", action="store_true", help="add a per-stage profile of Speeder to the output")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md", help="file the run is appended to")
    parser.add_argument("--no_write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        raise UsageError(f"unrecognised arguments {bad}: config overrides take the form --key=value")
    return args, rest


def check_data(data_path: str, dataset: str) -> None:
    folder = Path(data_path) / dataset
    wanted = [folder / f"{dataset}.{suffix}" for suffix in ("inter", "item", "text_emb.npz")]
    missing = [p.name for p in wanted if not p.is_file()]
    if missing:
        raise UsageError(
            f"{folder} lacks {', '.join(missing)}; prepare it first: " + PREPARE_HINT.format(data_path=data_path)
        )


def shared_backbone() -> None:
    """Load the backbone once for both Speeder modes: same weights by construction, one load (~20 s) saved."""
    import recbole_speeder.model.speeder as speeder_module

    loader = speeder_module.load_backbone
    cache: dict = {}

    @functools.wraps(loader)
    def load_once(config):
        key = tuple(str(config[k]) for k in BACKBONE_KEYS)
        if key not in cache:
            cache[key] = loader(config)
        return cache[key]

    speeder_module.load_backbone = load_once


def quiet_config(data_path: str, workdir: str) -> dict:
    """Config for benchmarked models: no progress bars or info logs in the timings, checkpoints in ``workdir``."""
    return {
        "data_path": data_path,
        "show_progress": False,
        "state": "WARNING",
        "log_wandb": False,
        "checkpoint_dir": workdir,
    }


def build_models(args, overrides: list[str], workdir: str):
    """Speeder (MRC tokens), Speeder in text-description mode, and SASRec, on one dataset split."""
    base = quiet_config(args.data_path, workdir)
    configs = {"Speeder": Config("Speeder", args.dataset, config_dict=base, cmd_args=overrides)}
    if not args.no_text:
        configs["Speeder (text)"] = Config(
            "Speeder", args.dataset, config_dict={**base, "item_repr": "text"}, cmd_args=overrides
        )
    configs["SASRec"] = Config("SASRec", args.dataset, config_dict=base)
    config = configs["Speeder"]
    seed_run(config["seed"], config["reproducibility"])
    print(f"loading {args.dataset} from {args.data_path} ...", flush=True)
    train, valid, _ = data_preparation(config, create_dataset(config))
    models = {}
    for name, model_config in configs.items():
        print(f"building {name} ...", flush=True)
        seed_run(model_config["seed"], model_config["reproducibility"])
        models[name] = get_model(model_config["model"])(model_config, train._dataset)
    return config, train, valid, models


def prompt_tokens(model, interaction, loss: bool) -> float | None:
    if not hasattr(model, "prompt"):
        return None
    model.prompt.stats.update(samples=0, tokens=0)
    model.eval()
    with torch.no_grad():
        model.calculate_loss(interaction) if loss else model.full_sort_predict(interaction)
    return model.mean_prompt_tokens()


def measure(models: dict, work: Workload, repeats: int) -> dict[str, ModelRow]:
    rows = {name: ModelRow(name) for name in models}
    for name, model in models.items():
        rows[name].train_tokens = prompt_tokens(model, work.train, loss=True)
        rows[name].eval_tokens = prompt_tokens(model, work.users, loss=False)
    steps = {name: training_step(model, adam(model), work.train) for name, model in models.items()}
    full = {name: scoring(model, work.users) for name, model in models.items()}
    candidates = {name: scoring(model, work.candidates, full=False) for name, model in models.items()}

    print(f"training steps: {len(work.train)} windows ({work.train_targets} targets), {repeats} rounds ...", flush=True)
    times = {"train": paired_timings(steps, repeats)}
    for model in models.values():
        model.eval()
    for name, model in models.items():  # the once-per-evaluation caches, timed apart from the per-batch cost
        if hasattr(model, "item_tokens"):
            model.train(False)  # drops the caches
            start = time.perf_counter()
            with torch.no_grad():
                model.item_vectors(model.item_tokens())
                model.runtime.prefix_key_values()
            rows[name].item_cache_s = time.perf_counter() - start
    print(f"full ranking: {len(work.users)} users, {repeats} rounds ...", flush=True)
    times["full"] = paired_timings(full, repeats)
    print(f"{work.n_candidates}-candidate scoring: {len(work.users)} users, {repeats} rounds ...", flush=True)
    times["candidates"] = paired_timings(candidates, repeats)

    for name, model in models.items():
        row = rows[name]
        targets = work.train_targets if getattr(model, "train_all_positions", False) else len(work.train)
        row.train_rows_per_s = len(work.train) / median(times["train"][name])
        row.train_targets_per_s = targets / median(times["train"][name])
        row.full_users_per_s = len(work.users) / median(times["full"][name])
        row.candidate_users_per_s = len(work.users) / median(times["candidates"][name])
        with peak_rss() as train_peak:
            steps[name]()
        model.train(False)
        with peak_rss() as eval_peak:
            full[name]()
        row.train_mib, row.eval_mib = train_peak["mib"], eval_peak["mib"]
    rows["_times"] = times  # type: ignore[assignment]
    return rows


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    check_data(args.data_path, args.dataset)
    if args.threads:
        torch.set_num_threads(args.threads)
    shared_backbone()
    with tempfile.TemporaryDirectory() as workdir:
        config, train, valid, models = build_models(args, overrides, workdir)
        # the batch sizes the run script trains and evaluates with, unless told otherwise
        train_rows = args.train_rows or config["train_batch_size"]
        eval_users = args.eval_users or config["eval_batch_size"]
        work = build_workload(train, valid, train_rows, eval_users, args.candidates, config["seed"])
        rows = measure(models, work, args.repeats)
        times = rows.pop("_times")
        extra = ""
        if args.profile:
            from bench.stage_profile import stage_profile

            speeder = models["Speeder"]
            extra = (
                "Profile of one Speeder training step and one full-ranking batch (caches rebuilt):\n\n"
                + stage_profile(speeder, adam(speeder), work.train, work.users)
            )
    ratios = {}
    if "Speeder (text)" in models:
        for key, label in (
            ("train", "training"),
            ("full", "full-ranking inference"),
            ("candidates", f"{args.candidates}-candidate inference"),
        ):
            ratios[label] = paired_ratio(times[key]["Speeder (text)"], times[key]["Speeder"])
        text, mrc = rows["Speeder (text)"], rows["Speeder"]
        ratios["prompt tokens per user (fewer)"] = text.eval_tokens / mrc.eval_tokens
    settings = (
        f"backbone {config['backbone_path']} with {len(models['Speeder'].llm.get_decoder().layers)} decoder layers, "
        f"LoRA r={config['lora_r']}, autocast {models['Speeder'].autocast_dtype or 'off (float32)'}, "
        f"length buckets {config['length_bucket_tokens']} tokens / {config['length_bucket_padding']} padding, "
        f"prefix cache {config['prefix_cache']}, mrc_tokens {config['mrc_tokens']}, max_item_text_tokens "
        f"{config['max_item_text_tokens']}; {len(work.train)} training windows per step, {len(work.users)} users per "
        f"inference batch, {args.repeats} rounds (medians), warm-up excluded; peak RSS above the phase's start, "
        f"sampled every 2 ms (psutil)"
    )
    text = section(settings, list(rows.values()), ratios, extra)
    publish(text, args.output, write=not args.no_write)


if __name__ == "__main__":
    run_cli(main)
