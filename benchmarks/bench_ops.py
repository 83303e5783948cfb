"""Speed of the NaN ops against their dense PyTorch counterparts, measured side by side.

Prints t(F.conv2d) / t(nan_conv2d) on brain-like inputs (a NaN background around a central
ellipse, NaN in every channel) for several sizes and skip ratios, against the dense
convolution as given (NCHW) and in channels-last layout (oneDNN's faster layout), and with the
input's NaN layout carried (as when the input comes from a NaN op: no scan for NaNs); then
t(F.max_pool2d with indices) / t(nan_max_pool2d). ``--layer`` times one FastSurfer step
``maximum(bn(conv(prelu(m))), m)`` as given, channels-last, channels-last with batch norm
folded, ``torch.compile`` of that, and as one fused NaN convolution. Repetitions are
interleaved (dense, NaN, dense, NaN, ...); each ratio is the median over the rounds' ratios
with its min-max spread. ``--busy`` times every row a second time while one competing
CPU-bound process runs (paused during the quiet rounds), and prints busy/quiet: how much of
its quiet ratio the NaN op keeps under load.

    python benchmarks/bench_ops.py                 # full table (several minutes on 2 cores)
    python benchmarks/bench_ops.py --rows goals    # the issue's goal rows (N=1, 128² and 256²)
    python benchmarks/bench_ops.py --rows goals --busy          # also with a competing process
    python benchmarks/bench_ops.py --layer --busy  # the fused FastSurfer step
    python benchmarks/bench_ops.py --retain-freed-memory        # without page faults
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from _timing import Competitor, add_busy_option, ratios, spread
from torch import nn

from nanprobe.evaluate import allocator_note, interleaved_rounds, rerun_retaining_freed_memory
from nanprobe.ops import NanConv2d, nan_conv2d, nan_max_pool2d
from nanprobe.ops._layout import remember
from nanprobe.ops.fusion import fold_batch_norm


def blob_input(n: int, c: int, size: int, skip: float, seed: int = 0) -> torch.Tensor:
    """(n, c, size, size) float32 noise with NaN outside a central ellipse of area 1 - skip."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g)
    if skip <= 0:
        return x
    area = (1.0 - skip) * size * size
    b = math.sqrt(area / (math.pi * 1.25))  # semi-axes a = 1.25 b
    a = 1.25 * b
    yy, xx = torch.meshgrid(torch.arange(size) - (size - 1) / 2,
                            torch.arange(size) - (size - 1) / 2, indexing="ij")
    outside = (yy / a) ** 2 + (xx / b) ** 2 > 1
    return x.masked_fill(outside, float("nan"))


