"""Dask executor for :func:`nanprobe.run.mca_run`: each sample (and the reference) is one task.

::

    with dask_executor(cluster="local", workers=2) as executor:
        mca_run(spec, run_dir, executor=executor)

Where the tasks run: ``cluster="local"`` starts a ``LocalCluster`` of one-thread worker
processes on this machine; ``cluster="slurm"`` submits Slurm jobs of one-thread workers with
dask-jobqueue's ``SLURMCluster`` (settings: :class:`SlurmConfig`, from a YAML file and/or
keyword overrides), optionally inside an Apptainer image; ``scheduler="tcp://HOST:PORT"``
uses a running Dask scheduler and its workers.

Workers write the capture files into the run directory themselves (a filesystem shared with
the client, the HPC norm; relative input paths resolve in each worker's working directory)
or, with ``gather=True``, send each file's content back and the client writes it. Either way
a file appears only complete (temporary name, fsync, rename): a task lost with its worker and
rerun elsewhere leaves no partial or duplicate file, and rerunning resumes like a local run.
A sample's numbers depend only on its seed, so any worker computes the same bits.

Dask is an optional dependency: ``pip install nanprobe[dask]``.
"""

from __future__ import annotations

import contextlib
import importlib
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import CancelledError
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import torch

from .worker import run_job, run_job_bytes, write_atomic

if TYPE_CHECKING:
    from dask_jobqueue import SLURMCluster
    from distributed import Client

CLUSTERS = ("local", "slurm")
INSTALL_HINT = "install the dask extra: `pip install nanprobe[dask]`"


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise RuntimeError(f"the Dask executor needs {module.split('.')[0]} ({err}); "
                           f"{INSTALL_HINT}") from None


@dataclass(frozen=True)
class SlurmConfig:
    """Slurm worker jobs for ``cluster="slurm"``; YAML keys spell ``_`` as ``-`` (job-extra).

    Each job runs ``cores`` one-thread worker processes sharing ``memory``; ``job_extra``
    lines become ``#SBATCH`` directives (e.g. ``--qos=normal``). With ``image`` the workers
    run as ``apptainer exec [apptainer_args] --bind RUN_DIR IMAGE python``: the image needs
    the same nanprobe, dask and distributed versions as the client. ``python`` defaults to
    ``python`` in the image, else to the client's interpreter (a shared software install).
    """

    queue: str | None = None
    account: str | None = None
    walltime: str = "01:00:00"
    cores: int = 1
    memory: str = "4GB"
    job_extra: list[str] = field(default_factory=list)
    job_script_prologue: list[str] = field(default_factory=list)
    image: str | None = None
    apptainer: str = "apptainer"
    apptainer_args: list[str] = field(default_factory=list)
    python: str | None = None
    local_directory: str | None = None
    log_directory: str | None = None
    interface: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            key = f.name.replace("_", "-")
            if f.name == "cores":
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
                kind = "a positive integer"
            elif isinstance(f.default, str) or f.default is None:
                ok = value is None and f.default is None or isinstance(value, str)
                kind = "a string"
            else:
                ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
                kind = "a list of strings"
            if not ok:
                hint = " (quote it: YAML reads 2:00:00 as a number)" if key == "walltime" else ""
                raise ValueError(f"Slurm setting {key} must be {kind}, got {value!r}{hint}")

    @classmethod
    def load(cls, path: str | Path | None = None,
             overrides: Mapping[str, Any] | None = None) -> SlurmConfig:
        """Settings from the YAML mapping in ``path``, then ``overrides`` that are not None."""
        data: dict[str, Any] = {}
        if path is not None:
            yaml = _import("yaml")
            try:
                loaded = yaml.safe_load(Path(path).read_text())
            except (OSError, yaml.YAMLError) as err:
                raise ValueError(f"cannot read cluster config {path}: "
                                 f"{' '.join(str(err).split())}") from None
            if not isinstance(loaded, dict | None):
                raise ValueError(f"cluster config {path} must be a YAML mapping of settings")
            data = {str(k).replace("-", "_"): v for k, v in (loaded or {}).items()}
        data.update({k.replace("-", "_"): v for k, v in (overrides or {}).items()
                     if v is not None})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown Slurm setting(s) {', '.join(unknown)}"
                             f"{f' in {path}' if path else ''}; allowed: "
                             f"{', '.join(k.replace('_', '-') for k in known)}")
        return cls(**data)

    def worker_python(self, run_dir: str | Path | None = None) -> str:
        """The command that starts the workers' Python, in the image when one is set."""
        if self.image is None:
            return shlex.quote(self.python or sys.executable)
        binds = ["--bind", str(Path(run_dir).absolute())] if run_dir is not None else []
        return shlex.join([self.apptainer, "exec", *self.apptainer_args, *binds, self.image,
                           self.python or "python"])


