"""``--compare``: several models on one dataset, one split, one seed and one evaluation protocol (``--seeds``
repeats it per seed: ``seeds.py``).

Each model (or variant, see ``variants.py``) is trained in turn by :func:`runner.train_and_test` with fresh seeds
and log handlers, validated on the configured valid protocol, and its best checkpoint tested twice: full ranking
and a sampled candidate list (``uni19`` by default). The reports in ``<results_dir>/<dataset>/<timestamp>/`` are
rewritten after every model, so an interrupted comparison keeps what finished; a model that fails becomes a
row with its error and the others still run. A config value that a model's config rejects stops the comparison
before anything trains.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

import yaml

from recbole_speeder.config import Config
from recbole_speeder.config.schema import parse_value
from recbole_speeder.errors import UsageError
from recbole_speeder.experiments import report
from recbole_speeder.experiments.runner import check_sampled_mode, train_and_test
from recbole_speeder.experiments.variants import Variant
from recbole_speeder.utils import get_model

logger = logging.getLogger(__name__)


def new_run_dir(results_dir: str | Path, dataset: str, prefix: str = "") -> Path:
    """``<results_dir>/<dataset>/<prefix><YYYYmmdd-HHMMSS>``, suffixed ``-2``, ``-3`` ... if that exists already."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(results_dir) / dataset / f"{prefix}{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def override_keys(cmd_args: list[str]) -> dict[str, str]:
    """``--key=value`` flags as ``{key: value}`` (text, as typed)."""
    return dict(arg[2:].split("=", 1) for arg in cmd_args)


def without_keys(cmd_args: list[str], keys) -> list[str]:
    """The command-line overrides minus ``keys`` (which something more specific sets)."""
    keys = set(keys)
    return [arg for arg in cmd_args if arg[2:].split("=", 1)[0] not in keys]


def check_configs(variants: list[Variant], dataset: str, config_files: list[str] | None, cmd_args: list[str]) -> None:
    """Build every model's config before the first one trains, so a bad value, or a variant key its model does not
    use (``SASRec[lora_r=4]``), stops the comparison at once instead of after the models before it have trained. An
    unknown model still fails its row."""
    for variant in variants:
        try:
            get_model(variant.model)
        except UsageError:
            continue
        try:
            config = Config(variant.model, dataset, config_files, dict(variant.overrides),
                            cmd_args=without_keys(cmd_args, variant.overrides))
        except UsageError as err:
            raise UsageError(f"{variant.label}: {err}") from None
        foreign = [key for key in variant.overrides if key not in config.model_keys()]
        if foreign:
            raise UsageError(f"{variant.label}: {foreign} {'is not a key' if len(foreign) == 1 else 'are not keys'} "
                             f"of {variant.model}")


def write_run_config(path: Path, config: dict, dataset: str) -> None:
    """The run's config as a yaml that ``--config_files`` accepts, with the command that replays it."""
    header = (
        f"# Replay: python run_recbole_speeder.py --model={config.get('model')} --dataset={dataset} "
        f"--config_files={path}\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def failed_row(variant: Variant, err: BaseException, config: dict) -> dict:
    """The row of a run that raised; its seed is the one ``config`` (what the command set) names, if any."""
    message = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return {"label": variant.label, "model": variant.model, "status": "failed", "error": message[:300],
            "seed": config.get("seed"), "traceback": "".join(traceback.format_exception(err))}


def run_compare(
    variants: list[Variant],
    dataset: str,
    config_files: list[str] | None,
    cmd_args: list[str],
    results_dir: str | Path = "results",
    sampled_mode: str | None = "uni19",
    out: Path | None = None,
    command: str | None = None,
) -> tuple[Path, list[str]]:
    """Train and test every variant; returns the folder holding results.{csv,json,md,png} and configs/, and the
    labels of the models that failed.

    ``out`` (a new folder under ``<results_dir>/<dataset>/``, e.g. one seed's of ``--seeds``) replaces the
    timestamped folder; ``command``, the command line as typed, heads the reports so they say how to rerun.
    """
    sampled_mode = check_sampled_mode(sampled_mode)
    for path in config_files or []:
        if not Path(path).is_file():
            raise UsageError(f"config file {path} does not exist")
    check_configs(variants, dataset, config_files, cmd_args)
    out = out or new_run_dir(results_dir, dataset)
    (out / "configs").mkdir(parents=True)
    run_name = out.relative_to(Path(results_dir) / dataset).as_posix()
    rows: list[dict] = []
    meta = {"dataset": dataset, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command,
            "sampled_mode": sampled_mode, "config_files": [str(Path(p).resolve()) for p in config_files or []],
            "overrides": cmd_args}
    print(f"Comparing {len(variants)} models on {dataset}; reports in {out}", flush=True)
    for i, variant in enumerate(variants, 1):
        title = f"compare {i}/{len(variants)}: {variant.label} on {dataset}"
        print(title, flush=True)
        config_path = out / "configs" / f"{variant.slug}.yaml"
        try:
            result = train_and_test(
                variant.model,
                dataset,
                config_files,
                dict(variant.overrides),
                without_keys(cmd_args, variant.overrides),
                checkpoint_subdir=f"compare-{dataset}-{run_name}/{variant.slug}",
                sampled_mode=sampled_mode,
                title=title,
            )
            row = {"label": variant.label, "status": "ok", "error": "", **result.to_dict()}
            write_run_config(config_path, result.config, dataset)
        except KeyboardInterrupt:
            report.write_compare_reports(out, meta, rows)
            raise
        except Exception as err:  # noqa: BLE001 - any failure of one model is its row; the others still run
            logger.debug("compare: %s failed", variant.label, exc_info=True)
            shared = {k: parse_value(v) for k, v in override_keys(without_keys(cmd_args, variant.overrides)).items()}
            config = {"model": variant.model, "dataset": dataset, **shared, **variant.overrides}
            row = failed_row(variant, err, config)
            write_run_config(config_path, config, dataset)
            print(f"  {variant.label} failed: {row['error']}", flush=True)
        row["config_file"] = str(config_path.relative_to(out))
        rows.append(row)
        report.write_compare_reports(out, meta, rows)
    print(report.summary_line(rows, out), flush=True)
    return out, [row["label"] for row in rows if row["status"] != "ok"]
