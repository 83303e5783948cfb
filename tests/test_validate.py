"""``nanprobe validate``: the statistics on known cases, whole-volume runs on real volumes,
segmentations in the input's space, resuming, the report hook and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.ndimage import affine_transform
from torch import nn
from typer.testing import CliRunner

from nanprobe.cli import app
from nanprobe.data import mri
from nanprobe.data.labels import FULL_TO_SAGITTAL, LABEL_IDS, NUM_CLASSES, NUM_SAGITTAL_CLASSES
from nanprobe.evaluate import dice_per_class, labels_from_logits, mean_foreground_dice
from nanprobe.jsonio import atomic_path
from nanprobe.models.default import load_default_brain
from nanprobe.models.registry import LoadedModel, load
from nanprobe.ops import nanify
from nanprobe.validate import (
    SCHEMA_KEYS,
    agreement,
    confusion,
    load_thresholds,
    paired_statistics,
    report_section,
    slice_dice,
    validate,
)

runner = CliRunner()
THRESHOLDS = {"format": "nanprobe-thresholds/1", "layers": {},
              "defaults": {"nan_threshold": 0.5, "fill": "mean", "tie_limit": 1,
                           "tie_eps": 1e-7, "tie_rtol": 0.0}}
PNG = b"\x89PNG\r\n\x1a\n"


def write_thresholds(folder: Path, name: str = "thresholds.json", **defaults) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(THRESHOLDS))
    config["defaults"].update(defaults)
    path.write_text(json.dumps(config))
    return path


# --- statistics ------------------------------------------------------------------------------


def test_identical_models_give_zero_differences_and_p_one_without_warnings():
    scores = np.linspace(0.6, 0.97, 25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = paired_statistics(scores, scores.copy())
    assert s["dice_diff_mean"] == 0.0 and s["dice_diff_std"] == 0.0
    assert s["n_pairs"] == 25 and s["n_nonzero"] == 0
    assert s["p_ttest"] == 1.0 and s["p_wilcoxon"] == 1.0 and s["t_statistic"] == 0.0
    assert "every difference is 0" in s["note"]


def test_known_difference_mean_std_and_p_values():
    plain = np.array([0.90, 0.80, 0.85, 0.70, 0.95])
    diff = np.array([1.0, 2.0, 3.0, 4.0, 5.0]) * 1e-2
    s = paired_statistics(plain, plain + diff)
    assert s["n_pairs"] == 5
    assert s["dice_diff_mean"] == pytest.approx(0.03, abs=1e-12)
    assert s["dice_diff_std"] == pytest.approx(0.01 * np.sqrt(2.5), rel=1e-9)  # ddof=1
    t = 3.0 * np.sqrt(2.0)  # mean / (std / sqrt(n))
    assert s["t_statistic"] == pytest.approx(t, rel=1e-9)
    assert s["p_ttest"] == pytest.approx(2 * stats.t.sf(t, df=4), rel=1e-9)
    assert s["p_ttest"] == pytest.approx(stats.ttest_rel(plain + diff, plain).pvalue, rel=1e-9)
    # Wilcoxon, exact: all 5 differences positive -> p = 2 / 2**5
    assert s["p_wilcoxon"] == pytest.approx(2 / 32, rel=1e-12)


def test_degenerate_cases_are_defined_and_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        const = paired_statistics([0.5] * 6, [0.49] * 6)  # constant non-zero difference
        few = paired_statistics([0.5, np.nan, 0.7], [0.4, 0.3, np.nan])  # NaN pairs dropped
        none = paired_statistics([], [])
    assert const["p_ttest"] == 0.0 and const["t_statistic"] == -np.inf
    assert const["p_wilcoxon"] == pytest.approx(2 / 64)  # 6 negative differences, exact
    assert const["dice_diff_std"] == pytest.approx(0.0, abs=1e-15)
    assert few["n_pairs"] == 1 and few["dice_diff_mean"] == pytest.approx(-0.1)
    assert few["p_ttest"] is None and few["p_wilcoxon"] is None and few["dice_diff_std"] is None
    assert none["n_pairs"] == 0 and none["dice_diff_mean"] is None
    with pytest.raises(ValueError, match="equal length"):
        paired_statistics([0.1, 0.2], [0.1])


def reference_slice_dice(pred: np.ndarray, ref: np.ndarray, c: int) -> list[float]:
    """Per slice with the package's slow Dice; slices without foreground in either: 1.0."""
    out = []
    for p, r in zip(pred, ref, strict=True):
        scores = dice_per_class(p, r, c)
        out.append(1.0 if np.all(np.isnan(scores[1:])) else mean_foreground_dice(scores))
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 5), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_slice_dice_matches_the_slow_reference(c, s, side, seed):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, c, (s, side, side))
    ref = np.where(rng.random((s, side, side)) < 0.7, pred, rng.integers(0, c, (s, side, side)))
    pred[0] = 0  # a slice without foreground in the prediction
    if s > 1:
        ref[1] = pred[1] = 0  # and one without foreground anywhere: Dice 1
    assert np.allclose(slice_dice(pred, ref, c), reference_slice_dice(pred, ref, c))
    a = agreement(confusion(pred, ref, c))
    slow = dice_per_class(pred, ref, c)
    assert [np.nan if v is None else v for v in a["dice_per_class"]] == pytest.approx(
        slow, nan_ok=True)
    assert a["identical"] == pytest.approx(float((pred == ref).mean()))


