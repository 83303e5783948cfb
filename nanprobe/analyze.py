"""`nanprobe analyze`: mca-run -> sigdigits -> audit -> calibrate -> report, in one directory.

Rerunnable: the MCA run resumes sample by sample (verifying what is there); a later step is
skipped when its output records this run's digest (and, for the calibration, was made with the
same options from the same pooling settings), so an interrupted analysis picks up where it
stopped and a finished one returns at once; results of an earlier state of the run are redone.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .calibrate import CALIBRATION_FILE, DEFAULT_THRESHOLDS, calibrate
from .integrity import RunLock, recorded_digest
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
    objective: str = "skip"

    def calibration_key(self) -> dict[str, Any]:
        """The options a stored calibration must share to be reused."""
        return {"thresholds": [float(t) for t in self.thresholds], "fills": list(self.fills),
                "tolerance": self.tolerance, "against": self.against, "repeats": self.repeats,
                "slices": self.calibration_slices, "seed": self.seed,
                "objective": self.objective}


def _calibration_reusable(path: Path, audit: Path, key: Mapping[str, Any]) -> bool:
    """A stored calibration was made with the same options from the same pooling settings
    (the audit's content and the run it was computed from), whatever the files' mtimes."""
    try:
        cal = json.loads(path.read_text())
        stored = cal["provenance"].get("analyze_options")
        pooling = json.loads(audit.read_text()).get("calibrated_pooling")
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    if stored != json.loads(json.dumps(key)):
        return False
    if pooling is None:  # calibrated with nanify's defaults
        return cal["provenance"].get("run_digest") is None
    return (cal["provenance"].get("run_digest") == recorded_digest(audit)
            and cal.get("pooling") == {**cal.get("pooling", {}), **pooling.get("defaults", {})})


def analyze(
    opts: AnalyzeOptions,
    out: str | Path,
    *,
    on_step: Callable[[str, bool], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> Path:
    """Run every step into ``out``; return the path of ``report.html``.

    ``on_step(step, skipped)`` is called as each step starts (``skipped``: its output is up to
    date); ``on_progress(step, done, total)`` follows the long steps; ``on_notice(message)``
    receives the MCA run's notices (quarantined files, --overwrite).
    """
    out = Path(out)

    def step(name: str, skipped: bool) -> bool:
        if on_step:
            on_step(name, skipped)
        return not skipped

    spec = RunSpec(model=opts.model, input=opts.input, samples=opts.samples, seed=opts.seed,
                   checkpoint=opts.checkpoint, view=opts.view, slices=opts.slices,
                   trust=opts.trust)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):  # the whole analysis: no other writer in between
        run_done = (out / "run.json").exists() and Run(out, verify=False).complete
        step("mca-run", run_done)
        mca_run(spec, out, jobs=opts.jobs, max_gb=opts.max_gb,
                on_progress=(lambda d, t: on_progress("mca-run", d, t)) if on_progress
                else None, on_notice=on_notice)
        return _analyse(opts, out, Run(out), step, on_progress)


def _analyse(opts: AnalyzeOptions, out: Path, run: Run, step: Callable[[str, bool], bool],
             on_progress: Callable[[str, int, int], None] | None) -> Path:
    """The steps after the MCA run; each is redone when its result is not this run's."""
    from .audit import audit_run
    from .plots import plot_sigdigits
    from .report import write_report
    from .sigdigits import compute_sigdigits

    sig = out / "sigdigits.h5"
    if step("sigdigits", sig.exists() and run.derived_from_this(sig)):
        compute_sigdigits(out)
        plot_sigdigits(sig, out / "sigdigits")
    audit = out / "audit.json"
    if step("audit", audit.exists() and run.derived_from_this(audit)):
        audit_run(out)

    key = opts.calibration_key()
    cal = out / CALIBRATION_FILE
    if step("calibrate", cal.exists() and _calibration_reusable(cal, audit, key)):
        pooling = audit if "calibrated_pooling" in json.loads(audit.read_text()) else None
        calibrate(opts.model, opts.input, out, slices=opts.calibration_slices, view=opts.view,
                  checkpoint=opts.checkpoint, trust=opts.trust, thresholds=opts.thresholds,
                  fills=opts.fills, pooling=pooling, tolerance=opts.tolerance,
                  against=opts.against, repeats=opts.repeats, seed=opts.seed,
                  objective=opts.objective,
                  provenance_extra={"analyze_options": key, "command": _calibrate_command(opts,
                                                                                          out)},
                  on_progress=(lambda d, t: on_progress("calibrate", d, t))
                  if on_progress else None)
    step("report", False)
    html_path, _ = write_report(out)
    return html_path


def _calibrate_command(opts: AnalyzeOptions, out: Path) -> str:
    """The ``nanprobe calibrate`` command line equivalent to the calibration step."""
    args: list[Any] = ["nanprobe", "calibrate", opts.model, opts.input, "--out", out]
    for option in ("calibration_slices", "view", "checkpoint", "tolerance"):
        value = getattr(opts, option)
        if value is not None:
            args += [f"--{'slices' if option == 'calibration_slices' else option}", value]
    args += [a for v in opts.thresholds for a in ("--threshold", f"{v:g}")]
    args += [a for v in opts.fills for a in ("--fill", v)]
    args += ["--against", opts.against, "--repeats", opts.repeats, "--seed", opts.seed,
             "--objective", opts.objective, "--pooling", out / "audit.json"]
    if opts.trust:
        args.append("--trust")
    return shlex.join(str(a) for a in args)


def summary_lines(out: str | Path) -> list[str]:
    """The report's verdict lines (output stability, noise, recommendation, speed) from
    ``out/report.json``: what ``nanprobe analyze`` prints last."""
    report = json.loads((Path(out) / "report.json").read_text())
    return list(report["summary"]["lines"])
