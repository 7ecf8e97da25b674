"""RecBole's full-ranking evaluation of SASRec on a large catalogue, with ``eval_batch_size`` fitted or set.

RecBole's evaluation scores ``[eval_batch_size x items]`` per batch and builds a hits matrix of the same size. When
the user does not set ``eval_batch_size``, the run fits it to ``eval_scores_per_batch``
(``evaluation/protocol.py``, ``fit_eval_batch_size``); here each setting evaluates an untrained SASRec (scores cost
the same trained or not) on ``--eval_users`` test users of bench/scale.py's synthetic data, in a child process of its
own: the batch size it ran with, users/s, the child's peak resident memory and what it held before evaluating.

    python bench/eval_batch.py --sizes=1m:2m --eval_users=4096 --workdir=/tmp/evalbatch
    python bench/eval_batch.py --sizes=20k:40k --eval_users=512 --no_write
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run_recbole_speeder.py: before torch loads OpenMP
if __package__ in (None, ""):  # `python bench/eval_batch.py` from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from bench import scale  # noqa: E402
from bench.report import command_line, machine_line, publish, run_cli, utc_now  # noqa: E402

SETTINGS = {"fitted": {}, "1024": {"eval_batch_size": 1024}}  # not set (the run fits it), and RecBole-style fixed


def evaluate(data: Path, setting: str, eval_users: int, budget: int | None) -> None:
    """In the child: build the run's data and an untrained SASRec as the run script does, then time its test."""
    from recbole_speeder.config import Config
    from recbole_speeder.quick_start import build_data_and_model
    from recbole_speeder.utils import get_trainer

    settings = {"data_path": str(data), "show_progress": False, "state": "ERROR", "log_wandb": False,
                "checkpoint_dir": str(data / "saved"), "eval_users": eval_users, "eval_exclude_history": True,
                "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, **SETTINGS[setting]}
    if budget is not None:
        settings["eval_scores_per_batch"] = budget
    config = Config("SASRec", scale.DATASET, config_dict=settings)
    _, (_, _, test), model = build_data_and_model(config)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    held = psutil.Process().memory_info().rss
    start = time.perf_counter()
    result = trainer.evaluate(test, load_best_model=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"eval_batch_size": config["eval_batch_size"], "users_per_s": eval_users / seconds,
                      "held_mib": held / 2**20, "ndcg@10": float(result["ndcg@10"])}), flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = scale.size_parser(__doc__.split("\n\n")[0], "1m:2m")
    parser.add_argument("--eval_users", type=int, default=4096, help="test users ranked per setting")
    parser.add_argument("--eval_scores_per_batch", type=int, default=None, help="the fitted run's bound (default: "
                        "the run's own)")
    parser.add_argument("--setting", choices=SETTINGS, default="fitted", help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        evaluate(Path(args.worker), args.setting, args.eval_users, args.eval_scores_per_batch)
        return []
    shared = [f"--eval_users={args.eval_users}",
              *([f"--eval_scores_per_batch={args.eval_scores_per_batch}"] if args.eval_scores_per_batch else [])]
    rows = scale.child_rows(args, __file__, {setting: [f"--setting={setting}", *shared] for setting in SETTINGS},
                            "setting", "evaluating with eval_batch_size {}")
    lines = ["| items | interactions | eval_batch_size | users/s | held before evaluating, MiB | peak MiB "
             "| test NDCG@10 | stopped |", "|---:|---:|---|---:|---:|---:|---:|---|"]
    for row in rows:
        size = row.get("eval_batch_size", "–")
        lines.append(f"| {row['items']:,} | {row['interactions']:,} | {row.get('setting', '–')}: {size} "
                     f"| {scale.fmt(row.get('users_per_s'))} | {scale.fmt(row.get('held_mib'), 0)} "
                     f"| {scale.fmt(row.get('peak_mib'), 0)} | {scale.fmt(row.get('ndcg@10'), 4)} | {row['stopped']} |")
    text = "\n".join([f"### {utc_now()}, SASRec's evaluation batch on a large catalogue", "", f"`{command_line()}`",
                      "", f"Machine: {machine_line()}.", "", "\n".join(lines)])
    publish(text + "\n", Path(args.output), write=not args.no_write)
    return rows


if __name__ == "__main__":
    run_cli(main)
