"""What answering over N candidates costs: generative Speeder next to score mode, and MRC items next to text.

Measured in one process on the real Amazon Beauty data (``dataset_prep``'s output), all models sharing one backbone
object: training (forward + backward + Adam step) of score mode on its tiling windows and of ``predict_mode:
generate`` on its training rows (one answer per row; the plain path without length buckets and with the full last
layer beside it) or, with ``train_all_positions``, on score mode's windows (tokens per row, rows/s, and the cost of
one epoch of each: steps per epoch x step time); then generative inference (``predict`` on each user's 20 candidate
rows) with MRC items (label or item-token answers, the latter with ``generate_copy: bias``) and with
``item_repr: text`` (constrained, and the free decoder of the LLaRA-style baseline), on the same users and
candidates. Paired rounds, as ``bench/efficiency.py``; results are appended to BENCHMARKS.md.

    python bench/generative.py --data_path=dataset/
    python bench/generative.py --data_path=dataset/ --repeats=2 --eval_users=8 --no_write
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run_recbole_speeder.py: before torch loads OpenMP
if __package__ in (None, ""):  # `python bench/generative.py` from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recbole.data import data_preparation  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

from bench.efficiency import check_data, prompt_tokens, quiet_config, shared_backbone  # noqa: E402
from bench.measure import adam, median, paired_ratio, paired_timings, scoring, training_step  # noqa: E402
from bench.report import command_line, machine_line, publish, run_cli, utc_now, workload_parser  # noqa: E402
from bench.workload import build_workload  # noqa: E402
from recbole_speeder.config import Config  # noqa: E402
from recbole_speeder.model import Speeder  # noqa: E402
from recbole_speeder.utils import create_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GENERATE = {"predict_mode": "generate", "train_all_positions": False}
# name -> (config change from the defaults, what it is); the first is the reference of the epoch ratios
TRAINED = {
    "score": ({}, "score mode, every position of a tiling window trains"),
    "generate, plain": (
        {**GENERATE, "length_bucket_tokens": 0, "last_layer_reads_only": False},
        "as below, one padded backbone call per batch, the last layer at every slot",
    ),
    "generate": (GENERATE, "one answer over 20 candidates per training row (item answers, copy bias: the defaults)"),
    "generate (windows)": (
        {"predict_mode": "generate"},
        "score mode's windows and loss, plus one answer per window, at its last target",
    ),
    "generate (windows, label answers)": (
        {"predict_mode": "generate", "generate_answer": "label"},
        "as above, the answer being the candidate's label token",
    ),
}
# generative inference, MRC items against text descriptions; the first is the fast side of the ratio
ANSWERING = {
    "generate (label answers)": ({**GENERATE, "generate_answer": "label"}, "MRC items: a label + 1 soft token each"),
    "generate": (GENERATE, "MRC items, the answer an item token with the copy bias (the defaults)"),
    "generate (free)": ({**GENERATE, "generate_decoder": "free"}, "as above, free decoder"),
    "generate (text)": ({**GENERATE, "item_repr": "text"}, "text descriptions, LLaRA-style titles"),
    "generate (text, free)": (
        {**GENERATE, "item_repr": "text", "generate_decoder": "free", "generate_validity": "llara"},
        "text descriptions, greedy titles (untrained: every answer runs to its token cap)",
    ),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = workload_parser(
        __doc__.split("\n\n")[0],
        eval_users_default=32,
        eval_users_help="users per inference batch (default 32: text mode answers ~1/s)",
        train_rows_help="training rows per step (default: train_batch_size, 256)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md", help="file the run is appended to")
    parser.add_argument("--no_write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return parser.parse_args(argv)


def build(args, workdir: str) -> tuple[dict, dict, dict, dict]:
    """Configs, models, each one's workload (training rows, inference users) and training-set size."""
    base = quiet_config(args.data_path, workdir)
    configs = {name: Config("Speeder", args.dataset, config_dict={**base, **change})
               for name, (change, _) in {**TRAINED, **ANSWERING}.items()}
    splits, works, models = {}, {}, {}
    for name, config in configs.items():
        key = bool(config["train_all_positions"])  # the training set depends on it, nothing else does
        if key not in splits:
            print(f"loading {args.dataset} (train_all_positions: {key}) ...", flush=True)
            init_seed(config["seed"], config["reproducibility"])
            splits[key] = data_preparation(config, create_dataset(config))
        train, valid, _ = splits[key]
        works[name] = build_workload(train, valid, args.train_rows or config["train_batch_size"],
                                     args.eval_users, args.candidates, config["seed"])
        print(f"building {name} ...", flush=True)
        init_seed(config["seed"], config["reproducibility"])
        models[name] = Speeder(config, train._dataset)
    sizes = {name: len(splits[bool(configs[name]["train_all_positions"])][0]._dataset) for name in configs}
    return configs, models, works, sizes


