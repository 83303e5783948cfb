"""Dask executor: real LocalCluster runs equal local runs bit for bit, survive a killed worker,
resume after an interrupted client; SLURMCluster job scripts and a full run through stand-ins
for sbatch/scancel/apptainer (no Slurm here); one-line errors."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import pytest

distributed = pytest.importorskip("distributed", reason="Dask not installed: "
                                  "pip install nanprobe[dask]")
pytest.importorskip("dask_jobqueue", reason="dask-jobqueue not installed: "
                    "pip install nanprobe[dask]")
psutil = pytest.importorskip("psutil")  # a dependency of distributed

from nanprobe.distributed import DaskExecutor, SlurmConfig, dask_executor, slurm_cluster  # noqa: E402
from nanprobe.run import Run, RunFailed, RunSpec, mca_run  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Port 8787 is already in use")  # many clusters

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 6
VARYING_ATTRS = {"started", "finished", "seconds"}


def _spec() -> RunSpec:
    return RunSpec(model="mnist", input="mnist", slices="0:6", samples=SAMPLES)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(run: Run) -> list[Path]:
    return [run.reference_path, *run.sample_paths]


def _assert_same_as(run: Run, local: Run) -> None:
    """Every capture file of ``run`` has the datasets (bit for bit) and attributes of ``local``."""
    assert [p.relative_to(run.path) for p in _files(run)] == [
        p.relative_to(local.path) for p in _files(local)]
    for mine, theirs in zip(_files(run), _files(local), strict=True):
        with h5py.File(mine, "r") as a, h5py.File(theirs, "r") as b:
            keys = _dataset_keys(b)
            assert len(keys) > 10 and _dataset_keys(a) == keys
            for key in keys:
                assert a[key].dtype == b[key].dtype
                np.testing.assert_array_equal(a[key][()], b[key][()], err_msg=f"{mine}: {key}")
            assert {k: v for k, v in a.attrs.items() if k not in VARYING_ATTRS} == {
                k: v for k, v in b.attrs.items() if k not in VARYING_ATTRS}
    assert not list(run.path.rglob(".*tmp*"))


def _dataset_keys(h5: h5py.File) -> list[str]:
    keys: list[str] = []
    h5.visititems(lambda k, obj: keys.append(k) if isinstance(obj, h5py.Dataset) else None)
    return keys


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids, timeout: float = 30) -> bool:
    deadline = time.time() + timeout
    while not all(_gone(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    return all(_gone(p) for p in pids)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Run:
    """The same run with the default (sequential, in-process) executor."""
    return mca_run(_spec(), tmp_path_factory.mktemp("local") / "run")


@pytest.fixture(scope="module")
def executor():
    with dask_executor(cluster="local", workers=2) as ex:
        yield ex


def test_dask_runs_equal_the_local_run_bit_for_bit(executor, local_run, tmp_path):
    shared = mca_run(_spec(), tmp_path / "shared", executor=executor)
    _assert_same_as(shared, local_run)
    gathered = mca_run(_spec(), tmp_path / "gather",
                       executor=DaskExecutor(executor.client, gather=True))
    _assert_same_as(gathered, local_run)
    workers = executor.client.scheduler_info()["workers"].values()
    assert [w["nthreads"] for w in workers] == [1, 1]


def test_killed_worker_its_tasks_rerun_nothing_lost_or_duplicated(executor, local_run,
                                                                  tmp_path):
    client = executor.client
    killed: dict = {}

    def kill_a_busy_worker_after_first_result(job_list, jobs):
        for i, result in enumerate(executor(job_list, jobs)):
            if i == 0:  # the other tasks are queued or running on the workers
                address, keys = max(client.processing().items(), key=lambda kv: len(kv[1]))
                assert keys
                killed["address"], killed["keys"] = address, keys
                killed["pid"] = client.run(os.getpid, workers=[address])[address]
                os.kill(killed["pid"], signal.SIGKILL)
                killed["at"] = datetime.now(timezone.utc).isoformat()
            yield result

    run = mca_run(_spec(), tmp_path / "run", executor=kill_a_busy_worker_after_first_result)
    assert _wait_gone([killed["pid"]])
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it, under a new address
    assert killed["address"] not in client.scheduler_info()["workers"]
    assert run.complete and len(list((run.path / "samples").iterdir())) == SAMPLES
    lost = {key.rsplit("-", 1)[0].removeprefix("nanprobe-") for key in killed["keys"]}
    for path in _files(run):
        if path.stem in lost:  # computed again after the kill
            with h5py.File(path, "r") as h5:
                assert h5.attrs["started"] > killed["at"]
    _assert_same_as(run, local_run)


def test_a_failing_sample_is_reported_and_the_others_complete(executor, local_run, tmp_path):
    def break_sample_1(job_list, jobs):
        yield from executor([{**job, "layers": ["no-such-layer"]} if job["sample"] == 1 else job
                             for job in job_list], jobs)

    with pytest.raises(RunFailed, match=r"1 sample\(s\) failed \(sample 1: .*no-such-layer"):
        mca_run(_spec(), tmp_path / "run", executor=break_sample_1)
    assert len(Run(tmp_path / "run").sample_paths) == SAMPLES - 1
    _assert_same_as(mca_run(_spec(), tmp_path / "run", executor=executor), local_run)


def test_resume_after_interrupting_the_client(executor, local_run, tmp_path):
    out = tmp_path / "run"

    def interrupted_after_two(ex):
        def run_jobs(job_list, jobs):
            for i, result in enumerate(ex(job_list, jobs), 1):
                yield result
                if i == 2:
                    raise KeyboardInterrupt
        return run_jobs

    with pytest.raises(KeyboardInterrupt), dask_executor(cluster="local", workers=1) as first:
        pids = list(first.client.run(os.getpid).values())
        mca_run(_spec(), out, executor=interrupted_after_two(first))
    assert first.client.status == "closed"
    assert _wait_gone(pids)  # the cluster went down with the client
    kept = {p: (_digest(p), p.stat().st_mtime_ns) for p in out.rglob("*.h5")}
    assert 2 <= len(kept) < SAMPLES + 1
    run = mca_run(_spec(), out, executor=executor)
    assert {p: (_digest(p), p.stat().st_mtime_ns) for p in kept} == kept
    _assert_same_as(run, local_run)


SLURM_YAML = """\
queue: short
account: proj42
walltime: "00:20:00"
cores: 2
memory: 4GB
job-extra: [--qos=debug, "--constraint=avx2"]
job-script-prologue: [export NANPROBE_JOB=1]
image: {image}
apptainer-args: [--bind, /scratch]
python: {python}
"""


def _slurm_yaml(tmp_path: Path) -> Path:
    """SLURM_YAML with an (empty) image file and this interpreter as the workers' Python."""
    image = tmp_path / "nanprobe.sif"
    image.touch()
    path = tmp_path / "slurm.yaml"
    path.write_text(SLURM_YAML.format(image=image, python=sys.executable))
    return path


