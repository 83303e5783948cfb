"""Pooling audit and run comparison: planted unstable windows, calibration, verdict, compare,
end to end on real MCA runs."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from run_files import write_run

from nanprobe.audit import (
    VERDICT_MIN_F1,
    audit_run,
    infer_geometry,
    json_safe,
    limit_counts,
    nan_flags,
    parse_geometry,
    scores,
    summary_lines,
    tie_counts,
    unstable_windows,
    verdict,
)
from nanprobe.calibrate import calibrate, load_pooling
from nanprobe.compare import compare_runs
from nanprobe.compare import summary_lines as compare_lines
from nanprobe.ops import load_config
from nanprobe.run import Run, RunSpec, mca_run

S, C, H, W = 2, 3, 8, 8
HO, WO = H // 2, W // 2
N_EXACT, N_TRIPLE, N_NEAR, N_FAR = 8, 4, 8, 4  # planted windows; the other 72 are clear
NEAR_GAP, FAR_GAP = 5e-6, 5e-5  # near ties flip, far ones stay
PNG = b"\x89PNG\r\n\x1a\n"


def _strict_json(path: Path) -> dict:
    def refuse(name: str):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _planted(seed: int = 0):
    """Pooled input (S, C, H, W) with planted ties, reference indices, and the planted sets.

    Returns ``x``, ``ref`` (S, C, HO, WO) int64 and per category a (S, C, HO, WO) bool mask plus
    the window-local position the argmax flips to.
    """
    rng = np.random.default_rng(seed)
    n = S * C * HO * WO
    win = np.empty((n, 4), np.float32)
    top = rng.uniform(0.5, 1.0, n).astype(np.float32)
    win[:] = top[:, None] - rng.uniform(0.01, 0.5, (n, 4)).astype(np.float32)
    best = rng.integers(0, 4, n)
    other = (best + rng.integers(1, 4, n)) % 4  # a second position, != best
    win[np.arange(n), best] = top
    order = rng.permutation(n)
    cats = {}
    start = 0
    for name, count in [("exact", N_EXACT), ("triple", N_TRIPLE), ("near", N_NEAR),
                        ("far", N_FAR)]:
        cats[name] = np.zeros(n, bool)
        cats[name][order[start : start + count]] = True
        start += count
    rows = np.arange(n)
    win[rows[cats["exact"]], other[cats["exact"]]] = top[cats["exact"]]
    third = (other + 1) % 4
    third = np.where(third == best, (third + 1) % 4, third)
    for pos in (other, third):
        win[rows[cats["triple"]], pos[cats["triple"]]] = top[cats["triple"]]
    win[rows[cats["near"]], other[cats["near"]]] = top[cats["near"]] - np.float32(NEAR_GAP)
    win[rows[cats["far"]], other[cats["far"]]] = top[cats["far"]] - np.float32(FAR_GAP)
    # (S, C, HO, WO, 2, 2) -> (S, C, HO, 2, WO, 2) -> (S, C, H, W)
    x = win.reshape(S, C, HO, WO, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(S, C, H, W)
    _, ref = F.max_pool2d(torch.from_numpy(x), 2, 2, return_indices=True)
    ref = ref.numpy()
    # flipped index: the planted partner unless the reference already points there
    ho, wo = np.meshgrid(np.arange(HO), np.arange(WO), indexing="ij")
    base = (2 * ho * W + 2 * wo)[None, None].repeat(S, 0).repeat(C, 1).reshape(n)
    flat = base + (other // 2) * W + other % 2
    flat_best = base + (best // 2) * W + best % 2
    flip = np.where(flat == ref.reshape(n), flat_best, flat).reshape(ref.shape)
    masks = {k: v.reshape(ref.shape) for k, v in cats.items()}
    return x, ref, masks, flip


def _capture(x: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    return {"layers/pool/input": x, "layers/pool/indices": idx,
            "layers/pool/output": F.max_pool2d(torch.from_numpy(x), 2, 2).numpy(),
            "final": x.mean(axis=(2, 3))}


def _write_run(path: Path, x: np.ndarray, ref: np.ndarray, samples: list[np.ndarray],
               **identity) -> Path:
    """A run directory in mca-run's format for a model that cannot be loaded."""
    return write_run(path, [_capture(x, idx) for idx in [ref, *samples]], layers=["pool"],
                     **identity)


def _flipping(ref: np.ndarray, flip: np.ndarray, unstable: np.ndarray) -> list[np.ndarray]:
    """Three samples: all unstable windows flip, none flips, every other one flips."""
    half = unstable & (np.arange(unstable.size).reshape(unstable.shape) % 2 == 0)
    return [np.where(unstable, flip, ref), ref.copy(), np.where(half, flip, ref)]


