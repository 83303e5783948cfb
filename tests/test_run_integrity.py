"""What a run directory guarantees (issue 16): nothing mixes, nothing bad is kept, nothing is lost.

Real processes, signals, HDF5 files and (where the machine allows a mount namespace) a real
20 MB tmpfs for the full-disk cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from nanprobe.cli import app
from nanprobe.data.mnist import interleave_classes, load_heldout
from nanprobe.integrity import GuardedFile, RunLock
from nanprobe.run import Run, RunSpec, mca_run

NANPROBE = [sys.executable, "-m", "nanprobe.cli"]
MNIST = ["mnist", "mnist", "--slices", "0:6"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): _digest(p) for p in sorted(run.rglob("*.h5"))}


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def _one_line_error(output: str, *fragments: str) -> None:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors, output
    text = " ".join(output.split())
    for fragment in fragments:
        assert fragment in text, output


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "run"
    code, output = cli("mca-run", *MNIST, "--samples", "3", "--out", out)
    assert code == 0, output
    return out


@pytest.fixture
def run_copy(small_run, tmp_path) -> Path:
    return Path(shutil.copytree(small_run, tmp_path / "run"))


# 1. --overwrite validates before it deletes


def test_overwrite_with_a_bad_option_keeps_the_old_run(run_copy):
    before = _files(run_copy)
    code, output = cli("mca-run", "mnist", "mnist", "--slices", "127:12", "--samples", "3",
                       "--overwrite", "--out", run_copy)
    assert code == 2
    _one_line_error(output, "selection '127:12'")
    code, output = cli("mca-run", "mnist", "mnist", "--slices", "990:1200", "--overwrite",
                       "--out", run_copy)
    assert code == 2
    _one_line_error(output, "reaches outside the 1000 available items")
    assert _files(run_copy) == before


def test_overwrite_removes_the_old_run_and_its_derived_results(run_copy):
    for name in ("sigdigits.h5", "audit.json", "calibration.json", "report.html"):
        (run_copy / name).write_text("{}")
    (run_copy / "thresholds.json").write_text(json.dumps(
        {"provenance": {"source": "nanprobe calibrate"}}))
    (run_copy / "notes.txt").write_text("mine")  # not nanprobe's: kept
    code, output = cli("mca-run", *MNIST, "--samples", "2", "--seed", "7", "--overwrite",
                       "--out", run_copy)
    assert code == 0, output
    assert "--overwrite: removing the run" in output
    left = sorted(p.name for p in run_copy.iterdir())
    assert left == [".lock", "notes.txt", "reference.h5", "run.json", "samples"]
    assert Run(run_copy).spec["seed"] == 7 and len(Run(run_copy).sample_paths) == 2


# 2. resume and Run() verify every file


def test_truncated_sample_is_refused_quarantined_and_recomputed(run_copy):
    path = run_copy / "samples" / "sample-0001.h5"
    with h5py.File(path) as h5:
        good = h5["final"][()]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"sample-0001.h5: it cannot be read .*truncated"):
        Run(run_copy)
    code, output = cli("sigdigits", run_copy)
    assert code == 2
    _one_line_error(output, "samples/sample-0001.h5: it cannot be read",
                    "rerun the same `nanprobe mca-run`")
    code, output = cli("mca-run", *MNIST, "--samples", "3", "--out", run_copy)
    assert code == 0, output
    assert "quarantined samples/sample-0001.h5: it cannot be read" in " ".join(output.split())
    with h5py.File(path) as h5:
        np.testing.assert_array_equal(h5["final"][()], good)  # same seed, same bits
    quarantined = sorted((run_copy / "quarantine").iterdir())
    assert [p.suffix for p in quarantined] == [".h5", ".json"]
    assert "truncated" in json.loads(quarantined[1].read_text())["reason"]
    assert Run(run_copy).complete


@pytest.mark.parametrize("tamper, reason", [
    (lambda h5: h5.attrs.__setitem__("weights_sha256", "0" * 64), "weights_sha256"),
    (lambda h5: h5.attrs.__setitem__("seed", 12345), "seed 12345"),
    (lambda h5: h5.__delitem__("final"), "dataset final is missing"),
    (lambda h5: h5.attrs.__delitem__("finished"), "never finished"),
])
def test_a_sample_from_elsewhere_is_quarantined(run_copy, tamper, reason):
    with h5py.File(run_copy / "samples" / "sample-0002.h5", "r+") as h5:
        tamper(h5)
    notes = []
    run = mca_run(RunSpec(model="mnist", input="mnist", slices="0:6", samples=3), run_copy,
                  on_notice=notes.append)
    assert len(notes) == 1 and reason in notes[0] and "recomputed" in notes[0]
    assert run.complete


# 3. inputs and weights must not change under a run


def test_changed_input_file_refuses_the_resume(tmp_path):
    data = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    np.save(tmp_path / "x.npy", data)
    args = ("mca-run", "mnist", tmp_path / "x.npy", "--samples", "2", "--out", tmp_path / "r")
    assert cli(*args)[0] == 0
    (tmp_path / "r" / "samples" / "sample-0001.h5").unlink()
    np.save(tmp_path / "x.npy", data * 2)
    code, output = cli(*args)
    assert code == 2
    _one_line_error(output, "holds a run with the same spec but other input",
                    "its samples would mix", "--overwrite")
    assert not (tmp_path / "r" / "samples" / "sample-0001.h5").exists()


FACTORY = textwrap.dedent('''
    from torch import nn

    def unseeded():
        return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2))

    def broken():
        return 1 / 0
''')


def _factory_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "mymods.py").write_text(FACTORY)
    np.save(tmp_path / "x.npy", np.ones((2, 1, 8, 8), np.float32))
    return {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_unseeded_factory_across_processes_is_an_error_naming_the_fix(tmp_path):
    env = _factory_env(tmp_path)
    cmd = [*NANPROBE, "mca-run", "mymods:unseeded", str(tmp_path / "x.npy"), "--samples", "2",
           "--jobs", "2", "--out", str(tmp_path / "r")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    text = " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr
    assert "not deterministic across processes" in text
    assert "seed it (torch.manual_seed inside the factory) or pass --checkpoint" in text
    assert not list((tmp_path / "r" / "samples").glob("*.h5"))


def test_factory_errors_are_one_line(tmp_path):
    env = _factory_env(tmp_path)
    proc = subprocess.run([*NANPROBE, "mca-run", "mymods:broken", str(tmp_path / "x.npy"),
                           "--out", str(tmp_path / "r")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "model factory mymods:broken raised ZeroDivisionError: division by zero" in \
        " ".join(proc.stderr.split())


# 4. full disks


def _mount_namespace() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--mount", "true"], capture_output=True).returncode == 0


needs_tmpfs = pytest.mark.skipif(not _mount_namespace(),
                                 reason="needs a mount namespace (unshare --mount) for a tmpfs")


def _in_tmpfs(tmp_path: Path, script: str, size: str = "20m") -> subprocess.CompletedProcess:
    """Run the shell ``script`` with a fresh tmpfs of ``size`` mounted at $T (gone after)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    body = f"mount -t tmpfs -o size={size} tmpfs {mnt} || exit 99; export T={mnt}; {script}"
    return subprocess.run(["unshare", "--mount", "sh", "-c", body], capture_output=True,
                          text=True, timeout=600)


