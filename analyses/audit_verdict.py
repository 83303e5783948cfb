"""Measure what decides the audit's verdict: do near ties explain the unstable pooling windows?

For each model, one in-process MCA run (random rounding, float32) capturing the pooling layers,
then :func:`nanprobe.audit.audit_run`: the best tie setting's precision / recall / F1 against
the measured unstable windows and the verdict (``explained`` when F1 >= ``VERDICT_MIN_F1``).
Beside it, what a tie rule that ignores ties at exactly 0 (the fixed point of ReLU) would
score: windows whose max is 0 are never flagged (same grid, best F1).

Runs (:data:`RUNS`): the bundled MNIST CNN and the paper-like one on 100 held-out digits, the
default U-Net on 8 coronal slices (``100:156:7``, calibrate's default), 10 samples each.

Writes into ``--out`` (default ``analyses/out/audit_verdict/``): one run directory per model
(with its ``audit.json``) and ``summary.json``; prints the table.

Usage, from the repository root::

    python -m analyses.audit_verdict
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analyses._common import DEFAULT_OUT, format_table
from nanprobe import __version__
from nanprobe.audit import (
    VERDICT_MIN_F1,
    _window_max,
    audit_run,
    pool_groups,
    scores_from_counts,
    tie_counts,
    unstable_windows,
)
from nanprobe.jsonio import write_json
from nanprobe.run import Run, RunSpec, mca_run

SAMPLES = 10
RUNS = {
    "mnist": RunSpec(model="mnist", input="mnist", slices="0:100", samples=SAMPLES),
    "mnist-paper": RunSpec(model="mnist-paper", input="mnist", slices="0:100", samples=SAMPLES),
    "default": RunSpec(model="default", input="default", slices="100:156:7", samples=SAMPLES,
                       layers=["encode*.maxpool"]),
}


def ignoring_zero_ties(run: Run, audit: dict[str, Any]) -> dict[str, Any]:
    """Best F1 over the audit's grid when windows whose max is exactly 0 are never flagged."""
    grid: dict[tuple[int, float, float], list[int]] = {}
    limits = sorted({row["tie_limit"] for row in audit["calibration"]["grid"]})
    for group in pool_groups(run):
        geometry = audit["layers"][group]["geometry"]
        if "kernel" not in geometry:
            continue
        geom = (tuple(geometry["kernel"]), tuple(geometry["stride"]), tuple(geometry["padding"]))
        unstable = torch.from_numpy(unstable_windows(run, group)[0])
        x = torch.from_numpy(run.reference(f"layers/{group}/input"))
        nonzero = _window_max(x, geom) != 0
        for eps in audit["eps_values"]:
            for rtol in audit["rtol_values"]:
                counts = tie_counts(x, geom, eps, rtol)
                for limit in limits:
                    flags = ((counts > limit) | (counts == 0)) & nonzero
                    acc = grid.setdefault((limit, eps, rtol), [0, 0, 0])
                    acc[0] += int((flags & unstable).sum())
                    acc[1] += int((flags & ~unstable).sum())
                    acc[2] += int((~flags & unstable).sum())
    (limit, eps, rtol), counts = max(grid.items(), key=lambda kv: scores_from_counts(*kv[1])["f1"])
    return {"tie_limit": limit, "tie_eps": eps, "tie_rtol": rtol, **scores_from_counts(*counts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "audit_verdict")
    args = parser.parse_args()

    start = time.perf_counter()
    results = {}
    for name, spec in RUNS.items():
        run = mca_run(spec, args.out / name)
        audit = audit_run(run.path, plots=False)
        best = audit["calibration"]["best"]
        zeros = [e["exact_ties_at_zero"] for e in audit["layers"].values()
                 if "exact_ties_at_zero" in e]
        results[name] = {
            "spec": {"model": spec.model, "input": spec.input, "slices": spec.slices,
                     "samples": spec.samples, "layers": spec.layers},
            "windows": audit["summary"]["windows"], "unstable": audit["summary"]["unstable"],
            "best": {k: best[k] for k in ("tie_limit", "tie_eps", "tie_rtol", "precision",
                                          "recall", "f1", "flagged")},
            "exact_ties_at_zero": {"windows": sum(z["windows"] for z in zeros),
                                   "unstable": sum(z["unstable"] for z in zeros)},
            "ignoring_zero_ties": ignoring_zero_ties(run, audit),
            "verdict": audit["verdict"], "verdict_text": audit["verdict_text"],
        }
        print(f"{name}: {audit['verdict_text']}", flush=True)

    def cell(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    print(f"\nverdict criterion: explained when the best F1 >= {VERDICT_MIN_F1:g}")
    print(format_table(
        ["model", "unstable windows", "best setting", "P", "R", "F1", "exact ties at 0 "
         "(unstable)", "F1 ignoring ties at 0", "verdict"],
        [[name, f"{r['unstable']:,} of {r['windows']:,}",
          f"limit {r['best']['tie_limit']}, eps {r['best']['tie_eps']:g}, "
          f"rtol {r['best']['tie_rtol']:g}", cell(r["best"]["precision"]),
          cell(r["best"]["recall"]), cell(r["best"]["f1"]),
          f"{r['exact_ties_at_zero']['windows']:,} ({r['exact_ties_at_zero']['unstable']:,})",
          cell(r["ignoring_zero_ties"]["f1"]), r["verdict"]] for name, r in results.items()]))
    seconds = time.perf_counter() - start
    path = write_json(args.out / "summary.json", {
        "verdict_min_f1": VERDICT_MIN_F1, "runs": results,
        "provenance": {"script": "analyses/audit_verdict.py", "nanprobe_version": __version__,
                       "torch_version": torch.__version__, "numpy_version": np.__version__,
                       "machine": platform.machine(), "seconds": round(seconds, 1)}})
    print(f"wrote {path}\n{seconds:.0f} s")


if __name__ == "__main__":
    main()
