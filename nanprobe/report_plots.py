"""Figures of ``nanprobe report``: the sweep trade-off, skips per layer and per slice.

Matplotlib's object API on the Agg canvas (no pyplot state, no display), written as palette
PNGs like :mod:`nanprobe.plots`. Inputs are the rows of ``calibration.json`` (see
:mod:`nanprobe.report`); user strings (layer names) are drawn without mathtext.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .plots import _save_png

FILL_MARKERS = {"mean": "o", "noisy_max": "s", "zero": "^"}
OTHER_MARKERS = ("D", "v", "P", "X")
DPI = 100


def _marker(fill: str, seen: dict[str, str]) -> str:
    """A stable marker per fill: known fills first, others in order of appearance."""
    if fill not in seen:
        seen[fill] = FILL_MARKERS.get(fill, OTHER_MARKERS[len(seen) % len(OTHER_MARKERS)])
    return seen[fill]


def plot_sweep(settings: Sequence[Mapping[str, Any]], path: str | Path, *,
               recommended: int | None, tolerance: float, metric: str,
               against: str = "plain") -> Path:
    """Skipped conv MACs vs agreement loss, one point per setting (marker per fill).

    Each point is labelled with its ``nan_threshold``; the recommended setting is ringed and
    the tolerance drawn as a dashed line; settings with an undefined loss are left out.
    ``metric``: the agreement metric's display name; ``against``: what the loss is measured
    against (``"plain"`` model or ground-truth ``"labels"``). The loss axis is linear within
    +-tolerance and logarithmic beyond, so small, large and negative losses (the nanified model
    agreeing better with the labels) all show.
    """
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    markers: dict[str, str] = {}
    for fill in dict.fromkeys(str(s["fill"]) for s in settings):
        rows = [s for s in settings if str(s["fill"]) == fill]
        x = [100 * s["skip"]["macs"] for s in rows]
        y = _values(rows, "loss")
        ax.plot(x, y, linestyle=":", marker=_marker(fill, markers), label=f"fill={fill}")
        for xi, yi, s in zip(x, y, rows, strict=True):
            if np.isnan(yi):
                continue
            ax.annotate(f"{s['nan_threshold']:g}", (xi, yi), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    if recommended is not None:
        best = settings[recommended]
        ax.plot([100 * best["skip"]["macs"]], [best["loss"]], marker="o", markersize=16,
                markerfacecolor="none", markeredgecolor="crimson", markeredgewidth=2,
                linestyle="none", label="recommended")
    ax.axhline(tolerance, color="grey", linestyle="--", label=f"tolerance {tolerance:g}")
    ax.set_xlabel("conv MACs skipped (%)")
    target = "the plain model" if against == "plain" else "the labels"
    ax.set_ylabel(f"loss of {metric} vs {target}")
    ax.set_yscale("symlog", linthresh=max(tolerance, 1e-4))
    losses = [v for v in _values(settings, "loss") if not np.isnan(v)]
    if not losses or min(losses) >= 0:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Sweep: work skipped vs agreement lost (labels: nan_threshold)", fontsize=10)
    return _save_png(fig, Path(path), DPI)


def plot_layer_skip(layers: Sequence[Mapping[str, Any]], path: str | Path, *,
                    title: str) -> Path:
    """Horizontal bars per conv layer (model order, top to bottom): positions and MACs skipped.

    ``layers``: the rows of one setting without the ``"all convs"`` total.
    """
    names = [str(r["layer"]) for r in layers]
    y = np.arange(len(names))
    fig = Figure(figsize=(6.4, 1.4 + 0.24 * max(len(names), 1)), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(y - 0.2, [100 * r["skipped"] for r in layers], height=0.4,
            label="positions skipped")
    ax.barh(y + 0.2, [100 * r["macs_skipped"] for r in layers], height=0.4,
            label="MACs skipped")
    ax.set_yticks(y, names, fontsize=7, parse_math=False)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of the layer's work")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10, parse_math=False)
    return _save_png(fig, Path(path), DPI)


def plot_slices(per_item: Sequence[Mapping[str, Any]], path: str | Path, *,
                title: str, quality_label: str) -> Path:
    """Two panels over the input slices/samples: skips, then quality.

    Quality is Dice (or correctness) vs the labels, plain and nanified, when the items have
    labels (:func:`has_labels`); otherwise the agreement with the plain model
    (``quality_label``). Missing scores (None: e.g. no foreground) leave gaps.
    """
    x = [int(r["index"]) for r in per_item]
    style = {"marker": "o" if len(x) <= 60 else None, "markersize": 3}
    fig = Figure(figsize=(6.8, 5.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(x, 100 * _values(per_item, "skipped"), label="positions skipped", **style)
    top.plot(x, 100 * _values(per_item, "macs_skipped"), label="MACs skipped", **style)
    top.set_ylabel("% skipped")
    top.set_ylim(0, 100)
    if has_labels(per_item):
        bottom.plot(x, _values(per_item, "vs_labels_plain"), label="plain vs labels", **style)
        bottom.plot(x, _values(per_item, "vs_labels_nanified"), label="nanified vs labels",
                    linestyle="--", **style)
        bottom.set_ylabel(f"{quality_label} vs labels")
    else:
        bottom.plot(x, _values(per_item, "agreement"), label="nanified vs plain", **style)
        bottom.set_ylabel(quality_label)
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_xlabel("input index (slice or sample)")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    top.set_title(title, fontsize=10, parse_math=False)
    return _save_png(fig, Path(path), DPI)


def has_labels(per_item: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the items were scored against labels (some item has a score vs the labels)."""
    return any(r.get("vs_labels_plain") is not None for r in per_item)


def _values(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """``row[key]`` of every row as float64, None as NaN (a gap in a line)."""
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=np.float64)