def test_thresholds_files_get_unique_names_and_checksums(tmp_path):
    a = write_thresholds(tmp_path / "a")
    b = write_thresholds(tmp_path / "b", nan_threshold=1.0)
    c = write_thresholds(tmp_path / "a" / "x", "thresholds.json")
    files = load_thresholds([a, b, c])
    assert [f.name for f in files] == ["thresholds", "b-thresholds", "x-thresholds"]
    assert files[1].config["defaults"]["nan_threshold"] == 1.0
    assert files[0].sha256 != files[1].sha256


def test_atomic_path_replaces_whole_files_only(tmp_path):
    target = tmp_path / "seg.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    with atomic_path(target) as tmp:
        nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.int16), np.eye(4)), tmp)
    assert np.asarray(nib.load(target).dataobj).sum() == 8
    assert sorted(tmp_path.iterdir()) == [target]


# --- real volumes ----------------------------------------------------------------------------


def view_position(view: str, voxel: tuple[int, int, int]) -> tuple[int, int, int]:
    """(row, column, slice) of conformed ``voxel`` in ``view``: the axes mri.to_view puts
    first, second and last, read off a volume whose axis lengths tell them apart."""
    axes = [(2, 3, 4).index(n) for n in mri.to_view(np.zeros((2, 3, 4)), view).shape]
    return tuple(int(voxel[a]) for a in axes)


def view_logits(model: nn.Module, volume: np.ndarray, view: str, idx: list[int]) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(mri.thick_slices(mri.to_view(volume, view), 3, slices=idx))
        return model(x).numpy()


def fused_reference(logits: dict, idx: list[int], voxels: list[tuple[int, int, int]]
                    ) -> list[int]:
    """FastSurfer's view aggregation, voxel by voxel: argmax of 0.4 axial + 0.4 coronal + 0.2
    sagittal logits (view -> (S, C, H, W) of slices ``idx``; NaN: no vote), sagittal's 51
    classes expanded to 79."""
    logits = {v: np.nan_to_num(a, nan=0.0) for v, a in logits.items()}
    out = []
    for voxel in voxels:
        total = 0.0
        for view, weight in zip(mri.VIEWS, mri.VIEW_WEIGHTS, strict=True):
            r, c, s = view_position(view, voxel)
            vec = logits[view][idx.index(s), :, r, c]
            if len(vec) == NUM_SAGITTAL_CLASSES:
                vec = vec[FULL_TO_SAGITTAL]
            total = total + np.float32(weight) * vec
        out.append(int(np.argmax(total)))
    return out


@pytest.fixture(scope="module")
def brain():
    t1, labels = load_default_brain()
    return t1, labels


