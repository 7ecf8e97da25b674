"""Timing and memory primitives of the efficiency benchmark: paired repeated timings, peak RSS."""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import psutil
import torch

from recbole_speeder.trainer.lazy_adam import LazyAdam, sparse_grad_parameters


def adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of the timed training steps, as the trainer builds it: Adam over the parameters the model
    trains, lazy on the rows of an ID table with sparse gradients (``lazy_id_update``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return LazyAdam(params, lr=1e-4) if sparse_grad_parameters(model) else torch.optim.Adam(params, lr=1e-4)


def training_step(model, optimizer: torch.optim.Optimizer, batch) -> Callable[[], None]:
    """One timed training step on ``batch``: forward, backward, optimizer step, as RecBole's trainer runs it."""

    def step() -> None:
        model.train()
        optimizer.zero_grad()
        loss = model.calculate_loss(batch)
        (sum(loss) if isinstance(loss, tuple) else loss).backward()  # RecBole sums a tuple of loss parts
        optimizer.step()

    return step


def scoring(model, interaction, full: bool = True) -> Callable[[], None]:
    """One timed scoring call: ``full_sort_predict`` (full ranking) or ``predict`` (candidate rows)."""

    def score() -> None:
        with torch.no_grad():  # what RecBole's evaluate does; the item/prefix caches persist across calls
            model.full_sort_predict(interaction) if full else model.predict(interaction)

    return score


def paired_timings(
    tasks: dict[str, Callable[[], None]], repeats: int, warmup: int = 1, settle: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of every task, ``repeats`` rounds, the tasks taking turns within each round.

    Turn-taking puts each model's i-th measurement next to the others' in time, so a load burst from another
    process hits all of them alike; ``paired_ratio`` then compares them round by round. Every other round runs the
    tasks in reverse order, so that none always runs first (after a warm-up, or after the largest model). Warm-up
    calls (caches, allocator, oneDNN kernel selection) are run first and not recorded. With ``settle``, that many
    untimed calls precede each timed one: a call right after another task's pays for that task's memory traffic
    (its freed buffers returned to the OS, caches evicted), which RecBole's loop of the same call never does.
    """
    for task in tasks.values():
        for _ in range(warmup):
            task()
    times: dict[str, list[float]] = {name: [] for name in tasks}
    order = list(tasks.items())
    for round_ in range(repeats):
        for name, task in order if round_ % 2 == 0 else reversed(order):
            for _ in range(settle):
                task()
            _synchronize()
            start = time.perf_counter()
            task()
            _synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def _synchronize() -> None:
    """GPU work is queued asynchronously: a timed call ends when the device has finished it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median(values: list[float]) -> float:
    return float(np.median(values))


def paired_ratio(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of ``slow / fast``: how many times faster ``fast`` was, measured side by side."""
    return float(np.median(np.asarray(slow) / np.asarray(fast)))


def _release_free_memory() -> None:
    """Return freed heap to the OS so the next RSS baseline is not inflated by an earlier phase."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline is just less tight
        pass


@contextmanager
def peak_rss(interval: float = 0.002):
    """Peak resident memory above the starting RSS while the block runs, in MiB (``result["mib"]``).

    RSS counts every allocation of the process, torch's CPU tensors included (tracemalloc would not see them:
    they bypass Python's allocator). A thread samples it every ``interval`` seconds; peaks shorter than that can
    be missed, so the figure is a lower bound of the true peak.
    """
    _release_free_memory()
    process = psutil.Process(os.getpid())
    start = process.memory_info().rss
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    result: dict[str, float] = {}
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], process.memory_info().rss)
        result["mib"] = (peak[0] - start) / 2**20
