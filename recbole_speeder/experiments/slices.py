"""Where do two trained models differ? Full-ranking accuracy by slice of test users, paired against the first.

``python -m recbole_speeder.experiments.slices pretrained.safetensors shuffled.safetensors --out=seed2020.json``
``python -m recbole_speeder.experiments.slices --combine seed2020.json seed2021.json seed2022.json``

A pretrained LLM should help most where the ID signal is thin: test targets that are rare in training, users
with short histories. A tie over all users can hide such a gap, or confirm there is none. Each checkpoint (Speeder
``.safetensors`` or a RecBole ``.pth``, as ``retest`` takes them) is rebuilt with its run's config and ranks all
items for every test user, exactly as the run's full-ranking test does. Users are sliced by the training count of
their target item and by their history length; each slice reports NDCG@10 and Hit@10 per model and every model's
difference from the first with its paired standard error over the slice's users, so one seed already says
whether a gap stands out from the noise of which users a slice holds (not from seed-to-seed noise: for that,
repeat over seeds and ``--combine`` the reports: each slice's mean ± std over them).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from recbole_speeder.errors import ArgumentParser, UsageError
from recbole_speeder.evaluation.ranking import Ranking

TOPK = 10
POPULARITY_EDGES = (4, 8, 16, 32)  # training interactions of the target item: <=4, 5-8, 9-16, 17-32, >32
HISTORY_EDGES = (3, 5, 10, 20)  # items in the user's test history


@dataclass
class Ranked:
    """One model's test users: who they are, their target, history length and where the target ranks (0: first;
    ``TOPK``: outside the top ``TOPK``, all the metrics need)."""

    users: np.ndarray
    targets: np.ndarray
    history: np.ndarray
    ranks: np.ndarray
    train_counts: np.ndarray  # training interactions of every item id
    result: dict  # RecBole's metrics over the same users, which the slice "all" reproduces


def training_counts(dataset, valid_data, test_data) -> np.ndarray:
    """Per item id, its interactions the model trained on: every interaction but the valid and test targets."""
    from recbole_speeder.data.dataset import item_interaction_counts

    iid, counts = dataset.iid_field, item_interaction_counts(dataset)
    for loader in (valid_data, test_data):
        counts -= np.bincount(loader._dataset.inter_feat[iid].numpy(), minlength=dataset.item_num)
    return counts


def rank_test_users(checkpoint: str, config_dict: dict) -> Ranked:
    """Every test user's rank of the true item among all items, from RecBole's own full-ranking evaluation."""
    from recbole_speeder.evaluation.protocol import full_ranking_loader
    from recbole_speeder.quick_start import load_tester

    config, trainer, dataset, valid_data, test_data = load_tester(checkpoint, config_dict)
    users, targets, history, ranks = [], [], [], []
    score_batch = trainer._full_sort_batch_eval

    def recording(batch):
        interaction, scores, positive_u, positive_i = score_batch(batch)
        ranked = isinstance(scores, Ranking)  # Speeder ranks in item chunks without a score matrix
        if len(positive_u) != (scores.n_rows if ranked else scores.shape[0]):
            raise UsageError("slices needs one test target per user (RecBole's leave-one-out split)")
        if ranked:
            ranks.append(scores.positive_rank.clamp(max=TOPK).cpu().numpy())
        else:
            top = torch.topk(scores, TOPK, dim=-1).indices.cpu()  # as RecBole's evaluator takes the top k
            hit = top[positive_u.cpu()] == positive_i.cpu().unsqueeze(1)
            ranks.append(torch.where(hit.any(1), hit.float().argmax(1), torch.tensor(TOPK)).numpy())
        users.append(interaction[config["USER_ID_FIELD"]].cpu().numpy())
        targets.append(positive_i.cpu().numpy())
        history.append(interaction[config["ITEM_LIST_LENGTH_FIELD"]].cpu().numpy())
        return interaction, scores, positive_u, positive_i

    trainer._full_sort_batch_eval = recording
    result = trainer.evaluate(full_ranking_loader(config, test_data), load_best_model=False,
                              show_progress=config["show_progress"])
    return Ranked(*(np.concatenate(parts) for parts in (users, targets, history, ranks)),
                  training_counts(dataset, valid_data, test_data), dict(result))


def per_user_metrics(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """NDCG@10 and Hit@10 of each user (one relevant item: NDCG is 1 / log2(rank + 2) inside the top 10)."""
    inside = ranks < TOPK
    return {f"ndcg@{TOPK}": np.where(inside, 1 / np.log2(ranks + 2.0), 0.0), f"hit@{TOPK}": inside.astype(float)}


def bucket_labels(values: np.ndarray, edges: tuple[int, ...]) -> np.ndarray:
    """``<=a``, ``a+1-b``, ..., ``>z`` for each value."""
    names = [f"<={edges[0]}"] + [f"{lo + 1}-{hi}" for lo, hi in pairwise(edges)] + [f">{edges[-1]}"]
    return np.array(names)[np.searchsorted(np.array(edges), values, side="left")]


def bucket_order(edges: tuple[int, ...]) -> list[str]:
    """The labels of :func:`bucket_labels`, smallest first."""
    return list(bucket_labels(np.array([*edges, edges[-1] + 1]), edges))


def slice_masks(labels: np.ndarray, order: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Each non-empty slice in ``order``, then ``all``: its label and which users it holds."""
    for label in [*order, "all"]:
        mask = np.ones(len(labels), bool) if label == "all" else labels == label
        if mask.any():
            yield label, mask