def setting(change: dict) -> str:
    return ", ".join(f"`{key}: {value}`" for key, value in change.items()) or "the defaults"


def answer_tokens(model: Speeder, candidates) -> float:
    """Mean prompt tokens per user of a generative ``predict`` (prefix, history and the candidate list)."""
    model.prompt.stats.update(samples=0, tokens=0)
    model.eval()
    scoring(model, candidates, full=False)()
    return model.mean_prompt_tokens()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_data(args.data_path, args.dataset)
    shared_backbone()
    with tempfile.TemporaryDirectory() as workdir:
        configs, models, works, sizes = build(args, workdir)
        shared = works[next(iter(TRAINED))]
        train_tokens = {name: prompt_tokens(models[name], works[name].train, loss=True) for name in TRAINED}
        steps = {name: training_step(models[name], adam(models[name]), works[name].train) for name in TRAINED}
        print(f"training steps, {args.repeats} rounds ...", flush=True)
        train_times = paired_timings(steps, args.repeats)
        users = shared.candidates  # the same users and candidate rows for both item representations
        eval_tokens = {name: answer_tokens(models[name], users) for name in ANSWERING}
        answers = {name: scoring(models[name], users, full=False) for name in ANSWERING}
        print(f"generative inference, {len(shared.users)} users, {args.repeats} rounds ...", flush=True)
        answer_times = paired_timings(answers, args.repeats)

    reference = next(iter(TRAINED))
    rows = {name: len(works[name].train) for name in TRAINED}
    epoch_steps = {name: -(-sizes[name] // rows[name]) for name in TRAINED}
    epoch_times = {name: [epoch_steps[name] * t for t in train_times[name]] for name in TRAINED}
    lines = [
        "| training | config | rows / epoch | answers / epoch | prompt tokens / row | step of rows (s) | rows/s "
        f"| epoch estimate (s) | epoch vs {reference} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (change, what) in TRAINED.items():
        answers = f"{sizes[name]:,}" if models[name].generative is not None else "–"  # one answer per row
        lines.append(
            f"| {name} ({what}) | {setting(change)} | {sizes[name]:,} | {answers} | {train_tokens[name]:.1f} "
            f"| {median(train_times[name]):.3f}"
            f" | {rows[name] / median(train_times[name]):.1f} | {median(epoch_times[name]):.0f} "
            f"| {paired_ratio(epoch_times[name], epoch_times[reference]):.2f}x |"
        )
    fast = next(iter(ANSWERING))
    lines += [
        "",
        f"| generative inference | config | prompt tokens / user | users/s | time vs {fast} |",
        "|---|---|---:|---:|---:|",
    ]
    for name, (change, what) in ANSWERING.items():
        lines.append(
            f"| {name} ({what}) | {setting(change)} | {eval_tokens[name]:.1f} "
            f"| {len(shared.users) / median(answer_times[name]):.1f} "
            f"| {paired_ratio(answer_times[name], answer_times[fast]):.2f}x |"
        )
    text = "\n".join([
        f"### {utc_now()}, generative",
        "",
        f"`{command_line()}`",
        "",
        f"Machine: {machine_line()}.",
        "",
        f"Backbone {configs[fast]['backbone_path']} with "
        f"{len(models[fast].llm.get_decoder().layers)} decoder layers, shared by every model; training rows per "
        f"step as the train loader gives them ({rows[reference]}), {len(shared.users)} users x {args.candidates} "
        f"candidate rows per inference batch (constrained decoder unless named), median of {args.repeats} paired "
        f"rounds; epoch estimate: training steps per epoch x step time; ratios are medians of per-round ratios.",
        "",
        *lines,
    ]) + "\n"
    publish(text, args.output, write=not args.no_write)


if __name__ == "__main__":
    run_cli(main)