@needs_tmpfs
def test_too_little_free_space_is_refused_before_anything_is_written(tmp_path):
    cmd = " ".join([*NANPROBE, "mca-run", "mnist", "mnist", "--slices", "0:400",
                    "--samples", "8", "--out", "$T/run"])
    proc = _in_tmpfs(tmp_path, f"{cmd}; echo rc=$?; ls -A $T/run $T/run/samples")
    assert "rc=2" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "not enough free space in" in " ".join(proc.stderr.split())
    listing = proc.stdout.split("rc=2", 1)[1]
    assert ".h5" not in listing and ".tmp-" not in listing


@needs_tmpfs
def test_disk_filling_up_during_a_write_ends_cleanly(tmp_path):
    """The pre-check passes; then another writer fills the disk: one line, no crash (HDF5
    segfaulted on ENOSPC before), no temporary left, and a later resume completes."""
    run = "$T/run"
    cmd = " ".join([*NANPROBE, "mca-run", "mnist", "mnist", "--slices", "0:200", "--samples",
                    "3", "--out", run])
    fill = (f"while [ ! -f {run}/run.json ] && kill -0 $pid; do sleep 0.05; done; "
            "dd if=/dev/zero of=$T/filler bs=1M 2>/dev/null; true")  # fills the disk
    proc = _in_tmpfs(tmp_path, f"{cmd} & pid=$!; {fill}; wait $pid; echo rc=$?; "
                               f"ls -A {run} {run}/samples; rm $T/filler; {cmd}; echo rc2=$?",
                     size="400m")
    out = proc.stdout
    assert "rc=2" in out, out + proc.stderr
    assert "Traceback" not in proc.stderr and "Segmentation" not in proc.stderr
    assert "no space left on device while writing" in " ".join(proc.stderr.split())
    first = out.split("rc=2", 1)[1].split("rc2=", 1)[0]
    assert ".tmp-" not in first
    assert "rc2=0" in out


