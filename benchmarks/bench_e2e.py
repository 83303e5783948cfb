"""End to end: the default U-Net vs its nanified twin at the recommended thresholds.

Prints t(plain) / t(nanified) on coronal slices of the bundled brain (goal: >= 1.3x) with the
skip ratio and the label agreement (goal: >= 99.9 % identical labels), measured side by side in
one run (interleaved repetitions, medians). Part of the nanified model's speed is memory layout,
not skipping (its convolutions run channels-last, which oneDNN computes faster), so the same
plain model converted to channels-last is timed too: t(plain, channels-last) / t(nanified) is
what the skipping alone gains or costs. The thresholds come from ``--thresholds
thresholds.json`` (e.g. written by ``nanprobe analyze``), else from a quick
``nanprobe.calibrate.calibrate`` run on the default calibration slices.

    python benchmarks/bench_e2e.py [--thresholds FILE] [--slices 0:256:8] [--reps 5]
    python benchmarks/bench_e2e.py --retain-freed-memory   # the same without page faults
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
    interleaved_times,
    labels_from_logits,
    mean_foreground_dice,
    rerun_retaining_freed_memory,
    skip_table,
)
from nanprobe.inputs import prepare_input
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thresholds", help="thresholds.json (default: calibrate now)")
    parser.add_argument("--slices", default="0:256:8",
                        help="coronal slices (default: every 8th through the whole volume)")
    parser.add_argument("--batch", type=int, default=8, help="slices per forward pass")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="rerun with glibc keeping freed memory (timings without page faults)")
    args = parser.parse_args()
    if args.retain_freed_memory:
        rerun_retaining_freed_memory()

    config = recommended_thresholds(args.thresholds)
    loaded = load("default")
    x = prepare_input("default", loaded, slices=args.slices).tensor
    plain = loaded.model
    plain_cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    nan_model = nanify(copy.deepcopy(plain), config=config)

    def run(model, channels_last=False):
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def fn():
            with torch.no_grad():
                return torch.cat([model(x[i:i + args.batch].contiguous(memory_format=fmt))
                                  for i in range(0, len(x), args.batch)])
        return fn

    ref = labels_from_logits(run(plain)()).numpy()
    skip_stats(nan_model, reset=True)
    got = labels_from_logits(run(nan_model)()).numpy()
    total = skip_table(skip_stats(nan_model))[-1]
    t_plain, t_cl, t_nan = interleaved_times(
        [run(plain), run(plain_cl, channels_last=True), run(nan_model)], args.reps)

    identical = float((ref == got).mean())
    dice = mean_foreground_dice(dice_per_class(got, ref, loaded.num_classes))
    speedup = t_plain / t_nan
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, default U-Net, "
          f"{len(x)} coronal slices ({args.slices}), batch {args.batch}, {args.reps} reps; "
          f"{allocator_note()}")
    print(f"# thresholds: {json.dumps(config['defaults'], sort_keys=True)}")
    print("| model | t per slice ms | t(plain) / t | skipped positions | skipped MACs | "
          "identical labels | mean Dice vs plain |")
    print("|---|---|---|---|---|---|---|")
    print(f"| plain (as given, NCHW) | {t_plain / len(x) * 1e3:.1f} | 1.00x | - | - | - | - |")
    print(f"| plain, channels-last | {t_cl / len(x) * 1e3:.1f} | {t_plain / t_cl:.2f}x | - | - | "
          "- | - |")
    print(f"| nanified | {t_nan / len(x) * 1e3:.1f} | {speedup:.2f}x | {total['skipped']:.1%} | "
          f"{total['macs_skipped']:.1%} | {identical:.3%} | {dice:.4f} |")
    print(f"skipping alone (t(plain, channels-last) / t(nanified)): {t_cl / t_nan:.2f}x")
    met = speedup >= 1.3 and identical >= 0.999
    print(f"goal (>= 1.3x with >= 99.9 % identical labels): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