@pytest.fixture(scope="module")
def three_views(tmp_path_factory):
    """The bundled model on the bundled brain, all three views, 2 slices each."""
    folder = tmp_path_factory.mktemp("three")
    t = write_thresholds(folder, "half.json")
    progress = []
    result = validate("default", ["default"], [t], folder / "out", slices="124:132:4",
                      repeats=2, timing_slices=1,
                      on_progress=lambda d, n, what: progress.append((d, n)))
    return folder / "out", result, t, progress


def test_three_views_schema_and_statistics(three_views, brain):
    out, result, _, progress = three_views
    on_disk = json.loads((out / "validation.json").read_text())
    assert on_disk["views"] == result["views"]
    assert list(result["views"]) == list(mri.VIEWS)
    for per in result["views"].values():
        assert list(per) == ["half"] and sorted(per["half"]) == sorted(SCHEMA_KEYS)
        assert per["half"]["n_pairs"] == 2
    assert result["against"] == "labels"  # the bundled brain comes with its labels
    assert progress[-1] == (3, 3) and [d for d, _ in progress] == sorted(d for d, _ in progress)
    # the pooled statistics are the paired test of the per-slice Dice series
    (subject,) = result["subjects"]
    for view in mri.VIEWS:
        v = subject["views"][view]
        expect = paired_statistics(v["plain"]["dice_per_slice_vs_labels"],
                                   v["nanified"]["half"]["dice_per_slice_vs_labels"])
        assert {k: expect[k] for k in SCHEMA_KEYS} == result["views"][view]["half"]
    # provenance: model, weights, input checksum, thresholds file and content, versions
    prov = result["provenance"]
    assert prov["model"] == "default" and set(prov["weights_sha256"]) == set(mri.VIEWS)
    assert len(prov["inputs"][0]["input_sha256"]) == 64
    assert result["thresholds"]["half"]["config"]["defaults"]["nan_threshold"] == 0.5
    assert len(result["thresholds"]["half"]["sha256"]) == 64
    assert result["settings"]["selection"]["axial"] == "124:129:4"
    assert prov["scipy_version"] and prov["torch_version"] and prov["created"]


def test_three_views_match_direct_inference(three_views, brain):
    """Per-view Dice and the fused segmentation against the model run directly."""
    out, result, t, _ = three_views
    t1, labels = brain
    volume, truth = np.asarray(t1.dataobj), np.asarray(labels.dataobj)
    plain = load("default").model
    nan = nanify(load("default").model, config=t)
    idx = [124, 128]
    (subject,) = result["subjects"]
    plain_logits = {v: view_logits(plain, volume, v, idx) for v in mri.VIEWS}
    for view in mri.VIEWS:
        pred = labels_from_logits(torch.from_numpy(plain_logits[view])).numpy()
        ref = np.moveaxis(mri.to_view(truth, view)[..., idx], -1, 0)
        got = subject["views"][view]["plain"]["dice_per_slice_vs_labels"]
        assert got == pytest.approx([mean_foreground_dice(dice_per_class(p, r, 4))
                                     for p, r in zip(pred, ref, strict=True)])
        assert subject["views"][view]["nanified"]["half"]["skip"]["macs"] > 0.2
    # fused labels: 2 x 2 x 2 voxels predicted in every view, in the bundled brain's space
    files = subject["files"]["aggregated"]
    seg = nib.load(out / files["plain.nii.gz"])
    assert seg.shape == t1.shape and np.allclose(seg.affine, t1.affine)
    data = np.asarray(seg.dataobj)
    voxels = [tuple(v) for v in np.argwhere(data >= 0)]
    assert len(voxels) == 8 and set(np.unique(data)) <= {-1, 0, 1, 2, 3}
    assert [int(data[v]) for v in voxels] == fused_reference(plain_logits, idx, voxels)
    nan_data = np.asarray(nib.load(out / files["nanified-half.nii.gz"]).dataobj)
    nan_logits = {v: view_logits(nan, volume, v, idx) for v in mri.VIEWS}
    assert [int(nan_data[v]) for v in voxels] == fused_reference(nan_logits, idx, voxels)
    diff = np.asarray(nib.load(out / files["diff-half.nii.gz"]).dataobj)
    assert np.array_equal(diff, ((data != nan_data) & (data >= 0)).astype(np.uint8))


