"""Reproduce the paper's FastSurfer skip ratios and Dice per slice on the bundled default U-Net.

The paper nanified FastSurfer (released weights, real subjects) and reported the share of
convolutions skipped at ``nan_threshold`` 1 and 0.5: 33.24 % / 44.19 % of all convolutions,
50.59 % / 69.30 % of the convolutions in the affected layers (layers that skip anything), per
layer and per slice, and the Dice loss per slice of the NaN model against the default one.

Here: the bundled default U-Net (FastSurferVINN blocks, 16 filters, see
``analyses/train_default_unet.py``) on coronal slices across the bundled MNI brain (default
``41:220:8``: every 8th brain slice, 23 slices, all odd, i.e. held out from training), nanified by
:func:`nanprobe.calibrate.calibrate` with fill ``mean`` (approach A) and nanify's pooling defaults
(``tie_limit=1, tie_eps=1e-7``) or ``--pooling audit.json``. calibrate already records skips per
layer and per slice and Dice per slice against the template labels for the plain and nanified
model; this script turns its record into tables and figures.

Writes into ``--out`` (default ``analyses/out/skip_dice/``): ``calibration.json`` (calibrate's
full record), ``skip_per_layer.csv``, ``per_slice.csv`` (skips, Dice vs labels, loss),
``summary.json`` (ours beside the paper's), ``skip_per_layer.png``, ``skip_per_slice.png`` and
``dice_per_slice.png``; prints the tables.

Usage, from the repository root::

    python -m analyses.paper_skip_dice
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from analyses._common import DEFAULT_OUT, format_table, percent, save_png, write_csv
from nanprobe.calibrate import calibrate
from nanprobe.jsonio import write_json

#: the paper's FastSurfer numbers (share of convolutions skipped), per nan_threshold
PAPER = {1.0: {"overall": 0.3324, "affected": 0.5059},
         0.5: {"overall": 0.4419, "affected": 0.6930}}
DEFAULT_SLICES = "41:220:8"
FILL = "mean"
#: the default U-Net's blocks in forward order (calibrate lists layers in registration order)
BLOCK_ORDER = ("inp_block", "encode1", "encode2", "encode3", "encode4", "bottleneck", "decode4",
               "decode3", "decode2", "decode1", "outp_block", "classifier")


def affected_share(layers: Sequence[Mapping[str, Any]]) -> tuple[float, int]:
    """Skipped share of output positions over the layers that skip anything, and their count.

    ``layers``: calibrate's per-layer skip table (its last row, ``all convs``, is left out).
    """
    hit = [r for r in layers[:-1] if r["skipped"] > 0]
    positions = sum(r["positions"] for r in hit)
    skipped = sum(r["positions"] * r["skipped"] for r in hit)
    return (skipped / positions if positions else 0.0), len(hit)


def by_threshold(calibration: Mapping[str, Any]) -> dict[float, Mapping[str, Any]]:
    """calibrate's settings keyed by ``nan_threshold`` (one fill is swept here)."""
    return {s["nan_threshold"]: s for s in calibration["settings"]}


