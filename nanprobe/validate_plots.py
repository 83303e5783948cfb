"""Figures of ``nanprobe validate`` (matplotlib object API on the Agg canvas, no display).

- :func:`plot_dice_per_slice`: Dice per slice of the plain and the nanified model, and their
  difference, per view (the paper's Figure 3);
- :func:`plot_dice_difference`: the per-slice Dice differences of every view and thresholds file
  pooled over subjects, with mean, paired-test p-values and significance marks (Figure 4);
- :func:`plot_differences`: three orthogonal planes of the brain with the voxels whose label
  differs between the plain and the nanified model (Figure 5).

Every PNG is written atomically (:func:`nanprobe.jsonio.atomic_path`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from .jsonio import atomic_path

DIFF_COLOUR = "red"
_LINE_COLOURS = ("tab:orange", "tab:blue", "tab:green", "tab:purple", "tab:brown")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path


def plot_dice_per_slice(record: Mapping[str, Any], path: str | Path) -> Path:
    """Per view of a subject record: Dice per slice (top) and nanified minus plain (bottom).

    Against the labels when the subject has them; else the nanified model against the plain
    one (the plain model's own Dice is 1 on every slice).
    """
    views = record["views"]
    fig = Figure(figsize=(4.2 * len(views) + 0.6, 6.0))
    axes = fig.subplots(2, len(views), squeeze=False, sharex="col")
    labelled = record.get("labels") is not None
    for col, (view, v) in enumerate(views.items()):
        x = np.asarray(v["slice_indices"])
        top, bottom = axes[0, col], axes[1, col]
        if labelled:
            plain = np.asarray(v["plain"]["dice_per_slice_vs_labels"], float)
            top.plot(x, plain, color="black", lw=1.2, label="plain")
        for k, (name, n) in enumerate(v["nanified"].items()):
            colour = _LINE_COLOURS[k % len(_LINE_COLOURS)]
            key = "dice_per_slice_vs_labels" if labelled else "dice_per_slice_vs_plain"
            nan = np.asarray(n[key], float)
            top.plot(x, nan, color=colour, lw=0.9, ls="--", label=f"nanified {name}")
            diff = nan - (plain if labelled else 1.0)
            bottom.plot(x, diff, color=colour, lw=0.9, label=name)
        bottom.axhline(0.0, color="grey", lw=0.6)
        top.set_title(view)
        top.set_ylabel(f"Dice per slice vs {'labels' if labelled else 'plain'}")
        bottom.set_ylabel("nanified - plain")
        bottom.set_xlabel(f"{view} slice")
        top.legend(fontsize=7, loc="lower center")
        bottom.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle(f"{record['name']}: Dice per slice, plain vs nanified", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_dice_difference(result: Mapping[str, Any], path: str | Path) -> Path:
    """Box plots of the per-slice Dice differences per view and thresholds file (all subjects),
    the mean as a diamond, and under each box the paired tests' p-values with their marks.

    The y axis is symmetric-log (linear within the median size of the non-zero differences)
    so that the many small differences and the few large ones both show.
    """
    from .validate import pooled_pairs, significance

    views = result["views"]
    names = list(next(iter(views.values())))
    fig = Figure(figsize=(max(4.5, 1.5 * len(names) * len(views) + 1.6), 5.2))
    ax = fig.subplots()
    data, positions, labels = [], [], []
    for i, view in enumerate(views):
        for j, name in enumerate(names):
            plain, nan = pooled_pairs(result["subjects"], view, name, result["against"])
            keep = np.isfinite(plain) & np.isfinite(nan)
            data.append(nan[keep] - plain[keep])
            positions.append(i * (len(names) + 1) + j)
            e = views[view][name]
            labels.append(f"{view}\n{name}\nt: p={_p(e['p_ttest'])} {significance(e['p_ttest'])}"
                          f"\nW: p={_p(e['p_wilcoxon'])} {significance(e['p_wilcoxon'])}"
                          f"\nn={e['n_pairs']}")
    ax.boxplot(data, positions=positions, widths=0.6, showfliers=True,
               flierprops={"markersize": 2})
    means = [np.mean(d) if len(d) else np.nan for d in data]
    ax.scatter(positions, means, marker="D", color="tab:red", zorder=3, label="mean")
    ax.axhline(0.0, color="grey", lw=0.6)
    nonzero = np.abs(np.concatenate([d[d != 0] for d in data] or [np.zeros(0)]))
    linthresh = float(np.median(nonzero)) if nonzero.size else 1e-6
    ax.set_yscale("symlog", linthresh=linthresh)
    top = int(np.ceil(np.log10(max(float(nonzero.max()), linthresh)))) if nonzero.size else -5
    decades = [10.0**k for k in range(int(np.floor(np.log10(linthresh))) + 1, top + 1)]
    ax.set_yticks([-d for d in reversed(decades)] + [0.0] + decades)
    ax.set_xticks(positions, labels, fontsize=7)
    ax.set_ylabel(f"Dice difference per slice\n(nanified - plain, vs {result['against']})")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Dice difference per slice, per view and thresholds file (symlog axis)\n"
                 "paired t-test (t) and Wilcoxon (W): * p<0.05, ** p<0.01, *** p<0.001",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.2g}"


def _planes(vol: np.ndarray, i: int, j: int, k: int) -> list[tuple[str, np.ndarray]]:
    """Display slices of a conformed LIA volume: coronal (superior up, patient left on the
    right), axial (anterior up) and sagittal (superior up, anterior right)."""
    return [("coronal", vol[:, :, k].T), ("axial", vol[:, j, :].T[::-1]),
            ("sagittal", vol[i, :, :])]


def plot_differences(volume: np.ndarray, plain: np.ndarray, nanified: np.ndarray,
                     path: str | Path, *, title: str) -> Path:
    """Three planes of the conformed ``volume`` (256³ uint8) with the voxels whose label
    differs between ``plain`` and ``nanified`` (label volumes on the same grid, -1 = not
    predicted) in red; each plane is the slice holding the most such voxels (the brain's
    centre when none differ)."""
    volume, plain, nanified = (np.asarray(a) for a in (volume, plain, nanified))
    differ = (plain != nanified) & (plain >= 0) & (nanified >= 0)
    if differ.any():
        centre = [int(np.argmax(differ.sum(axis=tuple(a for a in range(3) if a != ax))))
                  for ax in range(3)]
    else:  # the centre of the brain's bounding box
        centre = []
        for ax in range(3):
            filled = np.flatnonzero((volume > 0).any(axis=tuple(a for a in range(3) if a != ax)))
            centre.append(int(filled.mean()) if filled.size else volume.shape[ax] // 2)
    fig = Figure(figsize=(12.0, 4.6))
    axes = fig.subplots(1, 3)
    red = ListedColormap([DIFF_COLOUR])
    brain = volume > 0
    for ax, (name, img), (_, mask), (_, inside) in zip(
            axes, _planes(volume, *centre), _planes(differ, *centre), _planes(brain, *centre),
            strict=True):
        rows, cols = np.nonzero(inside) if inside.any() else np.nonzero(np.ones_like(inside))
        r0, r1 = max(rows.min() - 5, 0), min(rows.max() + 6, img.shape[0])
        c0, c1 = max(cols.min() - 5, 0), min(cols.max() + 6, img.shape[1])
        ax.imshow(img[r0:r1, c0:c1], cmap="gray", interpolation="nearest")
        ax.imshow(np.ma.masked_where(~mask[r0:r1, c0:c1], mask[r0:r1, c0:c1]), cmap=red,
                  interpolation="nearest", vmin=0, vmax=1)
        axis = {"coronal": 2, "axial": 1, "sagittal": 0}[name]
        ax.set_title(f"{name} slice {centre[axis]}: {int(mask.sum())} voxels differ", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title} ({int(differ.sum())} voxels in all)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
