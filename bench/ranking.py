"""Full ranking after the user vectors: RecBole's dense path against the chunked ranking, by catalogue size.

For each catalogue size: random user vectors ``[eval_users, d]`` and item vectors ``[items, d]`` (SmolLM2's width),
one true item per user and ``--history`` seen items per user to exclude. Three tasks, timed side by side (median of
rounds, taking turns), then each run once more under a peak-RSS probe:

- ``matmul``: ``users @ items.T`` alone, the floor any full ranking pays;
- ``dense``: what RecBole's trainer does with a model's scores: the matmul, padding and seen items set to ``-inf``,
  then its collector's top-k and ``[users x items]`` positives matrix;
- ``chunked``: ``evaluation/ranking.py``: ``ranking_chunk_size`` items at a time, each true item's rank (and a
  running top-k with ``--topk_items``), collected by ``RankingCollector``.

Both paths collect the same ``rec.topk`` (checked at every size, so the timings compare equal work).

    python bench/ranking.py
    python bench/ranking.py --items=2k,20k --eval_users=16 --repeats=1 --no_write
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run_recbole_speeder.py: before torch loads OpenMP
if __package__ in (None, ""):  # `python bench/ranking.py` from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from recbole.evaluator import Collector  # noqa: E402

from bench.measure import median, paired_ratio, paired_timings, peak_rss  # noqa: E402
from bench.report import command_line, machine_line, publish, run_cli, utc_now  # noqa: E402
from bench.scale import count  # noqa: E402
from recbole_speeder.errors import UsageError  # noqa: E402
from recbole_speeder.evaluation.ranking import RankingCollector, rank_all_items  # noqa: E402

TOPK = [1, 5, 10, 20]


@dataclass
class Row:
    items: int
    matmul_s: float
    dense_s: float
    chunked_s: float
    chunked_over_matmul: float  # paired, round by round
    dense_over_chunked: float
    dense_mib: float
    chunked_mib: float


def collector_config(topk_items: bool) -> dict:
    """What RecBole's collector reads; ShannonEntropy asks for the recommended items themselves."""
    metrics = ["Hit", "NDCG", "MRR"] + (["ShannonEntropy"] if topk_items else [])
    return {"metrics": metrics, "topk": TOPK, "device": "cpu", "eval_args": {"mode": "full"}}


def workload(n_items: int, n_users: int, dim: int, history: int, seed: int):
    """User and item vectors, one true item per user, and ``history`` seen items per user (never the true one)."""
    generator = torch.Generator().manual_seed(seed)
    users, items = torch.randn(n_users, dim, generator=generator), torch.randn(n_items, dim, generator=generator)
    positive_u = torch.arange(n_users)
    positive_i = torch.randint(1, n_items, (n_users,), generator=generator)
    seen_u = torch.arange(n_users).repeat_interleave(history)
    seen_i = torch.randint(1, n_items, (n_users * history,), generator=generator)
    keep = seen_i != positive_i[seen_u]
    return users, items, positive_u, positive_i, (seen_u[keep], seen_i[keep])


def measure(n_items: int, args) -> Row:
    users, items, positive_u, positive_i, seen = workload(n_items, args.eval_users, args.dim, args.history, args.seed)
    config = collector_config(args.topk_items)
    collected = {}

    def matmul() -> None:
        users @ items.T

    def dense() -> None:
        scores = users @ items.T
        scores[:, 0] = float("-inf")
        scores[seen] = float("-inf")
        collector = Collector(config)
        collector.eval_batch_collect(scores, None, positive_u, positive_i)
        collected["dense"] = collector.data_struct.get("rec.topk")

    def chunked() -> None:
        ranking = rank_all_items(users, items, positive_u, positive_i, seen, args.chunk_size,
                                 max(TOPK) if args.topk_items else None)
        collector = RankingCollector(config)
        collector.eval_batch_collect(ranking, None, positive_u, positive_i)
        collected["chunked"] = collector.data_struct.get("rec.topk")

    tasks = {"matmul": matmul, "dense": dense, "chunked": chunked}
    times = paired_timings(tasks, args.repeats)
    if not torch.equal(collected["dense"], collected["chunked"]):
        raise RuntimeError(f"{n_items:,} items: the chunked ranking collected other hits than RecBole's dense path")
    peaks = {}
    for name in ("dense", "chunked"):
        with peak_rss() as peak:
            tasks[name]()
        peaks[name] = peak["mib"]
    return Row(n_items, median(times["matmul"]), median(times["dense"]), median(times["chunked"]),
               paired_ratio(times["chunked"], times["matmul"]), paired_ratio(times["dense"], times["chunked"]),
               peaks["dense"], peaks["chunked"])


def table(rows: list[Row]) -> str:
    lines = ["| items | matmul s | dense (RecBole) s | chunked s | chunked / matmul | dense / chunked "
             "| dense peak MiB | chunked peak MiB |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.items:,} | {r.matmul_s:.3f} | {r.dense_s:.3f} | {r.chunked_s:.3f} "
                     f"| {r.chunked_over_matmul:.2f} | {r.dense_over_chunked:.2f} | {r.dense_mib:,.0f} "
                     f"| {r.chunked_mib:,.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default="10k,100k,1m", help="catalogue sizes, comma-separated (10k,100k,1m)")
    parser.add_argument("--eval_users", type=int, default=256, help="users per ranked batch")
    parser.add_argument("--dim", type=int, default=576, help="vector width (SmolLM2-135M's hidden size)")
    parser.add_argument("--history", type=int, default=50, help="seen items excluded per user")
    parser.add_argument("--chunk_size", type=int, default=65536, help="ranking_chunk_size")
    parser.add_argument("--topk_items", action="store_true", help="also keep the running top-k items")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--output", default="BENCHMARKS.md", help="file the run is appended to")
    parser.add_argument("--no_write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    for name in ("eval_users", "dim", "chunk_size", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sizes = [count(text) for text in args.items.split(",") if text.strip()]
    except UsageError:
        raise UsageError(f"--items takes catalogue sizes such as 10k,100k,1m, not '{args.items}'") from None
    rows = []
    for n_items in sizes:
        print(f"{n_items:,} items ...", flush=True)
        rows.append(measure(n_items, args))
    text = "\n".join([
        f"### {utc_now()}", "", f"`{command_line()}`", "", f"Machine: {machine_line()}.", "",
        f"Settings: {args.eval_users} users per batch, {args.dim}-d float32 vectors, {args.history} seen items "
        f"excluded per user, ranking_chunk_size {args.chunk_size}, cut-offs {TOPK}, top-k items kept: "
        f"{'yes' if args.topk_items else 'no'}; median of {args.repeats} rounds (ratios paired round by round); "
        "peak MiB: RSS above the start during one more call.", "",
        table(rows),
    ])
    publish(text + "\n", Path(args.output), write=not args.no_write)
    return rows


if __name__ == "__main__":
    run_cli(main)
