"""The run script's ``--compare`` (``--seeds``) and ``--tune`` flags, and the dispatch to them (imports stay lazy:
Ray and matplotlib load only when asked for)."""

from __future__ import annotations

import argparse
import importlib.util
import shlex

from recbole_speeder.errors import RunFailed, UsageError

TUNE_TOOLS = ("ray", "hyperopt")
EXTRA = "pip install 'recbole-speeder[experiments]'"  # what --compare and --tune need beyond the core


def require(flag: str, *modules: str) -> None:
    """A one-line error naming the install command when an experiment's package is missing."""
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise UsageError(f"{flag} needs {', '.join(missing)}, in the experiments extra: {EXTRA}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("experiments (docs/experiments.md)")
    group.add_argument("--compare", default=None,
                       help="models to compare on --dataset, e.g. 'Speeder,Speeder[text],SASRec,BERT4Rec'")
    group.add_argument("--seeds", default=None,
                       help="--compare: run it once per seed, e.g. 2020,2021,2022; reports per seed and mean ± std "
                            "in seeds.md")
    group.add_argument("--sampled_eval", default="uni19",
                       help="--compare: second test protocol beside full ranking (uniN or popN), or none")
    group.add_argument("--results_dir", default="results", help="where --compare and --tune write their reports")
    group.add_argument("--tune", default=None,
                       help="search space of a sweep of --model: a .hyper file (RecBole's params format)")
    group.add_argument("--tune_tool", default="ray", choices=TUNE_TOOLS,
                       help="ray: Ray Tune with ASHA on the valid metric; hyperopt: RecBole's HyperTuning")
    group.add_argument("--tune_search", default=None,
                       help="ray: random (default) or grid; hyperopt: grid (default: RecBole's exhaustive), "
                            "random or bayes")
    group.add_argument("--tune_samples", type=int, default=None,
                       help="trials of a random/bayes search (default 8); grid: runs of each grid point (default 1), "
                            "each drawing the non-choice lines anew")
    group.add_argument("--tune_cpus", type=float, default=1, help="ray: CPUs per trial")
    group.add_argument("--tune_gpus", type=float, default=None,
                       help="ray: GPUs per trial (fractions share a GPU); default 1 if this machine has CUDA, else 0")
    group.add_argument("--ray_address", default=None,
                       help="ray: join a running cluster ('auto' or host:port) instead of starting a local one")
    group.add_argument("--tune_grace_period", type=int, default=1,
                       help="ray: epochs every trial runs before ASHA may stop it")
    group.add_argument("--tune_reduction_factor", type=float, default=2,
                       help="ray: ASHA keeps 1/reduction_factor of the trials at each rung")


def wants_experiment(args: argparse.Namespace) -> bool:
    return bool(args.compare or args.tune or args.seeds)


def run_experiment(
    args: argparse.Namespace, config_files: list[str] | None, overrides: list[str], argv: list[str]
) -> dict:
    """Run ``--compare`` (over ``--seeds``) or ``--tune``; returns where the reports are (and, for a sweep, the
    best trial). ``argv``, the command line as typed, heads the comparison reports."""
    if args.compare and args.tune:
        raise UsageError("--compare and --tune are separate runs: give one of them")
    if args.seeds and not args.compare:
        raise UsageError("--seeds repeats a comparison: give --compare too")
    if args.nproc != 1 or args.world_size > 0:
        raise UsageError("--compare and --tune run one process per model or trial: drop --nproc / --world_size")
    if args.compare:
        require("--compare", "matplotlib")
        from recbole_speeder.experiments.compare import run_compare
        from recbole_speeder.experiments.seeds import parse_seeds, run_seeds
        from recbole_speeder.experiments.variants import parse_compare

        variants = parse_compare(args.compare)
        command = f"python run_recbole_speeder.py {shlex.join(argv)}"
        shared = {"results_dir": args.results_dir, "sampled_mode": args.sampled_eval, "command": command}
        if args.seeds:
            out, failed = run_seeds(variants, args.dataset, config_files, overrides, parse_seeds(args.seeds),
                                    **shared)
        else:
            out, failed = run_compare(variants, args.dataset, config_files, overrides, **shared)
        if failed:
            raise RunFailed(f"{len(failed)} run(s) failed: {', '.join(failed)}; their errors are in {out}")
        return {"results_dir": str(out)}
    require(f"--tune_tool={args.tune_tool}", "ray" if args.tune_tool == "ray" else "hyperopt")
    from recbole_speeder.experiments.sweep.run import run_sweep
    from recbole_speeder.experiments.sweep.spec import SweepOptions

    options = SweepOptions(
        tool=args.tune_tool,
        search=args.tune_search,
        samples=args.tune_samples,
        cpus=args.tune_cpus,
        gpus=args.tune_gpus,
        ray_address=args.ray_address,
        grace_period=args.tune_grace_period,
        reduction_factor=args.tune_reduction_factor,
        results_dir=args.results_dir,
    )
    return run_sweep(args.model, args.dataset, args.tune, config_files, overrides, options)