def carried(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` that carries its NaN layout, as the output of a NaN op does."""
    y = x.clone()
    remember(y, torch.isnan(y).sum(1, dtype=torch.int32), True)
    return y


def conv_rows(which: str, quick: bool) -> list[tuple]:
    layers = [(71, 3), (64, 5)]
    if which == "goals":
        sizes, batches, skips = [256, 128], [1], [0.0, 0.5, 0.7]
    else:
        sizes = [256, 128] if quick else [256, 128, 64]
        batches = [1] if quick else [1, 4]
        skips = [0.0, 0.5, 0.7] if quick else [0.0, 0.3, 0.5, 0.7]
    return [(n, c, k, size, skip) for n in batches for c, k in layers for size in sizes
            for skip in skips]


class Timer:
    """Quiet rounds, and busy rounds while ``competitor`` runs (when given)."""

    def __init__(self, reps: int, competitor: Competitor | None) -> None:
        self.reps, self.competitor = reps, competitor

    def __call__(self, fns) -> tuple[list[list[float]], list[list[float]] | None]:
        quiet = interleaved_rounds(fns, self.reps)
        busy = None if self.competitor is None else self.competitor.run(fns, self.reps)
        return quiet, busy


def keep(quiet: list[float], busy: list[float]) -> str:
    return f"{statistics.median(busy) / statistics.median(quiet):.0%}"


def conv_table(rows: list[tuple], timer: Timer) -> None:
    busy = timer.competitor is not None
    head = ("| N | C→C | k | H=W | skip | dense ms (NCHW / CL) | nan ms (scan / carried) | "
            "NCHW/nan | CL/nan | CL/nan carried |")
    line = "|---|---|---|---|---|---|---|---|---|---|"
    if busy:
        head += " busy: NCHW/nan | busy: CL/nan | busy/quiet (NCHW/nan) |"
        line += "---|---|---|"
    print(head)
    print(line)
    for n, c, k, size, skip in rows:
        x = blob_input(n, c, size, skip)
        xc = carried(x)
        w = torch.randn(c, c, k, k) * (1.0 / math.sqrt(c * k * k))
        b = torch.randn(c)
        pad = k // 2
        dense_in = torch.nan_to_num(x)
        dense_cl = dense_in.contiguous(memory_format=torch.channels_last)
        w_cl = w.contiguous(memory_format=torch.channels_last)
        quiet, loaded = timer([
            partial(F.conv2d, dense_in, w, b, padding=pad),
            partial(F.conv2d, dense_cl, w_cl, b, padding=pad),
            partial(nan_conv2d, x, w, b, padding=pad),
            partial(nan_conv2d, xc, w, b, padding=pad),
        ])
        med = [statistics.median(t) * 1e3 for t in quiet]
        out = (f"| {n} | {c}→{c} | {k} | {size} | {skip:.1f} | {med[0]:.1f} / {med[1]:.1f} | "
               f"{med[2]:.1f} / {med[3]:.1f} | {spread(ratios(quiet[0], quiet[2]))} | "
               f"{spread(ratios(quiet[1], quiet[2]))} | {spread(ratios(quiet[1], quiet[3]))} |")
        if loaded is not None:
            q, b_ = ratios(quiet[0], quiet[2]), ratios(loaded[0], loaded[2])
            out += (f" {spread(b_)} | {spread(ratios(loaded[1], loaded[2]))} | "
                    f"{keep(q, b_)} |")
        print(out, flush=True)


def layer_table(timer: Timer, compile_: bool) -> None:
    """One FastSurfer step m' = maximum(bn(conv(prelu(m))), m), 71→71 k3, against each
    dense baseline and as one fused NaN convolution."""
    busy = timer.competitor is not None
    print()
    print("FastSurfer step maximum(bn(conv(prelu(m))), m), 71→71 3×3, N=1; ms, and "
          "t(baseline) / t(fused NaN conv), median (min–max):")
    head = ("| H=W | skip | as given | CL | CL+BN folded | compiled | fused NaN | "
            "given/NaN | CL/NaN | CL+folded/NaN | compiled/NaN |")
    line = "|---|---|---|---|---|---|---|---|---|---|---|"
    if busy:
        head += " busy: CL+folded/NaN | busy/quiet |"
        line += "---|---|"
    print(head)
    print(line)
    torch.manual_seed(0)
    conv, bn, prelu = nn.Conv2d(71, 71, 3, padding=1), nn.BatchNorm2d(71), nn.PReLU()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    for module in (conv, bn, prelu):
        module.eval()
    w_f, b_f = fold_batch_norm(conv.weight, conv.bias, bn)
    w_cl = w_f.contiguous(memory_format=torch.channels_last)
    nan_conv = NanConv2d(71, 71, 3, padding=1, nan_threshold=0.5).eval()
    nan_conv.load_state_dict(conv.state_dict())

    def given(m):
        with torch.no_grad():
            return torch.maximum(bn(conv(prelu(m))), m)

    def folded(m):
        with torch.no_grad():
            return torch.maximum(F.conv2d(prelu(m), w_cl, b_f, padding=1), m)

    compiled, why = None, ""
    if compile_:
        try:
            compiled = torch.compile(folded)
            with torch.no_grad():
                compiled(torch.randn(1, 71, 32, 32).contiguous(memory_format=torch.channels_last))
        except Exception as err:  # noqa: BLE001 - report whatever torch.compile raises
            compiled, why = None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"

    def fused(m):
        with torch.no_grad():
            return nan_conv(m, m, pre_activation=prelu, batch_norm=bn)

    for size in (256, 128):
        for skip in (0.0, 0.5, 0.7):
            x = blob_input(1, 71, size, skip)
            dense = torch.nan_to_num(x)
            dense_cl = dense.contiguous(memory_format=torch.channels_last)
            xc = carried(x.contiguous(memory_format=torch.channels_last))
            fns = [partial(given, dense), partial(given, dense_cl), partial(folded, dense_cl)]
            if compiled is not None:
                fns.append(partial(compiled, dense_cl))
            fns.append(partial(fused, xc))
            quiet, loaded = timer(fns)
            med = [f"{statistics.median(t) * 1e3:.1f}" for t in quiet]
            if compiled is None:
                med.insert(3, "–")
            r = [spread(ratios(quiet[i], quiet[-1])) for i in range(len(fns) - 1)]
            if compiled is None:
                r.append("–")
            out = f"| {size} | {skip:.1f} | " + " | ".join(med) + " | " + " | ".join(r) + " |"
            if loaded is not None:
                q, b_ = ratios(quiet[2], quiet[-1]), ratios(loaded[2], loaded[-1])
                out += f" {spread(b_)} | {keep(q, b_)} |"
            print(out, flush=True)
    if compile_ and compiled is None:
        print(f"torch.compile failed, no compiled column: {why}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows")
    parser.add_argument("--rows", choices=("all", "goals"), default="all",
                        help="'goals': N=1, 71→71 k3 and 64→64 k5 at 256² and 128²")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions per row")
    add_busy_option(parser, "every row")
    parser.add_argument("--layer", action="store_true",
                        help="only the fused FastSurfer step against the dense baselines")
    parser.add_argument("--no-compile", action="store_true",
                        help="--layer without the torch.compile baseline")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="rerun with glibc keeping freed memory (timings without page faults)")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    if args.retain_freed_memory:
        rerun_retaining_freed_memory()
    torch.manual_seed(0)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; {allocator_note()}; "
          f"load average before: {load}; {args.reps} interleaved rounds per row")
    with Competitor(args.busy) if args.busy else nullcontext() as competitor:
        if competitor is not None:
            print(f"# busy rounds: {competitor.describe()}")
        timer = Timer(args.reps, competitor)
        if args.layer:
            layer_table(timer, not args.no_compile)
            return
        conv_table(conv_rows(args.rows, args.quick), timer)
        if args.rows == "goals":
            return
        print()
        print("| N | C | H=W | skip | t max_pool2d ms | t nan_max_pool2d ms | ratio |")
        print("|---|---|-----|------|-----------------|---------------------|-------|")
        for n, c, size, skip in [(1, 71, 256, 0.0), (1, 71, 256, 0.5), (4, 71, 128, 0.5),
                                 (1, 64, 64, 0.0)]:
            x = blob_input(n, c, size, skip)
            quiet = interleaved_rounds([partial(F.max_pool2d, x, 2, 2, return_indices=True),
                                         partial(nan_max_pool2d, x, 2, 2)], args.reps)
            print(f"| {n} | {c} | {size} | {skip:.1f} | {statistics.median(quiet[0]) * 1e3:.2f} "
                  f"| {statistics.median(quiet[1]) * 1e3:.2f} | "
                  f"{spread(ratios(quiet[0], quiet[1]))} |", flush=True)


if __name__ == "__main__":
    main()
