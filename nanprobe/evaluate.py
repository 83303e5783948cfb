"""Compare a nanified model with the plain one: labels, Dice, skipped work and wall-clock."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


def labels_from_logits(logits: torch.Tensor, nan_label: int = 0) -> torch.Tensor:
    """Argmax over dim 1 ignoring NaN; positions where every class is NaN get ``nan_label``.

    ``logits``: (N, K, ...) -> (N, ...) int64. A skipped position of a NaN convolution is NaN in
    all classes; for the segmentation models here that is the background (class 0).
    """
    all_nan = torch.isnan(logits).all(1)
    labels = logits.nan_to_num(nan=float("-inf")).argmax(1)
    return labels.masked_fill(all_nan, nan_label)


def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> list[float]:
    """Dice ``2|P∩T| / (|P|+|T|)`` per class ``0..num_classes-1`` (NaN where absent from both)."""
    pred, target = np.asarray(pred), np.asarray(target)
    scores = []
    for c in range(num_classes):
        p, t = pred == c, target == c
        total = int(p.sum()) + int(t.sum())
        scores.append(2.0 * int((p & t).sum()) / total if total else float("nan"))
    return scores


def classification_scores(pred: np.ndarray, target: np.ndarray,
                          num_classes: int) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1 over classes ``0..num_classes-1``.

    ``pred``/``target``: (N,) integer labels; a prediction outside the classes (e.g. -1 for an
    all-NaN output) is wrong. Classes absent from both contribute nothing to the macro means;
    a class never predicted has precision 0 (likewise recall for one never present).
    """
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    precision, recall, f1 = [], [], []
    for c in range(num_classes):
        p, t = pred == c, target == c
        tp, n_p, n_t = int((p & t).sum()), int(p.sum()), int(t.sum())
        if n_p + n_t == 0:
            continue
        precision.append(tp / n_p if n_p else 0.0)
        recall.append(tp / n_t if n_t else 0.0)
        f1.append(2.0 * tp / (n_p + n_t))
    return {"accuracy": float((pred == target).mean()), "precision": float(np.mean(precision)),
            "recall": float(np.mean(recall)), "f1": float(np.mean(f1))}


def mean_foreground_dice(scores: Sequence[float]) -> float:
    """Mean of per-class Dice scores over the classes except background (class 0); NaN when
    no foreground class is present in either segmentation."""
    values = np.asarray(scores[1:], dtype=float)
    return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")


def interleaved_rounds(fns: Sequence[Callable[[], Any]], repeats: int,
                       warmup: bool = True) -> list[list[float]]:
    """Seconds of each function in each of ``repeats`` interleaved rounds: ``[fn][round]``.

    ``warmup`` first calls each function once untimed (skip it when they just ran).
    """
    if warmup:
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return times


def interleaved_times(fns: Sequence[Callable[[], Any]], repeats: int,
                      warmup: bool = True) -> list[float]:
    """Median seconds of each function over ``repeats`` interleaved rounds."""
    return [statistics.median(t) for t in interleaved_rounds(fns, repeats, warmup)]


def ratio_spread(baseline: Sequence[float], candidate: Sequence[float]) -> dict[str, Any]:
    """Speed-up of ``candidate`` over ``baseline`` from paired rounds (same round, same
    machine state): ``{"median", "range": [min, max], "ratios"}`` of baseline / candidate."""
    ratios = [b / c for b, c in zip(baseline, candidate, strict=True)]
    return {"median": statistics.median(ratios), "range": [min(ratios), max(ratios)],
            "ratios": ratios}


def speed_verdict(low: float, high: float) -> str:
    """``faster`` when even the lowest measured speed-up is above 1, ``slower`` when even the
    highest is below 1, else ``no measurable difference``."""
    if low > 1.0:
        return "faster"
    if high < 1.0:
        return "slower"
    return "no measurable difference"


#: spread beyond which a timing is flagged as unreliable (the range leaves median * (1 +- this))
NOISY_SPREAD = 0.15


