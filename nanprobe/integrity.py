"""What a run directory guarantees: one writer at a time, capture files that are verified before
they are trusted, quarantine instead of silent reuse, writes that fail cleanly when the disk
fills, and a digest tying every derived result to the exact run it was computed from.

- :class:`RunLock`: ``fcntl`` lock on ``RUN/.lock`` holding the writer's pid; a second writer
  is refused naming it, a reader (:func:`check_no_writer`) refuses while a writer is active;
- :func:`verify_capture`: a capture file opens, is complete, holds every expected dataset with
  its shape and dtype, and carries provenance matching ``run.json``; otherwise the reason;
- :func:`quarantine`: moves a bad file to ``RUN/quarantine/`` with a JSON note of why;
- :func:`run_digest`: sha256 of the manifest and of each capture file's identity (name,
  size, seed, finish time); derived artifacts record it and are stale when it changes;
- :class:`GuardedFile`: the file object capture files are written through: a failing write
  (ENOSPC, EIO) is remembered and later writes are discarded, so that HDF5 never sees an I/O
  error (it crashes the interpreter on one) and the writer can stop and clean up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py

LOCK_FILE = ".lock"
QUARANTINE_DIR = "quarantine"
#: capture-file attributes that must equal the manifest's (attribute -> how to read it there)
_PROVENANCE_CHECKS = ("model", "weights_sha256", "nanify", "backend", "input", "layers",
                      "precision", "nanprobe_version", "torch_version")

_held: dict[Path, tuple[int, int]] = {}  # run dir -> (fd, depth): the lock is reentrant


class RunBusy(ValueError):
    """Another process holds the run directory."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    return f"pid {info.get('pid', '?')} ({info.get('command', 'nanprobe')}, since " \
           f"{info.get('since', '?')})"


class RunLock:
    """Exclusive writer lock of a run directory (reentrant within a process).

    ``RUN/.lock`` holds the holder's pid, command and start time; the lock itself is an
    ``fcntl.flock`` on it, released by the kernel when the holder dies (kill -9 included).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).resolve()

    def __enter__(self) -> RunLock:
        if self.run_dir in _held:
            fd, depth = _held[self.run_dir]
            _held[self.run_dir] = (fd, depth + 1)
            return self
        path = self.run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunBusy(f"{self.run_dir} is in use by {_holder(path)}; wait for it to finish "
                          "or choose another --out") from None
        info = {"pid": os.getpid(), "command": " ".join(Path(a).name if i == 0 else a
                                                        for i, a in enumerate(sys.argv[:3])),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _held[self.run_dir] = (fd, 1)
        return self

    def __exit__(self, *exc: object) -> None:
        fd, depth = _held[self.run_dir]
        if depth > 1:
            _held[self.run_dir] = (fd, depth - 1)
            return
        del _held[self.run_dir]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def check_no_writer(run_dir: str | Path) -> None:
    """RunBusy when another process holds ``run_dir``'s writer lock (this one may)."""
    run_dir = Path(run_dir).resolve()
    path = run_dir / LOCK_FILE
    if run_dir in _held or not path.exists():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # unreadable lock file: nothing we can check
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunBusy(f"{run_dir} is being written by {_holder(path)}; wait for it to finish"
                      ) from None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# verification


def _loads(text: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


def _provenance_mismatch(attrs: Mapping[str, Any], manifest: Mapping[str, Any]) -> str | None:
    spec = manifest.get("spec", {})
    inp = manifest.get("input", {})
    found = _loads(attrs.get("input_provenance")) or {}
    expected: dict[str, tuple[Any, Any]] = {
        "model": (attrs.get("model"), spec.get("model")),
        "weights_sha256": (attrs.get("weights_sha256") or None, manifest.get("weights_sha256")),
        "nanify": (attrs.get("nanify") or None, spec.get("nanify")),
        "backend": (_loads(attrs.get("backend")), spec.get("backend")),
        "input": ({k: found.get(k) for k in inp}, dict(inp)),
        "layers": (_loads(attrs.get("layers")), manifest.get("layers")),
        "precision": (attrs.get("precision"), manifest.get("precision")),
        "nanprobe_version": (attrs.get("nanprobe_version"), manifest.get("nanprobe_version")),
        "torch_version": (attrs.get("torch_version"), manifest.get("torch_version")),
    }
    for name in _PROVENANCE_CHECKS:
        got, want = expected[name]
        if want is not None and got != want:
            return f"its {name} ({_short(got)}) differs from run.json's ({_short(want)})"
    return None


def _short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 1] + "…"


def verify_capture(path: str | Path, manifest: Mapping[str, Any], *, sample: int,
                   seed: int) -> str | None:
    """Why the capture file at ``path`` cannot be trusted as sample ``sample`` (-1: the
    reference, drawn with ``seed``) of the run described by ``manifest``, or None if it can.

    Checks: HDF5 opens (a truncated file does not), the writer finished it, its provenance
    matches the manifest, and it holds every dataset of ``manifest["datasets"]`` with the
    recorded shape and dtype.
    """
    try:
        with h5py.File(path, "r") as h5:
            attrs = dict(h5.attrs)
            if "finished" not in attrs:
                return "it was never finished (no 'finished' attribute)"
            if attrs.get("sample") != sample or attrs.get("seed") != seed:
                return (f"it holds sample {attrs.get('sample')} with seed {attrs.get('seed')}, "
                        f"expected sample {sample} with seed {seed}")
            mismatch = _provenance_mismatch(attrs, manifest)
            if mismatch:
                return mismatch
            datasets = manifest.get("datasets") or {"final": None}
            for key, want in datasets.items():
                if key not in h5 or not isinstance(h5[key], h5py.Dataset):
                    return f"dataset {key} is missing"
                if want is not None:
                    got = {"shape": list(h5[key].shape), "dtype": str(h5[key].dtype)}
                    if got != want:
                        return f"dataset {key} is {got}, expected {want}"
    except OSError as err:  # h5py reports truncated and corrupt files as OSError
        return f"it cannot be read ({' '.join(str(err).split())})"
    return None


