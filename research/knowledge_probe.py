"""Is there knowledge to carry? Each backbone ranks Beauty's next items zero-shot, before any training.

Speeder can only bring to the ranking what its LLM knows. For a sample of test users, the untrained LLM reads the
user's last ``--history`` items as text and scores each of 20 candidates (the true next item and 19 distinct
uniform negatives outside the user's history: the 20-candidate protocol) by the log-probability of the
candidate's text after that history. Two scores from one pass: the mean log-probability per token, and PMI (the
log-probability after the history minus after a neutral prompt), which removes how likely a title is anywhere.
A pretrained backbone that ranks above its shuffled copy knows something about what shoppers buy next; one at the
shuffled copy's level has nothing for MRC to carry, whatever route it takes. References on the same lists: chance,
popularity (training interactions), MiniLM cosine similarity to the history (the text expert's input), and
MiniLM plus each LLM's PMI (z-scores added within each list): does the LLM know anything MiniLM's vectors do not?

    python research/knowledge_probe.py --data_path=dataset/ --users=300 --backbones=smollm2,smollm2:shuffled
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run_recbole_speeder.py: before torch loads OpenMP
if __package__ in (None, ""):  # `python research/knowledge_probe.py` from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from recbole.data import data_preparation  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.efficiency import check_data, quiet_config  # noqa: E402
from bench.report import command_line, machine_line, publish, run_cli, utc_now  # noqa: E402
from recbole_speeder.config import Config  # noqa: E402
from recbole_speeder.data.item_features import item_texts, text_features  # noqa: E402
from recbole_speeder.errors import UsageError  # noqa: E402
from recbole_speeder.experiments.slices import TOPK, per_user_metrics, training_counts  # noqa: E402
from recbole_speeder.model.backbone import GEMMA3_HUB_ID, SMOLLM2_HUB_ID, load_frozen_lm  # noqa: E402
from recbole_speeder.utils import create_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BACKBONES = {"smollm2": SMOLLM2_HUB_ID, "gemma": GEMMA3_HUB_ID}
INITS = ("pretrained", "shuffled", "random")
PROMPT = "A shopper bought these beauty products, in this order:\n{history}\nThe next product the shopper bought:"
NEUTRAL = "A beauty product:"
CANDIDATES = 20
MINILM = "MiniLM cosine to the history"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", default="dataset/", help="RecBole data_path holding <dataset>/ (dataset_prep)")
    parser.add_argument("--dataset", default="Amazon_Beauty", help="dataset name (default Amazon_Beauty)")
    parser.add_argument("--backbones", default="smollm2,smollm2:shuffled",
                        help="comma list of NAME[:INIT]; NAME is smollm2, gemma or a backbone_path, INIT one of "
                             f"{', '.join(INITS)} (default pretrained); the first is the reference of the paired "
                             "differences")
    parser.add_argument("--users", type=int, default=300, help="test users sampled (default 300)")
    parser.add_argument("--history", type=int, default=5, help="last history items in the prompt (default 5)")
    parser.add_argument("--item_tokens", type=int, default=24, help="tokens kept of each item's text (default 24)")
    parser.add_argument("--seed", type=int, default=2020, help="seed of the users, negatives and shuffles")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "results" / "knowledge-cpu" /
                        "knowledge-probe.md", help="file the run is appended to")
    parser.add_argument("--scores_out", type=Path, help="also save every scorer's [users, 20] scores (npz)")
    parser.add_argument("--no_write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.users < 1 or args.history < 1 or args.item_tokens < 1:
        raise UsageError("--users, --history and --item_tokens must be positive")
    return args


def backbone_specs(text: str) -> list[tuple[str, str, str]]:
    """(label, backbone_path, backbone_init) per ``NAME[:INIT]``."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, init = item.partition(":")
        init = init or "pretrained"
        if init not in INITS:
            raise UsageError(f"--backbones: '{item}' has init '{init}'; expected one of {', '.join(INITS)}")
        specs.append((item, BACKBONES.get(name, name), init))
    if not specs:
        raise UsageError("--backbones names no backbone")
    return specs


