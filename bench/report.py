"""The benchmark's output: a markdown section per run (command, machine, date, table, ratios) for BENCHMARKS.md."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from recbole_speeder.errors import UsageError

RUNS_HEADING = "## Benchmark runs"


@dataclass
class ModelRow:
    name: str
    train_tokens: float | None = None  # mean prompt tokens per training window (instruction prefix included)
    eval_tokens: float | None = None  # mean prompt tokens per evaluated user
    train_rows_per_s: float = 0.0
    train_targets_per_s: float = 0.0
    full_users_per_s: float = 0.0
    candidate_users_per_s: float = 0.0
    item_cache_s: float | None = None  # one-off per evaluation: every item's MRC tokens and the prefix K/V
    train_mib: float = 0.0
    eval_mib: float = 0.0
    notes: list[str] = field(default_factory=list)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    policy = os.environ.get("OMP_WAIT_POLICY") or "unset (libgomp: spin, then sleep)"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY {policy}, native bf16: {'yes' if bf16 else 'no'}, load average {load} (1/5/15 min) at the end"
    )


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def table(rows: list[ModelRow]) -> str:
    lines = [
        "| model | prompt tokens / training window | prompt tokens / user | train windows/s | train targets/s "
        "| full-ranking users/s | 20-candidate users/s | item cache (s / eval) | peak RSS train (MiB) "
        "| peak RSS eval (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {_fmt(r.train_tokens)} | {_fmt(r.eval_tokens)} | {_fmt(r.train_rows_per_s, 2)} "
            f"| {_fmt(r.train_targets_per_s, 1)} | {_fmt(r.full_users_per_s, 1)} | {_fmt(r.candidate_users_per_s, 1)} "
            f"| {_fmt(r.item_cache_s, 2)} | {_fmt(r.train_mib, 0)} | {_fmt(r.eval_mib, 0)} |"
        )
    return "\n".join(lines)


def utc_now() -> str:
    """When a run ended: the heading of its section in BENCHMARKS.md."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def section(settings: str, rows: list[ModelRow], ratios: dict[str, float], extra: str = "") -> str:
    now = utc_now()
    ratio_text = ", ".join(f"{name} **{value:.1f}x**" for name, value in ratios.items())
    notes = [f"- {r.name}: {n}" for r in rows for n in r.notes]
    parts = [
        f"### {now}",
        "",
        f"`{command_line()}`",
        "",
        f"Machine: {machine_line()}.",
        "",
        f"Settings: {settings}.",
        "",
        table(rows),
        "",
        f"Speeder vs. text-description mode, median of paired rounds: {ratio_text}.",
    ]
    if notes:
        parts += ["", *notes]
    if extra:
        parts += ["", extra]
    return "\n".join(parts) + "\n"


def publish(text: str, output: Path, write: bool) -> None:
    """Print the run and, unless ``--no_write``, append it to ``output``."""
    print("\n" + text)
    if write:
        append_run(output, text)
        print(f"appended to {output}")


def workload_parser(description: str, eval_users_default: int | None, eval_users_help: str,
                    train_rows_help: str) -> argparse.ArgumentParser:
    """The arguments every side-by-side bench shares: data, workload sizes, where the run is written."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data_path", default="dataset/", help="RecBole data_path holding <dataset>/ (dataset_prep)")
    parser.add_argument("--dataset", default="Amazon_Beauty", help="dataset name (default Amazon_Beauty)")
    parser.add_argument("--train_rows", type=int, default=None, help=train_rows_help)
    parser.add_argument("--eval_users", type=int, default=eval_users_default, help=eval_users_help)
    parser.add_argument("--candidates", type=int, default=20, help="candidates per user, true item included")
    return parser


def run_cli(main: Callable[[], None]) -> None:
    """A bench script's entry point: a usage mistake is one ``error:`` line and exit status 2."""
    try:
        main()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def append_run(path: Path, text: str) -> None:
    """Append the run under the runs heading (added if the file has none yet)."""
    existing = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if RUNS_HEADING not in existing:
        existing = existing.rstrip("\n") + f"\n\n{RUNS_HEADING}\n"
    path.write_text(existing.rstrip("\n") + "\n\n" + text, encoding="utf-8")
