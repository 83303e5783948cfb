"""MCA runs: N perturbed samples + one unperturbed reference of the same inference, on disk.

A run directory holds ``run.json`` (spec, layers, provenance), ``reference.h5`` and
``samples/sample-XXXX.h5``. Each file is written under a temporary name and renamed when
complete, so rerunning the same command resumes: complete samples are kept byte for byte,
incomplete ones are redone, and a different spec is refused unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from . import __version__
from .capture import dry_shapes, select_layers
from .jsonio import json_safe, write_json
from .worker import JOB_FORMAT, model_and_input, run_job

BACKENDS = ("inprocess", "verrou")
MCA_MODES = ("rr", "sr", "mca", "flop")
MANIFEST = "run.json"


@dataclass
class RunSpec:
    """Everything that determines a run's numbers (compared on resume)."""

    model: str = "default"
    input: str = "default"
    samples: int = 10
    seed: int = 0
    backend: dict[str, Any] = field(default_factory=lambda: {"name": "inprocess",
                                                             "mode": "flop", "precision": 24})
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


def _remove_stale_temporaries(run_dir: Path) -> None:
    for tmp in [*run_dir.glob(".*.tmp-*"), *(run_dir / "samples").glob(".*.tmp-*")]:
        tmp.unlink()


def estimate_bytes(spec: RunSpec) -> tuple[int, list[tuple[str, int]]]:
    """Uncompressed bytes of one capture file and the per-key bytes, largest first."""
    loaded, prepared = model_and_input(asdict(spec))
    names = select_layers(loaded.model, spec.layers)
    shapes = dry_shapes(loaded.model, names, prepared.tensor[:1])
    per_key = sorted(((s.key, s.nbytes * prepared.tensor.shape[0]) for s in shapes),
                     key=lambda kv: -kv[1])
    return sum(b for _, b in per_key), per_key


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


def _verrou_executor(spec: RunSpec, run_dir: Path, valgrind: str | None, timeout: float | None):
    """A function running one job under Valgrind/Verrou in a separate process."""
    from . import verrou

    exe = verrou.find_valgrind(valgrind)
    verrou.require_verrou(exe)
    jobs_dir = run_dir / "jobs"
    jobs_dir.mkdir(exist_ok=True)

    def execute(job: dict) -> str:
        stem = Path(job["out"]).stem
        mode = "nearest" if job["sample"] < 0 else spec.backend.get("rounding_mode", "random")
        job_path = jobs_dir / f"{stem}.json"
        inv = verrou.worker_invocation(exe, job_path, rounding_mode=mode, seed=job["seed"])
        write_json(job_path, {**job, "backend_provenance": inv.provenance})
        result = verrou.run_worker(inv.cmd, inv.env, timeout=timeout,
                                   log_path=jobs_dir / f"{stem}.log")
        if not result.ok:
            raise RuntimeError(result.describe())
        return job["out"]

    return execute


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
    executor: Callable[[Iterable[dict], int], Iterable[tuple[dict, BaseException | None]]]
    | None = None,
) -> Run:
    """Compute the reference and the missing samples of ``spec`` into ``run_dir``.

    ``on_progress(done, total)`` follows completed files. Raises :class:`RunFailed` after
    finishing everything else if some samples kept failing; ValueError for bad options, a
    different spec already in ``run_dir`` (unless ``overwrite``) or an estimate above ``max_gb``.
    """
    spec.validate()
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    run_dir = Path(run_dir)
    _check_writable(run_dir)
    manifest = run_dir / MANIFEST
    spec_dict = asdict(spec)
    if manifest.exists():
        old = json.loads(manifest.read_text()).get("spec", {})
        if old != spec_dict:
            changed = sorted(k for k in set(old) | set(spec_dict) if old.get(k) != spec_dict.get(k))
            if not overwrite:
                raise ValueError(f"{run_dir} holds a run with a different spec (differs in: "
                                 f"{', '.join(changed)}); pass --overwrite or choose another --out")
            shutil.rmtree(run_dir / "samples")
            (run_dir / "samples").mkdir()
            with contextlib.suppress(FileNotFoundError):
                (run_dir / "reference.h5").unlink()
    _remove_stale_temporaries(run_dir)

    total_bytes, per_key = estimate_bytes(spec)
    files = spec.samples + 1
    if total_bytes * files > max_gb * 1e9:
        top = ", ".join(f"{k.removeprefix('layers/')} {b / 1e6:.0f} MB" for k, b in per_key[:4])
        raise ValueError(f"the run would write about {total_bytes * files / 1e9:.1f} GB "
                         f"(> --max-gb {max_gb}): {files} files of {total_bytes / 1e6:.0f} MB; "
                         f"largest per file: {top}; select fewer --layers or --slices")
    loaded, prepared = model_and_input(spec_dict)
    layers = select_layers(loaded.model, spec.layers)
    content = {
        "format": "nanprobe-run/1", "spec": spec_dict, "layers": layers,
        "input": prepared.provenance(), "weights_sha256": loaded.weights_sha256,
        "nanprobe_version": __version__, "torch_version": torch.__version__,
        "estimated_bytes_per_file": total_bytes,
    }
    old = json.loads(manifest.read_text()) if manifest.exists() else {}
    if {k: v for k, v in old.items() if k != "created"} != json_safe(content):
        write_json(manifest, {**content, "created": datetime.now(timezone.utc).isoformat()})
    # else: a resumed run keeps its manifest (and its mtime, which later steps compare with)

    todo = [s for s in range(-1, spec.samples) if not sample_path(run_dir, s).exists()]
    job_list = [{"format": JOB_FORMAT, "spec": spec_dict, "sample": s,
                 "seed": sample_seed(spec.seed, s), "out": str(sample_path(run_dir, s)),
                 "layers": layers} for s in todo]
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
    for job, error in executor(job_list, jobs):
        if error is None:
            done += 1
            if on_progress:
                on_progress(done, files)
        else:
            failures.append(SampleFailure(job["sample"], " ".join(str(error).split())))
    if failures:
        raise RunFailed(failures)
    return Run(run_dir)


def _sequential(job_list: Iterable[dict], jobs: int):
    for job in job_list:
        try:
            run_job(job)
        except (RuntimeError, OSError, ValueError) as err:
            yield job, err
        else:
            yield job, None


def _process_pool(job_list: Iterable[dict], jobs: int):
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = {pool.submit(run_job, job): job for job in job_list}
        for fut in as_completed(futures):
            yield futures[fut], fut.exception()


def _threaded(execute: Callable[[dict], str]):
    def run_all(job_list: Iterable[dict], jobs: int):
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(execute, job): job for job in job_list}
            for fut in as_completed(futures):
                yield futures[fut], fut.exception()
    return run_all


class Run:
    """A run directory opened for the analysis stages; arrays are read lazily from HDF5."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise ValueError(f"{self.path} is not a nanprobe run directory (no {MANIFEST}); "
                             "create one with `nanprobe mca-run`")
        self.manifest = json.loads(manifest.read_text())
        self.spec = self.manifest["spec"]
        self.layers: list[str] = self.manifest["layers"]

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
