"""`nanprobe demo`: the bundled default U-Net on the bundled brain, plain vs nanified."""

from __future__ import annotations

import copy
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from . import __version__
from .evaluate import (
    dice_per_class,
    forward_pass,
    interleaved_rounds,
    labels_from_logits,
    ratio_spread,
    skip_table,
    speed_verdict,
    split_batches,
)
from .inputs import prepare_input
from .jsonio import write_json
from .models.registry import load
from .ops import nanify, skip_stats


def demo_results(*, slices: int = 8, nan_threshold: float = 1.0, tie_eps: float = 1e-7,
                 repeats: int = 3, batch_size: int = 4) -> dict[str, Any]:
    """Numbers of the demo: skip table, label agreement, Dice and measured speed-up (forward
    passes of ``batch_size`` slices)."""
    loaded = load("default")
    centre = 128
    selection = f"{centre - slices // 2}:{centre - slices // 2 + slices}"
    prepared = prepare_input("default", loaded, slices=selection)
    x = prepared.tensor
    plain = loaded.model
    nan_model = nanify(copy.deepcopy(plain), nan_threshold=nan_threshold, tie_eps=tie_eps)
    with torch.no_grad():
        ref_labels = labels_from_logits(plain(x)).numpy()
        skip_stats(nan_model, reset=True)
        nan_labels = labels_from_logits(nan_model(x)).numpy()
        table = skip_table(skip_stats(nan_model))
        # the plain model in channels-last layout (the NaN convolutions' layout) separates the
        # skipping's gain from the layout's
        plain_cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
        batches = split_batches(x, batch_size)
        batches_cl = split_batches(x, batch_size, channels_last=True)
        t_plain, t_cl, t_nan = interleaved_rounds(
            [forward_pass(plain, batches), forward_pass(plain_cl, batches_cl),
             forward_pass(nan_model, batches)], repeats)
    speed, speed_cl = ratio_spread(t_plain, t_nan), ratio_spread(t_cl, t_nan)
    classes = loaded.num_classes or int(ref_labels.max()) + 1
    return {
        "provenance": {"model": loaded.spec, "weights_sha256": loaded.weights_sha256,
                       **prepared.provenance(), "nanprobe_version": __version__,
                       "torch_version": torch.__version__, "threads": torch.get_num_threads(),
                       "created": datetime.now(timezone.utc).isoformat()},
        "settings": {"nan_threshold": nan_threshold, "tie_eps": tie_eps, "tie_limit": 1,
                     "batch_size": batch_size},
        "skip": table,
        "identical_labels": float((ref_labels == nan_labels).mean()),
        "dice_vs_plain": dice_per_class(nan_labels, ref_labels, classes),
        "dice_plain_vs_template": (dice_per_class(ref_labels, prepared.labels, classes)
                                   if prepared.labels is not None else None),
        "seconds_plain": statistics.median(t_plain),
        "seconds_nanified": statistics.median(t_nan),
        "speedup": speed["median"], "speedup_range": speed["range"],
        "verdict": speed_verdict(*speed["range"]),
        "seconds_plain_channels_last": statistics.median(t_cl),
        "speedup_channels_last": speed_cl["median"],
        "speedup_channels_last_range": speed_cl["range"],
    }


def run_demo(*, slices: int, nan_threshold: float, tie_eps: float, repeats: int,
             batch_size: int, out: Path | None, console: Console) -> dict[str, Any]:
    """Compute :func:`demo_results`, print them as tables and optionally write JSON."""
    with console.status("running the default U-Net, plain and nanified ..."):
        res = demo_results(slices=slices, nan_threshold=nan_threshold, tie_eps=tie_eps,
                           repeats=repeats, batch_size=batch_size)
    table = Table(title=f"NaN convolution skips (nan_threshold={nan_threshold}, "
                  f"{len(res['provenance']['selection'])} coronal slices)")
    for col in ("layer", "positions", "skipped", "MACs skipped"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in res["skip"]:
        table.add_row(row["layer"], f"{row['positions']:,}", f"{row['skipped']:.1%}",
                      f"{row['macs_skipped']:.1%}")
    console.print(table)
    dice = ", ".join(f"{d:.4f}" for d in res["dice_vs_plain"] if not np.isnan(d))
    console.print(f"identical labels vs plain model: [bold]{res['identical_labels']:.4%}[/] "
                  f"(Dice per class: {dice})")
    lo, hi = res["speedup_range"]
    words = {"faster": "faster than", "slower": "slower than",
             "no measurable difference": "no measurable difference from"}[res["verdict"]]
    lo_cl, hi_cl = res["speedup_channels_last_range"]
    console.print(f"forward time: plain {res['seconds_plain'] * 1e3:.0f} ms, nanified "
                  f"{res['seconds_nanified'] * 1e3:.0f} ms: [bold]{res['speedup']:.2f}x "
                  f"({lo:.2f}-{hi:.2f}x), {words} the plain model[/] on this machine (batches "
                  f"of {batch_size}, median and range of {repeats} alternating rounds); against "
                  "the plain model in channels-last layout "
                  f"({res['seconds_plain_channels_last'] * 1e3:.0f} ms): "
                  f"{res['speedup_channels_last']:.2f}x ({lo_cl:.2f}-{hi_cl:.2f}x)")
    if out is not None:
        write_json(out, res)
        console.print(f"results written to {out}")
    return res