def test_slurm_job_script_has_directives_and_apptainer_command(tmp_path):
    # options override the file (walltime), unset ones (None) leave it alone (queue)
    config = SlurmConfig.load(_slurm_yaml(tmp_path), {"walltime": "00:30:00", "queue": None})
    with slurm_cluster(config, tmp_path / "run") as cluster:
        script = cluster.job_script()
    lines = script.splitlines()
    for directive in ("-p short", "-A proj42", "-t 00:30:00", "--cpus-per-task=2", "--mem=4G",
                      "--qos=debug", "--constraint=avx2", "-J nanprobe-worker"):
        assert f"#SBATCH {directive}" in lines
    assert "export NANPROBE_JOB=1" in lines
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line)
    assert worker.startswith(f"apptainer exec --bind /scratch --bind {tmp_path / 'run'} "
                             f"{tmp_path / 'nanprobe.sif'} {sys.executable} -m "
                             "distributed.cli.dask_worker tcp://")
    for option in ("--nthreads 1 ", "--nworkers 2 ", "--memory-limit 1.86GiB ", "--nanny"):
        assert option in worker  # 2 one-thread workers sharing 4 GB
    assert (tmp_path / "run").is_dir()  # exists before Apptainer binds it

    shipped = SlurmConfig.load(ROOT / "docker" / "slurm-cluster.yaml")
    assert shipped.image and shipped.walltime == "02:00:00" and shipped.job_extra
    with slurm_cluster(shipped) as cluster:
        script = cluster.job_script()
    assert "#SBATCH -p compute" in script and "#SBATCH --qos=normal" in script
    assert f"apptainer exec --bind /scratch {shipped.image} python -m " in script


