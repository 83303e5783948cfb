"""`nanprobe analyze`: mca-run -> sigdigits -> audit -> calibrate -> report, in one directory.

Rerunnable: the MCA run resumes sample by sample; a later step is skipped when its output is
newer than every file it reads (and, for the calibration, was made with the same options), so
an interrupted analysis picks up where it stopped and a finished one returns at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .calibrate import CALIBRATION_FILE, DEFAULT_THRESHOLDS, calibrate
from .ops.conv import FILLS, Fill
from .run import Run, RunSpec, mca_run

#: the steps in order, each with the file it writes in the run directory
STEPS = (("mca-run", "run.json"), ("sigdigits", "sigdigits.h5"), ("audit", "audit.json"),
         ("calibrate", CALIBRATION_FILE), ("report", "report.html"))


@dataclass
class AnalyzeOptions:
    """What `nanprobe analyze` runs; see the CLI's --help for each option."""

    model: str = "default"
    input: str = "default"
    samples: int = 10
    slices: str | None = None
    calibration_slices: str | None = None
    view: str | None = None
    checkpoint: str | None = None
    trust: bool = False
    seed: int = 0
    jobs: int = 1
    max_gb: float = 4.0
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS
    fills: Sequence[Fill] = FILLS
    tolerance: float | None = None
    against: str = "auto"
    repeats: int = 3

    def calibration_key(self) -> dict[str, Any]:
        """The options a stored calibration must share to be reused."""
        return {"thresholds": [float(t) for t in self.thresholds], "fills": list(self.fills),
                "tolerance": self.tolerance, "against": self.against, "repeats": self.repeats,
                "slices": self.calibration_slices, "seed": self.seed}


def _newest(paths: list[Path]) -> float:
    return max(p.stat().st_mtime for p in paths)


def _fresh(output: Path, inputs: list[Path]) -> bool:
    """``output`` exists and is newer than every file in ``inputs``."""
    return output.exists() and output.stat().st_mtime >= _newest(inputs)


def _calibration_reusable(path: Path, inputs: list[Path], key: Mapping[str, Any]) -> bool:
    if not _fresh(path, inputs):
        return False
    try:
        stored = json.loads(path.read_text())["provenance"].get("analyze_options")
    except (OSError, ValueError, KeyError):
        return False
    return stored == json.loads(json.dumps(key))


def analyze(
    opts: AnalyzeOptions,
    out: str | Path,
    *,
    on_step: Callable[[str, bool], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Run every step into ``out``; return the path of ``report.html``.

    ``on_step(step, skipped)`` is called as each step starts (``skipped``: its output is up to
    date); ``on_progress(step, done, total)`` follows the long steps.
    """
    from .audit import audit_run
    from .plots import plot_sigdigits
    from .report import write_report
    from .sigdigits import compute_sigdigits

    out = Path(out)

    def step(name: str, skipped: bool) -> bool:
        if on_step:
            on_step(name, skipped)
        return not skipped

    spec = RunSpec(model=opts.model, input=opts.input, samples=opts.samples, seed=opts.seed,
                   checkpoint=opts.checkpoint, view=opts.view, slices=opts.slices,
                   trust=opts.trust)
    run_done = (out / "run.json").exists() and Run(out).complete
    step("mca-run", run_done)
    mca_run(spec, out, jobs=opts.jobs, max_gb=opts.max_gb,
            on_progress=(lambda d, t: on_progress("mca-run", d, t)) if on_progress else None)
    run = Run(out)
    captures = [run.reference_path, *run.sample_paths, out / "run.json"]

    sig = out / "sigdigits.h5"
    if step("sigdigits", _fresh(sig, captures)):
        compute_sigdigits(out)
        plot_sigdigits(sig, out / "sigdigits")
    audit = out / "audit.json"
    if step("audit", _fresh(audit, captures)):
        audit_run(out)

    key = opts.calibration_key()
    cal = out / CALIBRATION_FILE
    if step("calibrate", _calibration_reusable(cal, [audit], key)):
        pooling = audit if "calibrated_pooling" in json.loads(audit.read_text()) else None
        calibrate(opts.model, opts.input, out, slices=opts.calibration_slices, view=opts.view,
                  checkpoint=opts.checkpoint, trust=opts.trust, thresholds=opts.thresholds,
                  fills=opts.fills, pooling=pooling, tolerance=opts.tolerance,
                  against=opts.against, repeats=opts.repeats, seed=opts.seed,
                  provenance_extra={"analyze_options": key},
                  on_progress=(lambda d, t: on_progress("calibrate", d, t))
                  if on_progress else None)
    step("report", False)
    html_path, _ = write_report(out)
    return html_path
