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
import threading
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
from .integrity import GuardedFile, WriteFailed, uninterrupted, write_failed
from .models.registry import LoadedModel, load

JOB_FORMAT = "nanprobe-job/1"


@lru_cache(maxsize=2)
def _prepared(spec_json: str, _files: tuple) -> tuple[LoadedModel, PreparedInput]:
    """Model (nanified if asked) and input of a spec; cached per process across samples
    (``_files``: the referenced files' stamps, so that a changed file is read again)."""
    spec = json.loads(spec_json)
    loaded = load(spec["model"], checkpoint=spec.get("checkpoint"), view=spec.get("view"),
                  trust=spec.get("trust", False))
    if spec.get("nanify"):
        from .ops import nanify

        nanify(loaded.model, config=spec["nanify"])
    prepared = prepare_input(spec["input"], loaded, slices=spec.get("slices"),
                             view=spec.get("view"))
    return loaded, prepared


def _stamp(path: str | None) -> tuple | None:
    """(size, mtime) of a file the spec names, None for named assets ("default")."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return None if st is None else (st.st_size, st.st_mtime_ns, st.st_ino)


def model_and_input(spec: dict) -> tuple[LoadedModel, PreparedInput]:
    """The (cached) model and prepared input of a run spec; re-read when a file it names (input,
    checkpoint, nanify config) changed on disk."""
    files = tuple(_stamp(spec.get(k)) for k in ("input", "checkpoint", "nanify"))
    return _prepared(json.dumps(spec, sort_keys=True), files)


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


class IdentityMismatch(ValueError):
    """This process's model or input differ from the run's: no sample of it may be written."""


def _check_identity(job: dict, loaded: LoadedModel, prepared: PreparedInput) -> None:
    """:class:`IdentityMismatch` when this process's model or input differ from the run's
    (``job["expect"]``, the manifest's checksums): samples of different weights or inputs
    must never mix."""
    expect = job.get("expect") or {}
    spec = job["spec"]
    weights = expect.get("weights_sha256")
    if weights and loaded.weights_sha256 != weights:
        fix = ("seed it (torch.manual_seed inside the factory) or pass --checkpoint"
               if ":" in spec["model"] else "the weights file changed; use another --out")
        raise IdentityMismatch(f"model {spec['model']} gave weights with sha256 "
                         f"{str(loaded.weights_sha256)[:12]}… in this process but "
                         f"{weights[:12]}… in the run (run.json): it is not deterministic "
                         f"across processes; {fix}")
    data = expect.get("input_sha256")
    if data and prepared.sha256 != data:
        raise IdentityMismatch(f"input {spec['input']} changed while the run was in progress "
                         f"(sha256 {prepared.sha256[:12]}…, run.json has {data[:12]}…); "
                         "restore it, or start again with --overwrite")


def _write_capture(job: dict, path: Path) -> None:
    """Run ``job`` and write its capture file to ``path`` (created or truncated).

    The file is written through a :class:`~nanprobe.integrity.GuardedFile`: a failing write
    (a full disk) stops the run after the current batch with a one-line OSError, and HDF5
    never sees the error (it would crash the interpreter).
    """
    loaded, prepared = model_and_input(job["spec"])
    _check_identity(job, loaded, prepared)
    names = select_layers(loaded.model, job["layers"])
    t0 = time.perf_counter()
    sink = GuardedFile(path)

    def check(_done: int = 0) -> None:
        if sink.error is not None:
            raise write_failed(sink.error, Path(job["out"]))

    with contextlib.ExitStack() as stack:
        stack.callback(sink.close)
        with uninterrupted():
            h5 = stack.enter_context(_closing_uninterrupted(h5py.File(sink, "w")))
            h5.attrs.update(_attrs(loaded, prepared, job))
        capture(loaded.model, prepared.tensor, h5, names,
                batch_size=job["spec"].get("batch_size", 4),
                context=_perturbation(job["spec"], job["sample"], job["seed"]),
                on_batch=check)
        with uninterrupted():
            h5.attrs["finished"] = datetime.now(timezone.utc).isoformat()
            h5.attrs["seconds"] = time.perf_counter() - t0
            h5.close()
            sink.sync()
    check()


@contextlib.contextmanager
def _closing_uninterrupted(h5: h5py.File):
    """``h5``, closed on the way out (errors included) where no signal can interrupt HDF5."""
    try:
        yield h5
    finally:
        with uninterrupted():
            h5.close()


def write_atomic(out: str | Path, fill: Callable[[Path], object]) -> str:
    """Let ``fill(tmp)`` write a temporary sibling of ``out``, fsync it, rename it to ``out``.

    ``out`` appears only complete. The temporary, ``.NAME.tmp-HOST-PID-THREAD`` (unique across
    the machines, processes and threads of a cluster; mca_run removes leftovers as stale), is
    removed on error; an I/O error (a full disk) becomes a one-line OSError naming ``out``.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}-"
                        f"{threading.get_ident()}")
    try:
        fill(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except WriteFailed:
        raise
    except OSError as err:
        raise write_failed(err, out) from err
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
