"""What the paper reproductions (``analyses/paper_*.py``) share: output folder, CSV, tables, PNGs.

Figures use matplotlib's object API on the Agg canvas (no pyplot state, no display), as
:mod:`nanprobe.plots` does.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: where the reproductions write by default; not part of the repository (ignored by git)
DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` (dicts with the same keys, in column order) as a CSV file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with right-aligned columns (first column left-aligned), for the console."""
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w)
                  for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2))
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule, *[line(r) for r in cells[1:]]])


def percent(value: float | None, digits: int = 2) -> str:
    """``0.3324`` -> ``"33.24 %"``; None (not measured) -> ``"–"``."""
    return "–" if value is None else f"{100 * value:.{digits}f} %"


def save_png(fig: Figure, path: Path, dpi: int = 100) -> Path:
    """Render ``fig`` with Agg into ``path`` (parent folders are created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path
