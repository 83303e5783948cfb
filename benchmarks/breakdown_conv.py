"""Where the time of one NaN convolution goes, step by step (CPU kernels).

Wraps each step of ``nan_conv2d``'s numba path (NaN scan, window decisions, band rectangles,
NaN-free crops, the oneDNN convolution, the output pass, ...) in a timer and prints the
median milliseconds per call of each step over ``--reps`` calls, the whole call, and the
dense channels-last ``F.conv2d`` it competes with, on the brain-like input of bench_ops.py.
``--carried`` gives the input a carried NaN layout (as the output of a NaN op has), and
``--layer`` times the fused FastSurfer step (PReLU before, batch norm folded, maxout).

    python benchmarks/breakdown_conv.py --n 1 --c 71 --k 3 --size 256 --skip 0.7
    python benchmarks/breakdown_conv.py --n 4 --c 71 --k 3 --size 256 --skip 0.7 --carried
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections import defaultdict
from functools import wraps

import torch
import torch.nn.functional as F
from bench_ops import blob_input, carried

from nanprobe.evaluate import allocator_note, rerun_retaining_freed_memory
from nanprobe.ops import _kernels, nan_conv2d
from nanprobe.ops import conv as conv_mod
from nanprobe.ops.fusion import SLOPE, Activation

STEPS = {
    "pixel_stats": "scan: NaN count and sum per pixel",
    "window_layout": "skip/partial per window",
    "partial_means": "mean fill at partial windows (carried layout)",
    "band_rects": "band rectangles",
    "tap_weights": "weights for the mean fill's term",
    "gather": "NaN-free crops (with pre-activation)",
    "conv2d": "oneDNN convolution of the crops",
    "fill_outside": "NaN outside the rectangles",
    "write_bands": "output pass: NaN, fill term, activation, maxout, NaN count",
    "post_ops": "activation / maxout / NaN count pass",
    "noisy_max_partial": "noisy_max recompute",
}


def instrument(times: dict[str, list[float]]) -> None:
    """Wrap the steps so that each call adds its seconds to ``times[step]``."""
    def timed(name, fn):
        @wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name].append(time.perf_counter() - t0)
        return wrapper

    for name in STEPS:
        if name == "conv2d":
            conv_mod._conv_into_scratch = timed(name, conv_mod._conv_into_scratch)
        else:
            setattr(_kernels, name, timed(name, getattr(_kernels, name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--c", type=int, default=71)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--skip", type=float, default=0.7)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--carried", action="store_true", help="input carries its NaN layout")
    parser.add_argument("--channels-last", action="store_true", help="channels-last input")
    parser.add_argument("--layer", action="store_true",
                        help="PReLU before, maxout with the input after (FastSurfer's step)")
    parser.add_argument("--retain-freed-memory", action="store_true")
    args = parser.parse_args()
    if args.retain_freed_memory:
        rerun_retaining_freed_memory()
    x = blob_input(args.n, args.c, args.size, args.skip)
    if args.channels_last or args.layer:
        x = x.contiguous(memory_format=torch.channels_last)
    if args.carried:
        x = carried(x)
    w = torch.randn(args.c, args.c, args.k, args.k) / math.sqrt(args.c * args.k * args.k)
    b = torch.randn(args.c)
    kw = dict(padding=args.k // 2)
    if args.layer:
        kw.update(pre_activation=Activation(SLOPE, torch.tensor([0.25])), maxout=x)
    dense = torch.nan_to_num(x).contiguous(memory_format=torch.channels_last)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        nan_conv2d(x, w, b, **kw)
        F.conv2d(dense, w_cl, b, padding=args.k // 2)
    times: dict[str, list[float]] = defaultdict(list)
    instrument(times)
    whole, dense_t = [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        F.conv2d(dense, w_cl, b, padding=args.k // 2)
        dense_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        nan_conv2d(x, w, b, **kw)
        whole.append(time.perf_counter() - t0)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"# {args.n}x{args.c}->{args.c} k{args.k} {args.size}² skip {args.skip}, "
          f"{'carried layout' if args.carried else 'scanned'}"
          f"{', fused layer step' if args.layer else ''}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {allocator_note()}; load average: {load}")
    print("| step | ms per nan_conv2d (mean) | calls per nan_conv2d |")
    print("|---|---|---|")
    accounted = 0.0
    for name, what in STEPS.items():
        samples = times.get(name, [])
        if not samples:
            continue
        per_conv = len(samples) / args.reps
        ms = statistics.fmean(samples) * 1e3 * per_conv
        accounted += ms
        print(f"| {what} | {ms:.2f} | {per_conv:g} |")
    total = statistics.median(whole) * 1e3
    print(f"| other (Python, allocation, dispatch) | {total - accounted:.2f} | |")
    print(f"| **nan_conv2d in all** | **{total:.2f}** | |")
    print(f"| dense channels-last F.conv2d | {statistics.median(dense_t) * 1e3:.2f} | |")


if __name__ == "__main__":
    main()
