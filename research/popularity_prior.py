"""Does a trained Speeder lack a popularity prior? Re-rank with ``score + beta * log(1 + training count)``.

``python research/popularity_prior.py saved/Speeder-<time>.safetensors --betas=-0.5,-0.25,0,0.5,1 --out=prior.json``

The checkpoint is rebuilt with its run's config (``load_tester``); every beta ranks the valid users, and the best
one and ``beta = 0`` rank the test users, under the run's own protocol. The prior enters as one more dimension of
the user and item factors (``beta`` and the log count), so the ranking code, its history exclusion and RecBole's
metrics (here also AveragePopularity and TailPercentage) run as in any test. Negative betas push popular items down.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from recbole_speeder.errors import UsageError
from recbole_speeder.evaluation.protocol import full_ranking_loader
from recbole_speeder.experiments.slices import training_counts
from recbole_speeder.quick_start import load_tester

METRICS = ["Hit", "NDCG", "AveragePopularity", "TailPercentage"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a Speeder run's best checkpoint (.safetensors)")
    parser.add_argument("--betas", default="-0.5,-0.25,0,0.5,1", help="comma-separated weights of the log count")
    parser.add_argument("--tail_ratio", type=int, default=4, help="TailPercentage's tail: items trained this often")
    parser.add_argument("--data_path", help="where the run's dataset lives, if it moved")
    parser.add_argument("--out", help="write the valid and test results as JSON")
    args = parser.parse_args()
    overrides = {"metrics": METRICS, "tail_ratio": args.tail_ratio, "topk": [10], "show_progress": False}
    if args.data_path:
        overrides["data_path"] = args.data_path
    try:
        config, trainer, dataset, valid, test = load_tester(args.checkpoint, overrides)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    log_count = torch.log1p(torch.tensor(training_counts(dataset, valid, test), dtype=torch.float32))
    factors, beta = trainer.model.full_sort_factors, {"value": 0.0}

    def with_prior(interaction):
        users, items = factors(interaction)
        return (torch.cat([users, users.new_full((len(users), 1), beta["value"])], dim=1),
                torch.cat([items, log_count.unsqueeze(1).to(items)], dim=1))

    trainer.model.full_sort_factors = with_prior
    results: dict = {"valid": {}, "test": {}}
    for value in (float(b) for b in args.betas.split(",")):
        beta["value"] = value
        results["valid"][value] = {k: float(v) for k, v in trainer.evaluate(valid, load_best_model=False).items()}
        print(f"valid, beta {value:g}: {results['valid'][value]}", flush=True)
    best = max(results["valid"], key=lambda value: results["valid"][value]["ndcg@10"])
    for value in sorted({0.0, best}):
        beta["value"] = value
        test_result = trainer.evaluate(full_ranking_loader(config, test), load_best_model=False)
        results["test"][value] = {k: float(v) for k, v in test_result.items()}
        print(f"test, beta {value:g}: {results['test'][value]}", flush=True)
    results["best_beta"] = best
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
