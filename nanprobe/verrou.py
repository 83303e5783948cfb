"""Verrou backend plumbing: find Valgrind+Verrou, build worker command lines, run workers.

With ``--backend verrou`` every sample is its own process::

    valgrind --tool=verrou --rounding-mode=random --vr-seed=SEED --count-op=no \\
        --check-nan=no --check-inf=no --exclude=EXCLUDE --instr-atstart=no \\
        REAL_PYTHON -m nanprobe.worker JOB.json

The launcher is generic over the Valgrind tool (``tool="none"`` drops the Verrou-only
options), so the same plumbing is tested under a stock Valgrind. ``verrou/README.md`` says
why each option is there.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .jsonio import write_text

__all__ = [
    "CONTAINER_VALGRIND",
    "DETERMINISTIC_MODES",
    "ENV_PYBINDING",
    "ENV_VALGRIND",
    "ROUNDING_MODES",
    "STOCHASTIC_MODES",
    "Invocation",
    "VerrouError",
    "WorkerResult",
    "build_command",
    "check_rounding_mode",
    "default_exclude_file",
    "exclude_template",
    "find_pybinding",
    "find_valgrind",
    "instrumentation",
    "parse_version",
    "provenance",
    "real_python",
    "render_exclude",
    "require_verrou",
    "run_worker",
    "valgrind_info",
    "worker_env",
    "worker_invocation",
]

ENV_VALGRIND = "NANPROBE_VALGRIND"
"""Environment variable naming the Valgrind (with Verrou) to use."""
ENV_PYBINDING = "NANPROBE_VERROU_PYBINDING"
"""Set in the worker env: directory holding Verrou's ``valgrind/verrouPyBinding.py``."""
CONTAINER_VALGRIND = "/opt/verrou/bin/valgrind"
"""Where the nanprobe container (docker/Dockerfile) installs Valgrind+Verrou."""

_CONTAINER_HINT = (
    "build the nanprobe container (docker build -f docker/Dockerfile -t nanprobe .; "
    f"see docker/README.md) or point {ENV_VALGRIND} at a Valgrind built with Verrou"
)

STOCHASTIC_MODES: tuple[str, ...] = (
    "random", "random_det", "random_comdet", "random_scomdet",
    "nearness", "nearness_det", "nearness_comdet", "nearness_scomdet",
    "prandom", "prandom_det", "prandom_comdet",
    "average", "average_det", "average_comdet", "average_scomdet",
    "sr_monotonic", "sr_smonotonic",
)
"""Rounding modes that draw random numbers (they need ``--vr-seed``)."""
DETERMINISTIC_MODES: tuple[str, ...] = tuple(m for m in STOCHASTIC_MODES if "det" in m)
"""Hash-based modes: identical operations round identically, so exact ties stay tied."""
ROUNDING_MODES: tuple[str, ...] = (
    "nearest", "upward", "downward", "toward_zero", "away_zero", "farthest", "float", "native",
    *STOCHASTIC_MODES,
)
"""Values nanprobe accepts for Verrou's ``--rounding-mode``."""

# Variables that can force AVX-512 code paths. Valgrind does not emulate AVX-512 (it hides it
# from CPUID), so a forced AVX-512 kernel dies of SIGILL under Valgrind.
_AVX512_OVERRIDES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR",
                     "NPY_ENABLE_CPU_FEATURES", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA")
# Valgrind runs one thread at a time: threads only add overhead, samples run as processes.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS",
                "NANPROBE_THREADS")


class VerrouError(RuntimeError):
    """Valgrind/Verrou is missing or unusable; the message is one line saying what to do."""


