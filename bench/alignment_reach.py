"""How close can soft tokens come to the backbone's reading of each item's text (``align_loss_weight``)?

Trains the alignment loss alone, from a fresh model, and reports the mean centred cosine between the state after
an item's soft token and the state after its text (model/alignment.py) every ``--every`` steps. Three ways to
make the tokens: ``free`` (one free token per item: what a single token can reach through the backbone), ``text``
(MRC's text expert alone) and ``text_id`` (the text and ID experts). A route that cannot align does not test
whether alignment carries the LLM's knowledge; this says how far each one gets, at what cost.

    python bench/alignment_reach.py --data_path=dataset/ --steps=200
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run_recbole_speeder.py: before torch loads OpenMP
if __package__ in (None, ""):  # `python bench/alignment_reach.py` from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from recbole.data import data_preparation  # noqa: E402

from bench.efficiency import check_data, quiet_config, shared_backbone  # noqa: E402
from bench.report import command_line, machine_line, publish, run_cli, utc_now  # noqa: E402
from recbole_speeder.config import Config  # noqa: E402
from recbole_speeder.model import Speeder  # noqa: E402
from recbole_speeder.trainer.rng import seed_run  # noqa: E402
from recbole_speeder.utils import create_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROUTES = {"free": ["text"], "text": ["text"], "text_id": ["text", "id"]}  # route -> MRC modalities


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", default="dataset/", help="RecBole data_path holding <dataset>/ (dataset_prep)")
    parser.add_argument("--dataset", default="Amazon_Beauty", help="dataset name (default Amazon_Beauty)")
    parser.add_argument("--backbone_init", default="pretrained", help="pretrained, shuffled or random")
    parser.add_argument("--steps", type=int, default=200, help="Adam steps per route (default 200)")
    parser.add_argument("--every", type=int, default=50, help="report the cosine every N steps (default 50)")
    parser.add_argument("--items", type=int, default=256, help="items per step (default 256)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3, Speeder's)")
    parser.add_argument("--free_lr", type=float, default=1e-2, help="learning rate of the free tokens (default 1e-2)")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "results" / "knowledge-cpu" /
                        "alignment-reach.md", help="file the run is appended to")
    parser.add_argument("--no_write", action="store_true", help="print only")
    return parser.parse_args(argv)


def reach(model: Speeder, route: str, args: argparse.Namespace) -> list[float]:
    """The alignment cosine every ``--every`` steps of training ``route``'s parameters on the alignment loss."""
    alignment, n_items = model.alignment, model.n_items
    if route == "free":
        scale = model.llm.get_input_embeddings().weight.std().item()
        free = torch.nn.Parameter(torch.randn(n_items, 1, model.d_model) * scale)
        model.mrc.forward = lambda ids: (free[ids], None)  # the loss reads mrc(items)[0]
        optimizer = torch.optim.Adam([free], lr=args.free_lr)
    else:
        optimizer = torch.optim.Adam(model.mrc.parameters(), lr=args.lr)
    model.train()
    cosines = []
    for step in range(args.steps + 1):
        items = torch.randperm(n_items - 1)[: args.items] + 1
        loss = alignment.loss(model, items.unsqueeze(0), items[:1])
        if step % args.every == 0:
            cosines.append(1 - loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return cosines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_data(args.data_path, args.dataset)
    shared_backbone()  # the routes train only MRC or free tokens: one backbone serves them all
    rows, targets, train = [], None, None
    with tempfile.TemporaryDirectory() as workdir:
        base = {**quiet_config(args.data_path, workdir), "align_loss_weight": 1.0,
                "backbone_init": args.backbone_init, "align_items_per_step": args.items}
        for route, modalities in ROUTES.items():
            config = Config("Speeder", args.dataset, config_dict={**base, "modalities": modalities})
            seed_run(config["seed"], config["reproducibility"])
            if train is None:  # the routes differ in the model only: one split serves them all
                train, _, _ = data_preparation(config, create_dataset(config))
            model = Speeder(config, train._dataset)
            if targets is None:
                print("reading the alignment targets once ...", flush=True)
                model.alignment._read_targets(model)
                targets = (model.alignment.targets, model.alignment.target_mean)
            model.alignment.targets, model.alignment.target_mean = targets
            print(f"route {route} ...", flush=True)
            rows.append(f"| {route} | " + " | ".join(f"{c:.3f}" for c in reach(model, route, args)) + " |")
    steps = list(range(0, args.steps + 1, args.every))
    text = "\n".join([
        f"### {utc_now()}, alignment reach, backbone_init {args.backbone_init}",
        "",
        f"`{command_line()}`",
        "",
        f"Machine: {machine_line()}.",
        "",
        f"Mean centred cosine (1 - alignment loss) on {args.items} random items a step, alignment loss only; "
        f"lr {args.lr} (free tokens {args.free_lr}).",
        "",
        "| route | " + " | ".join(f"step {s}" for s in steps) + " |",
        "|---|" + "---:|" * len(steps),
        *rows,
    ]) + "\n"
    publish(text, args.output, write=not args.no_write)


if __name__ == "__main__":
    run_cli(main)
