"""Comparison reports: ``results.json`` (everything), ``results.csv`` (one flat row per model), ``results.md``
(tables with the best value of each metric in bold) and ``results.png`` (one bar chart per metric)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from recbole.evaluator.register import smaller_metrics

FULL = "full"


def smaller_is_better(metric: str) -> bool:
    return metric.split("@")[0].lower() in smaller_metrics


def ok_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row["status"] == "ok"]


def protocols(rows: list[dict]) -> list[str]:
    """Protocols in the order the runs evaluated them (full ranking first)."""
    names: list[str] = []
    for row in ok_rows(rows):
        names += [name for name in row["test"] if name not in names]
    return names


def metric_names(rows: list[dict], protocol: str) -> list[str]:
    names: list[str] = []
    for row in ok_rows(rows):
        names += [name for name in row["test"].get(protocol, {}) if name not in names]
    return names


def best_values(rows: list[dict], protocol: str) -> dict[str, float]:
    """The best value of each metric of ``protocol`` over the models that finished; a metric on which every model
    ties (Hit@20 of 20 candidates is always 1) has no best."""
    best = {}
    for metric in metric_names(rows, protocol):
        values = [row["test"][protocol][metric] for row in ok_rows(rows) if metric in row["test"].get(protocol, {})]
        if len(set(values)) > 1:
            best[metric] = min(values) if smaller_is_better(metric) else max(values)
    return best


# ---------------------------------------------------------------------------------------------- csv and json
def flat_row(row: dict) -> dict:
    """One csv row: identity, cost, then ``<protocol>/<metric>`` columns."""
    flat = {
        "model": row["label"],
        "status": row["status"],
        "error": row.get("error", ""),
        "seed": row.get("seed"),
        "eval_split": row.get("eval_split"),
        "params_trainable": row.get("params_trainable"),
        "params_frozen": row.get("params_frozen"),
        "epochs": row.get("epochs"),
        "train_s": row.get("train_seconds"),
    }
    for name, seconds in row.get("eval_seconds", {}).items():
        flat[f"eval_s/{name}"] = seconds
    for name, tokens in row.get("prompt_tokens_per_user", {}).items():
        flat[f"prompt_tokens_per_user/{name}"] = tokens
    if row["status"] == "ok":
        flat[f"valid/{row['valid_metric'].lower()}"] = row["best_valid_score"]
    for name, metrics in row.get("test", {}).items():
        flat.update({f"{name}/{metric}": value for metric, value in metrics.items()})
    flat["config_file"] = row.get("config_file")
    return flat


def write_compare_reports(out: Path, meta: dict, rows: list[dict]) -> None:
    """All four reports, rewritten from ``rows`` (called after every model)."""
    described = {name: desc for row in ok_rows(rows) for name, desc in row["protocols"].items()}
    payload = {**meta, "protocols": described, "rows": rows}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    table = pd.DataFrame([flat_row(row) for row in rows])
    table["seed"] = table["seed"].astype("Int64")  # 2020, not 2020.0, beside a failed row that has no seed
    table.to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(compare_markdown(meta, rows, described), encoding="utf-8")
    plot_compare(out / "results.png", meta, rows)


# ---------------------------------------------------------------------------------------------- markdown
def md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(md_cell(c) for c in cells) + " |" for cells in body]
    return "\n".join(lines)


def fmt_number(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _count(value) -> str:
    return "" if value is None else f"{value:,}"


def metric_table(rows: list[dict], protocol: str) -> str:
    metrics = metric_names(rows, protocol)
    best = best_values(rows, protocol)
    body = []
    for row in ok_rows(rows):
        values = row["test"].get(protocol, {})
        cells = [f"`{row['label']}`"]
        for metric in metrics:
            text = fmt_number(values.get(metric))
            cells.append(f"**{text}**" if metric in best and values.get(metric) == best[metric] else text)
        body.append(cells)
    return md_table(["model"] + metrics, body)


def cost_table(rows: list[dict], names: list[str]) -> str:
    valid_metric = next((row["valid_metric"] for row in ok_rows(rows)), "score")
    ok = ok_rows(rows)
    best_valid = None
    scores = [row["best_valid_score"] for row in ok]
    if len(set(scores)) > 1:
        best_valid = max(scores) if ok[0]["valid_score_bigger"] else min(scores)
    header = ["model", "status", f"best valid {valid_metric}", "trainable params", "frozen params", "epochs",
              "train (s)"] + [f"test {name} (s)" for name in names] + ["prompt tokens / user"]
    body = []
    for row in rows:
        if row["status"] != "ok":
            body.append([f"`{row['label']}`", "failed"] + [""] * (len(header) - 2))
            continue
        valid = fmt_number(row["best_valid_score"])
        tokens = row["prompt_tokens_per_user"].get(FULL)
        body.append(
            [f"`{row['label']}`", "ok", f"**{valid}**" if row["best_valid_score"] == best_valid else valid,
             _count(row["params_trainable"]), _count(row["params_frozen"]), str(row["epochs"]),
             fmt_number(row["train_seconds"], 1)]
            + [fmt_number(row["eval_seconds"].get(name), 1) for name in names]
            + [fmt_number(tokens, 1) if tokens is not None else "-"]
        )
    return md_table(header, body)


def compare_markdown(meta: dict, rows: list[dict], described: dict[str, str]) -> str:
    names = protocols(rows)
    ok = ok_rows(rows)
    lines = [f"# {meta['dataset']}: comparison of {len(rows)} model(s) ({meta['created']})", ""]
    if meta.get("command"):
        lines += ["```bash", meta["command"], "```", ""]
    if ok:
        first = ok[0]
        lines += [
            f"Every model is trained on the same split with the same seed and config (variants change only their "
            f"own keys). The epoch with the best valid `{first['valid_metric']}` is kept, and that checkpoint is "
            "tested under each protocol below. **Bold**: best value in its column (none where all tie).",
            "",
        ]
        lines += [f"- **{name}**: {described[name]}" for name in names]
        splits = sorted({row["eval_split"] for row in ok})
        lines.append(
            f"- evaluation split fingerprint: `{splits[0]}` (identical for every model)"
            if len(splits) == 1
            else f"- **warning**: the models were evaluated on different splits ({', '.join(splits)}); "
            "their numbers are not comparable"
        )
        lines.append("")
    for name in names:
        lines += [f"## Test, {name}", "", metric_table(rows, name), ""]
    lines += ["## Cost", "", "Train time is `trainer.fit`: all epochs with their validation passes. Test time "
              "includes loading the best checkpoint. Parameters are counted as each model is built.", "",
              cost_table(rows, names), ""]
    failed = [row for row in rows if row["status"] != "ok"]
    if failed:
        lines += ["## Failed", ""] + [f"- `{row['label']}`: {md_cell(row['error'])}" for row in failed] + [""]
    lines += ["## Configs", "", "Each run's config, replayable with `--config_files`:", ""]
    lines += [f"- `{row['label']}`: [{row['config_file']}]({row['config_file']})" for row in rows if
              row.get("config_file")]
    return "\n".join(lines) + "\n"


def summary_line(rows: list[dict], out: Path) -> str:
    ok = ok_rows(rows)
    failed = [row["label"] for row in rows if row["status"] != "ok"]
    text = f"{len(ok)}/{len(rows)} models finished; tables in {out / 'results.md'}"
    return text + (f"; failed: {', '.join(failed)}" if failed else "")


# ---------------------------------------------------------------------------------------------- chart
def plot_compare(path: Path, meta: dict, rows: list[dict]) -> None:
    """One panel per metric (bars: models, colours: protocols) and one for the train/test time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = ok_rows(rows)
    names = protocols(rows)
    metrics = metric_names(rows, names[0]) if names else []
    panels = len(metrics) + 1
    ncols = min(4, panels)
    nrows = math.ceil(panels / ncols)
    labels = [row["label"] for row in ok]
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    width = 0.8 / max(len(names), 1)
    positions = range(len(labels))
    for ax, metric in zip(axes, metrics, strict=False):
        for j, name in enumerate(names):
            values = [row["test"].get(name, {}).get(metric, float("nan")) for row in ok]
            ax.bar([x + (j - (len(names) - 1) / 2) * width for x in positions], values, width, label=name)
        ax.set_title(metric + (" (lower is better)" if smaller_is_better(metric) else ""), fontsize=10)
        ax.set_xticks(list(positions), labels, rotation=30, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    time_ax = axes[len(metrics)]
    kinds = [("train", [row["train_seconds"] for row in ok])]
    kinds += [(f"test {name}", [row["eval_seconds"].get(name, float("nan")) for row in ok]) for name in names]
    width = 0.8 / len(kinds)
    for j, (kind, values) in enumerate(kinds):
        time_ax.bar([x + (j - (len(kinds) - 1) / 2) * width for x in positions], values, width, label=kind)
    time_ax.set_title("seconds", fontsize=10)
    time_ax.set_xticks(list(positions), labels, rotation=30, ha="right", fontsize=8)
    time_ax.legend(fontsize=7)
    if metrics:
        axes[0].legend(fontsize=7)
    for ax in axes[panels:]:
        ax.set_visible(False)
    failed = [row["label"] for row in rows if row["status"] != "ok"]
    title = f"{meta['dataset']}: test metrics per model"
    fig.suptitle(title + (f"  (failed: {', '.join(failed)})" if failed else ""), fontsize=12)
    fig.savefig(path, dpi=110)
