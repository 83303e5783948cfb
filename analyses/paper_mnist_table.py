"""Reproduce the paper's MNIST threshold table: accuracy and skipped convolutions per threshold.

The paper nanified its MNIST CNN (approach B: NaN entries of a partially-NaN window filled with
draws around the window's maximum) and reported, at ``nan_threshold`` 1 / 0.85 / 0.75 / 0.65 /
0.5, accuracies of 0.989 / 0.989 / 0.981 / 0.927 / 0.198 with 5.14 / 9.28 / 14.63 / 28.38 /
64.83 % of the convolutions skipped (:data:`PAPER`, copied from the paper, not computed).

Here: the bundled MNIST CNN (``analyses/train_mnist.py``, same architecture, our weights) on the
1,000 bundled held-out digits, nanified by :func:`nanprobe.calibrate.calibrate` with nanify's
pooling defaults (``tie_limit=1, tie_eps=1e-7``) and both fills: ``noisy_max`` (approach B) and
``mean`` (approach A). Accuracy is against the digits' labels; skipped = share of all conv output
positions (and of MACs).

Extra rows (clearly labelled variants, not the paper's setting) explain why our nanified CNN
collapses: the tie rule switched off (``tie_limit=None``) or restricted to 4-way ties
(``tie_limit=3``), and the tie rule applied at one pooling layer only (the other layers still
NaN-aware, so NaNs propagate as in the full setting). A diagnosis of the plain model's pooling
inputs gives, per pooling layer, the share of windows the tie rule marks, how many of those are
ties at exactly 0 (ReLU zeros), and how many positions are NaN in every channel.

Writes into ``--out`` (default ``analyses/out/mnist/``): one ``calibration.json`` per calibrate
sweep (``paper/``, ``tie_limit_none/``, ``tie_limit_3/``), ``table.csv`` (every row, paper's and
ours), ``diagnosis.csv`` and ``summary.json``; prints the tables.

Usage, from the repository root::

    python -m analyses.paper_mnist_table
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from analyses._common import DEFAULT_OUT, format_table, percent, write_csv
from nanprobe.calibrate import DEFAULT_POOLING, calibrate
from nanprobe.evaluate import classification_scores, labels_from_logits, skip_table
from nanprobe.inputs import PreparedInput, prepare_input
from nanprobe.jsonio import write_json
from nanprobe.models.registry import LoadedModel, load
from nanprobe.ops import nan_max_pool2d, nanify, skip_stats

#: the paper's table (approach B): nan_threshold -> (accuracy, share of convolutions skipped)
PAPER = {1.0: (0.989, 0.0514), 0.85: (0.989, 0.0928), 0.75: (0.981, 0.1463),
         0.65: (0.927, 0.2838), 0.5: (0.198, 0.6483)}
APPROACH = {"noisy_max": "B", "mean": "A"}
SAMPLES = "0:1000"
BATCH_SIZE = 250
SEED = 0
#: variants: thresholds swept, pooling settings given to calibrate, single tie-rule pools
VARIANT_THRESHOLDS = (1.0, 0.5)
POOLING_VARIANTS = {"tie_limit_none": {"tie_limit": None}, "tie_limit_3": {"tie_limit": 3}}
SINGLE_TIE_POOLS = ("layers.2", "layers.8")


def sweep(out: Path, name: str, thresholds: Sequence[float], fills: Sequence[str],
          pooling: Mapping[str, Any] | None, loaded: LoadedModel,
          prepared: PreparedInput) -> dict[str, Any]:
    """One calibrate sweep on the held-out digits, written to ``out/name/calibration.json``."""
    return calibrate(loaded, prepared, out / name, thresholds=thresholds, fills=fills,
                     pooling=pooling, repeats=1, batch_size=BATCH_SIZE, seed=SEED)


def rows_of(calibration: Mapping[str, Any], variant: str) -> list[dict[str, Any]]:
    """Table rows (ours) of a calibrate sweep."""
    return [{"source": "ours", "variant": variant, "approach": APPROACH[s["fill"]],
             "fill": s["fill"], "nan_threshold": s["nan_threshold"],
             "accuracy": s["vs_labels"]["accuracy"], "skipped": s["skip"]["positions"],
             "macs_skipped": s["skip"]["macs"]} for s in calibration["settings"]]


def single_pool_row(loaded: LoadedModel, prepared: PreparedInput, pool: str, threshold: float,
                    fill: str) -> dict[str, Any]:
    """Accuracy and skips with the tie rule at pooling layer ``pool`` only.

    Every pooling and conv layer is still converted (with ``tie_limit=None`` elsewhere), so NaNs
    born at ``pool`` are carried and skipped downstream exactly as in the full setting.
    """
    generator = torch.Generator().manual_seed(SEED)
    model = nanify(copy.deepcopy(loaded.model), tie_limit=None, nan_threshold=threshold,
                   fill=fill, layers={"layers.*": {}, pool: {"tie_limit": 1}},
                   generator=generator)
    with torch.no_grad():
        pred = labels_from_logits(model(prepared.tensor), nan_label=-1).numpy()
    overall = skip_table(skip_stats(model))[-1]
    return {"source": "ours", "variant": f"tie rule at {pool} only", "approach": APPROACH[fill],
            "fill": fill, "nan_threshold": threshold,
            "accuracy": classification_scores(pred, prepared.labels, 10)["accuracy"],
            "skipped": overall["skipped"], "macs_skipped": overall["macs_skipped"]}


def tie_diagnosis(loaded: LoadedModel, prepared: PreparedInput) -> list[dict[str, Any]]:
    """Per pooling layer of the plain model: what nanify's default tie rule marks as NaN.

    ``nan_windows``: share of pooling windows (per channel) marked NaN; ``at_zero``: share of
    those whose maximum is exactly 0 (all-zero ReLU output); ``all_channels``: share of output
    positions NaN in every channel (a pixel-uniform mark, as in a U-Net's zero background).
    """
    inputs: dict[str, torch.Tensor] = {}
    pools = {n: m for n, m in loaded.model.named_modules() if isinstance(m, nn.MaxPool2d)}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0]))
               for n, m in pools.items()]
    try:
        with torch.no_grad():
            loaded.model(prepared.tensor)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name, module in pools.items():
        x, geometry = inputs[name], (module.kernel_size, module.stride, module.padding)
        values = nan_max_pool2d(x, *geometry, **DEFAULT_POOLING, return_indices=False)
        nan = torch.isnan(values)
        at_zero = (F.max_pool2d(x, *geometry)[nan] == 0).double().mean().item()
        rows.append({"pool": name, "nan_windows": nan.double().mean().item(),
                     "at_zero": at_zero if nan.any() else None,
                     "all_channels": nan.all(1).double().mean().item()})
    return rows


def print_tables(rows: Sequence[Mapping[str, Any]], plain: float,
                 diagnosis: Sequence[Mapping[str, Any]]) -> None:
    """The paper's table beside ours, the variants, and the tie diagnosis."""
    ours = {(r["approach"], r["nan_threshold"]): r for r in rows if r["variant"] == "paper setting"}
    print(f"plain model accuracy: {plain:.3f} (1,000 held-out digits)")
    print(format_table(
        ["t", "paper B acc", "paper B skipped", *[f"ours {a} {col}" for a in ("B", "A")
                                                  for col in ("acc", "skipped", "MACs")]],
        [[f"{t:g}", f"{acc:.3f}", percent(skip),
          *[cell for a in ("B", "A") for cell in (f"{ours[a, t]['accuracy']:.3f}",
                                                  percent(ours[a, t]["skipped"]),
                                                  percent(ours[a, t]["macs_skipped"]))]]
         for t, (acc, skip) in PAPER.items()]))
    print("\nvariants (not the paper's setting):")
    print(format_table(
        ["variant", "approach", "t", "accuracy", "skipped", "MACs skipped"],
        [[r["variant"], r["approach"], f"{r['nan_threshold']:g}", f"{r['accuracy']:.3f}",
          percent(r["skipped"]), percent(r["macs_skipped"])]
         for r in rows if r["variant"] not in ("paper setting", "paper")]))
    print("\nplain model, nanify's tie rule (tie_limit=1, tie_eps=1e-7) per pooling layer:")
    print(format_table(
        ["pool", "windows marked NaN", "of which max == 0", "positions NaN in all channels"],
        [[d["pool"], percent(d["nan_windows"], 1), percent(d["at_zero"], 1),
          percent(d["all_channels"], 1)] for d in diagnosis]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "mnist")
    args = parser.parse_args()

    start = time.perf_counter()
    loaded = load("mnist")
    prepared = prepare_input("mnist", loaded, slices=SAMPLES)
    main_sweep = sweep(args.out, "paper", tuple(PAPER), tuple(APPROACH), None, loaded, prepared)
    rows = [{"source": "paper", "variant": "paper", "approach": "B", "fill": "",
             "nan_threshold": t, "accuracy": acc, "skipped": skip, "macs_skipped": None}
            for t, (acc, skip) in PAPER.items()]
    rows += rows_of(main_sweep, "paper setting")
    for name, pooling in POOLING_VARIANTS.items():
        calibration = sweep(args.out, name, VARIANT_THRESHOLDS, tuple(APPROACH), pooling,
                            loaded, prepared)
        rows += rows_of(calibration, f"tie_limit={pooling['tie_limit']}")
    rows += [single_pool_row(loaded, prepared, pool, t, fill)
             for pool in SINGLE_TIE_POOLS for t in VARIANT_THRESHOLDS for fill in APPROACH]
    diagnosis = tie_diagnosis(loaded, prepared)
    plain = main_sweep["plain"]["vs_labels"]["accuracy"]

    paths = [write_csv(args.out / "table.csv", rows),
             write_csv(args.out / "diagnosis.csv", diagnosis),
             write_json(args.out / "summary.json", {"plain_accuracy": plain, "rows": rows,
                                                    "diagnosis": diagnosis})]
    print_tables(rows, plain, diagnosis)
    print("\n".join(f"wrote {p}" for p in paths))
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
