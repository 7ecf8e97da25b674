"""How Speeder's costs grow with the catalogue and with the interactions, on synthetic Zipf-popular data.

Each size (items:interactions) is generated in the generic raw layout (``interactions.tsv.gz`` + ``items.jsonl``),
prepared by ``dataset_prep`` in a child process (wall time, peak RSS), given synthetic 384-d text features (MiniLM's
width; encoding millions of titles would take hours on a CPU), then measured in a second child: the RecBole dataset
build (time, RSS growth per interaction), a training step with the full softmax and with the sampled softmax
(lazy and dense Adam side by side; seconds per 1,000 targets), full ranking (as the evaluation ranks: in item
chunks) and 20-candidate scoring (users/s). A child that passes ``--max_rss_gb`` is stopped, and the table says
where. MiniLM's encoding speed is measured once, on a sample of titles.

    python bench/scale.py --no_write
    python bench/scale.py --sizes=2k:20k --backbone_path=tiny-random --train_rows=16 --eval_users=8 --no_write
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run_recbole_speeder.py: before torch loads OpenMP
if __package__ in (None, ""):  # `python bench/scale.py` from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from bench.report import command_line, machine_line, publish, run_cli, utc_now  # noqa: E402
from recbole_speeder.errors import UsageError  # noqa: E402

DEFAULT_SIZES = "10k:2m,100k:2m,1m:2m,10k:200k,10k:20m"  # the items axis, then the interactions axis
DATASET = "Scale"
FEATURE_DIM = 384
SUFFIXES = {"k": 1_000, "m": 1_000_000}


@dataclass
class Row:
    items: int  # as generated
    interactions: int
    prepared_items: int | None = None  # in the prepared dataset: one interaction per (user, item) is kept
    prepared_interactions: int | None = None
    prep_s: float | None = None
    prep_peak_mib: float | None = None
    build_s: float | None = None
    build_bytes_per_interaction: float | None = None
    train_full_s_per_1k: float | None = None
    train_sampled_s_per_1k: float | None = None
    train_sampled_dense_adam_s_per_1k: float | None = None
    full_users_per_s: float | None = None
    candidate_users_per_s: float | None = None
    peak_mib: float | None = None
    stopped: str = ""
    notes: list[str] = field(default_factory=list)


def count(text: str) -> int:
    text = text.strip().lower()
    scale = SUFFIXES.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if text[-1:] in SUFFIXES else text) * scale)
    except ValueError:
        raise UsageError(f"a size is items:interactions, e.g. 10k:200k, not '{text}'") from None


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in filter(None, text.split(",")):
        items, _, interactions = part.partition(":")
        sizes.append((count(items), count(interactions)))
    if not sizes or any(i < 10 or n < 10 * 3 for i, n in sizes):
        raise UsageError(f"--sizes needs items:interactions pairs of at least 10 items and 30 interactions: {text}")
    return sizes


# ---------------------------------------------------------------------------------------------- data
def generate(folder: Path, n_items: int, n_interactions: int, seed: int = 0) -> None:
    """Users with geometric history lengths (mean 9, at least 3), items drawn by a Zipf(1.1) popularity, every
    item at least once (so the catalogue has ``n_items`` items when ``n_interactions`` allows), time stamps
    increasing along each history."""
    rng = np.random.default_rng(seed)
    lengths = 3 + rng.geometric(1 / 7, size=n_interactions // 3)
    lengths = lengths[np.cumsum(lengths) <= n_interactions]
    ranks = np.arange(1, n_items + 1, dtype=np.float64)
    popularity = ranks ** -1.1
    popularity /= popularity.sum()
    items = rng.choice(n_items, size=int(lengths.sum()), p=popularity)
    every = min(n_items, len(items))
    items[rng.choice(len(items), size=every, replace=False)] = rng.permutation(n_items)[:every]
    users = np.repeat(np.arange(len(lengths)), lengths)
    stamps = 1_000_000 + np.arange(len(items)) * 60
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "interactions.tsv.gz", "wt", encoding="utf-8", compresslevel=1) as out:
        out.write("user_id\titem_id\ttimestamp\n")
        for start in range(0, len(items), 1_000_000):
            part = slice(start, start + 1_000_000)
            out.writelines(f"{u}\t{i}\t{t}\n" for u, i, t in zip(users[part], items[part], stamps[part], strict=True))
    words = np.array(["red", "blue", "lamp", "soap", "cream", "brush", "gel", "mask", "oil", "set"])
    with open(folder / "items.jsonl", "w", encoding="utf-8") as out:
        for item in range(n_items):
            title = " ".join(words[[item % 10, (item // 10) % 10, (item // 100) % 10]])
            out.write(json.dumps({"item_id": int(item), "title": f"{title} {item}", "categories": ["Beauty"]}) + "\n")


def run_child(command: list[str], max_rss_gb: float, timeout: float) -> tuple[subprocess.CompletedProcess, float,
                                                                               float, str]:
    """Run a child process, polling its resident memory: ``(result, wall seconds, peak MiB, why it stopped)``; a
    stopped child's result holds what it printed before."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process, peak, stopped = psutil.Process(child.pid), 0, ""
    while child.poll() is None:
        try:
            peak = max(peak, process.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if peak > max_rss_gb * 2**30:
            stopped = f"stopped above {max_rss_gb:g} GB of RSS"
        elif time.perf_counter() - start > timeout:
            stopped = f"stopped after {timeout:.0f} s"
        if stopped:
            child.kill()
            break
        time.sleep(0.05)
    out, err = child.communicate()
    seconds = time.perf_counter() - start
    result = subprocess.CompletedProcess(command, child.returncode, out, err)
    if not stopped and child.returncode != 0:
        stopped = f"failed: {(err.strip().splitlines() or ['exit ' + str(child.returncode)])[-1][:160]}"
    return result, seconds, peak / 2**20, stopped


def prepare(raw: Path, data: Path, args) -> tuple[float | None, float, str]:
    _, seconds, peak, stopped = run_child(
        [sys.executable, "-m", "dataset_prep", "prepare", "--source=generic", f"--input={raw}", f"--out={data}",
         f"--dataset={DATASET}", "--kcore=0", "--features=none", "--no-progress"],
        args.max_rss_gb, args.timeout)
    if stopped:
        return None, peak, stopped
    from recbole_speeder.data.features import save_item_features

    tokens = [line.split("\t", 1)[0] for line in (data / DATASET / f"{DATASET}.item").read_text().splitlines()[1:]]
    vectors = np.random.default_rng(0).standard_normal((len(tokens), FEATURE_DIM), dtype=np.float32)
    save_item_features(data / DATASET, DATASET, "text", tokens, vectors, encoder="synthetic", source_sha256="-")
    return seconds, peak, ""


def prepared_sizes(sizes: list[tuple[int, int]], args) -> Iterator[tuple[int, int, Path, tuple]]:
    """Each size generated and prepared in turn under ``--workdir`` (in a temporary folder removed at the end):
    ``(items, interactions, prepared data folder, prepare()'s (seconds, peak MiB, why it stopped))``."""
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n_items, n_interactions in sizes:
            folder = Path(tmp) / f"{n_items}-{n_interactions}"
            print(f"{n_items:,} items, {n_interactions:,} interactions: generating ...", flush=True)
            generate(folder / "raw", n_items, n_interactions)
            yield n_items, n_interactions, folder / "data", prepare(folder / "raw", folder / "data", args)


def size_parser(description: str, sizes: str) -> argparse.ArgumentParser:
    """The options of every benchmark over generated sizes: the sizes, each child's limits, where the data and the
    results go, and the measuring child's hidden ``--worker`` (its data folder)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sizes", default=sizes, help=f"items:interactions, comma-separated ({sizes})")
    parser.add_argument("--max_rss_gb", type=float, default=20.0, help="stop a child above this resident memory")
    parser.add_argument("--timeout", type=float, default=3600.0, help="stop a child after this many seconds")
    parser.add_argument("--workdir", default=None, help="where the data is generated (default: a temporary folder)")
    parser.add_argument("--output", default="BENCHMARKS.md", help="file the run is appended to")
    parser.add_argument("--no_write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def child_rows(args, script: str, variants: dict[str, list[str]], name: str, progress: str) -> list[dict]:
    """For each generated and prepared size, one child per variant (``script --worker=<data> *flags``): a row with
    the size (``items`` as generated, ``prepared_items`` and ``interactions`` as prepared), the variant under
    ``name``, the child's peak MiB, why it stopped and its last JSON line; a size whose preparation stopped is one
    row saying so. ``progress`` is printed per child, the variant in its ``{}``."""
    rows = []
    for n_items, n_interactions, data, (_, _, stopped) in prepared_sizes(parse_sizes(args.sizes), args):
        if stopped:
            rows.append({"items": n_items, "interactions": n_interactions, "stopped": f"preparation {stopped}"})
            continue
        prepared_items, prepared_interactions = prepared_counts(data)
        for variant, flags in variants.items():
            print(f"  {progress.format(variant)} ...", flush=True)
            done, _, peak, stopped = run_child([sys.executable, script, f"--worker={data}", *flags],
                                               args.max_rss_gb, args.timeout)
            rows.append({"items": n_items, "prepared_items": prepared_items, "interactions": prepared_interactions,
                         name: variant, "peak_mib": peak, "stopped": stopped, **child_result(done)})
    return rows


def child_result(done: subprocess.CompletedProcess) -> dict:
    """The last JSON line a measuring child printed (it prints one as each phase ends), or ``{}``."""
    lines = [line for line in (done.stdout or "").splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def prepared_counts(data: Path) -> tuple[int, int]:
    """Items and interactions of the prepared atomic files (header lines excluded)."""
    folder = data / DATASET
    return tuple(sum(1 for _ in open(folder / f"{DATASET}.{kind}", encoding="utf-8")) - 1 for kind in ("item", "inter"))


# ---------------------------------------------------------------------------------------------- the measuring child
def full_ranking(model, users, chunk_size: int):
    """One timed full ranking as the evaluation runs it: user and item vectors, then ``evaluation/ranking.py``'s
    chunks (never a ``[users x items]`` matrix)."""
    import torch

    from recbole_speeder.evaluation.ranking import rank_all_items

    rows = torch.arange(len(users))

    def rank() -> None:
        with torch.no_grad():
            rank_all_items(*model.full_sort_factors(users), rows, users[model.ITEM_ID], None, chunk_size)

    return rank


def speeder_settings(data: Path, backbone_path: str) -> dict:
    """Speeder's config on a prepared synthetic size: text and ID experts, one stage, quiet."""
    return {"data_path": str(data), "show_progress": False, "state": "ERROR", "log_wandb": False,
            "checkpoint_dir": str(data / "saved"), "modalities": ["text", "id"], "mpo_stages": None,
            "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
            "item_text_fields": ["title"], "backbone_path": backbone_path, "eval_batch_size": 1024}


def measure(data: Path, args) -> dict:
    """In the child: build the dataset, then time training steps and scoring; one JSON line on stdout."""
    import torch
    from recbole.data import data_preparation

    from bench.measure import adam, median, paired_timings, scoring, training_step
    from bench.workload import build_workload
    from recbole_speeder.config import Config
    from recbole_speeder.model import Speeder
    from recbole_speeder.trainer.rng import seed_run
    from recbole_speeder.utils import create_dataset

    settings = speeder_settings(data, args.backbone_path)
    config = Config("Speeder", DATASET, config_dict=settings)
    seed_run(config["seed"], config["reproducibility"])
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    dataset = create_dataset(config)
    train, valid, _ = data_preparation(config, dataset)
    out = {"build_s": time.perf_counter() - start,
           "build_bytes_per_interaction": (psutil.Process().memory_info().rss - before) / len(dataset.inter_feat)}
    print(json.dumps(out), flush=True)  # each phase's results are printed as it ends: kept if a later one is stopped
    work = build_workload(train, valid, args.train_rows, args.eval_users, 20, config["seed"])
    per_1k = 1000 / work.train_targets
    # the sampled softmax first (what fits is measured before what may not), with lazy and dense Adam side by side
    sampled = {"sampled": {}, "sampled_dense_adam": {"lazy_id_update": False}}
    models = {name: Speeder(Config("Speeder", DATASET, config_dict={**settings, "sampled_softmax_negatives": 256,
                                                                      **extra}), train._dataset)
              for name, extra in sampled.items()}
    times = paired_timings({name: training_step(m, adam(m), work.train) for name, m in models.items()}, args.repeats)
    for name in sampled:
        out[f"train_{name}_s_per_1k"] = median(times[name]) * per_1k
    print(json.dumps(out), flush=True)
    model = models.pop("sampled")
    del models
    gc.collect()
    model.eval()  # evaluation is the same with either loss
    with torch.no_grad():
        model.item_vectors(model.item_tokens())  # the once-per-evaluation cache, outside the timed calls
    times = paired_timings({"full": full_ranking(model, work.users, config["ranking_chunk_size"]),
                            "candidates": scoring(model, work.candidates, False)},
                           args.repeats)
    out["full_users_per_s"] = len(work.users) / median(times["full"])
    out["candidate_users_per_s"] = len(work.users) / median(times["candidates"])
    print(json.dumps(out), flush=True)
    del model
    gc.collect()
    model = Speeder(config, train._dataset)
    times = paired_timings({"step": training_step(model, adam(model), work.train)}, args.repeats)
    out["train_full_s_per_1k"] = median(times["step"]) * per_1k
    print(json.dumps(out), flush=True)
    return out


def encoding_rate(n_texts: int) -> float:
    """MiniLM items/s on ``n_texts`` synthetic titles (what preparing a catalogue's text features costs)."""
    from recbole_speeder.data.encoders import encode_texts

    texts = [f"red soap lamp {i} brush; brand: B{i % 97}; categories: Beauty, Skin" for i in range(n_texts)]
    encode_texts(texts[:64], show_progress=False)  # loads the model
    start = time.perf_counter()
    encode_texts(texts, show_progress=False)
    return n_texts / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- report
def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def table(rows: list[Row]) -> str:
    lines = ["| items | interactions | prep s | prep peak MiB | build s | build bytes / inter | train s / 1k targets, "
             "full softmax | train s / 1k targets, sampled (256) | the same, dense Adam | full-ranking users/s "
             "| 20-candidate users/s | measuring peak MiB | stopped |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        items = f"{r.prepared_items:,}" if r.prepared_items is not None else f"{r.items:,} (generated)"
        inters = f"{r.prepared_interactions:,}" if r.prepared_interactions is not None else f"{r.interactions:,}"
        lines.append(f"| {items} | {inters} | {fmt(r.prep_s)} | {fmt(r.prep_peak_mib, 0)} "
                     f"| {fmt(r.build_s)} | {fmt(r.build_bytes_per_interaction, 0)} | {fmt(r.train_full_s_per_1k, 3)} "
                     f"| {fmt(r.train_sampled_s_per_1k, 3)} | {fmt(r.train_sampled_dense_adam_s_per_1k, 3)} "
                     f"| {fmt(r.full_users_per_s)} "
                     f"| {fmt(r.candidate_users_per_s)} | {fmt(r.peak_mib, 0)} | {r.stopped} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    """Log-log: each measured cost against the catalogue (the sizes sharing an interaction count) and against the
    interactions (the sizes sharing a catalogue)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4))
    FigureCanvasAgg(figure)
    by_items = sorted({r.interactions for r in rows}, key=lambda n: -sum(r.interactions == n for r in rows))[0]
    by_inters = sorted({r.items for r in rows}, key=lambda n: -sum(r.items == n for r in rows))[0]
    panels = [("prepared_items", [r for r in rows if r.interactions == by_items], f"at {by_items:,} interactions"),
              ("prepared_interactions", [r for r in rows if r.items == by_inters], f"at {by_inters:,} items")]
    metrics = ["prep_s", "build_s", "train_full_s_per_1k", "train_sampled_s_per_1k",
               "train_sampled_dense_adam_s_per_1k", "full_users_per_s"]
    for index, (axis, chosen, title) in enumerate(panels, 1):
        ax = figure.add_subplot(1, 2, index)
        for metric in metrics:
            points = [(getattr(r, axis), getattr(r, metric)) for r in chosen if getattr(r, metric) and getattr(r, axis)]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=metric)
        ax.set(xscale="log", yscale="log", xlabel=axis.replace("prepared_", ""), title=title)
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = size_parser(__doc__.split("\n\n")[0], DEFAULT_SIZES)
    parser.add_argument("--backbone_path", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="Speeder's backbone")
    parser.add_argument("--train_rows", type=int, default=64, help="training windows per timed step")
    parser.add_argument("--eval_users", type=int, default=256, help="users per timed scoring call")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per measurement")
    parser.add_argument("--encode_texts", type=int, default=512, help="titles for MiniLM's items/s (0: skip)")
    parser.add_argument("--plot", default="docs/results/scale.png", help="log-log plot of the run ('' to skip)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        measure(Path(args.worker), args)
        return []
    rows = []
    for n_items, n_interactions, data, prepared in prepared_sizes(parse_sizes(args.sizes), args):
        row = Row(n_items, n_interactions)
        rows.append(row)
        row.prep_s, row.prep_peak_mib, row.stopped = prepared
        if row.prep_s is None:
            continue
        row.prepared_items, row.prepared_interactions = prepared_counts(data)
        print("  measuring ...", flush=True)
        done, _, row.peak_mib, row.stopped = run_child(
            [sys.executable, __file__, f"--worker={data}", f"--backbone_path={args.backbone_path}",
             f"--train_rows={args.train_rows}", f"--eval_users={args.eval_users}", f"--repeats={args.repeats}"],
            args.max_rss_gb, args.timeout)
        for key, value in child_result(done).items():
            setattr(row, key, value)
    rate = encoding_rate(args.encode_texts) if args.encode_texts else None
    text = "\n".join([
        f"### {utc_now()}", "", f"`{command_line()}`", "", f"Machine: {machine_line()}.", "",
        f"Settings: Speeder ({args.backbone_path}, 2 decoder layers, text and ID experts, synthetic 384-d text "
        f"features), {args.train_rows} training windows per step, {args.eval_users} users per scoring call, median "
        f"of {args.repeats} rounds; the sampled softmax draws 256 uniform negatives a batch.", "",
        table(rows), "",
        f"MiniLM encoding: {fmt(rate)} items/s on {args.encode_texts} titles." if rate else "",
    ])
    if args.plot and not args.no_write:
        plot(rows, Path(args.plot))
        text += f"\n\n![cost against size]({args.plot})"
    publish(text + "\n", Path(args.output), write=not args.no_write)
    return rows


if __name__ == "__main__":
    run_cli(main)
