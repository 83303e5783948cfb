"""Time and peak memory of ``nanprobe sigdigits`` vs ``significantdigits`` on a whole stack.

Generates a synthetic run (default: 10 samples of one 64 x 256 x 256 float32 layer, a third
of it ReLU-like zeros, relative noise 2^-22..2^-2 per element) in the capture layout, then
measures, each in a fresh process:

- ``significantdigits``: the N-sample stack read into memory and passed whole to
  ``significant_digits`` (reference = the unperturbed reference);
- ``nanprobe``: :func:`nanprobe.sigdigits.compute_sigdigits` on the run directory (blocked
  reads, ``sigdigits.h5`` written).

Peak memory: tracemalloc (numpy allocations, Python heap) and the rise of peak RSS over the
process's RSS before the measured call (/proc/self/clear_refs; Linux).

    python benchmarks/bench_sigdigits.py [--samples 10] [--shape 1,64,256,256]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import h5py
import numpy as np

KEY = "layers/conv/output"


def make_run(path: Path, n: int, shape: tuple[int, ...], seed: int = 0) -> None:
    """Write reference.h5 and n samples of one layer ``shape`` (S, C, H, W) + run.json."""
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(shape, dtype=np.float32)
    ref[rng.random(shape) < 1 / 3] = 0
    exponent = -rng.uniform(2, 22, shape).astype(np.float32)
    (path / "samples").mkdir(parents=True, exist_ok=True)
    (path / "run.json").write_text(json.dumps({
        "format": "nanprobe-run/1", "layers": ["conv"], "input": {"view": None},
        "spec": {"model": "synthetic", "samples": n, "shape": list(shape)}}))
    for i in range(-1, n):
        data = ref if i < 0 else ref * (1 + np.exp2(exponent)
                                        * rng.standard_normal(shape, dtype=np.float32))
        name = "reference.h5" if i < 0 else f"samples/sample-{i:04d}.h5"
        with h5py.File(path / name, "w") as h5:
            h5.create_dataset(KEY, data=data, chunks=(1, *shape[1:]), compression="gzip",
                              compression_opts=1, shuffle=True)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _measure(mode: str, run_dir: str, queue) -> None:
    import significantdigits

    from nanprobe.run import Run
    from nanprobe.sigdigits import compute_sigdigits

    run = Run(run_dir)
    with h5py.File(run.reference_path, "r") as h5:
        shape, dtype = h5[KEY].shape, h5[KEY].dtype
    Path("/proc/self/clear_refs").write_text("5")  # reset peak RSS
    rss0 = _rss_kib("VmRSS")
    tracemalloc.start()
    start = time.perf_counter()
    if mode == "nanprobe":
        compute_sigdigits(run_dir, out=Path(run_dir) / "bench-sigdigits.h5")
    else:
        stack = np.empty((len(run.sample_paths), *shape), dtype=dtype)
        for i, p in enumerate(run.sample_paths):
            with h5py.File(p, "r") as h5:
                h5[KEY].read_direct(stack[i])
        ref = run.reference(KEY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bits = significantdigits.significant_digits(stack, reference=ref, axis=0)
        np.save(Path(run_dir) / "bench-library.npy", bits.astype(np.float32))
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    queue.put((seconds, peak, (_rss_kib("VmHWM") - rss0) * 1024))


def measure(mode: str, run_dir: Path) -> tuple[float, int, int]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(mode, str(run_dir), queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--shape", default="1,64,256,256", help="layer shape S,C,H,W")
    parser.add_argument("--dir", type=Path, default=None, help="keep the run here")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.dir or Path(tmp) / "run"
        t0 = time.perf_counter()
        make_run(run_dir, args.samples, shape)
        stack_mb = args.samples * np.prod(shape) * 4 / 1e6
        print(f"layer {args.samples} samples x {shape} float32: stack {stack_mb:.0f} MB "
              f"(generated in {time.perf_counter() - t0:.1f} s)")
        print(f"{'':18s} {'time':>8s} {'tracemalloc peak':>22s} {'peak RSS rise':>20s}")
        for mode in ("significantdigits", "nanprobe"):
            seconds, peak, rss = measure(mode, run_dir)
            print(f"{mode:18s} {seconds:7.2f}s {peak / 1e6:8.0f} MB ({peak / 1e6 / stack_mb:4.2f}x)"
                  f" {rss / 1e6:8.0f} MB ({rss / 1e6 / stack_mb:4.2f}x)")
        ours = h5py.File(run_dir / "bench-sigdigits.h5", "r")[KEY]["bits"][()]
        lib = np.load(run_dir / "bench-library.npy")
        with h5py.File(run_dir / "reference.h5", "r") as h5:
            nonzero = h5[KEY][()] != 0
        diff = np.abs(ours[nonzero] - np.maximum(lib[nonzero], 0))
        print(f"agreement where the reference is nonzero: max |diff| = {diff.max():.2e} bits")


if __name__ == "__main__":
    main()
