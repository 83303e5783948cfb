"""Figures of ``nanprobe report``: output stability, noise reach, the sweep trade-off, skips per
layer and per slice.

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
from matplotlib.ticker import FuncFormatter, MaxNLocator

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

    Points are labelled with their ``nan_threshold`` where a label does not overlap an earlier
    one; the recommended setting is ringed; the tolerance is a dashed line labelled on the
    plot; settings with an undefined loss are left out. ``metric``: the agreement metric's
    display name; ``against``: what the loss is measured against (``"plain"`` model or
    ground-truth ``"labels"``). The loss axis reads in percent of the metric: linear within
    +-tolerance, logarithmic beyond, so that small, large and negative losses (the nanified
    model agreeing better with the labels) all show. The legend sits below the axes.
    """
    fig = Figure(figsize=(6.8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    markers: dict[str, str] = {}
    points: list[tuple[float, float, str]] = []
    for fill in dict.fromkeys(str(s["fill"]) for s in settings):
        rows = sorted((s for s in settings if str(s["fill"]) == fill),
                      key=lambda s: s["skip"]["macs"])
        x = [100 * s["skip"]["macs"] for s in rows]
        y = _values(rows, "loss")
        ax.plot(x, y, linestyle=":", marker=_marker(fill, markers), label=f"fill={fill}")
        points += [(xi, yi, f"{s['nan_threshold']:g}") for xi, yi, s in
                   zip(x, y, rows, strict=True) if not np.isnan(yi)]
    if recommended is not None and settings[recommended]["loss"] is not None:
        best = settings[recommended]
        ax.plot([100 * best["skip"]["macs"]], [best["loss"]], marker="o", markersize=16,
                markerfacecolor="none", markeredgecolor="crimson", markeredgewidth=2,
                linestyle="none", label="recommended")
    ax.axhline(tolerance, color="grey", linestyle="--", linewidth=1)
    ax.set_yscale("symlog", linthresh=max(tolerance, 1e-4))
    ax.yaxis.set_major_formatter(FuncFormatter(_percent))
    losses = [p[1] for p in points]
    if not losses or min(losses) >= 0:
        ax.set_ylim(bottom=0)
    ax.text(1.0, tolerance, f" tolerance {_percent(tolerance)}", transform=ax.get_yaxis_transform(),
            va="bottom", ha="right", fontsize=8, color="dimgrey")
    _label_points(fig, ax, points)
    ax.set_xlabel("conv MACs skipped (%)")
    target = "the plain model" if against == "plain" else "the ground-truth labels"
    ax.set_ylabel(f"loss of {metric} against {target}")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(len(markers) + 1, 4), fontsize=8,
               frameon=False)
    fig.suptitle("Threshold sweep: work skipped vs agreement lost "
                 "(point labels: nan_threshold)", fontsize=10)
    return _save_png(fig, Path(path), DPI)


def _percent(value: float, _pos: object = None) -> str:
    """A fraction of the metric as a percentage label (``-0.1 %``, ``0``, ``10 %``)."""
    if value == 0:
        return "0"
    return f"{100 * value:.3g} %"


def _label_points(fig: Figure, ax: Any, points: Sequence[tuple[float, float, str]],
                  min_px: float = 14.0) -> None:
    """Annotate points with their labels, skipping a label within ``min_px`` pixels of one
    already placed (nearby settings otherwise print over each other)."""
    fig.canvas.draw()  # fixes the axes' limits and transforms
    placed: list[np.ndarray] = []
    for x, y, text in points:
        at = ax.transData.transform((x, y))
        if any(np.hypot(*(at - q)) < min_px for q in placed):
            continue
        placed.append(at)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)


def plot_output_stability(reference: np.ndarray | None, flips: np.ndarray | None,
                          path: str | Path, *, samples: int, class_names: Sequence[str],
                          per_class_flips: Mapping[str, float] | None = None,
                          title: str) -> Path:
    """Where the output changes under the MCA noise.

    Segmentation (``reference`` labels (H, W) and ``flips`` (H, W): in how many of the
    ``samples`` each pixel's label differs from the reference): the reference segmentation
    with flipped pixels in red (their count in the colour bar). Classification: bars of the
    fraction of each class's predictions that flipped (``per_class_flips``).
    """
    fig = Figure(figsize=(5.6, 4.6), layout="constrained")
    ax = fig.add_subplot()
    if reference is not None and flips is not None:
        k = max(len(class_names), 1)
        ax.imshow(reference, cmap="Greys_r", vmin=0, vmax=k - 1, interpolation="nearest")
        shown = np.ma.masked_equal(flips, 0)
        image = ax.imshow(shown, cmap="autumn_r", vmin=1, vmax=max(samples, 1),
                          interpolation="nearest")
        cbar = fig.colorbar(image, ax=ax, shrink=0.8)
        cbar.set_label(f"samples (of {samples}) whose label differs")
        ax.set_axis_off()
        if not flips.any():
            ax.text(0.5, -0.04, f"no label differs in any of the {samples} samples",
                    transform=ax.transAxes, ha="center", va="top", fontsize=9)
    else:
        names = list((per_class_flips or {}).keys())
        values = [100 * v for v in (per_class_flips or {}).values()]
        ax.bar(range(len(names)), values, color="tab:red")
        ax.set_xticks(range(len(names)), names, fontsize=8, parse_math=False)
        ax.set_ylabel("% of the class's predictions that flip")
        ax.set_ylim(0, max([*values, 1.0]) * 1.15)
        ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10, parse_math=False)
    return _save_png(fig, Path(path), DPI)


def plot_noise_reach(layers: Sequence[Mapping[str, Any]], path: str | Path, *,
                     pooling: Mapping[str, float] | None, output_flips: float | None,
                     max_bits: int = 24) -> Path:
    """How far the noise reaches, inside vs output: per layer in network order, the mean
    significant bits (top) and the share of values that are noise, with the share of unstable
    pooling windows at the pooling layers (bottom); the last column is the output labels.

    ``layers``: sigdigits rows (``layer``, ``mean_bits``, ``noise_fraction``) in network
    order; ``pooling``: layer -> unstable window fraction; ``output_flips``: largest fraction
    of output labels that flip in a sample.
    """
    names = [str(r["layer"]) for r in layers]
    x = np.arange(len(names))
    fig = Figure(figsize=(7.6, 4.8), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(1, 1))
    top.plot(x, _values(layers, "mean_bits"), marker=".", color="tab:blue")
    top.set_ylim(0, max_bits + 1)
    top.set_ylabel("mean significant bits")
    top.grid(alpha=0.3)
    bottom.bar(x, 100 * _values(layers, "noise_fraction"), color="tab:orange",
               label="values with <= 1 significant bit")
    if pooling:
        at = [i for i, n in enumerate(names) if n in pooling or n.removesuffix("/output") in
              pooling]
        vals = [100 * pooling.get(names[i], pooling.get(names[i].removesuffix("/output"), 0))
                for i in at]
        bottom.plot(at, vals, linestyle="none", marker="v", color="tab:purple", markersize=7,
                    label="max-pool windows that flip")
    if output_flips is not None:
        end = len(names)
        bottom.bar([end], [100 * output_flips], color="tab:red", label="output labels that flip")
        x = np.append(x, end)
        names = [*names, "output labels"]
    bottom.set_ylabel("% of the layer")
    bottom.set_ylim(0, 100)
    bottom.grid(axis="y", alpha=0.3)
    bottom.set_xticks(x, names, rotation=90, fontsize=6, parse_math=False)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle("How far the noise reaches: inside the network vs its output", fontsize=10)
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