def machine_busy(load_before: float, load_after: float, spread: Sequence[float],
                 median: float) -> str | None:
    """Why timings taken between two 1-minute load averages with ratio ``spread`` around
    ``median`` are not to be trusted, or None: load above the number of cores with at least one
    core's worth of it not this process's own timing threads (``torch.get_num_threads()``,
    which alone raise the load to about the thread count on a quiet machine), or a spread wider
    than +-15 %."""
    cores, own = os.cpu_count() or 1, torch.get_num_threads()
    load = max(load_before, load_after)
    reasons = []
    if load > cores and load - own >= 1.0:
        reasons.append(f"1-minute load average {load:.1f} on {cores} cores, at most {own} of it "
                       f"this process's timing threads")
    lo, hi = spread
    if median > 0 and (hi > median * (1 + NOISY_SPREAD) or lo < median * (1 - NOISY_SPREAD)):
        reasons.append(f"speed-up spread {lo:.2f}-{hi:.2f}x around {median:.2f}x is wider than "
                       f"+-{NOISY_SPREAD:.0%}")
    return "; ".join(reasons) or None


def split_batches(x: torch.Tensor, batch_size: int, channels_last: bool = False
                  ) -> list[torch.Tensor]:
    """``x`` split along the first axis into chunks of at most ``batch_size`` (views); with
    ``channels_last``, 4-D chunks are copied into channels-last layout."""
    batches = list(torch.split(x, batch_size))
    if channels_last:
        batches = [b.contiguous(memory_format=torch.channels_last) if b.dim() == 4 else b
                   for b in batches]
    return batches


def forward_pass(model: torch.nn.Module, batches: Sequence[torch.Tensor]) -> Callable[[], None]:
    """A callable (for :func:`interleaved_times`) running ``model`` on each batch, no grad."""
    def run() -> None:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    return run


#: glibc tunables that keep freed memory for reuse (read once, at process start)
RETAIN_FREED_MEMORY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def _retaining_freed_memory() -> bool:
    return all(os.environ.get(k) == v for k, v in RETAIN_FREED_MEMORY_ENV.items())


def rerun_retaining_freed_memory() -> None:
    """Re-execute this Python program with glibc keeping freed memory for reuse; no-op when
    that is already set.

    By default glibc serves multi-MB blocks (most activations) with fresh ``mmap`` pages and
    unmaps them on free, so every large op output pays page faults, on small VMs a large share
    of a forward pass. :data:`RETAIN_FREED_MEMORY_ENV` turns that off: the process keeps its
    peak memory, and timings show the computation without the faults. Meant for benchmarks
    (other C libraries ignore the variables).
    """
    if _retaining_freed_memory():
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
              {**os.environ, **RETAIN_FREED_MEMORY_ENV})


def allocator_note() -> str:
    """One line saying whether this process keeps freed memory (for benchmark headers)."""
    if _retaining_freed_memory():
        return "allocator: glibc keeps freed memory, no page faults on reused blocks"
    return "allocator: default, large tensors are fresh memory that page-faults in"


def skip_table(stats: dict[str, dict[str, Any]], key: str = "total") -> list[dict[str, Any]]:
    """Rows per NaN conv layer: positions, skipped fraction, MACs skipped fraction.

    ``stats`` is :func:`nanprobe.ops.skip_stats` output; the last row (``layer="all convs"``)
    sums every conv layer.
    """
    rows = []
    total = {"positions": 0, "skipped": 0, "macs": 0, "macs_skipped": 0}
    for name, entry in stats.items():
        counts = entry[key]
        if entry["kind"] != "conv" or not counts:
            continue
        rows.append({"layer": name, "positions": counts["positions"],
                     "skipped": counts["skipped"] / counts["positions"],
                     "macs_skipped": counts["macs_skipped"] / max(counts["macs"], 1)})
        for k in total:
            total[k] += counts[k]
    if rows:
        rows.append({"layer": "all convs", "positions": total["positions"],
                     "skipped": total["skipped"] / total["positions"],
                     "macs_skipped": total["macs_skipped"] / max(total["macs"], 1)})
    return rows
