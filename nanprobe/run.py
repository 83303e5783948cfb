"""MCA runs: N perturbed samples + one unperturbed reference of the same inference, on disk.

A run directory holds ``run.json`` (spec, layers, datasets, provenance), ``reference.h5`` and
``samples/sample-XXXX.h5``. Each file is written under a temporary name and renamed when
complete, so rerunning the same command resumes: verified files are kept byte for byte, bad
ones are quarantined and redone, missing ones are computed, and a different spec (or other
weights, input or versions under the same spec) is refused unless ``overwrite``. One process
writes a run at a time (:class:`~nanprobe.integrity.RunLock`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from . import __version__
from .capture import capture, select_layers
from .inputs import PreparedInput
from .integrity import (
    QUARANTINE_DIR,
    Interrupted,
    RunLock,
    WriteFailed,
    check_no_writer,
    interruptible,
    quarantine,
    recorded_digest,
    run_digest,
    verify_capture,
    write_failed,
)
from .jsonio import json_safe, write_json
from .models.registry import LoadedModel
from .worker import JOB_FORMAT, IdentityMismatch, model_and_input, run_job

BACKENDS = ("inprocess", "verrou")
MCA_MODES = ("rr", "sr", "mca")
MANIFEST = "run.json"


@dataclass
class RunSpec:
    """Everything that determines a run's numbers (compared on resume)."""

    model: str = "default"
    input: str = "default"
    samples: int = 10
    seed: int = 0
    backend: dict[str, Any] = field(default_factory=lambda: {"name": "inprocess", "mode": "rr",
                                                             "precision": 24})
    checkpoint: str | None = None
    view: str | None = None
    slices: str | None = None
    layers: list[str] | None = None
    nanify: str | None = None
    trust: bool = False
    batch_size: int = 4

    def validate(self) -> RunSpec:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        name = self.backend.get("name")
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
        if name == "inprocess" and self.backend.get("mode", "rr") not in MCA_MODES:
            raise ValueError(f"mode must be one of {', '.join(MCA_MODES)}, "
                             f"got {self.backend.get('mode')!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.nanify is not None:
            self.nanify = str(Path(self.nanify).resolve())
            if not Path(self.nanify).is_file():
                raise ValueError(f"--nanify file {self.nanify} does not exist")
        if self.checkpoint is not None:
            self.checkpoint = str(Path(self.checkpoint).resolve())
        return self


def sample_seed(seed: int, sample: int) -> int:
    """Independent 31-bit seed of sample ``sample`` (-1: reference) derived from the run seed."""
    return int(np.random.SeedSequence([seed, sample + 1]).generate_state(1)[0] >> 1)


def sample_path(run_dir: Path, sample: int) -> Path:
    if sample < 0:
        return run_dir / "reference.h5"
    return run_dir / "samples" / f"sample-{sample:04d}.h5"


def _check_writable(run_dir: Path) -> None:
    try:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-")
        probe.close()
    except OSError as err:
        raise ValueError(f"cannot write to run directory {run_dir}: {err.strerror or err}; "
                         "choose another --out") from None


def _remove_temporaries(run_dir: Path) -> None:
    """Remove temporary files of unfinished writes (only ever called under the run's lock)."""
    for tmp in [*run_dir.glob(".*.tmp-*"), *(run_dir / "samples").glob(".*.tmp-*")]:
        tmp.unlink(missing_ok=True)


@dataclass
class RunPlan:
    """What a spec will compute: model, input, captured layers and the files' datasets.

    ``datasets``: capture key -> ``{"shape": [S, ...], "dtype": ...}`` (recorded in run.json and
    checked in every file); ``raw_bytes``: uncompressed bytes per key and file, largest first;
    ``bytes_per_file``: on-disk estimate of one capture file, from one input item captured and
    compressed in memory exactly as the run will (the data decide how well they compress).
    """

    loaded: LoadedModel
    prepared: PreparedInput
    layers: list[str]
    datasets: dict[str, dict[str, Any]]
    raw_bytes: list[tuple[str, int]]
    bytes_per_file: int


def plan_run(spec: RunSpec) -> RunPlan:
    """Load the model and input of ``spec`` and capture one item in memory (no disk)."""
    loaded, prepared = model_and_input(asdict(spec))
    layers = select_layers(loaded.model, spec.layers)
    items = prepared.tensor.shape[0]
    with h5py.File(f"nanprobe-plan-{id(spec)}", "w", driver="core", backing_store=False) as h5:
        capture(loaded.model, prepared.tensor[:1], h5, layers, batch_size=1)
        h5.flush()
        size = h5.id.get_filesize()
        found: list[tuple[str, h5py.Dataset]] = []
        h5.visititems(lambda k, o: found.append((k, o)) if isinstance(o, h5py.Dataset) else None)
        datasets = {k: {"shape": [items, *ds.shape[1:]], "dtype": str(ds.dtype)}
                    for k, ds in found}
        raw = sorted(((k, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize * items)
                      for k, ds in found), key=lambda kv: -kv[1])
    return RunPlan(loaded, prepared, layers, datasets, raw, size * items)


@dataclass
class SampleFailure:
    sample: int
    message: str


class RunFailed(RuntimeError):
    """Some samples kept failing; the others are complete on disk."""

    def __init__(self, failures: list[SampleFailure]) -> None:
        self.failures = failures
        listed = "; ".join(f"sample {f.sample}: {f.message}" for f in failures[:3])
        super().__init__(f"{len(failures)} sample(s) failed ({listed}); rerun to retry them")


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; workers are stopped, temporaries removed, finished
    files kept. ``exit_code``: 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, signum: int, done: int, total: int) -> None:
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}: {done} of {total} "
                         "files complete; rerun the same command to resume")


