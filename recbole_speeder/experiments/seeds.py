"""Comparisons repeated over seeds, reported as mean ± sample std: one number per model says little without its
seed-to-seed spread.

Two ways in, one aggregation (:func:`write_seed_reports`, writing ``seeds.csv`` and ``seeds.md``):

- ``--compare=... --seeds=2020,2021,2022``: one process runs the comparison once per seed, each seed's reports in
  ``seed-<S>/`` of one folder, the aggregate beside them (rewritten after every seed);
- ``python -m recbole_speeder.experiments.seeds DIR [DIR ...] --out OUT``: comparison folders made apart (one
  ``--compare ... --seed=S`` per GPU or machine) aggregated afterwards.

A comparison folder is one seed: the ``seed`` column of its results.csv (or, in folders written before that column
existed, the ``seed`` of its config yamls). Folders are aggregated only if they compared the same models under the
same protocols on the same dataset, and each model finished with the same config but for :data:`RUN_LOCAL_KEYS`:
otherwise the spread would mix config changes into seed noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from recbole_speeder.errors import UsageError
from recbole_speeder.experiments.compare import new_run_dir, override_keys, run_compare
from recbole_speeder.experiments.report import fmt_number, md_cell, md_table
from recbole_speeder.experiments.variants import Variant

# Config keys that may differ between the runs of one aggregate: the seed, and where or how verbosely each ran.
RUN_LOCAL_KEYS = frozenset({"seed", "gpu_id", "use_gpu", "checkpoint_dir", "data_path", "feature_cache_dir",
                            "show_progress", "state", "log_wandb"})
# results.csv columns that name a run rather than measure it.
IDENTITY_COLUMNS = ("model", "seed", "status", "error", "eval_split", "config_file")
# The columns of each protocol's table in seeds.md; seeds.csv has every metric.
KEY_METRICS = ("hit@1", "hit@10", "ndcg@10", "mrr@10")
MIN_SEEDS = 3  # the project's rule for a reported number


@dataclass
class Run:
    """One comparison folder: its results.csv, the seed it ran, and each model's config."""

    folder: Path
    seed: int
    table: pd.DataFrame
    configs: dict[str, dict]  # model label -> its config yaml
    command: str | None  # the command that wrote the folder, if results.json recorded it

    @property
    def dataset(self) -> str | None:
        return next(iter(self.configs.values()), {}).get("dataset")