def layer_rows(settings: Mapping[float, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per conv layer, in forward order (``all convs`` last): output positions and skipped share
    of positions and MACs per threshold."""
    tables = {t: s["layers"] for t, s in settings.items()}
    first = next(iter(tables.values()))
    rows = []
    for i, row in enumerate(first):
        out: dict[str, Any] = {"layer": row["layer"], "positions": row["positions"]}
        for t, table in tables.items():
            out[f"skipped_t{t:g}"] = table[i]["skipped"]
            out[f"macs_skipped_t{t:g}"] = table[i]["macs_skipped"]
        rows.append(out)
    rank = {block: i for i, block in enumerate(BLOCK_ORDER)}
    return sorted(rows[:-1], key=lambda r: rank.get(r["layer"].split(".")[0], len(rank))) + [
        rows[-1]]


def slice_rows(settings: Mapping[float, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per slice: skipped share, mean foreground Dice vs the template labels, and the loss.

    ``loss_t`` = Dice(plain) - Dice(nanified), both against the labels; ``dice_vs_plain_t`` is the
    nanified model's Dice against the plain model's labels. Dice is None on a slice where neither
    labels nor prediction hold foreground.
    """
    items = {t: s["per_item"] for t, s in settings.items()}
    first = next(iter(items.values()))
    rows = []
    for i, item in enumerate(first):
        out: dict[str, Any] = {"slice": item["index"], "dice_plain": item["vs_labels_plain"]}
        for t, per_item in items.items():
            it = per_item[i]
            out[f"skipped_t{t:g}"] = it["skipped"]
            out[f"macs_skipped_t{t:g}"] = it["macs_skipped"]
            out[f"dice_t{t:g}"] = it["vs_labels_nanified"]
            out[f"loss_t{t:g}"] = (None if None in (it["vs_labels_plain"], it["vs_labels_nanified"])
                                   else it["vs_labels_plain"] - it["vs_labels_nanified"])
            out[f"dice_vs_plain_t{t:g}"] = it["agreement"]
        rows.append(out)
    return rows


def plot_layers(rows: Sequence[Mapping[str, Any]], thresholds: Sequence[float],
                path: Path) -> Path:
    """Grouped bars: skipped share of output positions per conv layer, one bar per threshold."""
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    width = 0.8 / len(thresholds)
    for k, t in enumerate(thresholds):
        ax.bar(x + (k - (len(thresholds) - 1) / 2) * width,
               [100 * r[f"skipped_t{t:g}"] for r in rows], width, label=f"nan_threshold {t:g}")
    ax.set_xticks(x, [r["layer"] for r in rows], rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel("skipped output positions (%)")
    ax.set_title(f"Default U-Net, bundled brain: skipped convolutions per layer (fill: {FILL})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def plot_slices(rows: Sequence[Mapping[str, Any]], thresholds: Sequence[float],
                path: Path) -> Path:
    """Lines: skipped share of all conv output positions (and MACs) per coronal slice."""
    fig = Figure(figsize=(7.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    x = [r["slice"] for r in rows]
    for t in thresholds:
        line, = ax.plot(x, [100 * r[f"skipped_t{t:g}"] for r in rows], marker=".",
                        label=f"positions, t={t:g}")
        ax.plot(x, [100 * r[f"macs_skipped_t{t:g}"] for r in rows], ls="--",
                color=line.get_color(), label=f"MACs, t={t:g}")
    ax.set_xlabel("coronal slice")
    ax.set_ylabel("skipped, all convolutions (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Skipped convolutions per slice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return save_png(fig, path)


def plot_dice(rows: Sequence[Mapping[str, Any]], thresholds: Sequence[float],
              path: Path) -> Path:
    """Two panels per slice: Dice vs the template labels, and the loss (plain - nanified)."""
    fig = Figure(figsize=(7.5, 5.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = [r["slice"] for r in rows]
    top.plot(x, [r["dice_plain"] for r in rows], color="black", marker=".", label="default")
    for t in thresholds:
        top.plot(x, [r[f"dice_t{t:g}"] for r in rows], marker=".", label=f"NaN, t={t:g}")
        bottom.plot(x, [r[f"loss_t{t:g}"] for r in rows], marker=".", label=f"t={t:g}")
    top.set_ylabel("mean foreground Dice\nvs template labels")
    top.set_title(f"Dice per slice: default vs nanified U-Net (fill: {FILL})")
    top.legend(fontsize=8)
    bottom.axhline(0, color="grey", lw=0.8)
    bottom.set_ylabel("Dice loss\n(default - NaN)")
    bottom.set_xlabel("coronal slice")
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return save_png(fig, path)


def summarise(settings: Mapping[float, Mapping[str, Any]], slices: Sequence[Mapping[str, Any]],
              calibration: Mapping[str, Any]) -> dict[str, Any]:
    """Per threshold: ours (skips overall and in affected layers, Dice, loss) and the paper's.

    The speed-up calibrate measures is left to ``calibration.json``: the paper table has none.
    """
    out: dict[str, Any] = {"plain_vs_labels": calibration["plain"]["vs_labels"]}
    for t, s in settings.items():
        affected, n_affected = affected_share(s["layers"])
        losses = [r[f"loss_t{t:g}"] for r in slices if r[f"loss_t{t:g}"] is not None]
        out[f"t{t:g}"] = {
            "ours": {"overall": s["skip"]["positions"], "overall_macs": s["skip"]["macs"],
                     "affected": affected, "affected_layers": n_affected,
                     "layers": len(s["layers"]) - 1, "mean_dice": s["vs_labels"]["mean_dice"],
                     "loss": s["loss"], "max_slice_loss": max(losses),
                     "identical_labels_vs_plain": s["agreement"]["identical"]},
            "paper": PAPER.get(t),
        }
    return out


def print_summary(summary: Mapping[str, Any], thresholds: Sequence[float]) -> None:
    """The table of ours beside the paper's."""
    rows = []
    for t in thresholds:
        ours, paper = summary[f"t{t:g}"]["ours"], summary[f"t{t:g}"]["paper"] or {}
        rows.append([f"{t:g}", percent(paper.get("overall")), percent(ours["overall"]),
                     percent(ours["overall_macs"]), percent(paper.get("affected")),
                     percent(ours["affected"]), f"{ours['affected_layers']}/{ours['layers']}",
                     f"{ours['mean_dice']:.4f}", f"{ours['loss']:+.4f}",
                     f"{ours['max_slice_loss']:+.4f}"])
    print(format_table(["t", "paper: all convs", "ours: all convs", "ours: MACs",
                        "paper: affected", "ours: affected", "affected layers", "Dice",
                        "loss", "worst slice loss"], rows))
    print(f"default model's mean foreground Dice vs labels: "
          f"{summary['plain_vs_labels']['mean_dice']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "skip_dice")
    parser.add_argument("--slices", default=DEFAULT_SLICES,
                        help="coronal slices START:STOP[:STEP] (default %(default)s)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=sorted(PAPER, reverse=True))
    parser.add_argument("--pooling", type=Path,
                        help="audit.json with calibrated pooling settings (default: nanify's)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed rounds for the speed-up (default %(default)s)")
    args = parser.parse_args()

    start = time.perf_counter()
    calibration = calibrate("default", "default", args.out, slices=args.slices,
                            thresholds=args.thresholds, fills=(FILL,), pooling=args.pooling,
                            repeats=args.repeats)
    settings = by_threshold(calibration)
    layers = layer_rows(settings)
    slices = slice_rows(settings)
    summary = summarise(settings, slices, calibration)
    paths = [write_csv(args.out / "skip_per_layer.csv", layers),
             write_csv(args.out / "per_slice.csv", slices),
             write_json(args.out / "summary.json", summary),
             plot_layers(layers[:-1], args.thresholds, args.out / "skip_per_layer.png"),
             plot_slices(slices, args.thresholds, args.out / "skip_per_slice.png"),
             plot_dice(slices, args.thresholds, args.out / "dice_per_slice.png")]

    print(f"{len(slices)} coronal slices {args.slices}, fill {FILL}, pooling "
          f"{calibration['pooling']}")
    print(format_table(["layer", *[f"skipped t={t:g}" for t in args.thresholds]],
                       [[r["layer"], *[percent(r[f"skipped_t{t:g}"], 1) for t in args.thresholds]]
                        for r in layers]))
    print()
    print_summary(summary, args.thresholds)
    print("\n".join(f"wrote {p}" for p in [args.out / "calibration.json", *paths]))
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