@pytest.fixture(scope="module")
def planted():
    return _planted()


@pytest.fixture(scope="module")
def planted_run(planted, tmp_path_factory) -> Path:
    x, ref, masks, flip = planted
    unstable = masks["exact"] | masks["triple"] | masks["near"]
    return _write_run(tmp_path_factory.mktemp("syn") / "a", x, ref, _flipping(ref, flip, unstable))


@pytest.fixture(scope="module")
def planted_audit(planted_run) -> dict:
    return audit_run(planted_run, rtol_values=(0.0,))


def _row(audit: dict, eps: float, ties: int) -> dict:
    table = next(t for t in audit["layers"]["pool"]["ties"] if t["eps"] == eps)
    return next(r for r in table["rows"] if r["ties"] == ties)


def _setting(audit: dict, limit: int, eps: float, rtol: float = 0.0) -> dict:
    return next(r for r in audit["calibration"]["grid"]
                if (r["tie_limit"], r["tie_eps"], r["tie_rtol"]) == (limit, eps, rtol))


def test_planted_unstable_windows_are_found(planted, planted_run, planted_audit):
    _, _, masks, _ = planted
    truth = masks["exact"] | masks["triple"] | masks["near"]
    unstable, flips = unstable_windows(Run(planted_run), "pool")
    np.testing.assert_array_equal(unstable, truth)
    assert flips.max() == 2 and flips[truth].min() >= 1
    layer = planted_audit["layers"]["pool"]
    assert layer["windows"] == S * C * HO * WO and layer["unstable"] == truth.sum() == 20
    assert layer["unstable_fraction"] == pytest.approx(20 / 96)
    assert layer["geometry"]["kernel"] == [2, 2] and layer["geometry"]["stride"] == [2, 2]
    assert layer["geometry"]["source"].startswith("inferred from shapes")


def test_p_unstable_given_ties_table(planted_audit):
    a = planted_audit
    # exact comparison: the near ties count as isolated maxima, their flips show at ties=1
    assert _row(a, 0.0, 1) == {"ties": 1, "windows": 84, "unstable": 8, "p_unstable": 8 / 84}
    assert _row(a, 0.0, 2) == {"ties": 2, "windows": 8, "unstable": 8, "p_unstable": 1.0}
    assert _row(a, 0.0, 3) == {"ties": 3, "windows": 4, "unstable": 4, "p_unstable": 1.0}
    assert _row(a, 0.0, 4) == {"ties": 4, "windows": 0, "unstable": 0, "p_unstable": None}
    assert _row(a, 1e-5, 2)["windows"] == 16 and _row(a, 1e-5, 2)["p_unstable"] == 1.0
    assert _row(a, 1e-5, 1)["unstable"] == 0
    assert _row(a, 1e-4, 2) == {"ties": 2, "windows": 20, "unstable": 16, "p_unstable": 0.8}


def test_flag_scores_and_calibration(planted_audit):
    a = planted_audit
    exact = _setting(a, 1, 0.0)  # exact ties only: misses the near ties
    assert (exact["precision"], exact["recall"]) == (1.0, pytest.approx(12 / 20))
    loose = _setting(a, 1, 1e-4)  # also flags the stable far ties
    assert (loose["precision"], loose["recall"]) == (pytest.approx(20 / 24), 1.0)
    triple = _setting(a, 2, 0.0)  # only windows with 3 tied entries
    assert (triple["precision"], triple["recall"]) == (1.0, pytest.approx(4 / 20))
    best = a["calibration"]["best"]
    assert (best["tie_limit"], best["tie_eps"], best["f1"]) == (1, 1e-5, 1.0)
    assert a["verdict"] == "explained" and "precision 1.000 and recall 1.000" in a["verdict_text"]
    assert a["calibrated_pooling"]["defaults"] == {"tie_limit": 1, "tie_eps": 1e-5,
                                                    "tie_rtol": 0.0}
    assert load_config(a["calibrated_pooling"])["defaults"]["tie_eps"] == 1e-5


def test_grid_equals_nan_max_pool2d_flags(planted, planted_audit):
    x, _, masks, _ = planted
    truth = torch.from_numpy(masks["exact"] | masks["triple"] | masks["near"])
    geom = ((2, 2), (2, 2), (0, 0))
    for row in planted_audit["layers"]["pool"]["grid"]:
        flags = nan_flags(torch.from_numpy(x), geom, row["tie_limit"], row["tie_eps"],
                          row["tie_rtol"])
        assert scores(flags, truth) == {k: row[k] for k in scores(flags, truth)}, row
    assert planted_audit["layers"]["pool"]["calibrated"]["f1"] == 1.0


