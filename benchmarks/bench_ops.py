"""Speed of the NaN ops against their dense PyTorch counterparts, measured side by side.

Prints t(F.conv2d) / t(nan_conv2d) on brain-like inputs (a NaN background around a central
ellipse, NaN in every channel) for several sizes and skip ratios, and
t(F.max_pool2d with indices) / t(nan_max_pool2d). Repetitions are interleaved (dense, NaN,
dense, NaN, ...) and the ratio of medians is reported, so both sides see the same machine load.

    python benchmarks/bench_ops.py            # full table (several minutes on 2 cores)
    python benchmarks/bench_ops.py --quick    # a few rows
    python benchmarks/bench_ops.py --retain-freed-memory   # without page faults
"""

from __future__ import annotations

import argparse
import math
import platform
from functools import partial

import torch
import torch.nn.functional as F

from nanprobe.evaluate import allocator_note, interleaved_times, rerun_retaining_freed_memory
from nanprobe.ops import nan_conv2d, nan_max_pool2d


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


def conv_rows(quick: bool) -> list[tuple]:
    layers = [(71, 3), (64, 5)]
    sizes = [256, 128] if quick else [256, 128, 64]
    batches = [1] if quick else [1, 4]
    skips = [0.0, 0.5, 0.7] if quick else [0.0, 0.3, 0.5, 0.7]
    rows = []
    for n in batches:
        for c, k in layers:
            for size in sizes:
                for skip in skips:
                    rows.append((n, c, k, size, skip))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions per row")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="rerun with glibc keeping freed memory (timings without page faults)")
    args = parser.parse_args()
    if args.retain_freed_memory:
        rerun_retaining_freed_memory()
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; {allocator_note()}")
    print("| N | C→C | k | H=W | skip (measured) | t conv2d ms | t nan_conv2d ms | ratio |")
    print("|---|-----|---|-----|-----------------|-------------|-----------------|-------|")
    for n, c, k, size, skip in conv_rows(args.quick):
        x = blob_input(n, c, size, skip)
        w = torch.randn(c, c, k, k) * (1.0 / math.sqrt(c * k * k))
        b = torch.randn(c)
        pad = k // 2
        dense_in = torch.nan_to_num(x)
        y = nan_conv2d(x, w, b, padding=pad)
        measured = torch.isnan(y[:, 0]).float().mean().item()
        t_dense, t_nan = interleaved_times([
            partial(F.conv2d, dense_in, w, b, padding=pad),
            partial(nan_conv2d, x, w, b, padding=pad),
        ], args.reps)
        print(f"| {n} | {c}→{c} | {k} | {size} | {skip:.1f} ({measured:.2f}) | "
              f"{t_dense * 1e3:.1f} | {t_nan * 1e3:.1f} | {t_dense / t_nan:.2f}x |")

    print()
    print("| N | C | H=W | skip | t max_pool2d ms | t nan_max_pool2d ms | ratio |")
    print("|---|---|-----|------|-----------------|---------------------|-------|")
    for n, c, size, skip in [(1, 71, 256, 0.0), (1, 71, 256, 0.5), (4, 71, 128, 0.5),
                             (1, 64, 64, 0.0)]:
        x = blob_input(n, c, size, skip)
        t_dense, t_nan = interleaved_times([
            partial(F.max_pool2d, x, 2, 2, return_indices=True),
            partial(nan_max_pool2d, x, 2, 2),
        ], args.reps)
        print(f"| {n} | {c} | {size} | {skip:.1f} | {t_dense * 1e3:.2f} | {t_nan * 1e3:.2f} | "
              f"{t_dense / t_nan:.2f}x |")


if __name__ == "__main__":
    main()