def _verrou_executor(spec: RunSpec, run_dir: Path, valgrind: str | None, timeout: float | None,
                     tool: str = "verrou"):
    """A function running one job under Valgrind/Verrou in a separate process.

    The exclusion file is rendered once, here, before any worker thread starts. ``tool="none"``
    runs the same plumbing under ``valgrind --tool=none`` (no perturbation: a check of the
    set-up, used by the tests).
    """
    from . import verrou

    exe = verrou.find_valgrind(valgrind)
    if tool == "verrou":
        verrou.require_verrou(exe)
    jobs_dir = run_dir / "jobs"
    jobs_dir.mkdir(exist_ok=True)
    exclude = verrou.default_exclude_file(jobs_dir / "verrou_exclude.txt")

    def execute(job: dict) -> str:
        stem = Path(job["out"]).stem
        mode = "nearest" if job["sample"] < 0 else spec.backend.get("rounding_mode", "random")
        job_path = jobs_dir / f"{stem}.json"
        inv = verrou.worker_invocation(exe, job_path, rounding_mode=mode, seed=job["seed"],
                                       exclude=exclude, tool=tool)
        write_json(job_path, {**job, "backend_provenance": inv.provenance})
        result = verrou.run_worker(inv.cmd, inv.env, timeout=timeout,
                                   log_path=jobs_dir / f"{stem}.log")
        if not result.ok:
            raise RuntimeError(result.describe())
        return job["out"]

    return execute


#: files of a run directory written by ``mca_run``
RUN_FILES = (MANIFEST, "reference.h5", "samples", "jobs", QUARANTINE_DIR)
#: results later steps write into a run directory (removed by ``overwrite``: they describe the
#: old run); ``thresholds.json`` only when ``nanprobe calibrate`` wrote it
DERIVED = ("sigdigits.h5", "sigdigits", "audit.json", "audit", "calibration.json",
           "thresholds.json", "report.html", "report.json", "report")
#: free space wanted beyond the estimate (perturbed samples compress a little worse)
DISK_MARGIN = 1.25


