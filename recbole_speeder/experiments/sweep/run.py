"""``--tune``: a hyper-parameter sweep of one model, ranked on the **valid** metric only.

RecBole's own Ray objective reports test metrics to Ray, so its sweeps pick the test set's best; here trials
report their valid score after every epoch (ASHA stops the weak ones on it) and the test result of each finished
trial is kept beside it, for information. Two tools:

- ``ray`` (default, ``ray_tune.py``): Ray Tune, local or on a running cluster, trials in parallel;
- ``hyperopt`` (``hyperopt_tune.py``): RecBole's ``HyperTuning`` in this process, one trial after another.

Both write ``<results_dir>/<dataset>/tune-<model>-<timestamp>/``: ``trials.csv`` and ``trials.md`` (sorted by the
valid metric), ``best.yaml`` (a config file ``--config_files`` accepts) and ``best.json`` (its valid and test
results).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import yaml

from recbole_speeder.config import Config
from recbole_speeder.config.snapshot import LAUNCH_KEYS, plain
from recbole_speeder.errors import UsageError
from recbole_speeder.experiments.compare import new_run_dir
from recbole_speeder.experiments.sweep.space import find_space_file, parse_space
from recbole_speeder.experiments.sweep.spec import SEARCHES, Sweep, SweepOptions, Trial
from recbole_speeder.utils import create_dataset, ensure_atomic_files

# Config keys holding paths: made absolute for the trials, which Ray runs in other working directories.
PATH_KEYS = ("data_path", "checkpoint_dir", "text_feature_file", "image_feature_file", "feature_cache_dir",
             "backbone_path")


def _absolute_paths(driver: Config) -> dict:
    """The path keys as the user set them (before RecBole joins the dataset name), made absolute."""
    raw = {**driver.internal_config_dict, **driver.external_config_dict}
    paths = {}
    for key in PATH_KEYS:
        value = raw.get(key)
        if not isinstance(value, str) or not value or os.path.isabs(value):
            continue
        if key == "backbone_path" and not Path(value).exists():
            continue  # a hub id or tiny-random, not a path
        paths[key] = os.path.abspath(value)
    return paths


def _warm_feature_cache(driver: Config) -> None:
    """Speeder computes missing text features on first use: do it once here, not in every parallel trial."""
    if driver["model"] != "Speeder":
        return
    from recbole_speeder.data.item_features import build_item_features, item_texts

    dataset = create_dataset(driver)
    build_item_features(driver, dataset, item_texts(dataset, list(driver["item_text_fields"] or [])))


def prepare_sweep(model: str, dataset: str, space: str, config_files: list[str] | None, cmd_args: list[str],
                  options: SweepOptions) -> Sweep:
    """Check everything a trial would trip on before any trial starts: one-line errors, not N failed trials."""
    if options.tool not in SEARCHES:
        raise UsageError(f"--tune_tool must be one of {tuple(SEARCHES)}, not '{options.tool}'")
    search = options.search or SEARCHES[options.tool][0]
    if search == "exhaustive":
        search = "grid"
    if search not in SEARCHES[options.tool]:
        raise UsageError(f"--tune_search for {options.tool} must be one of {SEARCHES[options.tool]}, not '{search}'")
    options.search = search
    if options.samples is None:
        options.samples = 1 if search == "grid" else 8
    if options.samples < 1:
        raise UsageError("--tune_samples must be at least 1")
    space_file = find_space_file(space)
    params = parse_space(space_file)
    files = []
    for path in config_files or []:
        if not Path(path).is_file():
            raise UsageError(f"config file {path} does not exist")
        files.append(str(Path(path).resolve()))
    driver = Config(model, dataset, files, cmd_args=cmd_args)
    names = [p.name for p in params]
    known = driver.model_keys()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(f"{space_file}: {unknown} not config keys of {model}")
    if search == "grid" and options.tool == "hyperopt" and any(p.kind != "choice" for p in params):
        raise UsageError("hyperopt's grid search enumerates choice lines only: use --tune_search=random or bayes")
    fixed = plain({k: v for k, v in {**driver.cmd_config_dict, **_absolute_paths(driver)}.items()
                   if k not in names and k not in LAUNCH_KEYS})
    ensure_atomic_files(driver)
    _warm_feature_cache(driver)
    out = new_run_dir(options.results_dir, dataset, prefix=f"tune-{model}-")
    return Sweep(
        model=driver["model"],
        dataset=dataset,
        config_files=files,
        file_values=plain(dict(driver.file_config_dict)),
        fixed=fixed,
        params=params,
        valid_metric=driver["valid_metric"],
        bigger=bool(driver["valid_metric_bigger"]),
        seed=int(driver["seed"]),
        out_dir=str(out.resolve()),
        checkpoint_root=fixed.get("checkpoint_dir") or os.path.abspath(driver["checkpoint_dir"]),
        name=out.name,
        test_mode=driver["eval_args"]["mode"]["test"],
    )


# ---------------------------------------------------------------------------------------------- reports
def ranked(trials: list[Trial], bigger: bool) -> list[Trial]:
    """Best valid score first; trials without one (failed) last."""
    scored = [t for t in trials if t.best_valid_score is not None]
    scored.sort(key=lambda t: t.best_valid_score, reverse=bigger)
    return scored + [t for t in trials if t.best_valid_score is None]


def best_config(sweep: Sweep, trial: Trial) -> dict:
    """The best trial's full config as a user config file: file values, command line, then sampled values."""
    return plain({"model": sweep.model, "dataset": sweep.dataset, **sweep.file_values, **sweep.fixed, **trial.params})