def _fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    """sbatch/scancel/apptainer stand-ins on PATH: a job runs its script here, in the
    background; apptainer runs the command without a container."""
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    state.mkdir()
    scripts = {
        "sbatch": """
            if [ -n "$FAKE_SBATCH_ERROR" ]; then echo "$FAKE_SBATCH_ERROR" >&2; exit 1; fi
            if [ "$1" = --test-only ]; then echo "sbatch: Job 1 to start at now" >&2; exit 0; fi
            cp "$1" "$FAKE_SLURM/job.sh"
            setsid bash "$FAKE_SLURM/job.sh" >> "$FAKE_SLURM/job.log" 2>&1 < /dev/null &
            echo "Submitted batch job $!"
            """,
        "scancel": """
            echo "$1" >> "$FAKE_SLURM/cancelled"
            kill -TERM -- "-$1" 2> /dev/null
            exit 0
            """,
        "apptainer": """
            echo "$@" >> "$FAKE_SLURM/apptainer"
            [ "$1" = exec ] || exit 2
            shift
            while [ "${1#--}" != "$1" ]; do shift 2; done
            [ -f "$1" ] || { echo "no image $1" >&2; exit 3; }
            shift
            exec "$@"
            """,
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + "\n".join(line.strip() for line in body.splitlines()))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(state))
    return state


def test_slurm_cluster_runs_through_sbatch_and_apptainer_standins(tmp_path, monkeypatch,
                                                                local_run):
    state = _fake_slurm(tmp_path, monkeypatch)
    config = _slurm_yaml(tmp_path)
    out = tmp_path / "run"
    with dask_executor(cluster="slurm", workers=1, cluster_config=config,
                       slurm={"queue": "long", "cores": 1}, run_dir=out) as ex:
        ex.client.wait_for_workers(1, timeout=120)  # else the job script failed: job.log
        job_pid = int(next(iter(ex.client.cluster.workers.values())).job_id)
        run = mca_run(_spec(), out, executor=ex)
        job_processes = [job_pid, *(c.pid for c in psutil.Process(job_pid).children(True))]
    _assert_same_as(run, local_run)
    assert "#SBATCH -p long" in (state / "job.sh").read_text()
    assert f"--bind {out} {tmp_path / 'nanprobe.sif'} " in (state / "apptainer").read_text()
    assert (state / "cancelled").read_text().split() == [str(job_pid)]
    assert len(job_processes) >= 3 and _wait_gone(job_processes)  # bash, nanny, worker

    monkeypatch.setenv("FAKE_SBATCH_ERROR", "sbatch: error: invalid partition specified: nope")
    with pytest.raises(RuntimeError, match="Slurm refuses .*invalid partition specified: nope"):
        with dask_executor(cluster="slurm", cluster_config=config):
            pass


def test_bad_options_give_one_line_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("queue: q\npartition: p\n")
    with pytest.raises(ValueError, match="unknown Slurm setting.*partition.*allowed: queue"):
        SlurmConfig.load(bad)
    bad.write_text("walltime: 2:00:00\n")  # YAML 1.1: sexagesimal 7200
    with pytest.raises(ValueError, match="walltime must be a string.*quote it"):
        SlurmConfig.load(bad)
    bad.write_text("- queue\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        SlurmConfig.load(bad)
    with pytest.raises(ValueError, match="cores must be a positive integer"):
        SlurmConfig.load(overrides={"cores": 0})
    with pytest.raises(ValueError, match="cannot read cluster config"):
        SlurmConfig.load(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="exclude each other"):
        with dask_executor(cluster="local", scheduler="tcp://127.0.0.1:1"):
            pass
    with pytest.raises(ValueError, match="apply to --cluster slurm only"):
        with dask_executor(cluster="local", cluster_config=bad):
            pass
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    with pytest.raises(RuntimeError, match="sbatch not found"):
        with dask_executor(cluster="slurm"):
            pass
    with pytest.raises(RuntimeError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        with dask_executor(scheduler="tcp://127.0.0.1:9", connect_timeout=1):
            pass
    verrou = {"spec": {"backend": {"name": "verrou"}}, "out": "x.h5", "sample": 0}
    with pytest.raises(ValueError, match="inprocess backend only"):
        next(DaskExecutor(client=None)([verrou], 1))
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if Dask were not installed
    with pytest.raises(RuntimeError, match=r"pip install nanprobe\[dask\]"):
        with dask_executor():
            pass
