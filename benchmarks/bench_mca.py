"""Cost of one MCA sample of the default U-Net, measured side by side with a plain forward.

Prints t(in-process MCA forward) / t(plain forward) for each rounding mode (goal: <= 4x for
the default mode, issue #20) on coronal slices of the bundled brain, and, when a Verrou-enabled
valgrind is found (``--valgrind`` / $NANPROBE_VALGRIND / PATH), the wall-clock of one Verrou
sample.

    python benchmarks/bench_mca.py [--slices 4] [--reps 5] [--valgrind PATH]
    python benchmarks/bench_mca.py --retain-freed-memory   # the same without page faults
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from nanprobe.evaluate import allocator_note, interleaved_times, rerun_retaining_freed_memory
from nanprobe.inputs import prepare_input
from nanprobe.mca import MODES, mca_mode
from nanprobe.models.registry import load
from nanprobe.run import RunSpec, mca_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=4, help="coronal slices per forward")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--valgrind", default=None, help="Verrou-enabled valgrind")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="rerun with glibc keeping freed memory (timings without page faults)")
    args = parser.parse_args()
    if args.retain_freed_memory:
        rerun_retaining_freed_memory()
    loaded = load("default")
    start = 128 - args.slices // 2
    x = prepare_input("default", loaded, slices=f"{start}:{start + args.slices}").tensor
    model = loaded.model
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, default U-Net, "
          f"input {tuple(x.shape)}; {allocator_note()}")

    def plain():
        with torch.no_grad():
            model(x)

    def perturbed(mode):
        def fn():
            with torch.no_grad(), mca_mode(mode, seed=1):
                model(x)
        return fn

    modes = list(MODES)
    times = interleaved_times([plain] + [perturbed(m) for m in modes], args.reps)
    print("| backend | t forward ms | ratio to plain |")
    print("|---------|--------------|----------------|")
    print(f"| plain | {times[0] * 1e3:.0f} | 1.00x |")
    for mode, t in zip(modes, times[1:], strict=True):
        print(f"| inprocess {mode} | {t * 1e3:.0f} | {t / times[0]:.2f}x |")

    try:
        from nanprobe.verrou import find_valgrind, require_verrou

        require_verrou(find_valgrind(args.valgrind))
    except (RuntimeError, ValueError) as err:
        print(f"\nVerrou sample: not measured ({' '.join(str(err).split())[:160]})")
        return
    with tempfile.TemporaryDirectory() as tmp:
        spec = RunSpec(samples=1, slices=f"{start}:{start + 1}",
                       backend={"name": "verrou", "rounding_mode": "random"})
        t0 = time.perf_counter()
        mca_run(spec, tmp, valgrind=args.valgrind)
        total = time.perf_counter() - t0
    print(f"\nVerrou: reference + 1 sample of 1 slice took {total:.0f} s "
          f"(~{total / 2:.0f} s per process incl. Valgrind start-up)")


if __name__ == "__main__":
    main()