def _format(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def trials_markdown(sweep: Sweep, order: list[Trial], options: SweepOptions, best: Trial | None) -> str:
    """The ranked table a person reads: params, the valid metric, and the same metric on test for reference."""
    metric = sweep.valid_metric.lower()
    names = [p.name for p in sweep.params]
    protocols = sorted({k.split("/")[0] for t in order for k in t.test_result if "/" in k})
    header = ["#", "trial", "status", f"valid {metric}", *names, "epochs", "seconds",
              *[f"test {metric} ({protocol})" for protocol in protocols], "error"]
    body = []
    for rank, trial in enumerate(order, 1):
        body.append([str(rank), f"`{trial.trial_id}`", trial.status, _format(trial.best_valid_score),
                     *[_format(trial.params.get(name)) for name in names], _format(trial.epochs),
                     _format(None if trial.seconds is None else round(trial.seconds, 1)),
                     *[_format(trial.test_result.get(f"{protocol}/{metric}")) for protocol in protocols],
                     _format(trial.error)])
    lines = [
        f"# {sweep.model} on {sweep.dataset}: {len(order)} trials ({options.tool}, {options.search} search)",
        "",
        f"Ranked by each trial's best valid `{sweep.valid_metric}` ({'higher' if sweep.bigger else 'lower'} is "
        "better). Test results are shown for reference and never used to choose. All metrics: trials.csv.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *["| " + " | ".join(row) + " |" for row in body],
        "",
    ]
    if best is not None:
        tests = ", ".join(f"{k} {_format(v)}" for k, v in best.test_result.items() if k.endswith(f"/{metric}"))
        lines += [f"Best: `{best.trial_id}`, valid {metric} {_format(best.best_valid_score)}"
                  + (f", test {tests}" if tests else ", stopped before testing")
                  + ". Config: [best.yaml](best.yaml); all its results: best.json.", ""]
    return "\n".join(lines)


def write_sweep_reports(sweep: Sweep, trials: list[Trial], options: SweepOptions) -> dict:
    """trials.csv / trials.md sorted by the valid metric, best.yaml and best.json; returns the summary."""
    out = Path(sweep.out_dir)
    order = ranked(trials, sweep.bigger)
    rows = []
    for trial in order:
        row = {"trial": trial.trial_id, "status": trial.status, f"valid_{sweep.valid_metric.lower()}":
               trial.best_valid_score, **trial.params, "epochs": trial.epochs, "seconds": trial.seconds}
        row.update({f"valid/{k}": v for k, v in trial.valid_result.items()})
        row.update({f"test/{k}": v for k, v in trial.test_result.items()})
        row.update(error=trial.error, node_ip=trial.node_ip, node_id=trial.node_id)
        rows.append(row)
    pd.DataFrame(rows).to_csv(out / "trials.csv", index=False)
    best = next((t for t in order if t.best_valid_score is not None), None)
    summary = {"results_dir": str(out), "trials": len(trials), "failed": sum(t.status == "failed" for t in trials),
               "valid_metric": sweep.valid_metric, "best_trial": None, "best_config": None}
    if best is not None:
        best_yaml = out / "best.yaml"
        best_yaml.write_text(
            f"# Best of {len(trials)} trials (trial {best.trial_id}, valid {sweep.valid_metric} "
            f"{best.best_valid_score}). Replay:\n# python run_recbole_speeder.py --model={sweep.model} "
            f"--dataset={sweep.dataset} --config_files={best_yaml}\n"
            + yaml.safe_dump(best_config(sweep, best), sort_keys=False),
            encoding="utf-8",
        )
        summary.update(best_trial=plain(asdict(best)), best_config=str(best_yaml))
    (out / "trials.md").write_text(trials_markdown(sweep, order, options, best), encoding="utf-8")
    (out / "best.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return summary


def run_sweep(model: str, dataset: str, space: str, config_files: list[str] | None, cmd_args: list[str],
              options: SweepOptions) -> dict:
    """Prepare, run with the chosen tool, write the reports; returns the summary (best trial, where files are)."""
    sweep = prepare_sweep(model, dataset, space, config_files, cmd_args, options)
    print(f"Sweep of {sweep.model} on {dataset} with {options.tool} ({options.search} search) over "
          f"{[p.name for p in sweep.params]}, ranked on valid {sweep.valid_metric}; reports in {sweep.out_dir}",
          flush=True)
    start = time.perf_counter()
    try:
        if options.tool == "ray":
            from recbole_speeder.experiments.sweep.ray_tune import run_ray

            trials = run_ray(sweep, options)
        else:
            from recbole_speeder.experiments.sweep.hyperopt_tune import run_hyperopt

            trials = run_hyperopt(sweep, options, on_trial=lambda done: write_sweep_reports(sweep, done, options))
    except UsageError:
        out = Path(sweep.out_dir)
        if not any(out.iterdir()):
            out.rmdir()  # refused before any trial (e.g. resources): leave no empty report folder
        raise
    summary = write_sweep_reports(sweep, trials, options)
    best = summary["best_trial"]
    metric = sweep.valid_metric.lower()
    tests = {k: v for k, v in (best or {}).get("test_result", {}).items() if k.split("/")[-1] == metric}
    print(f"{len(trials)} trials in {time.perf_counter() - start:.0f} s, {summary['failed']} failed; "
          + (f"best {best['trial_id']}: valid {metric} {best['best_valid_score']}, test {tests or 'n/a'}; "
             f"config {summary['best_config']}" if best else "no trial finished"), flush=True)
    return summary
