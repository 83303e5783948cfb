"""Figures of the pooling audit (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_unstable_map(
    unstable: np.ndarray,
    path: str | Path,
    *,
    title: str,
    flagged: np.ndarray | None = None,
    flagged_label: str | None = None,
) -> Path:
    """Map of the fraction of channels with an unstable window per position.

    ``unstable`` (and ``flagged``, drawn in a second panel on the same colour scale): (C, Ho, Wo)
    booleans of one slice. Writes a PNG to ``path`` and returns it.
    """
    panels = [(np.asarray(unstable, dtype=bool), "measured: argmax differs in a sample")]
    if flagged is not None:
        panels.append((np.asarray(flagged, dtype=bool), flagged_label or "flagged"))
    width = 4.4 * len(panels) + 1.6  # inches; the colour bar takes the last 1.3
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.6), squeeze=False)
    fig.subplots_adjust(left=0.6 / width, right=1 - 1.4 / width, top=0.82, bottom=0.11,
                        wspace=0.3)
    image = None
    for ax, (mask, label) in zip(axes[0], panels, strict=True):
        frac = mask.reshape(-1, *mask.shape[-2:]).mean(0)
        image = ax.imshow(frac, vmin=0.0, vmax=1.0, cmap="magma", interpolation="nearest")
        ax.set_title(f"{label}\n{int(mask.sum())} of {mask.size} windows", fontsize=9)
        ax.set_xlabel("window column")
        ax.set_ylabel("window row")
    cbar = fig.colorbar(image, cax=fig.add_axes((1 - 1.1 / width, 0.15, 0.12 / width, 0.63)))
    cbar.set_label("fraction of channels")
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_tie_tables(tables: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """P(unstable | ties) per layer: one panel per layer, one line per eps.

    ``tables``: layer -> ``[{"eps": e, "rows": [{"ties", "windows", "p_unstable"}, ...]}, ...]``
    as in ``audit.json``. Writes a PNG to ``path`` and returns it.
    """
    names = list(tables)
    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for table in tables[name]:
            pts = [(r["ties"], r["p_unstable"]) for r in table["rows"]
                   if r["p_unstable"] is not None]
            if pts:
                x, y = zip(*pts, strict=True)
                ax.plot(x, y, marker="o", label=f"eps={table['eps']:g}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("entries within eps of the window max")
        ax.set_ylabel("P(unstable)")
        ax.set_ylim(-0.02, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle("P(argmax unstable | ties in the reference's pooled input)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.88, 0.95))
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