def quarantine(run_dir: str | Path, path: str | Path, reason: str) -> Path:
    """Move the bad file ``path`` into ``RUN/quarantine/`` (with ``NAME.json`` saying why);
    returns its new path. Nothing is deleted: a researcher can still look at it."""
    qdir = Path(run_dir) / QUARANTINE_DIR
    qdir.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    dest = qdir / f"{stamp}-{Path(path).name}"
    os.replace(path, dest)
    note = {"file": str(Path(path).relative_to(run_dir)), "reason": reason,
            "quarantined": datetime.now(timezone.utc).isoformat()}
    dest.with_name(dest.name + ".json").write_text(json.dumps(note, indent=2) + "\n")
    return dest


def run_digest(manifest: Mapping[str, Any], captures: list[Path]) -> str:
    """sha256 identifying a run's content: its manifest and each capture file's name, size,
    seed and finish time (HDF5 attributes: read in milliseconds, unlike the data)."""
    h = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode())
    for path in captures:
        with h5py.File(path, "r") as h5:
            ident = [path.name, path.stat().st_size, str(h5.attrs.get("finished")),
                     int(h5.attrs.get("seed", -1))]
        h.update(json.dumps(ident).encode())
    return h.hexdigest()


def recorded_digest(path: str | Path) -> str | None:
    """The run digest a derived result records: the ``run_digest`` attribute of an HDF5 file
    (``sigdigits.h5``), or ``run_digest`` at the top or in ``provenance`` of a JSON file; None
    when the file records none or cannot be read."""
    path = Path(path)
    try:
        if path.suffix == ".h5":
            with h5py.File(path, "r") as h5:
                value = h5.attrs.get("run_digest")
        else:
            data = json.loads(path.read_text())
            value = data.get("run_digest") or (data.get("provenance") or {}).get("run_digest")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


# ---------------------------------------------------------------------------------------------
# signals


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where cleanup can run (see :func:`interruptible`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_uninterrupted = 0  # depth of uninterrupted() sections (main thread)
_pending: int | None = None  # a signal that arrived inside one


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block (main thread only), SIGINT and SIGTERM raise :class:`Interrupted`, so
    that cleanup runs instead of the process dying mid-write, except inside
    :func:`uninterrupted` sections, where the signal waits for the section's end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        global _pending
        if _uninterrupted:
            _pending = signum
        else:
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A section no signal may interrupt (calls into HDF5, which cannot survive an exception
    raised in its file callbacks); a signal that arrives meanwhile is raised at its end."""
    global _uninterrupted, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _uninterrupted += 1
    try:
        yield
    finally:
        _uninterrupted -= 1
        if not _uninterrupted and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)


# ---------------------------------------------------------------------------------------------
# writing through full disks


class GuardedFile:
    """A binary file for ``h5py.File(GuardedFile(path), "w")`` that never reports a write
    error to HDF5: the first failing write/flush/truncate is kept in :attr:`error` and every
    later write is discarded (positions advance as if written). The caller checks
    :attr:`error` after each batch and after closing, and fails cleanly.

    Unbuffered: a buffered file flushes on ``seek``, so a full disk would surface there, in a
    call HDF5 cannot survive.
    """

    def __init__(self, path: str | Path) -> None:
        self._f = open(path, "w+b", buffering=0)  # noqa: SIM115 - closed by close()
        self.error: OSError | None = None

    def _guard(self, fn, *args):
        if self.error is None:
            try:
                return fn(*args)
            except OSError as err:
                self.error = err
        return None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        start = self._f.tell()
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    written = self._f.write(view[done:])
                    if not written:
                        raise OSError(errno.EIO, "the file accepted no more bytes")
                    done += written
                return done
            except OSError as err:
                self.error = err
        self._f.seek(start + len(view))
        return len(view)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def readinto(self, buf) -> int:
        return self._f.readinto(buf)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def truncate(self, size: int | None = None) -> int:
        done = self._guard(self._f.truncate, size)
        return done if done is not None else (size if size is not None else self._f.tell())

    def flush(self) -> None:
        """Nothing to flush (unbuffered); kept for the file protocol."""

    def sync(self) -> None:
        """fsync (an error is kept like the writes')."""
        self._guard(os.fsync, self._f.fileno())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()


class WriteFailed(OSError):
    """A result file could not be written (its temporary is gone); the message is one line."""

    def __str__(self) -> str:
        return str(self.strerror)


def write_failed(err: OSError, path: Path) -> WriteFailed:
    """The one-line :class:`WriteFailed` for ``path`` after the I/O error ``err``."""
    if isinstance(err, WriteFailed):
        return err
    if err.errno == errno.ENOSPC:
        free = shutil.disk_usage(path.parent).free
        return WriteFailed(errno.ENOSPC, f"no space left on device while writing {path} "
                           f"({free / 1e6:.0f} MB free); free some space or choose another "
                           "--out, then rerun the same command to resume")
    return WriteFailed(err.errno, f"cannot write {path}: {err.strerror or err}")
