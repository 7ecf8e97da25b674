"""The Ray Tune side of ``--tune``: one ``tune.Tuner`` with ASHA on the valid metric.

Every trial reports ``valid_score`` after each validation (RecBole's ``callback_fn``), and once more at the end
with its best valid score, valid result and test results (``finished: True``); a trial ASHA stops has only the
epoch reports. Trials run wherever Ray puts them, in working directories of Ray's choosing: all paths they get
are absolute, and each one checkpoints into ``<checkpoint_dir>/<sweep>/<trial id>``.
"""

from __future__ import annotations

import os
from pathlib import Path

from recbole_speeder.config.snapshot import plain
from recbole_speeder.errors import UsageError
from recbole_speeder.experiments.runner import train_and_test
from recbole_speeder.experiments.sweep.spec import Sweep, SweepOptions, Trial

# ASHA's cap on reports per trial; RecBole's epochs and early stopping end trials well before it.
MAX_REPORTS = 1 << 20
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def ray_trial(params: dict, sweep: Sweep, use_gpu: bool) -> None:
    """One trial, run by a Ray worker: train, report valid per epoch, report the final results."""
    import ray
    from ray import tune

    config_dict = {**sweep.fixed, **plain(params)}
    if use_gpu:
        # RecBole sets CUDA_VISIBLE_DEVICES to gpu_id ("0" by default): give it the GPU Ray assigned instead.
        config_dict["gpu_id"] = ",".join(str(i) for i in ray.get_gpu_ids())
    else:
        config_dict["use_gpu"] = False
    trial_id = tune.get_context().get_trial_id()
    node_id = ray.get_runtime_context().get_node_id()  # with Tune's node_ip: which machine of a cluster ran it

    def report_epoch(epoch_idx: int, valid_score: float) -> None:
        tune.report({"valid_score": float(valid_score), "epoch": epoch_idx + 1, "finished": False,
                     "node_id": node_id})

    result = train_and_test(
        sweep.model,
        sweep.dataset,
        sweep.config_files,
        config_dict,
        checkpoint_subdir=os.path.join(sweep.name, trial_id),
        on_valid=report_epoch,
        title=f"trial {trial_id} of {sweep.name}: {plain(params)}",
    )
    final = {"valid_score": result.best_valid_score, "epoch": result.epochs, "finished": True,
             "train_seconds": result.train_seconds, "node_id": node_id}
    final.update({f"valid/{k}": v for k, v in result.best_valid_result.items()})
    for protocol, metrics in result.test.items():
        final.update({f"test/{protocol}/{k}": v for k, v in metrics.items()})
    tune.report(final)


def _error_line(error: BaseException) -> str:
    """The trial's own exception in one line, not Ray's wrapper with its traceback."""
    cause = getattr(error, "cause", None) or error
    text = f"{type(cause).__name__}: {cause}".strip()
    return text.splitlines()[0][:300]


def trial_from_result(result, sweep: Sweep) -> Trial:
    metrics = plain(dict(result.metrics or {}))
    history = result.metrics_dataframe
    params = plain(dict(result.config or {}))
    trial_id = metrics.get("trial_id") or Path(result.path).name
    trial = Trial(trial_id=trial_id, params=params, status="no result", epochs=metrics.get("epoch"),
                  seconds=metrics.get("time_total_s"), node_ip=metrics.get("node_ip", ""),
                  node_id=metrics.get("node_id", ""))
    if result.error:
        trial.status, trial.error = "failed", _error_line(result.error)
    elif metrics.get("finished"):
        trial.status = "finished"
        trial.best_valid_score = metrics["valid_score"]
        trial.valid_result = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("valid/")}
        trial.test_result = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("test/")}
    elif history is not None and "valid_score" in history and len(history):
        scores = history["valid_score"].dropna()
        trial.status = "stopped (ASHA)"
        trial.best_valid_score = float(scores.max() if sweep.bigger else scores.min())
    return trial


def _connect(address: str | None) -> bool:
    """Join ``address`` or start a local Ray; returns whether this call started it (and must shut it down).

    Workers import the plugin from this checkout when it is not installed (PYTHONPATH); on a remote cluster
    install recbole-speeder on every node and keep the data at the same absolute path (or on shared storage).
    """
    import ray
    from ray.exceptions import AuthenticationError

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": {"PYTHONPATH": f"{SOURCE_ROOT}{os.pathsep}${{PYTHONPATH}}"}}
    try:
        ray.init(address=address, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True,
                 logging_level="WARNING")
    except (ConnectionError, AuthenticationError) as err:  # the latter: token mode on, but no token here
        raise UsageError(_connection_error(address, err)) from None
    return True


def _connection_error(address: str | None, error: Exception) -> str:
    """One line for a cluster that refused us; for token authentication, what to set.

    Ray 2.60 clusters started with ``ray start`` use token authentication once the machine has a token
    (``~/.ray/auth_token``, which any local ``ray.init()`` writes), and a driver given an explicit address only
    sends one under ``RAY_AUTH_MODE=token``: Ray says so in a traceback wrapped in several exceptions.
    """
    messages, cause = [], error
    while cause is not None:
        messages.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, ConnectionError) and any("InvalidAuthToken" in text for text in messages):
        return (f"the Ray cluster at {address} uses token authentication: run with RAY_AUTH_MODE=token and the "
                "cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN (docs/experiments.md)")
    return f"cannot connect to the Ray cluster at {address}: {next(iter(str(error).splitlines()), '')}"


def _check_resources(cpus: float, gpus: float) -> None:
    """Trials asking for more than the cluster has would wait forever: say so instead."""
    import ray

    have = ray.cluster_resources()
    if cpus > have.get("CPU", 0):
        raise UsageError(f"--tune_cpus={cpus:g} per trial, but the Ray cluster has {have.get('CPU', 0):g} CPUs")
    if gpus > have.get("GPU", 0):
        raise UsageError(f"--tune_gpus={gpus:g} per trial, but the Ray cluster has {have.get('GPU', 0):g} GPUs "
                         "(use --tune_gpus=0 to train on CPUs)")


def run_ray(sweep: Sweep, options: SweepOptions) -> list[Trial]:
    import ray
    import torch
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    gpus = options.gpus if options.gpus is not None else float(torch.cuda.is_available())
    if options.cpus <= 0 or gpus < 0:
        raise UsageError("--tune_cpus must be positive and --tune_gpus not negative")
    started = _connect(options.ray_address)
    try:
        _check_resources(options.cpus, gpus)
        space = {
            p.name: tune.grid_search(list(p.args)) if options.search == "grid" and p.kind == "choice" else p.to_ray()
            for p in sweep.params
        }
        resources = {"cpu": options.cpus, **({"gpu": gpus} if gpus > 0 else {})}
        trainable = tune.with_resources(tune.with_parameters(ray_trial, sweep=sweep, use_gpu=gpus > 0), resources)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=MAX_REPORTS,
                                  grace_period=options.grace_period, reduction_factor=options.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="valid_score",
                mode="max" if sweep.bigger else "min",
                scheduler=scheduler,
                num_samples=options.samples,
                search_alg=BasicVariantGenerator(random_state=sweep.seed),
            ),
            run_config=tune.RunConfig(
                name="ray",
                storage_path=sweep.out_dir,
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                verbose=1,
            ),
        )
        return [trial_from_result(result, sweep) for result in tuner.fit()]
    finally:
        if started:
            ray.shutdown()