def test_three_views_outputs_timing_figures_report_and_resume(three_views):
    out, result, t, _ = three_views
    (subject,) = result["subjects"]
    computed = subject["computed"]
    assert computed["seconds"] > 0 and len(computed["load_average_before"]) == 3
    timing = subject["views"]["coronal"]["nanified"]["half"]["timing"]
    assert timing["repeats"] == 2 and len(timing["plain_seconds"]["all"]) == 2
    ratios = np.divide(timing["plain_seconds"]["all"], timing["nanified_seconds"]["all"])
    assert timing["speedup"] == pytest.approx(np.median(ratios))  # median of the rounds
    assert [timing["speedup_min"], timing["speedup_max"]] == pytest.approx(
        [ratios.min(), ratios.max()])
    assert timing["slowdown"] == (timing["speedup"] < 1)
    assert timing["verdict"] in ("faster", "slower", "no measurable difference")
    assert len(timing["load_average"]) == 2
    figures = [result["figures"]["dice_difference"], *subject["files"]["figures"].values()]
    assert len(figures) == 3
    for rel in figures:
        assert (out / rel).read_bytes().startswith(PNG)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no half-written file left
    html = report_section(out)
    assert "<table>" in html and html.count("data:image/png;base64,") == 3
    assert report_section(out / "subjects") is None
    # rerun: the finished subject is reused, nothing is recomputed
    seg = out / subject["files"]["aggregated"]["plain.nii.gz"]
    before = seg.stat().st_mtime_ns
    again = validate("default", ["default"], [t], out, slices="124:132:4", repeats=2,
                     timing_slices=1)
    assert seg.stat().st_mtime_ns == before
    assert again["views"] == result["views"] and again["subjects"] == result["subjects"]


