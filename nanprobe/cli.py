"""The ``nanprobe`` command line: parses options and calls the library, nothing more."""

from __future__ import annotations

import contextlib
import functools
import math
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__

app = typer.Typer(
    name="nanprobe",
    help="Find numerical noise inside convolutional networks and turn it into speed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable)

#: errors that are the user's to fix: shown as one line, exit code 2
USER_ERRORS = (ValueError, OSError, KeyError, RuntimeError)


def _error_line(err: BaseException) -> str:
    """One line for ``err``; an OSError names its file."""
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in str(err):
        return f"{err.strerror or err}: {err.filename}"
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename}"
    return " ".join(str(err).split()) or type(err).__name__


def friendly_errors(fn: F) -> F:
    """Turn user errors raised by the library into a one-line message and exit code 2; an
    interrupted run (Ctrl-C, SIGTERM) into one line and exit code 130 / 143."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as err:  # Ctrl-C; mca_run's RunInterrupted says more
            message = _error_line(err) if str(err) else "interrupted"
            err_console.print(f"[bold yellow]stopped:[/] {escape(message)}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(code=getattr(err, "exit_code", 130)) from None
        except USER_ERRORS as err:
            err_console.print(f"[bold red]error:[/] {escape(_error_line(err))}",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def notice(message: str) -> None:
    """Print a one-line notice (e.g. a quarantined file) on stderr."""
    err_console.print(f"[yellow]note:[/] {escape(message)}", highlight=False, soft_wrap=True)


def command_line(ctx: typer.Context) -> str:
    """The running command as a ``nanprobe ...`` line: arguments, then the options that differ
    from their defaults (for provenance)."""
    args: list[str] = ["nanprobe", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.param_type_name == "argument":  # a variadic one (validate's inputs) is a list
            args.extend(map(str, value) if isinstance(value, list | tuple) else [str(value)])
        elif value != param.default and value not in (None, [], ()):
            flag = param.opts[0]
            for v in (value if isinstance(value, list | tuple) else [value]):
                if isinstance(v, bool):
                    args.append(flag if v else param.secondary_opts[0])
                else:
                    args += [flag, str(v)]
    return shlex.join(args)


#: without a terminal, progress lines are printed at most this often (seconds)
PROGRESS_EVERY = 10.0


class Progress:
    """Progress of a command's long tasks and steps, on stderr.

    On a terminal: a rich bar per task. Elsewhere (a log file, CI, ``| tee``): plain lines,
    one per task update at most every :data:`PROGRESS_EVERY` seconds and at completion, so
    that a long step is never silent. :meth:`step` prints a step's start and the previous
    step's elapsed time.
    """

    def __init__(self, unit: str = "") -> None:
        self.unit = unit
        self.bar = None
        self.tasks: dict[str, Any] = {}
        self.printed: dict[str, float] = {}
        self.current: tuple[str, float] | None = None

    def __enter__(self) -> Progress:
        if err_console.is_terminal:
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(),
                           TextColumn("{task.completed}/{task.total} " + self.unit),
                           TimeElapsedColumn(), TimeRemainingColumn(), console=err_console)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self._finish_step()
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, name: str, done: int, total: int | None) -> None:
        if self.bar is not None:
            if name not in self.tasks:
                self.tasks[name] = self.bar.add_task(name, total=total)
            self.bar.update(self.tasks[name], completed=done, total=total)
            return
        now = time.monotonic()
        if done == total or now - self.printed.get(name, -math.inf) >= PROGRESS_EVERY:
            self.printed[name] = now
            of = f"/{total}" if total else ""
            err_console.print(f"{name}: {done}{of} {self.unit}".rstrip(), highlight=False)

    def step(self, name: str, skipped: bool) -> None:
        self._finish_step()
        if skipped:
            err_console.print(f"[bold]{name}[/]: up to date", highlight=False)
            return
        err_console.print(f"[bold]{name}[/] ...", highlight=False)
        self.current = (name, time.monotonic())

    def _finish_step(self) -> None:
        if self.current is not None:
            name, start = self.current
            err_console.print(f"[bold]{name}[/]: done in {time.monotonic() - start:.1f} s",
                              highlight=False)
            self.current = None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nanprobe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """nanprobe: measure where a CNN computes on noise (MCA), and skip that work (NaN ops)."""


# options shared by several commands (one definition, one help text)
ModelArg = Annotated[str, typer.Argument(
    help="Model: default | mnist | fastsurfer-vinn | fastsurfer-cnn | package.module:factory.")]
InputArg = Annotated[str, typer.Argument(
    help="Input: default (the bundled brain, or MNIST digits for mnist), a NIfTI/MGZ volume or an "
    ".npy array (S, C, H, W).")]
ViewOpt = Annotated[str | None, typer.Option(help="MRI view: axial, coronal or sagittal.")]
CheckpointOpt = Annotated[Path | None, typer.Option(
    help="Weights file (FastSurfer .pkl, or a state_dict for default/mnist).")]
TrustOpt = Annotated[bool, typer.Option(
    help="Allow full unpickling of a checkpoint that needs it (runs code from the file).")]
ThresholdsOpt = Annotated[list[float] | None, typer.Option(
    "--threshold", min=0.0, max=1.0, help="nan_threshold values to sweep (repeatable; default 1, "
    "0.9, 0.85, 0.75, 0.65, 0.5).")]
FillsOpt = Annotated[list[str] | None, typer.Option(
    "--fill", help="Fills to sweep (repeatable; default mean, noisy_max and zero): mean (the "
    "window's mean, the paper's approach A), noisy_max (draws around the window's max, approach "
    "B), zero, or a number (that constant).")]
ToleranceOpt = Annotated[float | None, typer.Option(
    min=0.0, max=1.0, help="Allowed loss of mean foreground Dice (segmentation, default 0.001) "
    "or accuracy (classification, default 0.005).")]
AgainstOpt = Annotated[str, typer.Option(
    help="Measure the loss against ground-truth 'labels', the 'plain' model, or 'auto' (labels "
    "when the input has them).")]
ResultsOpt = Annotated[Path | None, typer.Option(
    "--out", help="Folder for the results (default: RUN_DIR); lets a read-only run be analysed. "
    "`nanprobe report RUN_DIR --out DIR` then reads them from DIR.")]
ObjectiveOpt = Annotated[str, typer.Option(
    help="What the recommendation maximises within --tolerance: skip (the most conv MACs "
    "skipped, the paper's choice) or speed (the fastest measured setting).")]
RepeatsOpt = Annotated[int, typer.Option(
    min=1, help="Timed repetitions per setting (interleaved with the plain model).")]


@app.command()
@friendly_errors
def demo(
    slices: Annotated[int, typer.Option(min=1, max=64,
                                        help="Coronal slices through the brain's centre.")] = 8,
    nan_threshold: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Skip a conv output when at least this fraction of its window "
        "is NaN.")] = 1.0,
    tie_eps: Annotated[float, typer.Option(
        min=0.0, help="Pooling entries closer than this to the window max count as ties.")] = 1e-7,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repetitions (interleaved).")] = 3,
    batch_size: Annotated[int, typer.Option(
        min=1, help="Slices per forward pass. The measured speed depends on it: activations of "
        "32 MiB or more page-fault in on every call (glibc's mmap ceiling).")] = 4,
    out: Annotated[Path | None, typer.Option(
        help="Write the results (JSON with provenance) to this file.")] = None,
) -> None:
    """Run the bundled default U-Net on the bundled brain, plain and nanified.

    Prints per-layer skip ratios, the label agreement with the plain model and the measured
    speed-up, in about 20 seconds; `nanprobe analyze` is the whole job.
    """
    from .demo import run_demo

    run_demo(slices=slices, nan_threshold=nan_threshold, tie_eps=tie_eps, repeats=repeats,
             batch_size=batch_size, out=out, console=Console())


@app.command("mca-run")
@friendly_errors
def mca_run_cmd(
    model: ModelArg = "default",
    input: InputArg = "default",
    samples: Annotated[int, typer.Option(min=1, help="Number of perturbed samples N.")] = 10,
    out: Annotated[Path, typer.Option(help="Run directory (created; rerun to resume).")] = Path(
        "nanprobe-run"),
    backend: Annotated[str, typer.Option(
        help="inprocess (embedded MCA, default) or verrou (Valgrind/Verrou, one process per "
        "sample).")] = "inprocess",
    mode: Annotated[str, typer.Option(
        help="In-process rounding: flop (default: Verrou random on every FMA of convolutions "
        "and matrix products, modelled; docs/verrou.md), rr (random rounding once per op "
        "result), sr (stochastic, like Verrou nearness) or mca (virtual precision).")] = "flop",
    precision: Annotated[int, typer.Option(
        min=1, max=52, help="Virtual precision t in bits for --mode mca.")] = 24,
    rounding_mode: Annotated[str, typer.Option(
        help="Verrou rounding mode of the samples (random; random_det only to replay a sample: "
        "it hides exact ties).")] = "random",
    layers: Annotated[list[str] | None, typer.Option(
        "--layers", help="Glob pattern of module names to capture (repeatable; default: every "
        "conv, pool, unpool and top-level block).")] = None,
    slices: Annotated[str | None, typer.Option(
        help="Slices (MRI) or samples (arrays) to run: START:STOP[:STEP], I,J,K or I.")] = None,
    view: ViewOpt = None,
    checkpoint: CheckpointOpt = None,
    trust: TrustOpt = False,
    nanify: Annotated[Path | None, typer.Option(
        help="thresholds.json: run the nanified model (NaN ops) instead of the plain one.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Run seed; each sample derives its own.")] = 0,
    jobs: Annotated[int, typer.Option(min=1, help="Samples computed in parallel processes.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Slices per forward pass.")] = 4,
    max_gb: Annotated[float, typer.Option(
        help="Refuse runs whose capture files would exceed this many GB.")] = 4.0,
    valgrind: Annotated[str | None, typer.Option(
        help="Verrou-enabled valgrind (default: $NANPROBE_VALGRIND, then PATH).")] = None,
    timeout: Annotated[float | None, typer.Option(
        help="Seconds before a Verrou worker is killed (it is retried once).")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace a run with a different spec in --out.")] = False,
    executor: Annotated[str, typer.Option(
        help="Where samples run: local (processes on this machine, see --jobs) or dask (one "
        "Dask task per sample; needs `pip install nanprobe\\[dask]`).")] = "local",
    scheduler: Annotated[str | None, typer.Option(
        help="--executor dask: address of a running Dask scheduler, tcp://HOST:PORT.")] = None,
    cluster: Annotated[str | None, typer.Option(
        help="--executor dask: start a cluster: local (one-thread worker processes here; the "
        "default without --scheduler) or slurm (worker jobs via dask-jobqueue).")] = None,
    workers: Annotated[int, typer.Option(
        min=1, help="--executor dask: workers to start (one thread each).")] = 2,
    cluster_config: Annotated[Path | None, typer.Option(
        help="--cluster slurm: YAML settings (queue, account, walltime, cores, memory, "
        "job-extra, image, ...); see docker/slurm-cluster.yaml.")] = None,
    queue: Annotated[str | None, typer.Option(
        help="--cluster slurm: partition (overrides --cluster-config).")] = None,
    account: Annotated[str | None, typer.Option(
        help="--cluster slurm: account to charge.")] = None,
    walltime: Annotated[str | None, typer.Option(
        help="--cluster slurm: time limit of each worker job, e.g. 02:00:00.")] = None,
    cores: Annotated[int | None, typer.Option(
        min=1, help="--cluster slurm: cores per worker job (= one-thread workers per job).")
    ] = None,
    memory: Annotated[str | None, typer.Option(
        help="--cluster slurm: memory per worker job, e.g. 16GB.")] = None,
    job_extra: Annotated[list[str] | None, typer.Option(
        "--job-extra", help="--cluster slurm: extra #SBATCH directive (repeatable), e.g. "
        "--job-extra=--qos=normal.")] = None,
    image: Annotated[str | None, typer.Option(
        help="--cluster slurm: Apptainer image (.sif) the workers run in.")] = None,
    gather: Annotated[bool, typer.Option(
        help="--executor dask: workers send each file back and this process writes it (no "
        "filesystem shared with the workers needed).")] = False,
    retries: Annotated[int, typer.Option(
        min=0, help="--executor dask: reruns of a sample whose task failed or whose worker "
        "died, before it is reported as failed.")] = 2,
) -> None:
    """Run MODEL on INPUT N times under Monte Carlo Arithmetic, capturing every layer to HDF5.

    Writes OUT/reference.h5 (unperturbed), OUT/samples/sample-XXXX.h5 and OUT/run.json.
    Rerunning the same command resumes where it stopped.
    """
    from .run import RunSpec, mca_run

    backend_opts: dict = {"name": backend, "rounding_mode": rounding_mode}
    if backend == "inprocess":
        backend_opts = {"name": "inprocess", "mode": mode, "precision": precision}
    spec = RunSpec(model=model, input=input, samples=samples, seed=seed, backend=backend_opts,
                   checkpoint=str(checkpoint) if checkpoint else None, view=view, slices=slices,
                   layers=list(layers) if layers else None,
                   nanify=str(nanify) if nanify else None, trust=trust, batch_size=batch_size)
    if executor not in ("local", "dask"):
        raise ValueError(f"--executor must be local or dask, got {executor!r}")
    run_executor = contextlib.nullcontext()
    if executor == "dask":
        from .distributed import dask_executor

        run_executor = dask_executor(
            cluster=cluster, scheduler=scheduler, workers=workers, cluster_config=cluster_config,
            slurm={"queue": queue, "account": account, "walltime": walltime, "cores": cores,
                   "memory": memory, "job_extra": job_extra or None, "image": image},
            gather=gather, retries=retries, run_dir=out)
    with run_executor as dask_run, Progress("files") as bar:
        result = mca_run(spec, out, jobs=jobs, overwrite=overwrite, max_gb=max_gb,
                         valgrind=valgrind, timeout=timeout, executor=dask_run,
                         on_progress=lambda done, total: bar.update("mca-run", done, total),
                         on_notice=notice)
    typer.echo(f"run complete: {result.path} ({len(result.sample_paths)} samples + reference)")


@app.command()
@friendly_errors
def sigdigits(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `nanprobe mca-run`.")],
    method: Annotated[str, typer.Option(
        help="significantdigits method: cnh (Centered Normal Hypothesis) or general.")] = "cnh",
    reference: Annotated[str, typer.Option(
        help="Compare samples with the unperturbed 'reference' run or the sample 'mean'.")
    ] = "reference",
    error: Annotated[str, typer.Option(
        help="relative (absolute where the reference is 0) or absolute error.")] = "relative",
    probability: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Probability that the significant bits hold.")] = 0.95,
    confidence: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Confidence level of that statement.")] = 0.95,
    layers: Annotated[list[str] | None, typer.Option(
        "--layers", help="Glob pattern of capture keys to analyse (repeatable; default all).")
    ] = None,
    slice_index: Annotated[int, typer.Option(
        min=0, help="Input slice shown in the heatmaps.")] = 0,
    aggregate: Annotated[str, typer.Option(
        help="How heatmaps aggregate channels: min, mean or median.")] = "min",
    out: ResultsOpt = None,
) -> None:
    """Significant bits per layer and element over the samples -> RUN_DIR/sigdigits.h5 + PNGs."""
    from .plots import plot_sigdigits
    from .sigdigits import OUTPUT, compute_sigdigits

    folder = out if out is not None else run_dir
    written = compute_sigdigits(run_dir, method=method, reference=reference, error=error,
                                probability=probability, confidence=confidence, keys=layers,
                                out=folder / OUTPUT)
    pngs = plot_sigdigits(written, folder / "sigdigits", slice_index=slice_index,
                          aggregate=aggregate)
    typer.echo(f"wrote {written} and {len(pngs)} PNGs in {folder / 'sigdigits'}")


@app.command()
@friendly_errors
def audit(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `nanprobe mca-run`.")],
    eps: Annotated[list[float] | None, typer.Option(
        "--eps", help="Tie tolerances for the P(unstable | ties) table and the calibration "
        "(repeatable; default 0, 1e-7, 1e-6, 1e-5, 1e-4).")] = None,
    out: ResultsOpt = None,
) -> None:
    """Which pooling windows are unstable, why (near ties), and the calibrated tie settings.

    Writes RUN_DIR/audit.json (its "calibrated_pooling" entry is a thresholds config) and maps
    in RUN_DIR/audit/.
    """
    from .audit import audit_run, summary_lines

    kwargs = {"eps_values": tuple(eps)} if eps else {}
    for line in summary_lines(audit_run(run_dir, out=out, **kwargs)):
        typer.echo(line)
    typer.echo(f"wrote {(out if out is not None else run_dir) / 'audit.json'}")


@app.command()
@friendly_errors
def compare(
    run_a: Annotated[Path, typer.Argument(help="Run to judge (e.g. the in-process backend).")],
    run_b: Annotated[Path, typer.Argument(help="Run taken as truth (e.g. Verrou).")],
    out: Annotated[Path | None, typer.Option(help="Write the comparison as JSON here.")] = None,
) -> None:
    """How far two runs of the same model and input agree: unstable windows and sigdigit maps."""
    from .compare import compare_runs, summary_lines

    for line in summary_lines(compare_runs(run_a, run_b, out=out)):
        typer.echo(line)


@app.command()
@friendly_errors
def calibrate(
    ctx: typer.Context,
    model: ModelArg = "default",
    input: InputArg = "default",
    out: Annotated[Path, typer.Option(
        help="Directory for calibration.json and thresholds.json (e.g. a run directory, so "
        "`nanprobe report` finds them).")] = Path("nanprobe-run"),
    thresholds: ThresholdsOpt = None,
    fills: FillsOpt = None,
    pooling: Annotated[Path | None, typer.Option(
        help="audit.json (or a run directory) with the calibrated pooling settings; default: "
        "OUT/audit.json when it exists, else nanify's defaults.")] = None,
    tolerance: ToleranceOpt = None,
    against: AgainstOpt = "auto",
    slices: Annotated[str | None, typer.Option(
        help="Slices (MRI) or samples (arrays) to calibrate on: START:STOP[:STEP], I,J,K or I "
        "(default: 8 coronal slices across the bundled brain / 1000 MNIST digits / all).")
    ] = None,
    view: ViewOpt = None,
    checkpoint: CheckpointOpt = None,
    trust: TrustOpt = False,
    repeats: RepeatsOpt = 3,
    batch_size: Annotated[int, typer.Option(
        min=1, help="Slices/samples per forward pass. The measured speed depends on it: "
        "activations of 32 MiB or more page-fault in on every call (glibc's mmap ceiling).")
    ] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the noisy_max fill.")] = 0,
    objective: ObjectiveOpt = "skip",
) -> None:
    """Sweep NaN thresholds x fills: skipped work, agreement and speed vs the plain model.

    Recommends the setting that skips the most (or, with --objective speed, runs fastest)
    while its loss stays within --tolerance and writes it as OUT/thresholds.json (for
    `nanify(config=...)` and `mca-run --nanify`); all numbers go to OUT/calibration.json.
    Each setting is timed in rounds alternating with the plain model: the speed-up is the
    median ratio, with its range over the rounds.
    """
    from .calibrate import DEFAULT_THRESHOLDS, FILLS, summary_lines
    from .calibrate import calibrate as run_calibration
    from .ops.conv import parse_fill

    if pooling is None and (out / "audit.json").is_file():
        pooling = out / "audit.json"
    with Progress("steps (a quality pass and a timing per setting)") as bar:
        result = run_calibration(
            model, input, out, slices=slices, view=view, checkpoint=checkpoint, trust=trust,
            thresholds=tuple(thresholds) if thresholds else DEFAULT_THRESHOLDS,
            fills=tuple(map(parse_fill, fills)) if fills else FILLS, pooling=pooling,
            tolerance=tolerance, against=against, repeats=repeats, batch_size=batch_size, seed=seed,
            objective=objective, provenance_extra={"command": command_line(ctx)},
            on_progress=lambda done, total: bar.update("calibrate", done, total))
    for line in summary_lines(result):
        typer.echo(line)
    written = [out / "calibration.json"]
    if result["thresholds_file"]:
        written.append(out / result["thresholds_file"])
    typer.echo(f"wrote {' and '.join(map(str, written))}")


@app.command()
@friendly_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `nanprobe mca-run`.")],
    out: ResultsOpt = None,
) -> None:
    """One self-contained HTML page of a run: recommendation, sigdigit maps, pooling audit,
    threshold sweep, skips per layer and slice, speed and provenance.

    Writes RUN_DIR/report.html, RUN_DIR/report.json and figures in RUN_DIR/report/; steps not
    run yet (sigdigits, audit, calibrate) are named in the report, and results computed from
    an earlier state of the run are left out as stale.
    """
    from .report import write_report

    html_path, json_path = write_report(run_dir, out=out)
    typer.echo(f"wrote {html_path} and {json_path}")


@app.command()
@friendly_errors
def analyze(
    model: ModelArg = "default",
    input: InputArg = "default",
    out: Annotated[Path, typer.Option(
        help="Analysis directory (the MCA run and every result; rerun to resume).")] = Path(
        "nanprobe-analysis"),
    samples: Annotated[int, typer.Option(min=2, help="MCA samples N.")] = 10,
    slices: Annotated[str | None, typer.Option(
        help="Slices/samples of the MCA run (default: 2 central MRI slices / 32 digits).")
    ] = None,
    calibration_slices: Annotated[str | None, typer.Option(
        help="Slices/samples of the threshold sweep (default: 8 coronal slices across the "
        "bundled brain / 1000 MNIST digits / all).")] = None,
    view: ViewOpt = None,
    checkpoint: CheckpointOpt = None,
    trust: TrustOpt = False,
    thresholds: ThresholdsOpt = None,
    fills: FillsOpt = None,
    tolerance: ToleranceOpt = None,
    against: AgainstOpt = "auto",
    repeats: RepeatsOpt = 3,
    objective: ObjectiveOpt = "skip",
    seed: Annotated[int, typer.Option(help="Seed of the MCA samples and the noisy_max fill.")
                    ] = 0,
    jobs: Annotated[int, typer.Option(min=1, help="MCA samples computed in parallel.")] = 1,
    max_gb: Annotated[float, typer.Option(
        help="Refuse MCA runs whose capture files would exceed this many GB.")] = 4.0,
) -> None:
    """The whole job: MCA run -> sigdigits -> pooling audit -> threshold calibration -> report.

    With no argument: the bundled default U-Net on the bundled brain (a few minutes on 2
    cores). Ends with the path of OUT/report.html; rerunning resumes and skips finished steps.
    """
    from .analyze import AnalyzeOptions, summary_lines
    from .analyze import analyze as run_analysis
    from .calibrate import DEFAULT_THRESHOLDS, FILLS
    from .ops.conv import parse_fill

    opts = AnalyzeOptions(
        model=model, input=input, samples=samples, slices=slices,
        calibration_slices=calibration_slices, view=view,
        checkpoint=str(checkpoint) if checkpoint else None, trust=trust, seed=seed, jobs=jobs,
        max_gb=max_gb, thresholds=tuple(thresholds) if thresholds else DEFAULT_THRESHOLDS,
        fills=tuple(map(parse_fill, fills)) if fills else FILLS, tolerance=tolerance,
        against=against, repeats=repeats, objective=objective)
    with Progress() as bar:
        html_path = run_analysis(opts, out, on_step=bar.step, on_progress=bar.update,
                                 on_notice=notice)
    for line in summary_lines(out):
        typer.echo(line)
    typer.echo(f"report: {html_path}")


@app.command("validate")
@friendly_errors
def validate_cmd(
    ctx: typer.Context,
    model: ModelArg,
    inputs: Annotated[list[str], typer.Argument(
        help="Input volumes (subjects): default (the bundled brain) or NIfTI/MGZ files.")],
    thresholds: Annotated[list[Path] | None, typer.Option(
        "--thresholds", help="thresholds.json from `nanprobe calibrate` (repeatable: each file "
        "is validated against the plain model).")] = None,
    views: Annotated[str, typer.Option(
        help="Comma-separated views to run; all three are fused FastSurfer-style "
        "(0.4 axial, 0.4 coronal, 0.2 sagittal).")] = "axial,coronal,sagittal",
    out: Annotated[Path, typer.Option(
        help="Output directory (validation.json, segmentations, figures; rerun to resume).")
    ] = Path("nanprobe-validation"),
    labels: Annotated[list[str] | None, typer.Option(
        "--labels", help="Ground-truth label volume per input, in input order (repeatable; "
        "'none' for an input without, 'default' for the bundled brain's). Default: the "
        "bundled labels for the bundled brain with the default model.")] = None,
    slices: Annotated[str | None, typer.Option(
        help="Slices of every view to run: START:STOP[:STEP] or I,J,K (default all 256; e.g. "
        "0:256:8 for a quick look).")] = None,
    checkpoints: Annotated[list[Path] | None, typer.Option(
        "--checkpoint", help="Weights: once (every view) or once per view in --views order "
        "(FastSurfer: one network per view).")] = None,
    trust: TrustOpt = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Slices per forward pass.")] = 4,
    repeats: Annotated[int, typer.Option(
        min=0, help="Timed rounds per view (plain and nanified interleaved; 0: no timing).")
    ] = 3,
    timing_slices: Annotated[int, typer.Option(
        min=0, help="Central slices of each view timed in each round.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the noisy_max fill.")] = 0,
) -> None:
    """Whole-volume accuracy study: plain vs nanified per subject, view and thresholds file.

    Dice per slice and class, paired t-test and Wilcoxon test of the Dice differences per view,
    skipped work and speed. Writes OUT/validation.json, per subject segmentations in the input's
    space (plain, nanified, difference) and figures (docs/validation.md).
    """
    from .validate import UP_TO_DATE, summary_lines
    from .validate import validate as run_validation

    with Progress("batches") as bar:
        seen = [""]

        def on_progress(done: int, total: int, what: str) -> None:
            if what != seen[0]:  # a new subject or view: one line (with the last one's time)
                seen[0] = what
                bar.step(what.removesuffix(UP_TO_DATE), what.endswith(UP_TO_DATE))
            bar.update("validate", done, total)

        result = run_validation(
            model, inputs, thresholds or [], out, views=views, labels=labels,
            checkpoints=checkpoints or [], trust=trust, slices=slices, batch_size=batch_size,
            repeats=repeats, timing_slices=timing_slices, seed=seed,
            provenance_extra={"command": command_line(ctx)}, on_progress=on_progress)
    for line in summary_lines(result):
        typer.echo(line)
    typer.echo(f"wrote {out / 'validation.json'}")


def run() -> None:  # pragma: no cover - console script entry for `python -m nanprobe`
    app(prog_name="nanprobe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