def _remove_run(run_dir: Path) -> None:
    """Delete a run's files and every result derived from it (``--overwrite``)."""
    for name in (*RUN_FILES, *DERIVED):
        path = run_dir / name
        if name == "thresholds.json" and not _written_by_calibrate(path):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    (run_dir / "samples").mkdir()


def _written_by_calibrate(path: Path) -> bool:
    try:
        return json.loads(path.read_text())["provenance"]["source"] == "nanprobe calibrate"
    except (OSError, ValueError, KeyError, TypeError):
        return False


#: run.json entries that, once a run has started, must not change under a resume
IDENTITY = {"weights_sha256": "model weights", "input": "input", "layers": "captured layers",
            "datasets": "captured datasets", "precision": "precision",
            "nanprobe_version": "nanprobe version", "torch_version": "torch version"}


def _identity_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """What differs between a run's manifest and what this invocation would compute."""
    for key, what in IDENTITY.items():
        if key in old and json_safe(old[key]) != json_safe(new[key]):
            a, b = old[key], new[key]
            if key == "input":
                diff = [k for k in b if a.get(k) != b.get(k)]
                a, b = {k: a.get(k) for k in diff}, {k: b.get(k) for k in diff}
            return f"{what} ({_brief(a)} then, {_brief(b)} now)"
    return None


def _brief(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(json_safe(value), sort_keys=True)
    return text if len(text) <= 80 else text[:79] + "…"


def _run_bytes(run_dir: Path) -> int:
    """Bytes of the files ``_remove_run`` would delete."""
    total = 0
    for name in (*RUN_FILES, *DERIVED):
        path = run_dir / name
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total


def _check_free_space(run_dir: Path, files: int, bytes_per_file: int, freed: int = 0) -> None:
    need = int(files * bytes_per_file * DISK_MARGIN)
    free = shutil.disk_usage(run_dir).free + freed
    if files and free < need:
        raise ValueError(f"not enough free space in {run_dir}: the {files} file(s) still to "
                         f"write need about {need / 1e6:.0f} MB, {free / 1e6:.0f} MB are free; "
                         "free some space, select fewer --layers/--slices, or choose another "
                         "--out")


def check_max_gb(max_gb: float) -> float:
    """``max_gb`` if it is a finite number > 0, else a ValueError saying so."""
    try:
        value = float(max_gb)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"--max-gb must be a finite number of GB > 0, got {max_gb!r}")
    return value


def mca_run(
    spec: RunSpec,
    run_dir: str | Path,
    *,
    jobs: int = 1,
    overwrite: bool = False,
    max_gb: float = 4.0,
    valgrind: str | None = None,
    timeout: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
    executor: Callable[[Iterable[dict], int], Iterable[tuple[dict, BaseException | None]]]
    | None = None,
) -> Run:
    """Compute the reference and the missing samples of ``spec`` into ``run_dir``.

    Everything is validated (spec, model, input, size, free space) before anything in
    ``run_dir`` changes; the directory is locked for the whole run (a second writer is
    refused). On resume, every existing capture file is verified against ``run.json``
    (:func:`~nanprobe.integrity.verify_capture`); a bad one is moved to ``RUN/quarantine/``,
    announced through ``on_notice(message)`` and recomputed. A resume whose model weights,
    input, layers or versions differ from the run's is refused; ``overwrite`` starts again
    instead (deleting the old run and every result derived from it).

    ``on_progress(done, total)`` follows completed files. Raises :class:`RunFailed` after
    finishing everything else if some samples kept failing; :class:`RunInterrupted` on
    SIGINT/SIGTERM (workers stopped, temporaries removed); a one-line
    :class:`~nanprobe.integrity.WriteFailed` when the disk fills; ValueError for bad options,
    a different spec already in ``run_dir`` (unless ``overwrite``) or an estimate above
    ``max_gb``.
    """
    spec.validate()
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    max_gb = check_max_gb(max_gb)
    run_dir = Path(run_dir)
    plan = plan_run(spec)
    files = spec.samples + 1
    if plan.bytes_per_file * files > max_gb * 1e9:
        top = ", ".join(f"{k.removeprefix('layers/')} {b / 1e6:.0f} MB" for k, b in
                        plan.raw_bytes[:4])
        raise ValueError(f"the run would write about {plan.bytes_per_file * files / 1e9:.1f} GB "
                         f"(> --max-gb {max_gb:g}): {files} files of about "
                         f"{plan.bytes_per_file / 1e6:.0f} MB; largest per file (uncompressed): "
                         f"{top}; select fewer --layers or --slices")
    _check_writable(run_dir)
    with RunLock(run_dir), interruptible():
        return _run_locked(spec, run_dir, plan, jobs=jobs, overwrite=overwrite,
                           valgrind=valgrind, timeout=timeout, on_progress=on_progress,
                           on_notice=on_notice, executor=executor)