def slurm_cluster(config: SlurmConfig, run_dir: str | Path | None = None) -> SLURMCluster:
    """A ``dask_jobqueue.SLURMCluster`` of one-thread workers, not scaled (no job submitted).

    ``run_dir`` (created) is bound into the Apptainer image so that workers can write there.
    ``cluster.job_script()`` shows the script each worker job will run.
    """
    jobqueue = _import("dask_jobqueue")
    if config.image is not None and run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    return jobqueue.SLURMCluster(
        queue=config.queue, account=config.account, walltime=config.walltime,
        cores=config.cores, processes=config.cores, memory=config.memory,
        job_extra_directives=config.job_extra, job_script_prologue=config.job_script_prologue,
        python=config.worker_python(run_dir), local_directory=config.local_directory,
        log_directory=config.log_directory, interface=config.interface,
        job_name="nanprobe-worker")


def _run_task(job: dict, gather: bool) -> str | bytes:
    """Worker side: one job with one torch thread; the file's bytes if ``gather``."""
    torch.set_num_threads(1)
    return run_job_bytes(job) if gather else run_job(job)


class DaskExecutor:
    """An ``mca_run`` executor submitting each job as one task to ``client``'s cluster.

    Yields ``(job, error_or_None)`` as tasks finish. ``retries``: re-runs of a task that
    raised; a task whose worker died is rerun per the scheduler's ``allowed-failures`` (set
    to ``retries`` by :func:`dask_executor` for the clusters it starts), then reported as
    failed (``KilledWorker``). Parallelism is the cluster's: ``jobs`` is ignored.
    """

    def __init__(self, client: Client, *, gather: bool = False, retries: int = 2) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.client, self.gather, self.retries = client, gather, retries

    def __call__(self, job_list: Iterable[dict],
                 jobs: int = 1) -> Iterator[tuple[dict, BaseException | None]]:
        as_completed = _import("distributed").as_completed
        job_list = list(job_list)
        backends = {job["spec"]["backend"]["name"] for job in job_list} - {"inprocess"}
        if backends:
            raise ValueError(f"the Dask executor runs the inprocess backend only, not "
                             f"{', '.join(sorted(backends))}; run Verrou samples locally (--jobs)")
        pending = {}
        for job in job_list:
            task = {**job, "out": str(Path(job["out"]).absolute())}
            key = f"nanprobe-{Path(job['out']).stem}-{uuid4().hex}"
            fut = self.client.submit(_run_task, task, self.gather, key=key,
                                     retries=self.retries)
            pending[fut] = job
        try:
            for fut in as_completed(list(pending)):
                job = pending.pop(fut)
                yield job, self._finish(fut, job)
        finally:  # stopped early (interrupted, disk full): drop the tasks not yet run
            if pending:
                self.client.cancel(list(pending))

    def _finish(self, fut, job: dict) -> BaseException | None:
        """Error of a finished task, or None once its file is in place."""
        try:
            result = fut.result()
        except CancelledError:
            raise RuntimeError("the Dask scheduler cancelled the run's tasks (scheduler or "
                               "connection lost); rerun to resume") from None
        except Exception as err:  # the task's own error, or KilledWorker
            return err
        out = Path(job["out"])
        if self.gather:
            try:
                write_atomic(out, lambda tmp: tmp.write_bytes(result))
            except OSError as err:
                return err
        else:  # partial files of workers that died on this task
            for tmp in out.parent.glob(f".{out.name}.tmp-*"):
                tmp.unlink(missing_ok=True)
        return None