def test_limit_counts_match_the_op_with_nan_and_overlap():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 4, (2, 3, 9, 9), generator=g).float() / 4  # many exact ties
    x += torch.rand(x.shape, generator=g) * 1e-5 * (torch.rand(x.shape, generator=g) < 0.3)
    x[0, 0, :3, :3] = float("nan")  # a window without numbers
    x[1, 2, 4, :] = float("nan")
    truth = torch.rand((2, 3, 5, 5), generator=g) < 0.4
    geom = ((3, 3), (2, 2), (1, 1))
    for eps, rtol in [(0.0, 0.0), (1e-6, 0.0), (1e-5, 0.0), (0.0, 1e-4)]:
        counts = tie_counts(x, geom, eps, rtol)
        for lim, (tp, fp, fn) in limit_counts(counts, truth, [1, 2, 4, 8, 9]).items():
            sc = scores(nan_flags(x, geom, lim, eps, rtol), truth)
            assert (tp, fp, fn) == (sc["tp"], sc["fp"], sc["fn"]), (eps, rtol, lim)


def test_audit_json_figures_and_provenance(planted_run, planted_audit):
    written = _strict_json(planted_run / "audit.json")
    assert written == planted_audit
    assert written["provenance"]["run_manifest"]["spec"]["model"] == "synthetic"
    assert written["provenance"]["nanprobe_version"]
    for rel in [written["figures"]["p_unstable_given_ties"],
                written["figures"]["maps"]["pool"]["png"]]:
        assert (planted_run / rel).read_bytes().startswith(PNG)


def test_geometry_argument_and_inference(planted_run, tmp_path):
    a = audit_run(planted_run, geometry={"pool": (2, 2, 0)}, eps_values=(0.0,),
                  rtol_values=(0.0,), out=tmp_path, plots=False)
    assert a["layers"]["pool"]["geometry"]["source"] == "argument"
    assert (tmp_path / "audit.json").is_file() and "figures" not in a
    with pytest.raises(ValueError, match="does not give the captured indices"):
        audit_run(planted_run, geometry={"pool": 3}, out=tmp_path, plots=False)
    assert parse_geometry(2) == ((2, 2), (2, 2), (0, 0))
    assert parse_geometry(((3, 2), 2, (1, 0))) == ((3, 2), (2, 2), (1, 0))
    assert infer_geometry((4, 16, 7, 7), (4, 16, 3, 3)) == ((2, 2), (2, 2), (0, 0))
    with pytest.raises(ValueError, match="cannot infer"):
        infer_geometry((1, 1, 8, 8), (1, 1, 5, 5))


def test_audit_refuses_runs_without_samples_or_pooling(planted, tmp_path):
    x, ref, _, _ = planted
    empty = _write_run(tmp_path / "empty", x, ref, [])
    with pytest.raises(ValueError, match="no complete samples"):
        audit_run(empty, load_model=False)
    no_input = [{k: v for k, v in _capture(x, idx).items() if k != "layers/pool/input"}
                for idx in (ref, ref)]
    nopool = write_run(tmp_path / "nopool", no_input, layers=["pool"])
    with pytest.raises(ValueError, match="no max-pooling layer"):
        audit_run(nopool, load_model=False)
    with h5py.File(empty / "reference.h5", "a") as h5:  # damaged after the run: not trusted
        del h5["layers/pool/input"]
    with pytest.raises(ValueError, match=r"cannot be trusted \(reference.h5: dataset "
                       r"layers/pool/input is missing\); rerun the same `nanprobe mca-run`"):
        audit_run(empty, load_model=False)


def test_scores_and_json_safe():
    t = np.array([1, 1, 0, 0], bool)
    assert scores(t, t)["f1"] == 1.0
    sc = scores(np.array([1, 0, 1, 0], bool), t)
    assert (sc["precision"], sc["recall"], sc["f1"]) == (0.5, 0.5, 0.5)
    empty = scores(np.zeros(4, bool), np.zeros(4, bool))
    assert (empty["precision"], empty["recall"], empty["f1"]) == (None, None, 1.0)
    assert json_safe({"a": float("nan"), "b": np.float32(2), "c": (np.int64(1), np.inf)}) == {
        "a": None, "b": 2.0, "c": [1, None]}