def _run_locked(spec: RunSpec, run_dir: Path, plan: RunPlan, *, jobs: int, overwrite: bool,
                valgrind: str | None, timeout: float | None,
                on_progress: Callable[[int, int], None] | None,
                on_notice: Callable[[str], None] | None, executor) -> Run:
    notice = on_notice or (lambda _message: None)
    manifest = run_dir / MANIFEST
    spec_dict = asdict(spec)
    content = {
        "format": "nanprobe-run/1", "spec": spec_dict, "layers": plan.layers,
        "input": plan.prepared.provenance(), "weights_sha256": plan.loaded.weights_sha256,
        "precision": str(plan.prepared.tensor.dtype).removeprefix("torch."),
        "datasets": plan.datasets,
        "nanprobe_version": __version__, "torch_version": torch.__version__,
        "estimated_bytes_per_file": plan.bytes_per_file,
    }
    old = _read_manifest(manifest)
    change = None
    if old is not None:
        if old.get("spec") != spec_dict:
            changed = sorted(k for k in set(old.get("spec", {})) | set(spec_dict)
                             if old.get("spec", {}).get(k) != spec_dict.get(k))
            change = f"a different spec (differs in: {', '.join(changed)})"
        elif (what := _identity_change(old, content)) is not None:
            change = f"the same spec but other {what}: its samples would mix"
        if change is not None and not overwrite:
            raise ValueError(f"{run_dir} holds a run with {change}; pass --overwrite to start "
                             "again or choose another --out")
    files = spec.samples + 1
    if change is None:  # resume: verify what is there (bad files move aside, nothing is lost)
        record = {**content, **(old or {})}  # an older manifest lacks some entries: add them
        for path, sample, reason in _bad_files(run_dir, record, spec):
            moved = quarantine(run_dir, path, reason)
            again = "; it will be recomputed" if sample is not None else ""
            notice(f"quarantined {path.relative_to(run_dir)}: {reason} (moved to "
                   f"{moved.relative_to(run_dir)}){again}")
        existing = [p for p in (sample_path(run_dir, s) for s in range(-1, spec.samples))
                    if p.exists()]
        per_file = max([p.stat().st_size for p in existing], default=plan.bytes_per_file)
        _check_free_space(run_dir, files - len(existing), per_file)
    else:  # --overwrite: the new run must fit in what is free once the old one is gone
        _check_free_space(run_dir, files, plan.bytes_per_file, freed=_run_bytes(run_dir))
        notice(f"--overwrite: removing the run in {run_dir} ({change}) and its results")
        _remove_run(run_dir)
        old = None
    _remove_temporaries(run_dir)
    if old is None or any(k not in old for k in content):  # new, or recorded by an older version
        write_json(manifest, {**content, **(old or {}), "created": (old or {}).get(
            "created", datetime.now(timezone.utc).isoformat())})
    todo = [s for s in range(-1, spec.samples) if not sample_path(run_dir, s).exists()]
    expect = {"weights_sha256": plan.loaded.weights_sha256, "input_sha256": plan.prepared.sha256}
    job_list = [{"format": JOB_FORMAT, "spec": spec_dict, "sample": s,
                 "seed": sample_seed(spec.seed, s), "out": str(sample_path(run_dir, s)),
                 "layers": plan.layers, "expect": expect} for s in todo]
    done = files - len(todo)
    if on_progress:
        on_progress(done, files)
    if executor is None:
        if spec.backend["name"] == "verrou":
            executor = _threaded(_verrou_executor(spec, run_dir, valgrind, timeout))
        elif jobs == 1:
            executor = _sequential
        else:
            executor = _process_pool
    failures = []
    results = executor(job_list, jobs)
    try:
        for job, error in results:
            if error is None:
                done += 1
                if on_progress:
                    on_progress(done, files)
            elif isinstance(error, OSError) and error.errno in FATAL_ERRNOS:
                raise error if isinstance(error, WriteFailed) else write_failed(
                    error, Path(job["out"]))
            elif isinstance(error, IdentityMismatch):
                raise error  # every other sample would mix in the same way
            else:
                failures.append(SampleFailure(job["sample"], " ".join(str(error).split())))
    except KeyboardInterrupt as err:  # SIGINT or SIGTERM (interruptible)
        _close(results)
        _remove_temporaries(run_dir)
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        raise RunInterrupted(signum, done, files) from None
    except BaseException:
        _close(results)
        _remove_temporaries(run_dir)
        raise
    if failures:
        raise RunFailed(failures)
    return Run(run_dir)


