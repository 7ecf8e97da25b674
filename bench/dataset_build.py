"""RecBole's sequential dataset build against Speeder's, on bench/scale.py's synthetic data.

For each size (items:interactions) the data is generated and prepared once; then each dataset class builds its
splits in a child process of its own (``create_dataset`` + ``build``, as ``data_preparation`` calls it): wall
seconds, the child's peak resident memory, and the resident memory it holds once the splits are built, per
interaction. Both classes give the same splits (tests/test_dataset.py); Speeder's tiles the training part.

    python bench/dataset_build.py --sizes=10k:200k,10k:2m,10k:20m --workdir=/tmp/build
    python bench/dataset_build.py --sizes=2k:20k --no_write
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run_recbole_speeder.py: before torch loads OpenMP
if __package__ in (None, ""):  # `python bench/dataset_build.py` from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from bench import scale  # noqa: E402
from bench.report import command_line, machine_line, publish, run_cli, utc_now  # noqa: E402

CLASSES = ("recbole", "speeder")


def build(data: Path, kind: str) -> None:
    """In the child: one class's build; one JSON line on stdout."""
    from recbole.data.dataset import SequentialDataset

    from recbole_speeder.config import Config
    from recbole_speeder.data.dataset import SpeederDataset

    config = Config("Speeder", scale.DATASET, config_dict=scale.speeder_settings(data, "tiny-random"))
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    dataset = (SpeederDataset if kind == "speeder" else SequentialDataset)(config)
    interactions = len(dataset.inter_feat)  # before the build turns them into one row per target
    splits = dataset.build()
    seconds = time.perf_counter() - start
    held = psutil.Process().memory_info().rss - before
    print(json.dumps({"build_s": seconds, "held_bytes_per_interaction": held / interactions,
                      "train_rows": len(splits[0].inter_feat)}), flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = scale.size_parser(__doc__.split("\n\n")[0], "10k:200k,10k:2m,10k:20m")
    parser.add_argument("--kind", choices=CLASSES, default="speeder", help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        build(Path(args.worker), args.kind)
        return []
    rows = scale.child_rows(args, __file__, {kind: [f"--kind={kind}"] for kind in CLASSES}, "kind",
                            "building with {}'s dataset")
    lines = ["| items | interactions | dataset | build s | peak MiB | held bytes / interaction | training rows "
             "| stopped |", "|---:|---:|---|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['items']:,} | {row['interactions']:,} | {row.get('kind', '–')} "
                     f"| {scale.fmt(row.get('build_s'))} | {scale.fmt(row.get('peak_mib'), 0)} "
                     f"| {scale.fmt(row.get('held_bytes_per_interaction'), 0)} | {scale.fmt(row.get('train_rows'), 0)} "
                     f"| {row['stopped']} |")
    text = "\n".join([f"### {utc_now()}, dataset build", "", f"`{command_line()}`", "", f"Machine: {machine_line()}.",
                      "", "\n".join(lines)])
    publish(text + "\n", Path(args.output), write=not args.no_write)
    return rows


if __name__ == "__main__":
    run_cli(main)
