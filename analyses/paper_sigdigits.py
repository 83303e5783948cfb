"""Reproduce the paper's significant-digit maps per layer with the bundled default U-Net.

The paper ran FastSurfer under Monte Carlo Arithmetic (Verrou) and mapped the significant
digits of every layer's output: the encoder keeps most of its digits, while from the
max-unpooling on the zero background around the brain is pure noise.

Here: :func:`nanprobe.run.mca_run` with the in-process backend (random rounding, float32) runs
the bundled default U-Net on 2 central coronal slices of the bundled brain (default ``127:129``)
``--samples`` times plus an unperturbed reference, capturing every layer;
:func:`nanprobe.sigdigits.compute_sigdigits` maps the significant bits against the reference and
:func:`nanprobe.plots.plot_sigdigits` draws them (one grid of all layers, the per-layer
distribution, and one map per layer).

Writes into ``--out`` (default ``analyses/out/sigdigits/``): ``run/`` (the MCA run: about
1.4 GB for 2 slices and 10 samples; rerunning resumes it), ``run/sigdigits.h5`` and
``figures/``; prints per layer the mean bits and the share of pure-noise elements (<= 1 bit),
and where the PNGs are.

Usage, from the repository root::

    python -m analyses.paper_sigdigits
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import h5py

from analyses._common import DEFAULT_OUT, format_table, percent
from nanprobe.plots import plot_sigdigits, short_name
from nanprobe.run import RunSpec, mca_run
from nanprobe.sigdigits import NOISE_BITS, compute_sigdigits


def layer_lines(sigdigits_h5: Path) -> list[list[str]]:
    """Per captured key, in forward order: mean significant bits and share of <= 1-bit elements."""
    with h5py.File(sigdigits_h5, "r") as h5:
        return [[short_name(k), f"{h5[k].attrs['mean_bits']:.1f}",
                 percent(h5[k].attrs["noise_count"] / h5[k].attrs["elements"], 1)]
                for k in json.loads(h5.attrs["keys"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "sigdigits")
    parser.add_argument("--slices", default="127:129",
                        help="coronal slices START:STOP[:STEP] (default %(default)s)")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    run_dir = args.out / "run"
    spec = RunSpec(model="default", input="default", samples=args.samples, seed=args.seed,
                   slices=args.slices)
    mca_run(spec, run_dir, on_progress=lambda done, total: print(
        f"\rMCA run: {done}/{total} files", end="", flush=True))
    print()
    sigdigits_h5 = compute_sigdigits(run_dir)
    pngs = plot_sigdigits(sigdigits_h5, args.out / "figures")
    print(format_table(["layer", "mean bits", f"<= {NOISE_BITS:g} bit"],
                       layer_lines(sigdigits_h5)))
    print(f"wrote {sigdigits_h5}")
    print(f"wrote {len(pngs)} PNGs in {args.out / 'figures'}: {pngs[0].name} (all layers, first "
          "slice), distribution.png (bits per layer), layers/*.png (one map per layer)")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