# --------------------------------------------------------------------------- locating


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_valgrind(path: str | os.PathLike[str] | None = None) -> Path:
    """The Valgrind launcher: ``path`` if given, else ``$NANPROBE_VALGRIND``, else ``PATH``.

    Only locates it; :func:`require_verrou` checks that it has the Verrou tool.
    """
    if path is not None:
        candidate, origin = Path(path), "given path"
    elif os.environ.get(ENV_VALGRIND):
        candidate, origin = Path(os.environ[ENV_VALGRIND]), f"${ENV_VALGRIND}"
    else:
        found = shutil.which("valgrind")
        if found is None:
            raise VerrouError(f"valgrind not found (no {ENV_VALGRIND}, none on PATH): "
                              f"{_CONTAINER_HINT}")
        candidate, origin = Path(found), "PATH"
    if candidate.is_dir():  # an installation prefix or its bin/
        inner = candidate / "bin" / "valgrind"
        candidate = inner if inner.exists() else candidate / "valgrind"
    if not _executable(candidate):
        raise VerrouError(f"valgrind from {origin} is not an executable file: {candidate}; "
                          f"{_CONTAINER_HINT}")
    return candidate.absolute()


_VERSION_RE = re.compile(
    r"valgrind-(?P<vg>\d+(?:\.\d+)+)(?:[+._-]?verrou[-_]?(?P<vr>[0-9A-Za-z][\w.+-]*))?",
    re.IGNORECASE)


def parse_version(text: str) -> tuple[str | None, str | None]:
    """(Valgrind version, Verrou version or None) from ``valgrind --version`` output.

    Verrou builds report e.g. ``valgrind-3.26.0+verrou-2.7.0`` or ``valgrind-3.25.0.verrou-dev``.
    """
    m = _VERSION_RE.search(text)
    if m is None:
        return None, None
    return m.group("vg"), m.group("vr")