def parse_seeds(text: str) -> list[int]:
    """``2020,2021,2022`` -> ``[2020, 2021, 2022]``."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise UsageError(f"--seeds takes comma-separated non-negative integers, e.g. --seeds=2020,2021,2022, "
                         f"not '{text}'")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds lists a seed twice: '{text}'")
    return seeds


def run_seeds(
    variants: list[Variant],
    dataset: str,
    config_files: list[str] | None,
    cmd_args: list[str],
    seeds: list[int],
    *,
    results_dir: str | Path = "results",
    sampled_mode: str | None = "uni19",
    command: str | None = None,
) -> tuple[Path, list[str]]:
    """The comparison once per seed (``--seed=S`` added to ``cmd_args``, nothing else changed) into
    ``seed-<S>/`` of one new folder; returns that folder, which also holds seeds.csv and seeds.md, and the runs that
    failed (``<label> (seed S)``)."""
    if "seed" in override_keys(cmd_args):
        raise UsageError("--seeds sets the seed of every run: drop --seed")
    seeded = [variant.label for variant in variants if "seed" in variant.overrides]
    if seeded:
        raise UsageError(f"--seeds sets the seed of every run: drop seed= from {', '.join(seeded)}")
    root = new_run_dir(results_dir, dataset)
    print(f"Repeating the comparison for seeds {', '.join(map(str, seeds))}; reports in {root}", flush=True)
    folders, failed = [], []
    for seed in seeds:
        folder, failed_here = run_compare(variants, dataset, config_files, [*cmd_args, f"--seed={seed}"],
                                          results_dir=results_dir, sampled_mode=sampled_mode,
                                          out=root / f"seed-{seed}", command=command)
        folders.append(folder)
        failed += [f"{label} (seed {seed})" for label in failed_here]
        write_seed_reports(folders, root, command)
    print(f"mean ± std over {len(seeds)} seeds in {root / 'seeds.md'}", flush=True)
    return root, failed


# ---------------------------------------------------------------------------------------------- reading
def read_run(folder: Path) -> Run:
    if not (folder / "results.csv").is_file():
        raise UsageError(f"{folder} has no results.csv: give folders written by --compare")
    table = pd.read_csv(folder / "results.csv")
    configs = {row.model: yaml.safe_load((folder / row.config_file).read_text(encoding="utf-8"))
               for row in table.itertuples()}
    recorded = table["seed"] if "seed" in table else pd.Series([config.get("seed") for config in configs.values()])
    seeds = sorted({int(seed) for seed in recorded.dropna()})
    if len(seeds) != 1:
        raise UsageError(f"{folder}: its models ran different seeds {seeds}" if seeds else
                         f"{folder}: no seed recorded (a comparison from before seeds were recorded; rerun it "
                         "with --seed=S)")
    meta_file = folder / "results.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    return Run(folder, seeds[0], table, configs, meta.get("command"))


def protocol_names(table: pd.DataFrame) -> list[str]:
    """Test protocols in evaluation order, from the ``eval_s/<protocol>`` columns (finished rows only have them)."""
    return [column.split("/", 1)[1] for column in table.columns if column.startswith("eval_s/")]


def check_runs(runs: list[Run]) -> None:
    """One spread needs the same experiment at every seed: models, dataset, protocols and configs but the seed."""
    first = runs[0]
    protocols = next((names for names in map(protocol_names, (run.table for run in runs)) if names), [])
    folder_of_seed: dict[int, Path] = {}
    reference: dict[str, tuple[Path, dict]] = {}  # model -> the first folder where it finished, and its config
    for run in runs:
        if run.seed in folder_of_seed:
            raise UsageError(f"{folder_of_seed[run.seed]} and {run.folder} both ran seed {run.seed}")
        folder_of_seed[run.seed] = run.folder
        if sorted(run.configs) != sorted(first.configs):
            raise UsageError(f"{run.folder} compared {list(run.configs)} but {first.folder} compared "
                             f"{list(first.configs)}: aggregate runs of one --compare list")
        if run.dataset != first.dataset:
            raise UsageError(f"{run.folder} ran on {run.dataset} but {first.folder} on {first.dataset}")
        if protocol_names(run.table) not in ([], protocols):
            raise UsageError(f"{run.folder} tested under {protocol_names(run.table)} but others under {protocols}")
        for label in run.table.loc[run.table["status"] == "ok", "model"]:
            config = {k: v for k, v in run.configs[label].items() if k not in RUN_LOCAL_KEYS}
            folder, expected = reference.setdefault(label, (run.folder, config))
            differ = sorted(k for k in expected.keys() | config.keys() if expected.get(k) != config.get(k))
            if differ:
                raise UsageError(f"{label} ran with different {', '.join(differ)} in {folder} and {run.folder}: "
                                 "only the seed may differ")


# ---------------------------------------------------------------------------------------------- aggregation
def all_rows(runs: list[Run]) -> pd.DataFrame:
    """Every folder's rows in one table, each with its folder's seed (a failed row may have recorded none)."""
    return pd.concat([run.table.assign(seed=run.seed) for run in runs], ignore_index=True)


def aggregate(rows: pd.DataFrame) -> pd.DataFrame:
    """Per model (first-seen order): finished runs ``n`` of ``runs``, their seeds, the failed seeds, and
    ``<column>:mean`` / ``<column>:std`` (sample std, ddof=1) of every numeric column over the finished runs.

    NaN stays NaN (``skipna=False``): a metric missing from one finished run would otherwise shrink its n unseen.
    """
    numeric = [column for column in rows.select_dtypes("number").columns if column not in IDENTITY_COLUMNS]
    summaries = []
    for label, group in rows.groupby("model", sort=False):
        ok = group[group["status"] == "ok"]
        summary = {"model": label, "n": len(ok), "runs": len(group), "seeds": " ".join(map(str, ok["seed"])),
                   "failed_seeds": " ".join(map(str, group.loc[group["status"] != "ok", "seed"]))}
        for column in numeric:
            summary[f"{column}:mean"] = ok[column].mean(skipna=False)
            summary[f"{column}:std"] = ok[column].std(ddof=1, skipna=False)
        summaries.append(summary)
    return pd.DataFrame(summaries)


def write_seed_reports(folders: list[Path], out: Path, command: str | None) -> pd.DataFrame:
    """seeds.csv and seeds.md in ``out`` from comparison ``folders`` (one per seed); returns seeds.csv's table."""
    runs = [read_run(Path(folder)) for folder in folders]
    check_runs(runs)
    rows = all_rows(runs)
    table = aggregate(rows)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "seeds.csv", index=False)
    (out / "seeds.md").write_text(seeds_markdown(runs, rows, table, out, command), encoding="utf-8")
    return table


