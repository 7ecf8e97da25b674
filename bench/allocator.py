"""What ``keep_freed_memory`` is worth: training steps of SASRec and Speeder with glibc's allocator as configured
and as it comes, each setting in processes of its own (the allocator's mode is set once per process).

Rounds alternate the two settings, one fresh worker process per (model, setting, round); a worker times
``--steps`` training steps on the first batches of the real training loader (after one warm-up step) and reports
the median step, the CPU time the kernel spent for it, and the process's peak RSS.

    python bench/allocator.py --data_path=dataset/
    python bench/allocator.py --data_path=dataset/ --models=SASRec --rounds=2 --no_write
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run_recbole_speeder.py: before torch loads OpenMP
if __package__ in (None, ""):  # `python bench/allocator.py` from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.efficiency import check_data, quiet_config  # noqa: E402
from bench.measure import adam, median, training_step  # noqa: E402
from bench.report import command_line, machine_line, publish, run_cli, utc_now  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# model -> its training batch: RecBole's default for SASRec, the plugin's for Speeder
BATCHES = {"SASRec": 2048, "Speeder": 256}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", default="dataset/", help="RecBole data_path holding <dataset>/ (dataset_prep)")
    parser.add_argument("--dataset", default="Amazon_Beauty", help="dataset name (default Amazon_Beauty)")
    parser.add_argument("--models", default=",".join(BATCHES), help=f"comma list of {', '.join(BATCHES)}")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per worker")
    parser.add_argument("--rounds", type=int, default=3, help="worker pairs per model (settings alternate)")
    parser.add_argument("--no_write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "<model>:<keep>": one measuring process
    return parser.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """Time ``args.steps`` training steps of one model under one allocator setting; print one JSON line."""
    from recbole.data import data_preparation

    from recbole_speeder.config import Config
    from recbole_speeder.quick_start import start_logging
    from recbole_speeder.utils import create_dataset, get_model

    model_name, keep = args.worker.split(":")
    with tempfile.TemporaryDirectory() as workdir:
        settings = {**quiet_config(args.data_path, workdir), "keep_freed_memory": keep == "True",
                    "train_batch_size": BATCHES[model_name]}
        config = Config(model_name, args.dataset, config_dict=settings)
        start_logging(config)  # applies keep_freed_memory, as every run does
        train, _, _ = data_preparation(config, create_dataset(config))
        model = get_model(model_name)(config, train._dataset)
        optimizer = adam(model)
        seconds, kernel = [], []
        for index, batch in enumerate(train):
            if index > args.steps:
                break
            start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            training_step(model, optimizer, batch)()
            if index:  # the first step is the warm-up
                seconds.append(time.perf_counter() - start)
                kernel.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - cpu.ru_stime)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    print(json.dumps({"step": median(seconds), "kernel": median(kernel), "peak_mib": peak}))


def run_worker(args: argparse.Namespace, model: str, keep: bool) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), f"--data_path={args.data_path}",
               f"--dataset={args.dataset}", f"--steps={args.steps}", f"--worker={model}:{keep}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode:
        raise SystemExit(f"worker {model} keep_freed_memory={keep} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return worker(args)
    check_data(args.data_path, args.dataset)
    lines = ["| model | batch | `keep_freed_memory` | step (s) | kernel CPU per step (s) | peak RSS (MiB) | speed-up |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for model in args.models.split(","):
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for round_ in range(args.rounds):
            for keep in (True, False) if round_ % 2 == 0 else (False, True):
                runs[keep].append(run_worker(args, model, keep))
        ratios = [off["step"] / on["step"] for on, off in zip(runs[True], runs[False], strict=True)]
        for keep in (True, False):
            rows = runs[keep]
            speedup = f"{median(ratios):.2f}x" if keep else ""
            lines.append(f"| {model} | {BATCHES[model]} | {keep} | {median([r['step'] for r in rows]):.3f} | "
                         f"{median([r['kernel'] for r in rows]):.3f} | {median([r['peak_mib'] for r in rows]):.0f} | "
                         f"{speedup} |")
    text = "\n".join([f"### {utc_now()}", "", f"`{command_line()}`", "", machine_line(), "",
                      f"{args.steps} timed steps per worker process after one warm-up, {args.rounds} worker pairs per "
                      "model, settings alternating; medians, speed-up = median of paired step-time ratios.", "",
                      *lines]) + "\n"
    publish(text, REPO / "BENCHMARKS.md", not args.no_write)


if __name__ == "__main__":
    run_cli(main)