#: I/O errors that end the run at once (the other samples would fail the same way)
FATAL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def _close(results: Iterable) -> None:
    """Stop an executor's generator early: it terminates its workers on close."""
    close = getattr(results, "close", None)
    if close is not None:
        close()


def _read_manifest(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}; restore it, or start again with "
                         "--overwrite") from None
    if not isinstance(data, dict) or not isinstance(data.get("spec"), dict):
        raise ValueError(f"{path} is not a nanprobe run manifest; choose another --out")
    return data


def _bad_files(run_dir: Path, manifest: Mapping[str, Any], spec: RunSpec | Mapping[str, Any]
               ) -> list[tuple[Path, int | None, str]]:
    """``(path, sample or None, reason)`` of the capture files in ``run_dir`` that fail
    verification, and of sample files that are not part of the run (sample None)."""
    spec_d = asdict(spec) if isinstance(spec, RunSpec) else dict(spec)
    bad: list[tuple[Path, int | None, str]] = []
    for s in range(-1, spec_d["samples"]):
        path = sample_path(run_dir, s)
        if path.exists():
            reason = verify_capture(path, manifest, sample=s, seed=sample_seed(spec_d["seed"], s))
            if reason:
                bad.append((path, s, reason))
    expected = {sample_path(run_dir, s).name for s in range(spec_d["samples"])}
    for path in sorted((run_dir / "samples").glob("sample-*.h5")):
        if path.name not in expected:
            bad.append((path, None, f"not part of this run ({spec_d['samples']} samples)"))
    return bad


def _sequential(job_list: Iterable[dict], jobs: int):
    for job in job_list:
        try:
            run_job(job)
        except (RuntimeError, OSError, ValueError) as err:
            yield job, err
        else:
            yield job, None


