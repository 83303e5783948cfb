"""mca-run: capture files, provenance, resume after kill -9, spec checks, one-line CLI errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from nanprobe.cli import app
from nanprobe.run import Run, RunSpec, mca_run

MNIST = dict(model="mnist", input="mnist", slices="0:6")


def _spec(**kw) -> RunSpec:
    return RunSpec(**{**MNIST, "samples": 3, **kw})


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory) -> Run:
    return mca_run(_spec(), tmp_path_factory.mktemp("run") / "r1")


def test_run_writes_reference_samples_and_manifest(mnist_run):
    assert mnist_run.complete and len(mnist_run.sample_paths) == 3
    keys = mnist_run.keys()
    assert "final" in keys and "layers/layers.0/output" in keys
    pool = next(k.rsplit("/", 1)[0] for k in keys if k.endswith("/indices"))
    assert {f"{pool}/input", f"{pool}/output"} <= set(keys)
    ref = mnist_run.reference("layers/layers.0/output")
    assert ref.shape == (6, 32, 28, 28) and ref.dtype == np.float32
    assert mnist_run.stack("final").shape == (3, 6, 10)


def test_samples_are_perturbed_and_reproducible(mnist_run, tmp_path):
    ref = mnist_run.reference("final")
    samples = mnist_run.stack("final")
    assert not all(np.array_equal(s, ref) for s in samples)  # low bits changed
    np.testing.assert_allclose(samples, np.broadcast_to(ref, samples.shape), rtol=1e-3,
                               atol=1e-4)
    again = mca_run(_spec(samples=2), tmp_path / "again")
    for i in range(2):  # same run seed -> bit-identical samples
        np.testing.assert_array_equal(again.sample(i, "final"), mnist_run.sample(i, "final"))


def test_provenance_attributes(mnist_run):
    attrs = mnist_run.attrs(0)
    for key in ("model", "weights_sha256", "input_provenance", "backend", "seed", "precision",
                "nanprobe_version", "torch_version", "started", "finished"):
        assert key in attrs and attrs[key] != ""
    assert json.loads(attrs["input_provenance"])["selection"] == [0, 1, 2, 3, 4, 5]
    assert mnist_run.attrs()["kind"] == "reference"
    manifest = json.loads((mnist_run.path / "run.json").read_text())
    assert manifest["spec"]["samples"] == 3 and manifest["weights_sha256"]


def test_resume_redoes_only_missing_and_keeps_files_byte_identical(tmp_path):
    run = mca_run(_spec(), tmp_path / "r")
    before = {p.name: _digest(p) for p in run.sample_paths}
    lost = run.sample(1, "final")
    run.sample_paths[1].unlink()
    (run.path / "samples" / ".sample-0002.h5.tmp-999").write_bytes(b"partial")  # a dead write
    again = mca_run(_spec(), tmp_path / "r")
    after = {p.name: _digest(p) for p in again.sample_paths}
    assert after.keys() == before.keys()
    assert {k: after[k] for k in after if k != "sample-0001.h5"} == {
        k: before[k] for k in before if k != "sample-0001.h5"}
    np.testing.assert_array_equal(again.sample(1, "final"), lost)  # same seed, same numbers
    assert not list((run.path / "samples").glob(".*tmp*"))


def test_spec_mismatch_refused_unless_overwrite(tmp_path):
    mca_run(_spec(samples=1), tmp_path / "r")
    with pytest.raises(ValueError, match="different spec.*seed"):
        mca_run(_spec(samples=1, seed=5), tmp_path / "r")
    run = mca_run(_spec(samples=1, seed=5), tmp_path / "r", overwrite=True)
    assert run.spec["seed"] == 5 and len(run.sample_paths) == 1


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="matches no module; available: layers, layers.0"):
        mca_run(_spec(layers=["nope*"]), tmp_path / "a")
    with pytest.raises(ValueError, match="--max-gb"):
        mca_run(_spec(), tmp_path / "b", max_gb=1e-6)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot write"):
        mca_run(_spec(), tmp_path / "file" / "run")
    with pytest.raises(ValueError, match="selection"):
        mca_run(_spec(slices="5000:5001"), tmp_path / "c")


def test_cli_reports_one_line_errors(tmp_path):
    result = CliRunner().invoke(app, ["mca-run", "mnist", "mnist", "--samples", "1", "--out",
                                      str(tmp_path / "r"), "--layers", "bogus"])
    assert result.exit_code == 2
    assert "matches no module" in result.output and "Traceback" not in result.output


def test_kill_minus_9_then_resume(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nanprobe.cli", "mca-run", "mnist", "mnist", "--samples", "8",
           "--slices", "0:200", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while len(list((out / "samples").glob("sample-*.h5"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    survivors = {p.name: _digest(p) for p in (out / "samples").glob("sample-*.h5")}
    assert 2 <= len(survivors) < 8
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = Run(out)
    assert run.complete and len(run.sample_paths) == 8
    assert {n: _digest(out / "samples" / n) for n in survivors} == survivors
    assert not list(out.rglob(".*tmp*"))
    for path in run.sample_paths:  # every file is a complete capture
        with h5py.File(path) as h5:
            assert "finished" in h5.attrs and h5["final"].shape == (200, 10)