def test_compare_identical_runs(planted_run, tmp_path):
    copy = shutil.copytree(planted_run, tmp_path / "copy")
    c = compare_runs(planted_run, copy, out=tmp_path / "cmp.json")
    pool = c["pooling"]["pool"]
    assert (pool["precision"], pool["recall"], pool["f1"]) == (1.0, 1.0, 1.0)
    assert pool["reference_index_agreement"] == 1.0 and c["pooling"]["all"]["f1"] == 1.0
    assert c["sigbits_source"] == "estimate" and "nanprobe sigdigits" in c["sigbits_note"]
    assert c["sigbits"]["layers/pool/output"]["mean_abs_diff"] == 0.0
    assert _strict_json(tmp_path / "cmp.json") == c


def test_compare_constructed_difference_and_sigdigits(planted, planted_run, tmp_path):
    x, ref, masks, flip = planted
    other = masks["exact"] | masks["far"]  # B (the truth): 12 windows, 8 shared with A's 20
    b = _write_run(tmp_path / "b", x, ref, _flipping(ref, flip, other))
    pool = compare_runs(planted_run, b, sigdigits=False)["pooling"]["pool"]
    assert (pool["tp"], pool["fp"], pool["fn"]) == (8, 12, 4)
    assert pool["precision"] == pytest.approx(8 / 20) and pool["recall"] == pytest.approx(8 / 12)
    assert pool["f1"] == pytest.approx(16 / 32)
    assert pool["unstable_fraction_b"] == pytest.approx(12 / 96)

    a = shutil.copytree(planted_run, tmp_path / "a")
    bits = np.random.default_rng(1).uniform(0, 24, (S, C, HO, WO)).astype(np.float32)
    for run, arr in [(a, bits), (b, bits + 0.5)]:
        with h5py.File(run / "sigdigits.h5", "w") as h5:
            h5["layers/pool/output/bits"] = arr  # nanprobe.sigdigits' layout
            h5["layers/pool/output/exact"] = arr == 24
            h5.attrs["run_digest"] = Run(run).digest
    c = compare_runs(a, b)
    assert c["sigbits_source"] == "sigdigits.h5" and c["sigbits_note"] is None
    entry = c["sigbits"]["layers/pool/output"]
    assert entry["correlation"] == pytest.approx(1.0)
    assert entry["mean_abs_diff"] == pytest.approx(0.5)
    (a / "sigdigits.h5").unlink()
    c = compare_runs(a, b, estimate_max_bytes=0)
    assert c["sigbits"] is None and c["sigbits_note"].startswith(f"{a} has no sigdigits.h5")
    assert f"run `nanprobe sigdigits {a}` first" in c["sigbits_note"]
    with h5py.File(b / "sigdigits.h5", "r+") as h5:  # b's run changed since: stale
        h5.attrs["run_digest"] = "0" * 64
    c = compare_runs(a, b, estimate_max_bytes=0)
    assert f"{b} has a stale sigdigits.h5" in c["sigbits_note"]
    assert f"nanprobe sigdigits {a} && nanprobe sigdigits {b}" in c["sigbits_note"]


def test_compare_refuses_different_inputs(planted, planted_run, tmp_path):
    x, ref, _, _ = planted
    other = _write_run(tmp_path / "other", x, ref, [ref], input_sha256="def")
    with pytest.raises(ValueError, match="input_sha256") as err:
        compare_runs(planted_run, other)
    assert "\n" not in str(err.value)


def test_verdict_without_unstable_windows(planted, tmp_path):
    x, ref, _, _ = planted
    steady = _write_run(tmp_path / "steady", x, ref, [ref, ref.copy()])
    a = audit_run(steady, rtol_values=(0.0,), plots=False)
    assert a["summary"]["unstable"] == 0 and a["verdict"] == "no_unstable_windows"
    assert a["calibrated_pooling"]["defaults"]["tie_limit"] is None
    assert a["verdict_text"].startswith("No pooling window is unstable over 2 MCA samples")
    assert summary_lines(a)[-1] == "calibrated pooling: tie_limit=None (no NaN pooling)"
    assert load_pooling(steady)[0]["tie_limit"] is None


def test_verdict_thresholds_and_sentences():
    summary = {"windows": 1000, "unstable": 10}
    row = {"tie_limit": 2, "tie_eps": 1e-6, "tie_rtol": 0.0, "precision": 0.4, "recall": 1.0,
           "fp": 15, "flagged": 25}
    name, text = verdict(summary, 5, {**row, "f1": VERDICT_MIN_F1})
    assert name == "explained" and "tie_limit=2, tie_eps=1e-06" in text
    name, text = verdict(summary, 5, {**row, "f1": VERDICT_MIN_F1 - 1e-9}, (7, 0))
    assert name == "not_explained"
    assert "15 of its 25 flags are stable windows; 7 windows are exact ties at 0" in text
    assert verdict(summary, 5, None)[0] == "not_explained"
    for _, text in [verdict(summary, 5, {**row, "f1": 0.9}),
                    verdict({**summary, "unstable": 0}, 5, None)]:
        assert not re.search(r"[.!?]\s", text) and text.endswith(".")  # one sentence, one line