def _init_worker() -> None:
    """Pool worker set-up: one torch thread; Ctrl-C is the parent's to handle; die with the
    parent (Linux), so that no worker outlives a killed run."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _process_pool(job_list: Iterable[dict], jobs: int):
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"),
                               initializer=_init_worker)
    finished = False
    try:
        futures = {pool.submit(run_job, job): job for job in job_list}
        for fut in as_completed(futures):
            yield futures[fut], fut.exception()
        finished = True
    finally:
        if not finished:  # stopped early: the workers must not go on writing
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.join(timeout=10)
        pool.shutdown(wait=True, cancel_futures=True)


def _threaded(execute: Callable[[dict], str]):
    def run_all(job_list: Iterable[dict], jobs: int):
        from .verrou import allow_workers, stop_workers

        allow_workers()
        pool = ThreadPoolExecutor(max_workers=jobs)
        finished = False
        try:
            futures = {pool.submit(execute, job): job for job in job_list}
            for fut in as_completed(futures):
                yield futures[fut], fut.exception()
            finished = True
        finally:
            if not finished:
                stop_workers()  # kills the Valgrind process groups; no retry starts
            pool.shutdown(wait=True, cancel_futures=True)
    return run_all


class Run:
    """A run directory opened for the analysis stages; arrays are read lazily from HDF5.

    Opening verifies it: no other process is writing it, and every capture file present opens,
    holds the expected datasets and matches ``run.json``'s provenance; otherwise a one-line
    ValueError names the files and the fix (rerunning ``nanprobe mca-run`` quarantines and
    recomputes them). ``verify=False`` skips the file checks (``mca_run`` verifies itself).
    """

    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise ValueError(f"{self.path} is not a nanprobe run directory (no {MANIFEST}); "
                             "create one with `nanprobe mca-run`")
        check_no_writer(self.path)
        self.manifest = _read_manifest(manifest)
        self.spec = self.manifest["spec"]
        self.layers: list[str] = self.manifest["layers"]
        if verify:
            bad = _bad_files(self.path, self.manifest, self.spec)
            if bad:
                listed = "; ".join(f"{path.relative_to(self.path)}: {why}"
                                   for path, _, why in bad[:3])
                raise ValueError(f"{self.path} holds {len(bad)} capture file(s) that cannot be "
                                 f"trusted ({listed}); rerun the same `nanprobe mca-run` to "
                                 "quarantine and recompute them")

    @cached_property
    def digest(self) -> str:
        """sha256 of the run's manifest and capture files (:func:`~nanprobe.integrity.run_digest`):
        results derived from the run record it, and are stale when it changes."""
        captures = [p for p in [self.reference_path, *self.sample_paths] if p.exists()]
        return run_digest(self.manifest, captures)

    def derived_from_this(self, path: str | Path) -> bool:
        """Whether the result file ``path`` records this run's :attr:`digest` (not stale)."""
        return recorded_digest(path) == self.digest

    @property
    def reference_path(self) -> Path:
        return sample_path(self.path, -1)

    @property
    def sample_paths(self) -> list[Path]:
        return sorted((self.path / "samples").glob("sample-*.h5"))

    @property
    def complete(self) -> bool:
        return self.reference_path.exists() and len(self.sample_paths) == self.spec["samples"]

    def keys(self) -> list[str]:
        """Dataset keys of the capture files, e.g. ``layers/enc.conv0/output`` and ``final``."""
        keys: list[str] = []
        with h5py.File(self.reference_path, "r") as h5:
            h5.visititems(lambda k, obj: keys.append(k) if isinstance(obj, h5py.Dataset) else None)
        return keys

    def reference(self, key: str, index=()) -> np.ndarray:
        """``key`` of the unperturbed reference, optionally indexed (e.g. one slice)."""
        with h5py.File(self.reference_path, "r") as h5:
            return h5[key][index]

    def sample(self, i: int, key: str, index=()) -> np.ndarray:
        with h5py.File(self.sample_paths[i], "r") as h5:
            return h5[key][index]

    def stack(self, key: str, index=()) -> np.ndarray:
        """``key`` of every sample stacked on a new first axis: (N, ...)."""
        return np.stack([self.sample(i, key, index) for i in range(len(self.sample_paths))])

    def attrs(self, sample: int = -1) -> dict[str, Any]:
        """Provenance attributes of the reference (-1) or of sample ``sample``."""
        path = self.reference_path if sample < 0 else self.sample_paths[sample]
        with h5py.File(path, "r") as h5:
            return dict(h5.attrs)