def sample_lists(test_data, n_items: int, users: int, history: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[U, history] last history items (0: padding, oldest first) and [U, 20] candidates, the true item first."""
    inter = test_data._dataset.inter_feat
    seqs, lengths, targets = inter["item_id_list"].numpy(), inter["item_length"].numpy(), inter["item_id"].numpy()
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(targets), size=min(users, len(targets)), replace=False)
    recent = np.zeros((len(rows), history), dtype=np.int64)
    lists = np.zeros((len(rows), CANDIDATES), dtype=np.int64)
    for i, row in enumerate(rows):
        seen = seqs[row, : lengths[row]]
        tail = seen[-history:]
        recent[i, history - len(tail):] = tail
        excluded = set(seen.tolist()) | {int(targets[row])}
        negatives: list[int] = []
        while len(negatives) < CANDIDATES - 1:
            item = int(rng.integers(1, n_items))
            if item not in excluded:
                excluded.add(item)
                negatives.append(item)
        lists[i] = [targets[row], *negatives]
    return recent, lists


class ZeroShotScorer:
    """One causal LM's log-probabilities of candidate texts after a history prompt and after a neutral one."""

    def __init__(self, path: str, init: str, seed: int, texts: list[str], item_tokens: int):
        config = {"backbone_path": path, "backbone_init": init, "seed": seed, "backbone_dtype": "float32",
                  "backbone_local_files_only": True, "backbone_offline_copy": True}
        self.model, self.tokenizer = load_frozen_lm(config, None)
        self.model.eval()
        self.texts = texts  # index i: item id i + 1
        self.item_tokens = item_tokens
        self._candidate_ids: dict[int, list[int]] = {}

    def _clipped(self, item: int) -> str:
        ids = self.tokenizer(self.texts[item - 1], add_special_tokens=False)["input_ids"][: self.item_tokens]
        return self.tokenizer.decode(ids)

    def _continuation(self, item: int) -> list[int]:
        if item not in self._candidate_ids:
            self._candidate_ids[item] = self.tokenizer(" " + self._clipped(item),
                                                       add_special_tokens=False)["input_ids"]
        return self._candidate_ids[item]

    def prompt(self, recent: np.ndarray) -> str:
        return PROMPT.format(history="\n".join(f"- {self._clipped(int(i))}" for i in recent if i))

    @torch.inference_mode()
    def log_probs(self, prompt: str, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Summed log-probability of each item's text after ``prompt``, and its token count."""
        prompt_ids = torch.tensor([self.tokenizer(prompt)["input_ids"]])
        out = self.model(input_ids=prompt_ids, use_cache=True)
        cache = out.cache
        cache.batch_repeat_interleave(len(items))
        conts = [self._continuation(int(i)) for i in items]
        width = max(map(len, conts))
        ids = torch.tensor([c + [0] * (width - len(c)) for c in conts])
        real = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in conts])
        mask = torch.cat([torch.ones(len(items), prompt_ids.shape[1], dtype=torch.long), real], dim=1)
        logits = self.model(input_ids=ids, attention_mask=mask, cache=cache).logits
        # token t of a continuation is predicted at the prompt's last position (t = 0) or at token t - 1
        logits = torch.cat([out.logits[:, -1:].expand(len(items), -1, -1), logits[:, :-1]], dim=1)
        picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return (picked * real).sum(1).numpy(), real.sum(1).numpy()


def standardised(scores: np.ndarray) -> np.ndarray:
    """Scores as z-values within each user's list: two scorers add up without one's scale drowning the other's."""
    return (scores - scores.mean(1, keepdims=True)) / (scores.std(1, keepdims=True) + 1e-9)