def test_real_run_end_to_end(tmp_path):
    run = mca_run(RunSpec(model="mnist", input="mnist", slices="0:2", samples=2), tmp_path / "r")
    a = audit_run(run.path)
    written = _strict_json(run.path / "audit.json")
    assert written == a
    pools = ["layers.2", "layers.5", "layers.8", "layers.10"]
    assert list(a["layers"]) == pools
    assert a["layers"]["layers.10"]["geometry"] == {"kernel": [3, 3], "stride": [3, 3],
                                                    "padding": [0, 0], "source": "model"}
    for name in pools:
        assert 0.0 <= a["layers"][name]["unstable_fraction"] <= 1.0
        assert (run.path / a["figures"]["maps"][name]["png"]).read_bytes().startswith(PNG)
    c = compare_runs(run.path, run.path)
    assert c["pooling"]["all"]["f1"] == 1.0
    assert any(line.startswith("pooling all:") for line in compare_lines(c))

    # ReLU's exact zeros tie in 4-way windows that MCA never changes: ties are not what is
    # unstable here, and the audit says so instead of calibrating on them
    assert a["summary"]["unstable"] > 0
    zeros = [a["layers"][n]["exact_ties_at_zero"] for n in pools]
    assert sum(z["windows"] for z in zeros) > 10 * a["summary"]["unstable"]
    assert sum(z["unstable"] for z in zeros) == 0
    assert a["calibration"]["best"]["f1"] < VERDICT_MIN_F1
    assert a["verdict"] == "not_explained"
    assert a["verdict_text"].startswith("No tie setting explains the ")
    assert a["verdict_text"].endswith("so NaN pooling is not recommended (tie_limit=None).")
    assert a["calibrated_pooling"]["defaults"]["tie_limit"] is None
    assert a["calibrated_pooling"]["provenance"]["verdict"] == "not_explained"
    lines = summary_lines(a)
    assert lines[-3].startswith("best tie setting: tie_limit=")
    assert lines[-2] == f"verdict: not_explained: {a['verdict_text']}"
    assert lines[-1] == "calibrated pooling: tie_limit=None (no NaN pooling)"

    # calibrate reads the recommendation from the run: no NaN pooling, nothing skipped
    assert load_config(a["calibrated_pooling"])["defaults"]["tie_limit"] is None
    cal = calibrate("mnist", "mnist", tmp_path / "cal", slices="0:8", thresholds=(1.0, 0.5),
                    fills=("zero",), pooling=run.path, repeats=1)
    assert cal["pooling"]["tie_limit"] is None
    for setting in cal["settings"]:
        assert setting["skip"]["positions"] == 0.0
        assert setting["agreement"]["accuracy"] == 1.0


TIES_MODULE = "nanprobe_test_tied_background"


def test_real_run_where_ties_explain_instability(tmp_path, monkeypatch):
    """A constant background makes exact, inexactly computed ties (as in the default U-Net):
    random rounding breaks them in every sample, so the tie rule finds the unstable windows."""
    (tmp_path / f"{TIES_MODULE}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn


        def make():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2))
            with torch.no_grad():  # positive, inexact weights: no ReLU zeros, no exact sums
                model[0].weight.uniform_(0.05, 0.15)
                model[0].bias.uniform_(0.1, 0.2)
            return model
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    images = np.random.default_rng(0).uniform(0, 1, (2, 1, 16, 16)).astype(np.float32)
    images[:, :, :, :8] = 0.3  # the left half is a constant background
    np.save(tmp_path / "images.npy", images)
    run = mca_run(RunSpec(model=f"{TIES_MODULE}:make", input=str(tmp_path / "images.npy"),
                          samples=8), tmp_path / "run")
    a = audit_run(run.path, plots=False)
    assert list(a["layers"]) == ["1"] and a["layers"]["1"]["geometry"]["source"] == "model"
    assert a["summary"]["unstable"] > 50
    best = a["calibration"]["best"]
    assert best["f1"] >= 0.9 and best["recall"] >= 0.95
    assert a["verdict"] == "explained"
    assert a["verdict_text"].startswith("Near ties explain the ")
    assert a["calibrated_pooling"]["defaults"] == {k: best[k] for k in
                                                   ("tie_limit", "tie_eps", "tie_rtol")}
    assert summary_lines(a)[-1].startswith(f"calibrated pooling: tie_limit={best['tie_limit']} ")
