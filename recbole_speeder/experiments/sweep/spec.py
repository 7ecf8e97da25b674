"""What a sweep is made of, shared by the sweep runner and its two tools (a leaf: each imports it, none the other)."""

from __future__ import annotations

from dataclasses import dataclass, field

from recbole_speeder.experiments.sweep.space import Param

SEARCHES = {"ray": ("random", "grid"), "hyperopt": ("grid", "random", "bayes")}


@dataclass
class SweepOptions:
    tool: str = "ray"
    search: str | None = None  # ray: random; hyperopt: grid (RecBole's "exhaustive")
    samples: int | None = None  # random/bayes: trials (8); grid: runs per grid point (1)
    cpus: float = 1
    gpus: float | None = None  # None: 1 if this machine has CUDA, else 0
    ray_address: str | None = None
    grace_period: int = 1
    reduction_factor: float = 2
    results_dir: str = "results"


@dataclass
class Sweep:
    """What every trial shares; paths absolute, values plain (it travels to Ray workers)."""

    model: str
    dataset: str
    config_files: list[str]
    file_values: dict  # the config files' values as RecBole read them (for best.yaml)
    fixed: dict  # the command line's values and absolute paths, under the sampled ones
    params: list[Param]
    valid_metric: str
    bigger: bool
    seed: int
    out_dir: str
    checkpoint_root: str  # each trial checkpoints into <checkpoint_root>/<name>/<trial id>
    name: str
    test_mode: str = "full"  # eval_args.mode of the test split


@dataclass
class Trial:
    trial_id: str
    params: dict
    status: str  # finished, stopped (ASHA), failed
    best_valid_score: float | None = None
    epochs: int | None = None
    seconds: float | None = None
    valid_result: dict = field(default_factory=dict)
    test_result: dict = field(default_factory=dict)
    error: str = ""
    node_ip: str = ""  # the Ray node that ran it (empty for hyperopt: the driver process)
    node_id: str = ""
