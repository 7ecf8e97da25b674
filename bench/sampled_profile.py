"""Where a sampled-softmax training step spends its time, at each catalogue size (torch.profiler, CPU).

For each size, bench/scale.py's synthetic data (generated and prepared once into ``--workdir``, kept for the next
run), Speeder with ``sampled_softmax_negatives: 256``, ``--train_rows`` training windows per step: the seconds per
step, then the operators of ``--steps`` profiled steps by self CPU time.

    python bench/sampled_profile.py --sizes=10k:2m,1m:2m --workdir=/tmp/sampled-profile
    python bench/sampled_profile.py --sizes=2k:20k --backbone_path=tiny-random --steps=1 --workdir=/tmp/sp
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run_recbole_speeder.py: before torch loads OpenMP
if __package__ in (None, ""):  # `python bench/sampled_profile.py` from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import scale  # noqa: E402
from bench.measure import adam, training_step  # noqa: E402
from bench.report import run_cli  # noqa: E402
from bench.workload import build_workload  # noqa: E402


def profile(data: Path, args) -> str:
    """Seconds per step and the profiler's table for one prepared size."""
    from recbole.data import data_preparation

    from recbole_speeder.config import Config
    from recbole_speeder.model import Speeder
    from recbole_speeder.utils import create_dataset

    settings = {**scale.speeder_settings(data, args.backbone_path), "sampled_softmax_negatives": 256}
    config = Config("Speeder", scale.DATASET, config_dict=settings)
    train, valid, _ = data_preparation(config, create_dataset(config))
    work = build_workload(train, valid, args.train_rows, 8, 20, config["seed"])
    model = Speeder(config, train._dataset)
    step = training_step(model, adam(model), work.train)
    step()  # warm-up: allocator, kernels
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(args.steps):
            step()
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    return f"{seconds:.3f} s per step ({work.train_targets} targets)\n{table}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10k:2m,1m:2m", help="items:interactions, comma-separated")
    parser.add_argument("--backbone_path", default="tiny-random", help="Speeder's backbone (tiny: the catalogue's "
                                                                       "share of a step shows)")
    parser.add_argument("--train_rows", type=int, default=64, help="training windows per step")
    parser.add_argument("--steps", type=int, default=3, help="timed and profiled steps")
    parser.add_argument("--rows", type=int, default=15, help="operators listed")
    parser.add_argument("--workdir", required=True, help="where the data is generated and prepared (kept)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for n_items, n_interactions in scale.parse_sizes(args.sizes):
        folder = Path(args.workdir) / f"{n_items}-{n_interactions}"
        if not (folder / "data").exists():
            scale.generate(folder / "raw", n_items, n_interactions)
            prep_s, _, stopped = scale.prepare(folder / "raw", folder / "data",
                                               argparse.Namespace(max_rss_gb=20.0, timeout=3600.0))
            if prep_s is None:
                print(f"{n_items:,} items: preparation {stopped}")
                continue
        print(f"{n_items:,} items, {n_interactions:,} interactions: {profile(folder / 'data', args)}", flush=True)


if __name__ == "__main__":
    run_cli(main)
