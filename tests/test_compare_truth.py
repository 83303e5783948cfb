"""``nanprobe compare RUN TRUTH.npz``: a run against pooling indices of a Verrou run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from nanprobe.cli import app
from nanprobe.compare import compare_runs, truth_unstable
from nanprobe.run import Run, RunSpec, mca_run

POOLS = ["layers.2", "layers.5", "layers.8", "layers.10"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """A real in-process run of the MNIST CNN, pooling layers only, 2 samples of 2 images."""
    spec = RunSpec(model="mnist", input="mnist", slices="0:2", samples=2, layers=POOLS,
                   backend={"name": "inprocess", "mode": "flop", "precision": 24})
    return mca_run(spec, tmp_path_factory.mktemp("truth") / "run")


def indices(run: Run) -> dict[str, np.ndarray]:
    """Per pooling layer, (1 + samples, N, C, Ho, Wo): the run's reference then its samples."""
    out = {}
    for g in POOLS:
        key = f"layers/{g}/indices"
        out[g] = np.stack([run.reference(key)] + [run.sample(i, key)
                                                   for i in range(len(run.sample_paths))])
    return out


def write_truth(path: Path, layers: dict[str, np.ndarray], meta: dict | None = None) -> Path:
    np.savez(path, **{k.replace(".", "__"): v.astype(np.int32) for k, v in layers.items()},
             final_labels=np.zeros((3, 2), np.uint8))
    if meta is not None:
        path.with_name(path.name.removesuffix("_pool_indices.npz") + ".json").write_text(
            json.dumps(meta))
    return path


def identity(run: Run) -> dict:
    """The truth JSON's fields (as in ../shared/verrou-truth) for ``run``'s model and input."""
    inp = run.manifest["input"]
    return {"model": run.spec["model"], "weights_sha256": run.manifest["weights_sha256"],
            "input_provenance": json.dumps({k: inp[k] for k in ("input_sha256", "input_shape",
                                                                "selection", "view")}),
            "backend": {"rounding_mode": "random"}}


def test_a_run_against_its_own_indices_as_truth(run: Run, tmp_path: Path) -> None:
    truth = write_truth(tmp_path / "t_pool_indices.npz", indices(run), identity(run))
    c = compare_runs(run.path, truth, out=tmp_path / "c.json")
    assert list(c["pooling"]) == [*POOLS, "all"]
    for g in POOLS:
        assert c["pooling"][g]["f1"] == 1.0
    assert c["samples"] == {"a": 2, "b": 2} and c["backends"]["b"] == {"rounding_mode": "random"}
    assert c["provenance"]["truth_sha256"] and json.loads((tmp_path / "c.json").read_text()) == c
    result = CliRunner().invoke(app, ["compare", str(run.path), str(truth)])
    assert result.exit_code == 0 and "pooling layers.2: unstable windows P=1.000" in result.output


def test_scores_against_a_changed_truth(run: Run, tmp_path: Path) -> None:
    """Truth = the run's indices with planted flips and some flips removed: counts follow."""
    layers = indices(run)
    own = truth_unstable(write_truth(tmp_path / "own.npz", layers))
    idx = layers["layers.5"].copy()
    flat = idx.reshape(idx.shape[0], -1)
    stable = np.flatnonzero(~own["layers.5"].reshape(-1))[:7]
    flat[1, stable] += 1  # 7 new unstable windows in the truth
    unstable = np.flatnonzero(own["layers.5"].reshape(-1))[:3]
    flat[1:, unstable] = flat[0, unstable]  # 3 of the run's unstable windows stable in it
    layers["layers.5"] = idx
    c = compare_runs(run.path, write_truth(tmp_path / "changed.npz", layers))
    entry = c["pooling"]["layers.5"]
    assert (entry["fp"], entry["fn"]) == (3, 7) and entry["tp"] == own["layers.5"].sum() - 3
    assert "no significant-bit maps" in c["sigbits_note"]


def test_truth_of_another_input_or_a_bad_file_is_refused(run: Run, tmp_path: Path) -> None:
    meta = identity(run) | {"weights_sha256": "0" * 64}
    truth = write_truth(tmp_path / "w_pool_indices.npz", indices(run), meta)
    with pytest.raises(ValueError, match="weights_sha256") as err:
        compare_runs(run.path, truth)
    assert "\n" not in str(err.value)
    np.savez(tmp_path / "bad.npz", something=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="not a truth file"):
        compare_runs(run.path, tmp_path / "bad.npz")
    result = CliRunner().invoke(app, ["compare", str(run.path), str(truth)])
    assert result.exit_code != 0 and "Traceback" not in result.output