@lru_cache(maxsize=16)
def _info(path: str, _mtime_ns: int) -> tuple[str | None, str | None, bool, str]:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
        help_ = subprocess.run([path, "--tool=verrou", "--help"], capture_output=True,
                               text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VerrouError(f"cannot run {path}: {exc}; {_CONTAINER_HINT}") from exc
    version, verrou = parse_version(out.stdout + out.stderr)
    has_tool = help_.returncode == 0 and "rounding-mode" in help_.stdout + help_.stderr
    first = (help_.stdout + help_.stderr).strip().splitlines()
    return version, verrou, has_tool, first[0] if first else ""


def valgrind_info(valgrind: str | os.PathLike[str]) -> dict:
    """``{"path", "version", "verrou_version"}`` of a Valgrind launcher.

    ``verrou_version`` is None when ``--tool=verrou`` does not start, ``"unknown"`` when the
    tool works but the version string does not name Verrou's release.
    """
    path = Path(valgrind).absolute()
    version, verrou, has_tool, _ = _info(str(path), path.stat().st_mtime_ns)
    if has_tool and verrou is None:
        verrou = "unknown"
    return {"path": str(path), "version": version, "verrou_version": verrou if has_tool else None}


def require_verrou(valgrind: str | os.PathLike[str]) -> dict:
    """:func:`valgrind_info`, raising a one-line :class:`VerrouError` if Verrou is missing."""
    info = valgrind_info(valgrind)
    if info["verrou_version"] is None:
        path = Path(valgrind).absolute()
        why = _info(str(path), path.stat().st_mtime_ns)[3]
        shown = f"valgrind-{info['version']}" if info["version"] else "unknown version"
        raise VerrouError(f"{path} ({shown}) has no Verrou tool ({why or 'no output'}): "
                          f"{_CONTAINER_HINT}")
    return info


def find_pybinding(valgrind: str | os.PathLike[str]) -> Path | None:
    """The site-packages directory holding Verrou's ``valgrind/verrouPyBinding.py``, if any.

    Verrou installs it under ``<prefix>/lib/python3.X/site-packages/valgrind/`` where
    ``<prefix>`` is the directory above the launcher's ``bin/``.
    """
    return _binding_site(Path(os.path.realpath(valgrind)).parent.parent)


def _binding_site(prefix: Path) -> Path | None:
    for pattern in ("lib*/python3*/*-packages", "local/lib*/python3*/*-packages"):
        for site_dir in sorted(prefix.glob(pattern)):
            if (site_dir / "valgrind" / "verrouPyBinding.py").is_file():
                return site_dir
    return None


def real_python() -> str:
    """The interpreter binary itself (symlinks resolved), for Valgrind to exec.

    Valgrind must run the ELF interpreter: a shell shim would be instrumented instead, and
    the Python it then starts would run natively. :func:`worker_env` keeps a virtual
    environment's site-packages visible to the resolved binary.
    """
    if not sys.executable:
        raise VerrouError("sys.executable is empty: cannot tell which Python the workers run")
    path = os.path.realpath(sys.executable)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"\x7fELF":
        raise VerrouError(f"{path} is not an ELF binary (a shell shim?): run nanprobe with "
                          "the interpreter itself")
    return path


# --------------------------------------------------------------------------- environment


def _in_venv() -> bool:
    return sys.prefix != getattr(sys, "base_prefix", sys.prefix)


def worker_env(base_env: Mapping[str, str] | None = None, *,
               pybinding_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Environment of a worker run under Valgrind.

    One thread everywhere; no variable forcing AVX-512 code (``OPENBLAS_CORETYPE`` always
    removed); no ``VERROU_*`` variable (they would override the command line); unbuffered
    output and faulthandler for useful log tails; the NaN ops' torch path (numba would
    compile its kernels under Valgrind); the current virtual environment kept
    visible to :func:`real_python`; ``$NANPROBE_VERROU_PYBINDING`` set when Verrou's
    Python binding is used (see :func:`instrumentation`).
    """
    env = dict(os.environ if base_env is None else base_env)
    env.pop("OPENBLAS_CORETYPE", None)
    for name in _AVX512_OVERRIDES:
        if "avx512" in env.get(name, "").lower():
            del env[name]
    for name in [n for n in env if n.startswith("VERROU_")]:
        del env[name]
    env.pop(ENV_PYBINDING, None)
    for name in _THREAD_VARS:
        env[name] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"
    env["NANPROBE_KERNELS"] = "torch"  # no LLVM compilation under Valgrind (minutes there)
    if _in_venv():
        # The resolved binary would not find pyvenv.cfg next to itself; since Python 3.11
        # PYTHONEXECUTABLE makes it compute the venv's prefix (with .pth files processed).
        env["PYTHONEXECUTABLE"] = sys.executable
        env["VIRTUAL_ENV"] = sys.prefix
        if sys.version_info < (3, 11):
            import site

            extra = os.pathsep.join(site.getsitepackages())
            env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH")) if p)
    if pybinding_dir is not None:
        env[ENV_PYBINDING] = str(Path(pybinding_dir).absolute())
    return env


# --------------------------------------------------------------------------- exclusions


def exclude_template() -> Path:
    """The packaged exclusion template (``nanprobe/assets/verrou_exclude.txt``)."""
    return Path(str(resources.files("nanprobe").joinpath("assets", "verrou_exclude.txt")))


def _loaded_objects() -> list[str]:
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = set()
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            paths.add(fields[5])
    return sorted(paths)


def _first_loaded(pattern: str) -> str | None:
    for path in _loaded_objects():
        if fnmatch.fnmatch(os.path.basename(path), pattern):
            return os.path.realpath(path)
    return None


def _placeholders() -> dict[str, str | None]:
    """Canonical paths of the objects the template names (None: absent here)."""
    import ctypes
    import ctypes.util

    libm = _first_loaded("libm.so*") or _first_loaded("libm-*.so*")
    if libm is None and (name := ctypes.util.find_library("m")):
        ctypes.CDLL(name)
        libm = _first_loaded("libm.so*") or _first_loaded("libm-*.so*")
    libmvec = None
    if libm is not None:
        candidate = Path(libm).parent / "libmvec.so.1"
        libmvec = os.path.realpath(candidate) if candidate.exists() else None
    try:
        import numpy

        umath_mod = getattr(getattr(numpy, "_core", None), "_multiarray_umath", None)
        if umath_mod is None:
            from numpy.core import _multiarray_umath as umath_mod  # numpy < 2
        umath = os.path.realpath(umath_mod.__file__)
    except (ImportError, AttributeError, TypeError):
        umath = None
    return {
        "libm": libm,
        "libmvec": libmvec,
        "numpy_umath": umath,
        "python": real_python(),
        "libpython": _first_loaded("libpython3*.so*"),
    }


def render_exclude(dest: str | os.PathLike[str], template: str | os.PathLike[str] | None = None,
                   ) -> Path:
    """Write Verrou's exclusion file for this interpreter from ``template``; returns ``dest``.

    Each ``{name}`` becomes a canonical path (rules whose object is absent are dropped); a
    literal path is canonicalised; blank lines and trailing comments never reach Verrou
    (its parser would take them for part of a path).
    """
    src = Path(template) if template is not None else exclude_template()
    values = _placeholders()
    rules: list[str] = []
    for lineno, raw in enumerate(src.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise VerrouError(f"{src}:{lineno}: expected 'FNNAME OBJNAME', got {line!r}")
        fn, obj = parts[0], parts[1].strip()
        if m := re.fullmatch(r"\{(\w+)\}", obj):
            if m.group(1) not in values:
                raise VerrouError(f"{src}:{lineno}: unknown placeholder {obj} "
                                  f"(known: {', '.join(sorted(values))})")
            resolved = values[m.group(1)]
            if resolved is None:
                continue
            obj = resolved
        elif obj.startswith("/"):
            obj = os.path.realpath(obj)
        rules.append(f"{fn}\t{obj}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Verrou exclusion rules rendered by nanprobe from {src}\n"
              f"# for {real_python()}: FNNAME<TAB>OBJNAME, '*' matches anything\n")
    write_text(dest, header + "".join(r + "\n" for r in rules))  # atomic, unique temporary
    return dest


def default_exclude_file(dest: str | os.PathLike[str] | None = None) -> Path:
    """The default exclusions rendered for this machine (see ``verrou/README.md``).

    Written to ``dest`` (e.g. into the run directory, for provenance) or, by default, to a
    per-user temporary directory under a name derived from its contents.
    """
    if dest is not None:
        return render_exclude(dest)
    cache = Path(tempfile.gettempdir()) / f"nanprobe-{os.getuid()}"
    cache.mkdir(mode=0o700, exist_ok=True)
    staged = render_exclude(cache / f".exclude-{os.getpid()}-{threading.get_ident()}.txt")
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()[:16]
    final = cache / f"verrou-exclude-{digest}.txt"
    os.replace(staged, final)
    return final


# --------------------------------------------------------------------------- command line


def check_rounding_mode(mode: str) -> str:
    """Validate a Verrou rounding mode; warn on hash-based (``*_det``) modes."""
    if mode not in ROUNDING_MODES:
        raise ValueError(f"unknown Verrou rounding mode {mode!r}; "
                         f"choose from {', '.join(ROUNDING_MODES)}")
    if mode in DETERMINISTIC_MODES:
        warnings.warn(
            f"--rounding-mode={mode} rounds identical operations identically, so exactly tied "
            "windows stay tied and instabilities are missed (0 unstable windows where "
            "'random' found 2,266 of 16,384); use it only to replay a sample",
            UserWarning, stacklevel=3)
    return mode


def build_command(
    valgrind: str | os.PathLike[str],
    *,
    tool: str = "verrou",
    rounding_mode: str = "random",
    seed: int | None = None,
    exclude: str | os.PathLike[str] | None = None,
    instr_atstart: bool | None = None,
    extra: Sequence[str] = (),
    python: str | os.PathLike[str] | None = None,
    module: str | None = "nanprobe.worker",
    args: Sequence[str | os.PathLike[str]] = (),
) -> list[str]:
    """``valgrind --tool=TOOL [Verrou options] [extra] PYTHON [-m MODULE] ARGS...``.

    Verrou options (``tool="verrou"`` only): ``--rounding-mode``, ``--vr-seed`` (required for
    stochastic modes), ``--count-op=no --check-nan=no --check-inf=no`` (about 35 % faster),
    ``--exclude`` and ``--instr-atstart``. ``instr_atstart=None`` (default) means ``no``
    (perturb only inside :func:`instrumentation`) when Verrou's Python binding is installed
    next to ``valgrind``, else ``yes`` (the whole process); ``False`` without the binding is
    refused, since nothing would be perturbed. With ``module=None`` the ``args`` go straight
    to Python (a script, or ``-c CODE``).
    """
    cmd = [str(valgrind), f"--tool={tool}"]
    if tool == "verrou":
        check_rounding_mode(rounding_mode)
        if seed is None and rounding_mode in STOCHASTIC_MODES:
            raise ValueError(f"--rounding-mode={rounding_mode} needs a seed (--vr-seed)")
        if seed is not None and not 0 <= int(seed) < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        cmd.append(f"--rounding-mode={rounding_mode}")
        if seed is not None:
            cmd.append(f"--vr-seed={int(seed)}")
        cmd += ["--count-op=no", "--check-nan=no", "--check-inf=no"]
        if exclude is not None:
            path = Path(exclude)
            if not path.is_file():
                raise VerrouError(f"exclusion file not found: {path}")
            if "{" in path.read_text():
                raise VerrouError(f"{path} is a template: pass render_exclude()'s output")
            cmd.append(f"--exclude={path.absolute()}")
        binding = find_pybinding(valgrind)
        if instr_atstart is None:
            instr_atstart = binding is None
        elif not instr_atstart and binding is None and Path(valgrind).is_file():
            raise VerrouError(f"--instr-atstart=no needs Verrou's Python binding "
                              f"(valgrind/verrouPyBinding.py), none next to {valgrind}: "
                              "nothing would be perturbed; leave instr_atstart=None")
        cmd.append(f"--instr-atstart={'yes' if instr_atstart else 'no'}")
    cmd += [str(x) for x in extra]
    cmd.append(str(python) if python is not None else real_python())
    if module is not None:
        cmd += ["-m", module]
    cmd += [str(a) for a in args]
    return cmd


def provenance(info: Mapping[str, object], cmd: Sequence[str], *, rounding_mode: str,
               seed: int | None, exclude: str | os.PathLike[str] | None = None) -> dict:
    """What to record with a Verrou sample instead of promising bit-reproducibility.

    ``random`` rounding with a fixed ``--vr-seed`` is not bit-reproducible in a Python
    process, so the seed, the versions and the exact command line are what is kept.
    """
    rec: dict = {
        "backend": "verrou",
        "valgrind": info.get("path"),
        "valgrind_version": info.get("version"),
        "verrou_version": info.get("verrou_version"),
        "rounding_mode": rounding_mode,
        "seed": seed,
        "command": shlex.join(cmd),
        "perturbed": "forward pass only" if "--instr-atstart=no" in cmd else "whole process",
        "bit_reproducible": False,
    }
    if exclude is not None:
        data = Path(exclude).read_bytes()
        rec["exclude_file"] = str(exclude)
        rec["exclude_sha256"] = hashlib.sha256(data).hexdigest()
        rec["exclude_rules"] = [ln for ln in data.decode().splitlines()
                                if ln and not ln.startswith("#")]
    return rec


@dataclass(frozen=True)
class Invocation:
    """A ready-to-run worker: its command line, environment and provenance record."""

    cmd: list[str]
    env: dict[str, str]
    provenance: dict = field(default_factory=dict)


def worker_invocation(
    valgrind: str | os.PathLike[str],
    job_path: str | os.PathLike[str],
    *,
    rounding_mode: str = "random",
    seed: int | None = None,
    exclude: str | os.PathLike[str] | None | bool = True,
    extra: Sequence[str] = (),
    base_env: Mapping[str, str] | None = None,
    tool: str = "verrou",
) -> Invocation:
    """Everything to run ``nanprobe.worker JOB`` under Verrou (the reference: ``nearest``).

    ``exclude=True`` renders the default exclusions (next to the job file), ``False``/None
    excludes nothing, a path uses that rendered file (render it once when several workers
    start at once). Perturbation is limited to the forward pass when Verrou's Python binding
    is installed, else it covers the process. ``tool="none"``: the same worker under
    ``valgrind --tool=none`` (no perturbation; checks the set-up).
    """
    info = require_verrou(valgrind) if tool == "verrou" else valgrind_info(valgrind)
    pybinding = find_pybinding(valgrind)
    if exclude is True:
        exclude = default_exclude_file(Path(job_path).with_name("verrou_exclude.txt"))
    elif exclude is False:
        exclude = None
    cmd = build_command(valgrind, tool=tool, rounding_mode=rounding_mode, seed=seed,
                        exclude=exclude, extra=extra, args=(str(job_path),))
    env = worker_env(base_env, pybinding_dir=pybinding)
    rec = provenance(info, cmd, rounding_mode=rounding_mode, seed=seed, exclude=exclude)
    return Invocation(cmd=cmd, env=env, provenance=rec)


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class WorkerResult:
    """Outcome of :func:`run_worker` (after retries).

    ``returncode`` is the last attempt's exit status (negative: killed by that signal, None:
    could not start); ``seconds`` the wall time of all attempts; ``timed_out`` whether the
    last attempt ran out of time; ``log_tail`` the end of the last attempt's log.
    """

    returncode: int | None
    attempts: int
    log_tail: str
    seconds: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        """Whether the (last) attempt exited 0 in time."""
        return self.returncode == 0 and not self.timed_out

    def describe(self) -> str:
        """One line: how the worker ended (the log tail is reported separately)."""
        if self.timed_out:
            how = "timed out (process group killed)"
        elif self.returncode is None:
            how = "could not start"
        elif self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            how = f"killed by {name}"
            if name == "SIGILL":
                how += " (an AVX-512 kernel under Valgrind? see verrou/README.md)"
        else:
            how = f"exit status {self.returncode}"
        n = self.attempts
        return f"{how} after {n} attempt{'s' if n > 1 else ''} ({self.seconds:.1f} s)"


def _kill_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM then SIGKILL the worker's whole process group (its own session)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # stragglers left by a leader that exited on SIGTERM
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(path: Path, start: int, lines: int, max_bytes: int = 16384) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        f.seek(max(start, end - max_bytes))
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


_live: set[subprocess.Popen] = set()  # running workers, for stop_workers()
_live_lock = threading.Lock()
_stopping = threading.Event()


def stop_workers(grace: float = 2.0) -> None:
    """Kill every running worker's process group; no worker starts again until
    :func:`allow_workers` (a run was interrupted)."""
    with _live_lock:
        _stopping.set()
        procs = list(_live)
    for proc in procs:
        _kill_group(proc, grace)


def allow_workers() -> None:
    """Let :func:`run_worker` start workers again (a new run begins)."""
    _stopping.clear()


def run_worker(
    cmd: Sequence[str | os.PathLike[str]],
    env: Mapping[str, str] | None,
    *,
    timeout: float | None,
    log_path: str | os.PathLike[str],
    retries: int = 1,
    cwd: str | os.PathLike[str] | None = None,
    tail_lines: int = 30,
    kill_grace: float = 5.0,
) -> WorkerResult:
    """Run ``cmd`` in its own session, output appended to ``log_path``; retry on failure.

    A crash or a timeout (the whole process group is killed) is retried up to ``retries``
    times; the result carries the tail of the last attempt's log and never raises for a
    failing worker, so the caller reports it and goes on with the other samples.
    """
    argv = [str(c) for c in cmd]
    log = Path(log_path)
    log.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    rc: int | None = None
    timed_out = False
    tail = ""
    attempt = 0
    for attempt in range(1, retries + 2):
        with open(log, "ab") as fh:
            fh.write(f"=== nanprobe worker attempt {attempt}/{retries + 1}: "
                     f"{shlex.join(argv)}\n".encode())
            fh.flush()
            start = fh.tell()
            t0 = time.monotonic()
            timed_out = False
            try:
                with _live_lock:
                    if _stopping.is_set():
                        raise OSError("the run was stopped")
                    proc = subprocess.Popen(argv, env=None if env is None else dict(env),
                                            cwd=cwd, stdin=subprocess.DEVNULL, stdout=fh,
                                            stderr=subprocess.STDOUT, start_new_session=True)
                    _live.add(proc)
            except OSError as exc:
                fh.write(f"cannot start: {exc}\n".encode())
                rc = None
            else:
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _kill_group(proc, kill_grace)
                else:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)  # leftovers only
                finally:
                    with _live_lock:
                        _live.discard(proc)
                rc = proc.returncode
            end = (f"timed out after {timeout} s, process group killed" if timed_out
                   else f"exit status {rc}")
            fh.write(f"=== attempt {attempt} ended: {end} ({time.monotonic() - t0:.1f} s)\n"
                     .encode())
        tail = _tail(log, start, tail_lines)
        if (rc == 0 and not timed_out) or _stopping.is_set():
            break
    return WorkerResult(returncode=rc, attempts=attempt, log_tail=tail,
                        seconds=time.monotonic() - t_start, timed_out=timed_out)


# --------------------------------------------------------------------------- in the worker

_binding = None
_depth = 0


def _preloads() -> list[str]:
    return os.environ.get("LD_PRELOAD", "").replace(" ", ":").split(":")


def _under_valgrind() -> bool:
    return any(os.path.basename(p).startswith("vgpreload") for p in _preloads())


def _binding_dir() -> str | None:
    """``$NANPROBE_VERROU_PYBINDING``, else the binding of the Verrou this process runs in.

    Under Verrou, Valgrind preloads ``<prefix>/libexec/valgrind/vgpreload_verrou-*.so``; the
    binding is looked up under that ``<prefix>`` exactly as :func:`build_command` does, so
    both sides agree on ``--instr-atstart``.
    """
    if os.environ.get(ENV_PYBINDING):
        return os.environ[ENV_PYBINDING]
    for entry in _preloads():
        if os.path.basename(entry).startswith("vgpreload_verrou"):
            site = _binding_site(Path(os.path.realpath(entry)).parents[2])
            return str(site) if site is not None else None
    return None


def _load_binding(site_dir: str):
    """Import Verrou's ``valgrind.verrouPyBinding`` from ``site_dir``."""
    global _binding
    if _binding is None:
        if site_dir not in sys.path:
            sys.path.append(site_dir)
        try:
            from valgrind import verrouPyBinding  # type: ignore[import-not-found]
        except (ImportError, SystemExit) as exc:  # the binding exits when its .so is missing
            raise VerrouError(f"Verrou's Python binding under {site_dir} failed to load "
                              f"({exc!r}); without it --instr-atstart=no perturbs nothing"
                              ) from exc
        _binding = verrouPyBinding
    return _binding


@contextlib.contextmanager
def instrumentation() -> Iterator[bool]:
    """Perturb floating point only inside this block (Verrou with ``--instr-atstart=no``).

    Active under Valgrind when Verrou's Python binding is known (``$NANPROBE_VERROU_PYBINDING``
    or found next to the running Verrou); a no-op otherwise (native run, ``--tool=none``, or
    no binding, in which case the launcher passed ``--instr-atstart=yes``). Yields whether
    instrumentation was toggled. Nesting is fine.
    """
    global _depth
    site_dir = _binding_dir() if _under_valgrind() else None
    if site_dir is None:
        yield False
        return
    binding = _load_binding(site_dir)
    if _depth == 0:
        binding.start_instrumentation()
    _depth += 1
    try:
        yield True
    finally:
        _depth -= 1
        if _depth == 0:
            binding.stop_instrumentation()