def make_subject(brain, folder: Path) -> tuple[Path, Path]:
    """A real NIfTI unlike the conformed brain: cropped, flipped left-right, resampled to
    1.2 x 1.0 x 1.1 mm, intensities scaled and shifted (float32); labels likewise (MGZ)."""
    t1, labels = brain
    crop = np.s_[40:216, 20:236, 30:226]
    affine = t1.affine @ np.array([[1, 0, 0, 40], [0, 1, 0, 20], [0, 0, 1, 30], [0, 0, 0, 1.0]])
    vol = np.asarray(t1.dataobj)[crop][::-1].astype(np.float64)
    lab = np.asarray(labels.dataobj)[crop][::-1]
    n = vol.shape[0]
    affine = affine @ np.array([[-1, 0, 0, n - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    zoom = np.array([1.2, 1.0, 1.1])
    shape = tuple(int(s) for s in np.floor((np.array(vol.shape) - 1) / zoom) + 1)
    vol = affine_transform(vol, np.diag(zoom), output_shape=shape, order=1)
    lab = affine_transform(lab, np.diag(zoom), output_shape=shape, order=0)
    affine = affine @ np.diag([*zoom, 1.0])
    img_path, lab_path = folder / "subject.nii.gz", folder / "subject_labels.mgz"
    nib.save(nib.Nifti1Image((vol * 1.7 + 30.0).astype(np.float32), affine), img_path)
    nib.save(nib.MGHImage(lab.astype(np.int32), affine), lab_path)
    return img_path, lab_path


def test_two_inputs_segmentations_in_each_inputs_space(brain, tmp_path):
    img_path, lab_path = make_subject(brain, tmp_path)
    t = write_thresholds(tmp_path, "t.json")
    result = validate("default", ["default", str(img_path)], [t], tmp_path / "out",
                      views="coronal", labels=["default", str(lab_path)],
                      slices="100:160:30", repeats=0)
    assert [s["name"] for s in result["subjects"]] == ["default-brain", "subject"]
    assert result["views"]["coronal"]["t"]["n_pairs"] == 2 * 2  # slices x subjects
    assert result["subjects"][1]["views"]["coronal"]["nanified"]["t"]["timing"] is None
    made = nib.load(img_path)
    files = result["subjects"][1]["files"]["coronal"]
    assert sorted(files) == ["diff-t.nii.gz", "nanified-t.nii.gz", "plain.nii.gz"]
    seg = nib.load(tmp_path / "out" / files["plain.nii.gz"])
    assert seg.shape == made.shape and np.allclose(seg.affine, made.affine)
    assert seg.get_data_dtype() == np.int16
    # the segmentation lies on the subject: Dice against its own labels, where predicted
    pred = np.asarray(seg.dataobj)
    truth = np.asarray(nib.load(lab_path).dataobj)
    where = pred >= 0
    assert where.sum() > 20000

    def dice(p: np.ndarray) -> float:
        return mean_foreground_dice(dice_per_class(p[where], truth[where], 4))

    assert dice(pred) > 0.75
    # an upside-down or misplaced segmentation would be caught (the template is symmetric:
    # a left-right flip would not, the affine check above covers it)
    assert dice(pred) > dice(pred[:, ::-1]) + 0.3
    assert dice(pred) > dice(np.roll(pred, 4, axis=2)) + 0.3


class TinySeg(nn.Module):
    """conv -> pool (indices) -> conv -> unpool -> 1x1 classifier: NaN ops have work to do."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(7, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.unpool = nn.MaxUnpool2d(2)
        self.classifier = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        p, i = self.pool(y)
        u = self.unpool(torch.relu(self.conv2(p)), i, output_size=y.shape[-2:])
        return self.classifier(u + y)


def tiny_fastsurfer(view: str = "coronal") -> LoadedModel:
    """A model predicting FastSurfer's label sets (79 classes, 51 sagittal), random weights."""
    torch.manual_seed({"axial": 1, "coronal": 2, "sagittal": 3}[view])
    classes = NUM_SAGITTAL_CLASSES if view == "sagittal" else NUM_CLASSES
    return LoadedModel(TinySeg(classes).eval(), "tiny", "segmentation", "mri-thick-slices",
                       (7, 256, 256), classes, view)


def test_fastsurfer_label_set_checkpoint_per_view_mgz_and_fusion(brain, tmp_path):
    t1, labels = brain
    spec = "test_validate:tiny_fastsurfer"
    checkpoints = []
    for view in mri.VIEWS:  # one checkpoint per view, real torch.save files
        path = tmp_path / f"tiny_{view}.pt"
        torch.save(tiny_fastsurfer(view).model.state_dict(), path)
        checkpoints.append(path)
    ids = np.array([0, 24, 1024, 2], dtype=np.int32)  # CSF, ctx-lh-precentral, left WM
    lab_path = tmp_path / "aparc.mgz"
    nib.save(nib.MGHImage(ids[np.asarray(labels.dataobj)], t1.affine), lab_path)
    t = write_thresholds(tmp_path, "t.json")
    result = validate(spec, ["default"], [t], tmp_path / "out", checkpoints=checkpoints,
                      labels=[str(lab_path)], slices="126:130:2", repeats=0)
    assert result["settings"]["label_space"] == "freesurfer"
    assert result["settings"]["classes"] == {"axial": 79, "coronal": 79, "sagittal": 51}
    (subject,) = result["subjects"]
    assert subject["views"]["sagittal"]["plain"]["vs_labels"]["dice_per_class"][0] is not None
    files = subject["files"]["aggregated"]
    nii = np.asarray(nib.load(tmp_path / "out" / files["plain.nii.gz"]).dataobj)
    mgz = nib.load(tmp_path / "out" / files["plain.mgz"])
    assert isinstance(mgz, nib.MGHImage) and np.array_equal(np.asarray(mgz.dataobj), nii)
    assert np.allclose(mgz.affine, t1.affine)
    assert set(np.unique(nii)) <= {-1, *LABEL_IDS.tolist()}
    voxels = [tuple(v) for v in np.argwhere(nii >= 0)]
    assert len(voxels) == 8
    logits = {v: view_logits(tiny_fastsurfer(v).model, np.asarray(t1.dataobj), v, [126, 128])
              for v in mri.VIEWS}
    expect = fused_reference(logits, [126, 128], voxels)
    assert [int(nii[v]) for v in voxels] == [int(LABEL_IDS[c]) for c in expect]


def test_checkpoints_must_fit_the_views(tmp_path):
    with pytest.raises(ValueError, match="once per view"):
        validate("fastsurfer-vinn", ["default"], [write_thresholds(tmp_path)], tmp_path / "o",
                 checkpoints=[tmp_path / "x_coronal.pkl"])
    ck = tmp_path / "net_axial.pt"
    torch.save(tiny_fastsurfer("coronal").model.state_dict(), ck)
    with pytest.raises(ValueError, match="names view 'axial' but is given for 'coronal'"):
        validate("test_validate:tiny_fastsurfer", ["default"], [write_thresholds(tmp_path)],
                 tmp_path / "o", views="coronal,sagittal", checkpoints=[ck, ck])


def test_report_includes_validation(three_views, tmp_path):
    from nanprobe.report import write_report
    from nanprobe.run import RunSpec, mca_run

    mca_run(RunSpec(model="mnist", input="mnist", slices="0:2", samples=2), tmp_path / "run")
    shutil.copytree(three_views[0], tmp_path / "run" / "validation")
    html_path, _ = write_report(tmp_path / "run")
    page = html_path.read_text()
    assert '<section id="validation">' in page and "Dice per slice" in page


# --- CLI -------------------------------------------------------------------------------------


def test_cli_runs_and_prints_the_statistics(tmp_path):
    t = write_thresholds(tmp_path)
    result = runner.invoke(app, ["validate", "default", "default", "--thresholds", str(t),
                                 "--views", "coronal", "--slices", "120,136", "--repeats", "1",
                                 "--timing-slices", "1", "--out", str(tmp_path / "v")])
    assert result.exit_code == 0, result.output
    assert "p t-test" in result.output and "MACs skipped" in result.output
    data = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert data["views"]["coronal"]["thresholds"]["n_pairs"] == 2
    assert data["provenance"]["command"].startswith("nanprobe validate default default ")
    assert "--views coronal" in data["provenance"]["command"]
    assert data["settings"]["slices"] == "120,136"
    assert data["settings"]["selection"]["coronal"] == "120:137:16"


@pytest.mark.parametrize(("args", "message"), [
    ([], "give at least one --thresholds file"),
    (["--thresholds", "missing.json"], "missing.json does not exist"),
    (["--thresholds", "{bad}"], "is not valid JSON"),
    (["--thresholds", "{calibration}"], "not a calibration.json"),
    (["--thresholds", "{t}", "--views", "axial,frontal"], "unknown view 'frontal'"),
    (["--thresholds", "{t}", "--labels", "none", "--labels", "none"], "once per input (1)"),
    (["--thresholds", "{t}", "--slices", "300:400"], "outside the 256 available"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "calibration.json").write_text(json.dumps({"settings": [], "recommended": 0}))
    paths = {"t": write_thresholds(tmp_path), "bad": tmp_path / "bad.json",
             "calibration": tmp_path / "calibration.json"}
    args = [a.format(**paths) for a in args]
    result = runner.invoke(app, ["validate", "default", "default", *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(("model", "inputs", "message"), [
    ("mnist", ["default"], "validate is for MRI segmentation models"),
    ("default", ["mnist"], "is not an MRI volume"),
    ("default", ["x.npy"], "is not an MRI volume"),
    ("default", ["nowhere.nii.gz"], "nowhere.nii.gz does not exist"),
])
def test_cli_rejects_non_mri_models_and_inputs(tmp_path, model, inputs, message):
    t = write_thresholds(tmp_path)
    result = runner.invoke(app, ["validate", model, *inputs, "--thresholds", str(t)])
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert len(result.output.strip().splitlines()) == 1


def test_cli_help():
    result = runner.invoke(app, ["validate", "--help"])
    assert result.exit_code == 0 and "--thresholds" in result.output


def test_rejects_a_corrupt_input(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="broken.nii.gz"):
        validate("default", [str(bad)], [write_thresholds(tmp_path)], tmp_path / "o",
                 views="coronal", slices="128", repeats=0)
