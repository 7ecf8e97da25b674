"""Where Speeder's time goes: one training step and one full-ranking batch under ``torch.profiler``, by stage."""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile, record_function

# (part of the model, its method) -> stage name in the table; calls resolve to the instance's wrapper
STAGES = {
    ("", "item_tokens"): "MRC: every item's soft tokens",
    ("", "history_prompt"): "prompt packing + SPAE cues",
    ("runtime", "prefix_key_values"): "instruction prefix K/V",
    ("runtime", "run"): "LLM backbone (forward)",
    ("head", "users"): "user head",
}
OUTER = {
    "loss": "training loss (forward, total)",
    "backward": "backward (all stages)",
    "step": "optimizer step",
    "rank": "full-ranking scores (total)",
}


def _instrument(model) -> Callable[[], None]:
    """Label the model's stages for the profiler; returns the undo."""
    for (part, name), label in STAGES.items():
        owner = getattr(model, part) if part else model
        method = getattr(owner, name)

        def wrapped(*args, _method=method, _label=label, **kwargs):
            with record_function(_label):
                return _method(*args, **kwargs)

        owner.__dict__[name] = wrapped
    return lambda: [(getattr(model, part) if part else model).__dict__.pop(name, None) for part, name in STAGES]


def stage_profile(model, optimizer, train_batch, users) -> str:
    """Markdown: wall time per stage of one training step and one full-ranking batch, and the top operators."""
    import torch

    undo = _instrument(model)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.train()
            optimizer.zero_grad()
            with record_function(OUTER["loss"]):
                loss = model.calculate_loss(train_batch)
            with record_function(OUTER["backward"]):
                loss.backward()
            with record_function(OUTER["step"]):
                optimizer.step()
            model.eval()
            with torch.no_grad(), record_function(OUTER["rank"]):
                model.full_sort_predict(users)
    finally:
        undo()
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    lines = ["| stage | calls | CPU time (s) |", "|---|---:|---:|"]
    for label in [OUTER["loss"], *STAGES.values(), OUTER["backward"], OUTER["step"], OUTER["rank"]]:
        if label in by_name:
            event = by_name[label]
            lines.append(f"| {label} | {event.count} | {event.cpu_time_total / 1e6:.3f} |")
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)[:10]
    lines += ["", "| operator (top 10 by self CPU time) | calls | self CPU (s) |", "|---|---:|---:|"]
    lines += [f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e6:.3f} |" for e in ops]
    return "\n".join(lines)