def test_guarded_file_swallows_write_errors_for_hdf5(tmp_path):
    """GuardedFile keeps the first error and lets HDF5 close normally (RLIMIT_FSIZE makes real
    writes fail with EFBIG in a child process, no mount needed)."""
    script = textwrap.dedent(f'''
        import resource, signal, sys, h5py, numpy as np
        from nanprobe.integrity import GuardedFile
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
        sink = GuardedFile({str(tmp_path / "x.h5")!r})
        with h5py.File(sink, "w") as h5:
            d = h5.create_dataset("x", (64, 256, 256), "f4", chunks=(1, 256, 256))
            for i in range(64):
                d[i] = np.random.rand(256, 256)
                h5.flush()
                if sink.error:
                    break
        sink.close()
        print("error", sink.error.errno if sink.error else None, "at", i)
    ''')
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("error 27 at"), proc.stdout  # EFBIG, stopped early
    assert int(proc.stdout.split()[-1]) < 63
    assert GuardedFile.__doc__


# 5. signals stop the workers


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.split(") ", 1)[1][0] != "Z"


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_workers_and_removes_temporaries(tmp_path, sig, code):
    out = tmp_path / "run"
    cmd = [*NANPROBE, "mca-run", "mnist", "mnist", "--slices", "0:300", "--samples", "12",
           "--jobs", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((out / "samples").glob(".*tmp*")) and time.time() < deadline:
        time.sleep(0.05)  # the workers are writing
    workers = [c for c in _children(proc.pid) if _alive(c)]
    assert workers
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert f"interrupted by {sig.name}" in stderr and "rerun the same command" in stderr
    time.sleep(0.5)
    assert not [w for w in workers if _alive(w)]
    assert not list(out.rglob(".*tmp*"))
    finished = len(list((out / "samples").glob("sample-*.h5")))
    assert finished < 12
    Run(out)  # what is there verifies


# 6. one writer at a time


def test_second_writer_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    cmd = [*NANPROBE, "mca-run", "mnist", "mnist", "--slices", "0:300", "--samples", "6",
           "--out", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list((out / "samples").glob(".*tmp*")) and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        text = " ".join(second.stderr.split())
        assert f"is in use by pid {first.pid}" in text and "Traceback" not in text
        code, output = cli("audit", out)  # readers wait for the writer too
        assert code == 2 and f"is being written by pid {first.pid}" in " ".join(output.split())
    finally:
        first.terminate()
        first.wait(timeout=120)
    with RunLock(out), RunLock(out):  # free again, and reentrant
        pass


# 7. derived results record the run they come from


def test_results_of_an_earlier_state_are_stale(run_copy, tmp_path):
    for step in ("sigdigits", "audit", "report"):
        assert cli(step, run_copy)[0] == 0
    assert json.loads((run_copy / "report.json").read_text())["sigdigits"] is not None
    (run_copy / "samples" / "sample-0000.h5").unlink()  # recomputed: a new file, a new run
    assert cli("mca-run", *MNIST, "--samples", "3", "--out", run_copy)[0] == 0
    code, output = cli("report", run_copy)
    assert code == 0, output
    report = json.loads((run_copy / "report.json").read_text())
    assert report["sigdigits"] is None and report["audit"] is None
    for step in ("sigdigits", "audit"):
        assert report["missing"][step].startswith(f"stale — {step}")
        assert f"nanprobe {step} {run_copy}" in report["missing"][step]
    assert "stale" in (run_copy / "report.html").read_text()


def test_read_only_run_can_be_analysed_elsewhere(small_run, tmp_path):
    if not _mount_namespace():
        pytest.skip("needs a mount namespace for a read-only bind mount")
    results = tmp_path / "results"
    steps = " && ".join(f"{' '.join(NANPROBE)} {step} $T/run --out {results}"
                        for step in ("sigdigits", "audit", "report"))
    script = (f"mkdir $T/run && mount --bind {small_run} $T/run && mount -o remount,ro,bind "
              f"$T/run && touch $T/run/x 2>/dev/null; echo ro=$?; {steps}; echo rc=$?")
    proc = _in_tmpfs(tmp_path, script, size="1m")
    assert "ro=1" in proc.stdout and "rc=0" in proc.stdout, proc.stdout + proc.stderr
    for name in ("sigdigits.h5", "audit.json", "report.html", "report.json"):
        assert (results / name).is_file()
    report = json.loads((results / "report.json").read_text())
    assert report["sigdigits"] is not None and report["audit"] is not None


# 8. inputs the MRI path would refuse are refused everywhere


def test_bad_array_inputs_and_options_are_one_line_errors(tmp_path):
    np.save(tmp_path / "nan.npy", np.full((2, 1, 28, 28), np.nan, np.float32))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    cases = [
        (["mnist", tmp_path / "nan.npy"], "1568 of 1568 values are non-finite"),
        (["mnist", tmp_path / "obj.npy"], f"{tmp_path / 'obj.npy'} holds Python objects"),
        (["default", "default", "--slices", "250:300"], "reaches outside the 256"),
        (["mnist", "mnist", "--max-gb", "nan"], "--max-gb must be a finite number"),
        (["mnist", "mnist", "--max-gb", "-1"], "--max-gb must be a finite number"),
    ]
    for args, message in cases:
        code, output = cli("mca-run", *args, "--out", tmp_path / "r")
        assert code == 2, (args, output)
        _one_line_error(output, message)
    assert not (tmp_path / "r").exists()


# 9. any prefix of the bundled digits holds every class


def test_bundled_digits_are_class_interleaved():
    _, labels = load_heldout()
    for n in (10, 30, 100, 1000):
        assert np.bincount(labels[:n], minlength=10).tolist() == [n // 10] * 10
    shuffled = np.random.default_rng(0).permutation(np.repeat(np.arange(3), 4))
    order = interleave_classes(shuffled)
    assert shuffled[order].tolist() == [0, 1, 2] * 4
    assert all(np.all(np.diff(order[shuffled[order] == c]) > 0) for c in range(3))


# 10. more one-line errors


def test_calibrate_and_report_errors_are_one_line(run_copy, tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    code, output = cli("calibrate", "mnist", "mnist", "--slices", "0:4", "--pooling",
                       tmp_path / "list.json", "--out", tmp_path / "cal")
    assert code == 2
    _one_line_error(output, "is not an audit.json or thresholds file")
    (run_copy / "calibration.json").write_text(json.dumps(
        {"format": "nanprobe-calibration/1", "metric": "accuracy"}))
    code, output = cli("report", run_copy)
    assert code == 2
    _one_line_error(output, "is not a complete calibration (lacks settings")


def test_calibrate_without_foreground_says_why(tmp_path):
    code, output = cli("calibrate", "default", "default", "--slices", "0:2", "--threshold", "1",
                       "--fill", "mean", "--repeats", "1", "--against", "plain",
                       "--out", tmp_path / "cal")
    assert code == 0, output
    assert "Traceback" not in output
    assert "loss is undefined for every setting" in " ".join(output.split())


# 11. Verrou jobs in threads share no temporary names


@pytest.mark.slow
def test_verrou_executor_with_two_jobs_under_real_valgrind(tmp_path):
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        pytest.skip("no valgrind")
    from nanprobe.run import _threaded, _verrou_executor

    spec = RunSpec(model="mnist", input="mnist", slices="0:2", samples=3,
                   backend={"name": "verrou", "rounding_mode": "random"})
    out = tmp_path / "run"
    out.mkdir()
    executor = _threaded(_verrou_executor(spec, out, valgrind, 600, tool="none"))
    run = mca_run(spec, out, jobs=2, executor=executor)
    assert run.complete and len(run.sample_paths) == 3
    assert (out / "jobs" / "verrou_exclude.txt").read_text().startswith("# Verrou exclusion")
    assert not list(out.rglob(".*tmp*"))
    for i in range(3):  # --tool=none perturbs nothing: the plumbing, not the numbers
        np.testing.assert_array_equal(run.sample(i, "final"), run.reference("final"))
