"""End to end: the default U-Net vs its nanified twin at the recommended thresholds.

Prints t(plain) / t(nanified) on coronal slices of the bundled brain (goal: >= 1.3x) with the
skip ratio and the label agreement (goal: >= 99.9 % identical labels), measured side by side in
one run (interleaved repetitions, medians). Part of the nanified model's speed is memory layout,
not skipping (its convolutions run channels-last, which oneDNN computes faster), so the same
plain model converted to channels-last is timed too: t(plain, channels-last) / t(nanified) is
what the skipping alone gains or costs. The thresholds come from ``--thresholds
thresholds.json`` (e.g. written by ``nanprobe analyze``), else from a quick
``nanprobe.calibrate.calibrate`` run on the default calibration slices.

Every ratio is measured at each ``--batch`` size: the plain model's time per slice depends on
it, through the allocator. glibc serves a request of 32 MiB or more (the most its adaptive
mmap threshold rises to) with fresh ``mmap`` memory that page-faults in and is returned when
freed; a 16-channel 256² float32 activation reaches 32 MiB at batch 8, so from batch 8 on
every such op of the plain model pays page faults (about 0.5 ms per MB on the VM this project
is measured on), while the nanified model reuses scratch buffers for part of its work.

    python benchmarks/bench_e2e.py [--thresholds FILE] [--slices 0:256:8] [--batch 1,4,8]
                                   [--reps 5]
    python benchmarks/bench_e2e.py --retain-freed-memory   # the same without page faults
    python benchmarks/bench_e2e.py --filters 71 --batch 1,4 --slices 0:256:16 --reps 3

``--filters N`` times the default U-Net's architecture widened from 16 to N filters (N // 2
interpolation filters; FastSurfer's published networks have 71) with seeded random weights, as
no trained network of that width can be bundled. The NaNs come from pooling ties in the brain's
constant background, whatever the weights, so the skips and the timings are representative;
the labels of a random network are not, so no agreement is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch

from nanprobe.calibrate import THRESHOLDS_FILE, calibrate
from nanprobe.evaluate import (
    allocator_note,
    dice_per_class,
    forward_pass,
    interleaved_times,
    labels_from_logits,
    mean_foreground_dice,
    rerun_retaining_freed_memory,
    skip_table,
    split_batches,
)
from nanprobe.inputs import prepare_input
from nanprobe.models.fastsurfer import FastSurferVINN
from nanprobe.models.registry import load
from nanprobe.ops import nanify, skip_stats


def recommended_thresholds(path: str | None) -> dict:
    if path:
        return json.loads(Path(path).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        calibrate("default", "default", tmp, repeats=1)
        file = Path(tmp) / THRESHOLDS_FILE
        if not file.exists():
            raise SystemExit("calibration recommended nothing within tolerance")
        return json.loads(file.read_text())


def batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,4,8"`` -> (1, 4, 8); each a positive integer."""
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4,8, got {text!r}")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thresholds", help="thresholds.json (default: calibrate now)")
    parser.add_argument("--slices", default="0:256:8",
                        help="coronal slices (default: every 8th through the whole volume)")
    parser.add_argument("--batch", type=batch_sizes, default=(1, 4, 8),
                        help="slices per forward pass; comma-separated to time several "
                        "(default: 1,4,8)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--filters", type=int, default=None,
                        help="time the default architecture widened to this many filters "
                        "(FastSurfer: 71), seeded random weights, no label agreement")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="rerun with glibc keeping freed memory (timings without page faults)")
    args = parser.parse_args()
    if args.filters is not None and args.filters < 2:
        parser.error(f"--filters must be at least 2, got {args.filters}")
    if args.retain_freed_memory:
        rerun_retaining_freed_memory()

    config = recommended_thresholds(args.thresholds)
    loaded = load("default")
    x = prepare_input("default", loaded, slices=args.slices).tensor
    if args.filters is not None:
        torch.manual_seed(0)
        plain = FastSurferVINN(loaded.num_classes, num_filters=args.filters,
                               num_filters_interpol=args.filters // 2).eval()
        name = f"default architecture at {args.filters} filters, random weights"
    else:
        plain, name = loaded.model, "default U-Net"
    plain_cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    nan_model = nanify(copy.deepcopy(plain), config=config)

    def labels(model):
        with torch.no_grad():
            return labels_from_logits(torch.cat([model(b) for b in split_batches(x, 8)])).numpy()

    skip_stats(nan_model, reset=True)
    got = labels(nan_model)
    total = skip_table(skip_stats(nan_model))[-1]
    identical, agreement = None, ""  # a random network's labels mean nothing
    if args.filters is None:
        ref = labels(plain)
        identical = float((ref == got).mean())
        dice = mean_foreground_dice(dice_per_class(got, ref, loaded.num_classes))
        agreement = f", {identical:.3%} identical labels, mean Dice vs plain {dice:.4f}"

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {name}, "
          f"{len(x)} coronal slices ({args.slices}), {args.reps} reps; {allocator_note()}")
    print(f"# thresholds: {json.dumps(config['defaults'], sort_keys=True)}")
    print(f"# nanified: {total['skipped']:.1%} of positions and {total['macs_skipped']:.1%} of "
          f"MACs skipped{agreement}")
    print("| batch | plain (as given, NCHW) ms/slice | plain, channels-last | nanified | "
          "t(plain) / t(nanified) | t(plain, channels-last) / t(nanified) |")
    print("|---|---|---|---|---|---|")
    met = []
    for batch in args.batch:
        batches = split_batches(x, batch)
        batches_cl = split_batches(x, batch, channels_last=True)
        t_plain, t_cl, t_nan = (t / len(x) * 1e3 for t in interleaved_times(
            [forward_pass(plain, batches), forward_pass(plain_cl, batches_cl),
             forward_pass(nan_model, batches)], args.reps))
        print(f"| {batch} | {t_plain:.1f} | {t_cl:.1f} | {t_nan:.1f} | "
              f"{t_plain / t_nan:.2f}x | {t_cl / t_nan:.2f}x |", flush=True)
        if identical is not None and t_plain / t_nan >= 1.3 and identical >= 0.999:
            met.append(batch)
    if identical is None:  # the goal is about the trained default U-Net
        return
    where = f"met at batch {', '.join(map(str, met))}" if met else "NOT met"
    print(f"goal (t(plain) / t(nanified) >= 1.3x with >= 99.9 % identical labels): {where}")


if __name__ == "__main__":
    main()