@contextlib.contextmanager
def dask_executor(
    *,
    cluster: str | None = None,
    scheduler: str | None = None,
    workers: int = 2,
    cluster_config: str | Path | None = None,
    slurm: Mapping[str, Any] | None = None,
    gather: bool = False,
    retries: int = 2,
    run_dir: str | Path | None = None,
    connect_timeout: float = 30.0,
) -> Iterator[DaskExecutor]:
    """Start (or connect to) a Dask cluster and yield an executor for ``mca_run``.

    ``cluster``: ``local`` (default without ``scheduler``: ``workers`` one-thread processes
    here) or ``slurm`` (``workers`` one-thread workers in Slurm jobs of ``cores`` workers each,
    :class:`SlurmConfig` from ``cluster_config`` YAML, then the ``slurm`` overrides);
    ``scheduler``: address of a running scheduler instead. The client and any cluster started
    here are closed on exit, also on errors and Ctrl-C. ValueError for bad options or config,
    RuntimeError when Dask is missing, the scheduler is unreachable or sbatch fails.
    """
    distributed = _import("distributed")
    if scheduler is not None and cluster is not None:
        raise ValueError("--scheduler and --cluster exclude each other: give one")
    cluster = cluster or ("local" if scheduler is None else None)
    if cluster is not None and cluster not in CLUSTERS:
        raise ValueError(f"cluster must be one of {', '.join(CLUSTERS)}, got {cluster!r}")
    if cluster != "slurm" and (cluster_config is not None or any(
            v is not None for v in (slurm or {}).values())):
        raise ValueError("--cluster-config and Slurm settings apply to --cluster slurm only")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    config = SlurmConfig.load(cluster_config, slurm) if cluster == "slurm" else None
    if config is not None and shutil.which("sbatch") is None:
        raise RuntimeError("sbatch not found: --cluster slurm must run where Slurm jobs can be "
                           "submitted (a login node), or use --scheduler")
    with contextlib.ExitStack() as stack:
        # the scheduler of a cluster started here runs in this process and reads this setting
        with _import("dask").config.set({"distributed.scheduler.allowed-failures": retries}):
            if cluster == "local":
                target = stack.enter_context(distributed.LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True))
            elif cluster == "slurm":
                target = stack.enter_context(slurm_cluster(config, run_dir))
                _check_job_script(target)
                target.scale(n=workers)
            else:
                target = scheduler
        try:
            client = stack.enter_context(distributed.Client(target, timeout=connect_timeout))
        except (OSError, TimeoutError) as err:
            raise RuntimeError(f"cannot reach the Dask scheduler at {scheduler}: "
                               f"{' '.join(str(err).split())}; start one with `dask scheduler` "
                               "and workers with `dask worker ADDRESS --nthreads 1`, or check "
                               "--scheduler") from None
        yield DaskExecutor(client, gather=gather, retries=retries)


def _check_job_script(cluster: SLURMCluster) -> None:
    """``sbatch --test-only`` of the worker job script (nothing is submitted).

    ``cluster.scale`` submits in the background, where a refused job (bad partition, account
    or limits) would only be logged while the run waits for workers: refuse it here instead.
    """
    with tempfile.NamedTemporaryFile("w", prefix="nanprobe-worker-", suffix=".sh") as script:
        script.write(cluster.job_script())
        script.flush()
        result = subprocess.run(["sbatch", "--test-only", script.name], capture_output=True,
                                text=True, check=False)
    if result.returncode != 0:
        message = " ".join((result.stderr or result.stdout).split())
        raise RuntimeError(f"Slurm refuses the worker jobs: {message[-400:]}; check the Slurm "
                           "settings (--cluster-config)")
