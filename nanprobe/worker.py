"""Run one sample (or the reference) of an MCA run and write its capture file atomically.

Used in process (in-process backend), in Dask workers (:mod:`nanprobe.distributed`) and as
``python -m nanprobe.worker JOB.json`` under Valgrind/Verrou. A job is plain JSON (never pickle)::

    {"format": "nanprobe-job/1", "spec": {...RunSpec...}, "sample": 3,   # -1: reference
     "seed": 123456, "out": "RUN/samples/sample-0003.h5", "layers": ["enc.conv0", ...],
     "backend_provenance": {...}}
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import lru_cache, partial
from pathlib import Path

import h5py
import torch

from . import __version__
from .capture import capture, select_layers
from .inputs import PreparedInput, prepare_input
from .models.registry import LoadedModel, load

JOB_FORMAT = "nanprobe-job/1"


@lru_cache(maxsize=2)
def _prepared(spec_json: str) -> tuple[LoadedModel, PreparedInput]:
    """Model (nanified if asked) and input of a spec; cached per process across samples."""
    spec = json.loads(spec_json)
    loaded = load(spec["model"], checkpoint=spec.get("checkpoint"), view=spec.get("view"),
                  trust=spec.get("trust", False))
    if spec.get("nanify"):
        from .ops import nanify

        nanify(loaded.model, config=spec["nanify"])
    prepared = prepare_input(spec["input"], loaded, slices=spec.get("slices"),
                             view=spec.get("view"))
    return loaded, prepared


def model_and_input(spec: dict) -> tuple[LoadedModel, PreparedInput]:
    """The (cached) model and prepared input of a run spec."""
    return _prepared(json.dumps(spec, sort_keys=True))


def _perturbation(spec: dict, sample: int, seed: int):
    """Context-manager factory entered around each forward, or None (unperturbed)."""
    backend = spec["backend"]
    if backend["name"] == "verrou":
        from .verrou import instrumentation

        return instrumentation
    if sample < 0:
        return None
    from .mca import mca_mode

    mode = mca_mode(backend.get("mode", "rr"), seed=seed, precision=backend.get("precision", 24))
    return lambda: mode


def _attrs(loaded: LoadedModel, prepared: PreparedInput, job: dict) -> dict:
    spec = job["spec"]
    return {
        "nanprobe_version": __version__,
        "torch_version": str(torch.__version__),
        "model": spec["model"],
        "checkpoint": spec.get("checkpoint") or "",
        "weights_sha256": loaded.weights_sha256 or "",
        "nanify": spec.get("nanify") or "",
        "sample": job["sample"],
        "kind": "reference" if job["sample"] < 0 else "sample",
        "seed": job["seed"],
        "backend": json.dumps(spec["backend"], sort_keys=True),
        "backend_provenance": json.dumps(job.get("backend_provenance", {}), sort_keys=True),
        "input_provenance": json.dumps(prepared.provenance(), sort_keys=True),
        "layers": json.dumps(job["layers"]),
        "precision": str(prepared.tensor.dtype).replace("torch.", ""),
        "started": datetime.now(timezone.utc).isoformat(),
    }


def _check_format(job: dict) -> None:
    if job.get("format") != JOB_FORMAT:
        raise ValueError(f"not a nanprobe job (format {job.get('format')!r}, "
                         f"expected {JOB_FORMAT!r})")


def _write_capture(job: dict, path: Path) -> None:
    """Run ``job`` and write its capture file to ``path`` (created or truncated)."""
    loaded, prepared = model_and_input(job["spec"])
    names = select_layers(loaded.model, job["layers"])
    t0 = time.perf_counter()
    with h5py.File(path, "w") as h5:
        h5.attrs.update(_attrs(loaded, prepared, job))
        capture(loaded.model, prepared.tensor, h5, names,
                batch_size=job["spec"].get("batch_size", 4),
                context=_perturbation(job["spec"], job["sample"], job["seed"]))
        h5.attrs["finished"] = datetime.now(timezone.utc).isoformat()
        h5.attrs["seconds"] = time.perf_counter() - t0


def write_atomic(out: str | Path, fill: Callable[[Path], object]) -> str:
    """Let ``fill(tmp)`` write a temporary sibling of ``out``, fsync it, rename it to ``out``.

    ``out`` appears only complete. The temporary, ``.NAME.tmp-HOST-PID`` (unique across the
    machines of a cluster; mca_run removes leftovers as stale), is removed on error.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        fill(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return str(out)


def run_job(job: dict) -> str:
    """Run one job; the output appears at ``job["out"]`` only once complete. Returns its path."""
    _check_format(job)
    return write_atomic(job["out"], partial(_write_capture, job))


def run_job_bytes(job: dict) -> bytes:
    """Run one job into a private temporary file and return the file's content.

    ``job["out"]`` is not touched: the caller writes the bytes there (e.g. a Dask client
    gathering results from workers without a shared filesystem, with :func:`write_atomic`).
    """
    _check_format(job)
    with tempfile.TemporaryDirectory(prefix="nanprobe-job-") as tmp:
        path = Path(tmp) / "capture.h5"
        _write_capture(job, path)
        return path.read_bytes()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m nanprobe.worker JOB.json", file=sys.stderr)
        return 2
    torch.set_num_threads(int(os.environ.get("NANPROBE_THREADS", "1")))
    run_job(json.loads(Path(args[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
