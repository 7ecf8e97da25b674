"""The hyperopt side of ``--tune``: RecBole's ``HyperTuning`` around ``quick_start.objective_function``.

``HyperTuning`` of RecBole 1.2.1 needs four fixes on this stack, made in :class:`RecordingHyperTuning`:

- its exhaustive search seeds ``np.random.RandomState``, but hyperopt 0.3.0 samples with the ``Generator``
  API (``rng.integers``): every exhaustive sweep died on its first trial. :func:`grid_suggest` enumerates the
  grid of the ``choice`` lines in order instead, without sampling;
- counting that grid read ``literal.obj`` of every option, which fails for list-valued choices;
- one failing trial raised out of ``fmin`` and ended the sweep: here it is recorded and the sweep goes on;
- ``fmin`` ran unseeded: random and bayes sweeps now draw from ``seed``; and its early stop (no progress in
  10 trials) read the loss of failed trials and cut grids short: a sweep now runs all its trials.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import traceback
from collections.abc import Callable
from functools import partial

import numpy as np
from recbole.trainer import HyperTuning

from recbole_speeder.config.snapshot import plain
from recbole_speeder.experiments.runner import isolated_logging
from recbole_speeder.experiments.sweep.space import Param, grid_size
from recbole_speeder.experiments.sweep.spec import Sweep, SweepOptions, Trial
from recbole_speeder.quick_start import objective_function

ALGOS = {"random": "random", "bayes": "bayes"}  # RecBole's names: rand.suggest, tpe.suggest


def grid_suggest(new_ids, domain, trials, seed, *, sizes: dict[str, int]):
    """A hyperopt ``algo`` that proposes the grid's points in order (``hp.choice`` indices); none left ends fmin."""
    from hyperopt.base import miscs_update_idxs_vals

    points = list(itertools.product(*(range(n) for n in sizes.values())))
    docs = []
    for new_id in new_ids:
        if new_id >= len(points):
            break
        misc = {"tid": new_id, "cmd": domain.cmd, "workdir": domain.workdir}
        idxs = {name: [new_id] for name in sizes}
        vals = {name: [index] for name, index in zip(sizes, points[new_id], strict=True)}
        miscs_update_idxs_vals([misc], idxs, vals)
        docs += trials.new_trial_docs([new_id], [None], [domain.new_result()], [misc])
    return docs


class RecordingHyperTuning(HyperTuning):
    """``HyperTuning`` that records every trial (failed ones too) as a :class:`Trial`."""

    def __init__(self, objective: Callable[[dict, str], dict], params: list[Param], search: str, samples: int,
                 seed: int, test_mode: str = "full", on_trial: Callable[[list[Trial]], object] | None = None):
        space = {p.name: p.to_hyperopt() for p in params}
        if search == "grid":
            algo = partial(grid_suggest, sizes={p.name: len(p.args) for p in params})
            max_evals = grid_size(params)
        else:
            algo, max_evals = ALGOS[search], samples
        super().__init__(objective, space=space, algo=algo, max_evals=max_evals)
        self.seed = seed
        self.test_mode = test_mode  # the protocol objective_function tests under
        self.on_trial = on_trial
        self.trials: list[Trial] = []

    def trial(self, params: dict) -> dict:
        import hyperopt

        params = plain(params)
        trial = Trial(trial_id=f"trial_{len(self.trials):03d}", params=params, status="failed")
        start = time.perf_counter()
        try:
            result = self.objective_function(params, trial.trial_id)
        except Exception as err:  # one bad trial must not end the sweep
            trial.error = f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]
            logging.getLogger(__name__).debug("trial failed\n%s", traceback.format_exc())
            print(f"{trial.trial_id} {params} failed: {trial.error}", flush=True)
            outcome = {"status": hyperopt.STATUS_FAIL}
        else:
            trial.status = "finished"
            trial.best_valid_score = float(result["best_valid_score"])
            trial.valid_result = plain(dict(result["best_valid_result"] or {}))
            trial.test_result = {f"{self.test_mode}/{k}": v for k, v in plain(dict(result["test_result"])).items()}
            score = trial.best_valid_score
            outcome = {"loss": -score if result["valid_score_bigger"] else score, "status": hyperopt.STATUS_OK}
            print(f"{trial.trial_id} {params}: best valid {score}", flush=True)
        trial.seconds = time.perf_counter() - start
        self.trials.append(trial)
        if self.on_trial:
            self.on_trial(self.trials)
        return outcome

    def run(self) -> None:
        from hyperopt import fmin

        # No early_stop_fn: RecBole's no_progress_loss reads the loss of failed trials (KeyError) and would cut an
        # exhaustive grid short; a sweep runs its grid, or --tune_samples trials.
        fmin(self.trial, self.space, algo=self.algo, max_evals=self.max_evals, rstate=np.random.default_rng(self.seed))


def run_hyperopt(sweep: Sweep, options: SweepOptions,
                 on_trial: Callable[[list[Trial]], object] | None = None) -> list[Trial]:
    """Trials one after another in this process, each through ``quick_start.objective_function``."""

    def objective(params: dict, trial_id: str) -> dict:
        config_dict = {"model": sweep.model, "dataset": sweep.dataset, **sweep.fixed, **params,
                       "checkpoint_dir": os.path.join(sweep.checkpoint_root, sweep.name, trial_id)}
        with isolated_logging():
            return objective_function(config_dict, sweep.config_files or None, saved=True)

    tuning = RecordingHyperTuning(objective, sweep.params, options.search, options.samples, sweep.seed,
                                  sweep.test_mode, on_trial)
    tuning.run()
    return tuning.trials