def ranks_of_first(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """0-based rank of column 0 in each row, ties broken at random."""
    noisy = scores + rng.uniform(0, 1e-9, size=scores.shape) * (np.abs(scores).max() + 1)
    return (noisy[:, 1:] > noisy[:, :1]).sum(1)


def per_user(ranks: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "Hit@1": (ranks < 1).astype(float),
        "Hit@5": (ranks < 5).astype(float),
        f"NDCG@{TOPK}": per_user_metrics(ranks)[f"ndcg@{TOPK}"],
        "MRR": 1 / (ranks + 1),
    }


def mean_se(values: np.ndarray) -> str:
    return f"{values.mean():.3f} ± {values.std(ddof=1) / np.sqrt(len(values)):.3f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_data(args.data_path, args.dataset)
    specs = backbone_specs(args.backbones)
    with tempfile.TemporaryDirectory() as workdir:
        config = Config("Speeder", args.dataset, config_dict=quiet_config(args.data_path, workdir))
        dataset = create_dataset(config)
        _, valid_data, test_data = data_preparation(config, dataset)
    texts = item_texts(dataset, list(config["item_text_fields"]))
    recent, lists = sample_lists(test_data, dataset.item_num, args.users, args.history, args.seed)
    rng = np.random.default_rng(args.seed)
    scores = {"chance": np.zeros(lists.shape),
              "popularity (training interactions)": training_counts(dataset, valid_data, test_data)[lists]}
    minilm = torch.nn.functional.normalize(torch.from_numpy(text_features(config, dataset, texts).embedding), dim=1)
    profile = torch.nn.functional.normalize(minilm[torch.from_numpy(recent)].sum(1), dim=1)  # row 0 is zeros
    scores[MINILM] = torch.einsum("ud,ucd->uc", profile, minilm[torch.from_numpy(lists)]).numpy()
    seconds = {}
    for label, path, init in specs:
        print(f"{label}: loading {path} ({init}) ...", flush=True)
        scorer = ZeroShotScorer(path, init, args.seed, texts, args.item_tokens)
        cond, neutral, n_tokens = np.zeros(lists.shape), np.zeros(lists.shape), np.ones(lists.shape)
        start = time.perf_counter()
        for u in tqdm(range(len(lists)), desc=label, unit="user"):
            cond[u], n_tokens[u] = scorer.log_probs(scorer.prompt(recent[u]), lists[u])
            neutral[u], _ = scorer.log_probs(NEUTRAL, lists[u])
        scores[f"{label}, log p per token"] = cond / n_tokens
        scores[f"{label}, PMI"] = cond - neutral
        scores[f"MiniLM + {label} PMI"] = standardised(scores[MINILM]) + standardised(cond - neutral)
        seconds[label] = time.perf_counter() - start
    if args.scores_out:
        np.savez_compressed(args.scores_out, lists=lists, recent=recent, **scores)
    metrics = {name: per_user(ranks_of_first(s, rng)) for name, s in scores.items()}
    names = list(next(iter(metrics.values())))
    rows = [f"| {name} | " + " | ".join(mean_se(m[k]) for k in names) + " |" for name, m in metrics.items()]
    reference = specs[0][0]
    pairs = [(f"{reference}, {kind}", f"{label}, {kind}") for label, _, _ in specs[1:]
             for kind in ("PMI", "log p per token")]
    pairs += [(f"MiniLM + {label} PMI", MINILM) for label, _, _ in specs]
    diffs = [f"| {a} - {b} | " + " | ".join(mean_se(metrics[a][k] - metrics[b][k]) for k in names) + " |"
             for a, b in pairs]
    text = "\n".join([
        f"### {utc_now()}, zero-shot knowledge probe, {len(lists)} test users",
        "",
        f"`{command_line()}`",
        "",
        f"Machine: {machine_line()}.",
        "",
        f"Each user's last {args.history} items as text (fields {', '.join(config['item_text_fields'])}, "
        f"{args.item_tokens} tokens each) in the prompt; 20 candidates (the true item and 19 uniform negatives "
        f"outside the history, seed {args.seed}); no training. Mean ± standard error over users; chance is Hit@1 "
        f"0.05. Seconds of LLM scoring: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".",
        "",
        "| scorer | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
        *rows,
        "",
        "Paired differences (same users, same lists):",
        "",
        "| difference | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
        *diffs,
    ]) + "\n"
    publish(text, args.output, write=not args.no_write)


if __name__ == "__main__":
    run_cli(main)
