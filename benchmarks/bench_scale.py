"""Wall-clock of 8 in-process MCA samples on a Dask LocalCluster of 1 vs 2 one-thread workers.

For each worker count: a fresh cluster and run directory; every worker loads the model and
the reference is computed before the clock starts, so the timed ``mca_run`` is the samples
(one task each) plus the client's per-run work (spec check, size estimate, manifest). Prints
both times, the CPU the workers got meanwhile (in cores: below the worker count when other
processes compete for the cores) and the ratio of the times (ideal: the number of workers).

    python benchmarks/bench_scale.py [--model default] [--input default] [--slices S]
                                     [--samples 8] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from nanprobe.distributed import dask_executor
from nanprobe.run import RunSpec, mca_run
from nanprobe.worker import model_and_input


def reference_only(executor):
    """An executor running only the reference job of a run."""
    return lambda job_list, jobs: executor([j for j in job_list if j["sample"] < 0], jobs)


def timed_run(spec: RunSpec, run_dir: Path, workers: int) -> tuple[float, float]:
    """Wall seconds of ``mca_run`` for the samples of ``spec`` on ``workers`` warm workers, and
    the CPU seconds the workers used meanwhile."""
    with dask_executor(cluster="local", workers=workers) as executor:
        client = executor.client
        client.run(model_and_input, asdict(spec))
        mca_run(spec, run_dir, executor=reference_only(executor))
        cpu0 = client.run(time.process_time)
        start = time.perf_counter()
        run = mca_run(spec, run_dir, executor=executor)
        seconds = time.perf_counter() - start
        cpu = sum(t - cpu0[w] for w, t in client.run(time.process_time).items())
    assert run.complete
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--input", default="default")
    parser.add_argument("--slices", default=None, help="default: the model's default selection")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--workers", default="1,2", help="worker counts, comma separated")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    spec = RunSpec(model=args.model, input=args.input, slices=args.slices,
                   samples=args.samples)
    print(f"# {args.samples} samples of {args.model} on {args.input} (slices "
          f"{args.slices or 'default'}), {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in counts:
            times[workers], cpu = timed_run(spec, Path(tmp) / f"w{workers}", workers)
            print(f"{workers} worker(s): {times[workers]:6.1f} s, workers busy "
                  f"{cpu / times[workers]:.2f} cores", flush=True)
    base = counts[0]
    for workers in counts[1:]:
        print(f"speed-up {workers} vs {base} worker(s): {times[base] / times[workers]:.2f}x")


if __name__ == "__main__":
    main()