def slice_table(metrics: dict[str, dict[str, np.ndarray]], by: str, labels: np.ndarray, order: list[str]
                ) -> list[str]:
    """Markdown rows from each model's per-user metrics (:func:`per_user_metrics`): a slice's users, each model's
    metric and each later model's paired difference from the first."""
    names = list(metrics)
    header = [by, "users"]
    for metric in metrics[names[0]]:
        header.append(f"{names[0]} {metric}")
        header += [f"{name} {metric} (vs {names[0]}, ± paired SE)" for name in names[1:]]
    rows = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for label, mask in slice_masks(labels, order):
        cells = [label, str(int(mask.sum()))]
        for metric, first in metrics[names[0]].items():
            cells.append(f"{first[mask].mean():.4f}")
            for name in names[1:]:
                diff = metrics[name][metric][mask] - first[mask]
                se = diff.std(ddof=1) / math.sqrt(mask.sum()) if mask.sum() > 1 else float("nan")
                cells.append(f"{metrics[name][metric][mask].mean():.4f} ({diff.mean():+.4f} ± {se:.4f})")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def slice_means(metrics: dict[str, dict[str, np.ndarray]], labels: np.ndarray, order: list[str]) -> dict[str, dict]:
    """Per slice (and ``all``): its users and each model's mean metrics, the numbers :func:`combine` reads."""
    return {label: {"users": int(mask.sum()), "models": {
        name: {metric: float(values[mask].mean()) for metric, values in per_user.items()}
        for name, per_user in metrics.items()}} for label, mask in slice_masks(labels, order)}


def combine(reports: list[dict]) -> list[str]:
    """Markdown rows per slicing of several reports (runs of other seeds on one split): each model's mean ± sample
    std over the reports and, for every later model, that mean as a multiple of the first model's. The models are
    those every report holds."""
    if any("slices" not in report for report in reports):
        raise UsageError("a report without per-slice numbers: write it again with this version's --out")
    first = reports[0]["slices"]
    names = [name for name in next(iter(first.values()))["all"]["models"]
             if all(name in table["all"]["models"] for report in reports for table in report["slices"].values())]
    lines = []
    for by, table in first.items():
        users = {label: row["users"] for label, row in table.items()}
        if any({label: row["users"] for label, row in report["slices"][by].items()} != users for report in reports):
            raise UsageError(f"the reports slice other users by {by}: combine reports of one dataset and split")
        metrics = list(table["all"]["models"][names[0]])
        header = [by, "users"] + [f"{name} {metric}" + (f" (x {names[0]})" if name != names[0] else "")
                                  for metric in metrics for name in names]
        lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        for label in table:
            cells = [label, str(users[label])]
            for metric in metrics:
                values = {name: np.array([report["slices"][by][label]["models"][name][metric] for report in reports])
                          for name in names}
                for name in names:
                    cell = f"{values[name].mean():.4f} ± {values[name].std(ddof=1) if len(reports) > 1 else 0:.4f}"
                    if name != names[0] and values[names[0]].mean() > 0:
                        cell += f" ({values[name].mean() / values[names[0]].mean():.2f}x)"
                    cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines[:-1]


def compare(checkpoints: dict[str, str], config_dict: dict) -> dict:
    """Rank the test users with every checkpoint: each run's RecBole metrics and the slice tables (markdown rows)."""
    runs = {name: rank_test_users(path, config_dict) for name, path in checkpoints.items()}
    first = next(iter(runs.values()))
    for name, run in runs.items():
        if not (np.array_equal(run.users, first.users) and np.array_equal(run.targets, first.targets)):
            raise UsageError(f"{name} was tested on other users or targets than {next(iter(runs))}: "
                             "slices compares runs of one dataset and split")
    popularity = bucket_labels(first.train_counts[first.targets], POPULARITY_EDGES)
    history = bucket_labels(first.history, HISTORY_EDGES)
    metrics = {name: per_user_metrics(run.ranks) for name, run in runs.items()}
    return {
        "checkpoints": checkpoints,
        "recbole_results": {name: {k: float(v) for k, v in run.result.items()} for name, run in runs.items()},
        "by_target_popularity": slice_table(metrics, "target's training interactions", popularity,
                                            bucket_order(POPULARITY_EDGES)),
        "by_history_length": slice_table(metrics, "history length", history, bucket_order(HISTORY_EDGES)),
        "slices": {"target's training interactions": slice_means(metrics, popularity, bucket_order(POPULARITY_EDGES)),
                   "history length": slice_means(metrics, history, bucket_order(HISTORY_EDGES))},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("checkpoints", nargs="+", help="NAME=PATH or PATH of each run's best checkpoint; "
                                                       "the first is the reference")
    parser.add_argument("--out", help="also write the report as JSON to this file")
    parser.add_argument("--combine", action="store_true", help="the arguments are --out reports of one split (e.g. "
                        "one per seed): print each slice's mean ± std over them")
    args, flags = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.combine:
        return _combine_files(args.checkpoints)
    try:
        from recbole_speeder.experiments.retest import parse_overrides

        named = dict((Path(item).stem, item) if Path(item).is_file() or "=" not in item else item.partition("=")[::2]
                     for item in args.checkpoints)
        if len(named) < 2:
            raise UsageError("slices compares at least two checkpoints with distinct names (NAME=PATH)")
        report = compare(named, parse_overrides(flags))
    except (UsageError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print("\n".join(["", *report["by_target_popularity"], "", *report["by_history_length"]]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _combine_files(paths: list[str]) -> dict:
    try:
        reports = []
        for path in paths:
            try:
                reports.append(json.loads(Path(path).read_text()))
            except (OSError, ValueError) as err:
                raise UsageError(f"{path} is not a slices report: {err}") from None
        lines = combine(reports)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print("\n".join(lines))
    return {"reports": paths, "combined": lines}


if __name__ == "__main__":
    main()