# ---------------------------------------------------------------------------------------------- markdown
def mean_std(summary: pd.Series, column: str, scale: float = 1.0, digits: int = 4) -> str:
    mean, std = summary.get(f"{column}:mean"), summary.get(f"{column}:std")
    if mean is None or pd.isna(mean):
        return ""
    text = fmt_number(mean / scale, digits)
    return text if pd.isna(std) else f"{text} ± {fmt_number(std / scale, digits)}"


def summary_table(table: pd.DataFrame, columns: list[tuple[str, str, float, int]]) -> str:
    """``model | n | mean ± std ...``; ``columns``: (header, seeds.csv column, scale, digits)."""
    body = []
    for _, summary in table.iterrows():
        n = str(summary["n"]) if summary["n"] == summary["runs"] else f"{summary['n']} of {summary['runs']}"
        body.append([f"`{summary['model']}`", n]
                    + [mean_std(summary, column, scale, digits) for _, column, scale, digits in columns])
    return md_table(["model", "n"] + [header for header, *_ in columns], body)


def seeds_markdown(runs: list[Run], rows: pd.DataFrame, table: pd.DataFrame, out: Path, command: str | None) -> str:
    seeds = ", ".join(str(run.seed) for run in runs)
    lines = [f"# {runs[0].dataset}: {len(table)} model(s) over seeds {seeds}", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += [
        "Mean ± sample standard deviation (ddof=1) over the seeds at which the model finished; `n`: those runs "
        "(`2 of 3` where one failed). Each seed's run is a `--compare` folder listed under Runs; they were checked "
        f"to differ only in the seed (models, dataset, protocols, and each model's config but for "
        f"{', '.join(f'`{key}`' for key in sorted(RUN_LOCAL_KEYS))}). Every metric is in seeds.csv.",
        "",
    ]
    few = table.loc[table["n"] < MIN_SEEDS, "model"].tolist()
    if few:
        lines += [f"**Fewer than {MIN_SEEDS} finished seeds** for {', '.join(f'`{m}`' for m in few)}: not enough "
                  "to report.", ""]
    for protocol in protocol_names(rows):
        metrics = [(metric, f"{protocol}/{metric}", 1.0, 4) for metric in KEY_METRICS
                   if f"{protocol}/{metric}:mean" in table]
        lines += [f"## Test, {protocol}", "", summary_table(table, metrics), ""]
    valid = [(f"best valid {column[len('valid/'):]}", column, 1.0, 4) for column in rows
             if column.startswith("valid/")]
    lines += ["## Model selection and cost", "", "Train time is `trainer.fit`: all epochs with their validation "
              "passes.", "", summary_table(table, valid + [("epochs", "epochs", 1.0, 1),
                                                          ("train (min)", "train_s", 60.0, 2)]), ""]
    failed = rows[rows["status"] != "ok"]
    if len(failed):
        lines += ["## Failed runs", ""]
        lines += [f"- `{row.model}`, seed {row.seed}: {md_cell(row.error)}" for row in failed.itertuples()] + [""]
    lines += ["## Runs", ""]
    for run in runs:
        link = Path(os.path.relpath(run.folder / "results.md", out)).as_posix()
        own = f": `{run.command}`" if run.command and run.command != command else ""
        lines.append(f"- seed {run.seed}: [{link}]({link}){own}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> Path:
    """Aggregate comparison folders made in separate processes; a usage mistake is one line and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    prog = "python -m recbole_speeder.experiments.seeds"
    parser = argparse.ArgumentParser(prog=prog, description="Mean ± std over --compare folders, one per seed.")
    parser.add_argument("folders", nargs="+", type=Path, metavar="DIR", help="a --compare folder (results.csv)")
    parser.add_argument("--out", required=True, type=Path, help="where seeds.csv and seeds.md are written")
    args = parser.parse_args(argv)
    try:
        table = write_seed_reports(args.folders, args.out, f"{prog} {shlex.join(argv)}")
    except (UsageError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{len(table)} model(s) over {len(args.folders)} seeds: {args.out / 'seeds.md'}")
    return args.out


if __name__ == "__main__":
    main()
