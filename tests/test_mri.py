"""Tests for the FastSurfer-style MRI input pipeline (nanprobe.data.mri, nanprobe.data.labels)."""

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanprobe.data import labels
from nanprobe.data.mri import (
    CONFORMED_SHAPE,
    VIEWS,
    VolumeError,
    aggregate_views,
    conform,
    from_view,
    is_conformed,
    load_volume,
    map_aparc_aseg2label,
    map_label2aparc_aseg,
    resample_labels,
    sagittal_to_full,
    slices_to_volume,
    thick_slices,
    to_view,
    view_axes,
)

# FastSurfer v1 map_prediction_sagittal2full index list (51 sagittal -> 79 classes), verbatim.
FASTSURFER_SAG2FULL = [
    0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 1, 2, 3, 14, 15, 4, 16, 17, 18, 5, 6, 7, 8, 9, 10, 11, 12,
    13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35,
    36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 20, 22, 27, 29, 30, 31, 33, 34,
    38, 39, 40, 41, 42, 45,
]  # fmt: skip
# FastSurfer eval.py: (B, C, H, W) network outputs -> (X, Y, Z, C) volume layout, per view.
FASTSURFER_PERMUTE = {"axial": (3, 0, 2, 1), "coronal": (2, 3, 0, 1), "sagittal": (0, 3, 2, 1)}

# Synthetic anisotropic RAS scan: 1.2 x 1.0 x 0.9 mm, float32, uniform "head" (100) holding a
# 20-voxel marker cube (200), plus one extreme outlier voxel outside the head.
SCAN_SHAPE = (150, 180, 200)
MARKER = np.s_[40:60, 100:120, 60:80]
OUTLIER = (3, 3, 3)


@pytest.fixture(scope="module")
def scan() -> nib.Nifti1Image:
    affine = np.diag([1.2, 1.0, 0.9, 1.0])
    affine[:3, 3] = (-85.0, -95.0, -80.0)
    grid = np.ogrid[tuple(slice(0, n) for n in SCAN_SHAPE)]
    r2 = sum(((g - n / 2) / (0.45 * n)) ** 2 for g, n in zip(grid, SCAN_SHAPE, strict=True))
    data = np.where(r2 < 1.0, 100.0, 0.0).astype(np.float32)
    data[MARKER] = 200.0
    data[OUTLIER] = 1e6
    return nib.Nifti1Image(data, affine)


@pytest.fixture(scope="module")
def conformed(scan: nib.Nifti1Image) -> nib.Nifti1Image:
    return conform(scan)


# --- conform -------------------------------------------------------------------------------


def test_conform_anisotropic_float_scan(scan: nib.Nifti1Image, conformed: nib.Nifti1Image) -> None:
    out = np.asanyarray(conformed.dataobj)
    assert conformed.shape == CONFORMED_SHAPE
    assert nib.aff2axcodes(conformed.affine) == ("L", "I", "A")
    assert np.allclose(conformed.header.get_zooms(), 1.0)
    assert out.dtype == np.uint8 and conformed.get_data_dtype() == np.uint8
    assert is_conformed(conformed) and not is_conformed(scan)
    # the conformed grid is centred (voxel 128) on the input's centre voxel (shape / 2)
    centre = scan.affine @ [*(np.array(SCAN_SHAPE) / 2), 1]
    assert np.allclose(conformed.affine @ [128, 128, 128, 1], centre)
    # robust scale: 200 (the 0.999 quantile of non-zero voxels) -> 255, so the head (100) sits
    # at 127.5 (up to interpolation round-off); scaling by the 1e6 outlier would crush it to 0
    assert np.median(out[out > 0]) in (127, 128)
    assert np.count_nonzero(out == 255) > 8000


def test_conform_keeps_world_positions(scan: nib.Nifti1Image, conformed: nib.Nifti1Image) -> None:
    out = np.asanyarray(conformed.dataobj)
    marker_vox = np.array([(s.start + s.stop - 1) / 2 for s in MARKER])
    marker_world = scan.affine @ [*marker_vox, 1]
    bright = np.argwhere(out >= 250)  # marker (~24*20*18 mm^3) + a few voxels near the outlier
    assert abs(len(bright) - 24 * 20 * 18) < 1500
    centroid_world = conformed.affine @ [*bright.mean(axis=0), 1]
    assert np.linalg.norm(centroid_world - marker_world) < 1.0


def test_conformed_image_passes_unchanged(conformed: nib.Nifti1Image, tmp_path) -> None:
    again = conform(conformed)
    assert np.array_equal(np.asanyarray(again.dataobj), np.asanyarray(conformed.dataobj))
    assert np.array_equal(again.affine, conformed.affine)
    path = tmp_path / "orig.nii"
    nib.save(conformed, path)
    loaded = load_volume(path)
    assert is_conformed(loaded)
    assert np.array_equal(np.asanyarray(conform(loaded).dataobj), np.asanyarray(conformed.dataobj))


def test_conform_1mm_reordering_is_exact() -> None:
    """A 1 mm RAS volume (odd sizes: half-voxel centre) is copied voxel for voxel, not blurred."""
    rng = np.random.default_rng(1)
    data = rng.integers(1, 256, size=(41, 50, 61), dtype=np.uint8)
    affine = np.eye(4)
    affine[:3, 3] = (-20.0, -30.0, -25.0)
    out = conform(nib.Nifti1Image(data, affine))
    vox = np.argwhere(np.ones(data.shape, dtype=bool))
    world = affine @ np.c_[vox, np.ones(len(vox))].T
    out_vox = np.rint(np.linalg.inv(out.affine) @ world)[:3].astype(int)
    out_data = np.asanyarray(out.dataobj)
    assert np.array_equal(out_data[tuple(out_vox)], data[tuple(vox.T)])
    assert np.count_nonzero(out_data) == data.size
    assert nib.aff2axcodes(out.affine) == ("L", "I", "A")


def test_conform_constant_image_is_background() -> None:
    out = conform(nib.Nifti1Image(np.full((10, 12, 14), 7.0, dtype=np.float32), np.eye(4)))
    assert not np.asanyarray(out.dataobj).any()


def test_conform_rejects_non_finite() -> None:
    data = np.ones((8, 8, 8), dtype=np.float32)
    data[1, 2, 3] = np.nan
    with pytest.raises(VolumeError, match="non-finite"):
        conform(nib.Nifti1Image(data, np.eye(4)))


# --- load_volume ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "image_class", "dtype"),
    [
        (".nii", nib.Nifti1Image, np.int16),
        (".nii.gz", nib.Nifti1Image, np.float32),
        (".mgz", nib.MGHImage, np.uint8),
    ],
)
def test_load_volume_formats(tmp_path, suffix, image_class, dtype) -> None:
    rng = np.random.default_rng(2)
    data = rng.integers(0, 120, size=(7, 8, 9)).astype(dtype)
    affine = np.array([[-1.0, 0, 0, 3], [0, 0, 1.0, -4], [0, -1.0, 0, 5], [0, 0, 0, 1]])
    nib.save(image_class(data, affine), tmp_path / f"vol{suffix}")
    img = load_volume(tmp_path / f"vol{suffix}")
    assert isinstance(img, image_class)
    assert np.allclose(img.affine, affine)
    loaded = np.asanyarray(img.dataobj)
    assert loaded.dtype == dtype and np.array_equal(loaded, data)


def _write_bad_file(kind: str, tmp_path):
    path = tmp_path / {"unknown": "scan.txt", "garbage": "scan.nii"}.get(kind, "scan.nii.gz")
    if kind in ("unknown", "garbage"):
        path.write_text("this is not an image\n")
    elif kind == "2d":
        nib.save(nib.Nifti1Image(np.ones((8, 8), dtype=np.float32), np.eye(4)), path)
    elif kind == "4d":
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 3), dtype=np.float32), np.eye(4)), path)
    elif kind == "truncated":
        data = np.random.default_rng(3).random((16, 16, 16)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind in ("nan", "inf"):
        data = np.ones((6, 6, 6), dtype=np.float32)
        data[2, 2, 2] = np.nan if kind == "nan" else np.inf
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


@pytest.mark.parametrize(
    ("kind", "phrase"),
    [
        ("missing", "no such file"),
        ("unknown", "unknown image format"),
        ("garbage", "not a readable .nii image"),
        ("2d", "2-D image"),
        ("4d", "several volumes"),
        ("truncated", "truncated or corrupt"),
        ("nan", "non-finite"),
        ("inf", "non-finite"),
    ],
)
def test_load_volume_bad_files(tmp_path, kind, phrase) -> None:
    path = _write_bad_file(kind, tmp_path)
    with pytest.raises(VolumeError, match=phrase) as info:
        load_volume(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert isinstance(info.value, ValueError)


# --- views ---------------------------------------------------------------------------------

view_st = st.sampled_from(VIEWS)
dims_st = st.tuples(*(st.integers(1, 6),) * 3)


@settings(max_examples=60, deadline=None)
@given(view=view_st, dims=dims_st, classes=st.integers(1, 4))
def test_to_view_from_view_round_trip(view, dims, classes) -> None:
    vol = np.arange(np.prod(dims)).reshape(dims)
    assert np.array_equal(from_view(to_view(vol, view), view), vol)
    probs = np.arange(classes * np.prod(dims)).reshape(classes, *dims)
    stack = to_view(probs, view)
    assert stack.shape[:2] == (to_view(vol, view).shape[2], classes)
    assert np.array_equal(from_view(stack, view), probs)
    # a class volume's per-slice stack holds the view volume's slices for every class
    assert np.array_equal(stack[:, 0], np.moveaxis(to_view(probs[0], view), -1, 0))


def test_views_follow_fastsurfer() -> None:
    vol = np.arange(5 * 6 * 7).reshape(5, 6, 7)
    # FastSurfer's transform_axial / transform_sagittal (coronal2x=True); coronal is identity
    assert np.array_equal(to_view(vol, "axial"), np.moveaxis(vol, [0, 1, 2], [1, 2, 0]))
    assert np.array_equal(to_view(vol, "sagittal"), np.moveaxis(vol, [0, 1, 2], [2, 1, 0]))
    assert np.array_equal(to_view(vol, "coronal"), vol)
    # on LIA data: axial slices fix the I axis (j), sagittal the L axis (i), coronal A (k)
    assert np.array_equal(to_view(vol, "axial")[:, :, 2], vol[:, 2, :].T)
    assert np.array_equal(to_view(vol, "sagittal")[:, :, 3], vol[3].T)
    assert np.array_equal(to_view(vol, "coronal")[:, :, 4], vol[:, :, 4])
    for view in VIEWS:
        h, w, s = to_view(vol, view).shape
        outputs = np.arange(s * 3 * h * w).reshape(s, 3, h, w)  # (B, C, H, W) network outputs
        fastsurfer = np.moveaxis(outputs.transpose(FASTSURFER_PERMUTE[view]), -1, 0)
        assert np.array_equal(from_view(outputs, view), fastsurfer)


def test_unknown_view() -> None:
    with pytest.raises(ValueError, match="unknown view"):
        to_view(np.zeros((2, 2, 2)), "transverse")


# --- thick slices --------------------------------------------------------------------------


def _thick_slices_reference(vol_view: np.ndarray, t: int) -> np.ndarray:
    h, w, n = vol_view.shape
    out = np.zeros((n, 2 * t + 1, h, w), dtype=np.float32)
    for s in range(n):
        for k in range(2 * t + 1):
            neighbour = min(max(s - t + k, 0), n - 1)
            out[s, k] = vol_view[:, :, neighbour].astype(np.float32) / np.float32(255.0)
    return np.clip(out, 0.0, 1.0)


@pytest.mark.parametrize("t", [3, 1, 0])
def test_thick_slices_match_reference(t) -> None:
    vol = np.random.default_rng(4).integers(0, 256, size=(6, 5, 9), dtype=np.uint8)
    out = thick_slices(vol, slice_thickness=t)
    assert out.shape == (9, 2 * t + 1, 6, 5) and out.dtype == np.float32
    assert out.flags.c_contiguous
    assert np.array_equal(out, _thick_slices_reference(vol, t))


def test_thick_slices_clip() -> None:
    vol = np.random.default_rng(5).uniform(-100.0, 400.0, size=(4, 3, 5))
    out = thick_slices(vol)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.array_equal(out, _thick_slices_reference(vol, 3))


@pytest.mark.parametrize(
    "slices",
    [range(2, 7), slice(1, 10, 3), slice(-3, None), [0, 10, 4], 7, np.arange(11) % 2 == 0],
)
@pytest.mark.parametrize("view", VIEWS)
def test_thick_slices_selection_equals_full_build(slices, view) -> None:
    vol = np.random.default_rng(6).integers(0, 256, size=(11, 11, 11), dtype=np.uint8)
    vol_view = to_view(vol, view)
    full = thick_slices(vol_view)
    picked = np.atleast_1d(np.arange(11)[slices])
    assert np.array_equal(thick_slices(vol_view, slices=slices), full[picked])


def test_thick_slices_selection_on_conformed(conformed: nib.Nifti1Image) -> None:
    vol = np.asanyarray(conformed.dataobj)
    view = to_view(vol, "axial")
    out = thick_slices(view, slices=range(120, 125))
    assert out.shape == (5, 7, 256, 256)
    assert np.array_equal(out[0, 3], view[:, :, 120] / np.float32(255.0))
    assert np.array_equal(out[4, 6], view[:, :, 127] / np.float32(255.0))
    edge = thick_slices(view, slices=[0])
    assert np.array_equal(edge[0, 0], edge[0, 3])  # edge padding at the volume border


def test_thick_slices_selection_out_of_range() -> None:
    with pytest.raises(IndexError):
        thick_slices(np.zeros((2, 2, 5)), slices=[5])


# --- slices_to_volume ----------------------------------------------------------------------


@pytest.mark.parametrize("view", VIEWS)
def test_slices_to_volume_round_trip(view) -> None:
    shape = (5, 6, 7)
    rng = np.random.default_rng(7)
    probs = rng.random((3, *shape)).astype(np.float32)
    n = to_view(probs[0], view).shape[2]
    idx = np.array([n - 1, 0, 2])
    outputs = to_view(probs, view)[idx]  # (S, C, H, W) per-slice outputs of those slices
    vol = slices_to_volume(outputs, view, idx, shape=shape)
    assert vol.shape == (3, *shape) and vol.dtype == np.float32
    picked = np.zeros(n, dtype=bool)
    picked[idx] = True
    mask = from_view(np.broadcast_to(picked, to_view(probs[0], view).shape), view)
    assert np.array_equal(vol[:, mask], probs[:, mask])
    assert np.isnan(vol[:, ~mask]).all()
    # all slices: identical to from_view; labels (S, H, W): -1 where not given
    assert np.array_equal(slices_to_volume(to_view(probs, view), view, None, shape), probs)
    lab = rng.integers(0, 79, size=shape).astype(np.uint8)
    lab_slices = np.moveaxis(to_view(lab, view), -1, 0)[idx]
    lab_vol = slices_to_volume(lab_slices, view, idx, shape)
    assert lab_vol.dtype == np.int16
    assert np.array_equal(lab_vol[mask], lab[mask]) and (lab_vol[~mask] == -1).all()
    filled = slices_to_volume(lab_slices, view, idx, shape, fill=0)
    assert filled.dtype == np.uint8 and (filled[~mask] == 0).all()


def test_slices_to_volume_conformed_default_shape() -> None:
    outputs = np.ones((2, 1, 256, 256), dtype=np.float32)
    vol = slices_to_volume(outputs, "sagittal", range(100, 102))
    assert vol.shape == (1, *CONFORMED_SHAPE)
    assert (vol[0, 100:102] == 1).all() and np.isnan(vol[0, :100]).all()


def test_slices_to_volume_shape_errors() -> None:
    with pytest.raises(ValueError, match="S=2"):
        slices_to_volume(np.zeros((3, 1, 4, 4)), "coronal", [0, 1], (4, 4, 4))
    with pytest.raises(ValueError, match="axial slices"):
        slices_to_volume(np.zeros((1, 1, 5, 4)), "axial", [0], (4, 4, 6))


# --- labels and view aggregation -----------------------------------------------------------


def test_label_tables() -> None:
    assert labels.NUM_CLASSES == len(labels.LABEL_IDS) == 79
    assert labels.NUM_SAGITTAL_CLASSES == len(labels.SAGITTAL_LABEL_IDS) == 51
    assert labels.label_id(1) == 2 and labels.label_name(19) == "Right-Cerebral-White-Matter"
    assert labels.class_index(2028) == 78 and labels.label_name(78) == "ctx-rh-superiorfrontal"
    assert labels.sagittal_label_id(5) == 41 and labels.sagittal_label_id(50) == 1035
    assert labels.FULL_TO_SAGITTAL.tolist() == FASTSURFER_SAG2FULL
    assert np.all(np.diff(labels.LABEL_IDS) > 0)
    assert np.array_equal(map_label2aparc_aseg(np.arange(79)), labels.LABEL_IDS)
    assert map_label2aparc_aseg(np.array([-1, 0, 33])).tolist() == [-1, 0, 77]


def test_sagittal_to_full() -> None:
    sag = np.random.default_rng(8).random((2, 51, 3, 3))
    full = sagittal_to_full(sag, axis=1)
    assert full.shape == (2, 79, 3, 3)
    assert np.array_equal(full, sag[:, FASTSURFER_SAG2FULL])
    wm_sag = int(np.flatnonzero(labels.SAGITTAL_LABEL_IDS == 41)[0])
    for fs_id in (2, 41):  # Left-/Right-Cerebral-White-Matter read the merged WM class
        assert np.array_equal(full[:, labels.class_index(fs_id)], sag[:, wm_sag])
    with pytest.raises(ValueError, match="51 sagittal classes"):
        sagittal_to_full(full, axis=1)


def _onehot(pairs: dict[int, float], n: int) -> np.ndarray:
    p = np.zeros(n)
    for k, v in pairs.items():
        p[k] = v
    return p


def test_aggregate_views_constructed() -> None:
    cls = labels.class_index
    sag = {int(lid): k for k, lid in enumerate(labels.SAGITTAL_LABEL_IDS)}
    # voxel -> (axial = coronal probabilities over 79 classes, sagittal over 51), expected id
    cases = [
        # all views agree
        ({cls(17): 1.0}, {sag[53]: 1.0}, 17),
        # axial/coronal prefer Left-Thalamus (0.55 vs 0.45) but the sagittal WM vote (+0.2 to
        # both WM classes) tips it to WM, and the hemisphere comes from axial/coronal
        ({cls(10): 0.55, cls(2): 0.45}, {sag[41]: 1.0}, 2),
        ({cls(49): 0.55, cls(41): 0.45}, {sag[41]: 1.0}, 41),
        # lateralised cortex: ctx-rh-precuneus through the merged ctx-lh-precuneus class
        ({cls(2025): 0.45, cls(1025): 0.05, cls(24): 0.5}, {sag[1025]: 1.0}, 2025),
        # without a sagittal vote for WM the thalamus wins
        ({cls(10): 0.55, cls(2): 0.45}, {sag[14]: 1.0}, 10),
    ]
    n = len(cases)
    axial = np.zeros((79, n, 1, 1), dtype=np.float32)
    sagittal = np.zeros((51, n, 1, 1), dtype=np.float32)
    for x, (ac, sg, _) in enumerate(cases):
        axial[:, x, 0, 0] = _onehot(ac, 79)
        sagittal[:, x, 0, 0] = _onehot(sg, 51)
    expected = [fs_id for *_, fs_id in cases]
    result = aggregate_views(axial, axial.copy(), sagittal)
    assert result.shape == (n, 1, 1) and result.dtype == np.int32
    assert map_label2aparc_aseg(result).ravel().tolist() == expected
    pre_expanded = aggregate_views(axial, axial, sagittal_to_full(sagittal))
    assert np.array_equal(pre_expanded, result)


def test_aggregate_views_matches_weighted_argmax() -> None:
    rng = np.random.default_rng(9)
    spatial = (19, 3, 2)  # more X planes than one aggregation chunk
    axial, coronal = (rng.random((79, *spatial)).astype(np.float32) for _ in range(2))
    sagittal = rng.random((51, *spatial)).astype(np.float32)
    sagittal[:, 4, 1, 0] = np.nan  # a voxel whose sagittal slice was not predicted
    fused = 0.4 * axial + 0.4 * coronal + 0.2 * sagittal[FASTSURFER_SAG2FULL]
    expected = fused.argmax(axis=0)
    expected[4, 1, 0] = -1
    assert np.array_equal(aggregate_views(axial, coronal, sagittal), expected)


def test_aggregate_views_shape_errors() -> None:
    good = np.zeros((79, 2, 2, 2))
    with pytest.raises(ValueError, match="coronal"):
        aggregate_views(good, np.zeros((51, 2, 2, 2)), good)
    with pytest.raises(ValueError, match="sagittal"):
        aggregate_views(good, good, np.zeros((51, 2, 2, 3)))


# --- inverse mapping of segmentations -------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.permutations([0, 1, 2]), st.lists(st.sampled_from([-1, 1]), min_size=3, max_size=3),
       st.lists(st.integers(-8, 30), min_size=3, max_size=3),
       st.tuples(*(st.integers(1, 30) for _ in range(3))), st.integers(0, 2**31 - 1))
def test_resample_labels_reordering_matches_nearest_neighbour(perm, signs, shift, shape, seed):
    """The copying fast path (axis swaps, flips, integer shifts) against scipy's order-0."""
    from scipy.ndimage import affine_transform

    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 7, (11, 17, 13)).astype(np.int16)
    vox2vox = np.zeros((4, 4))
    vox2vox[3, 3] = 1.0
    for a in range(3):
        vox2vox[perm[a], a] = signs[a]
    vox2vox[:3, 3] = shift
    source = np.diag([1.0, 2.0, 1.5, 1.0])
    source[:3, 3] = (5.0, -3.0, 7.0)
    got = resample_labels(lab, source, shape, source @ vox2vox, fill=-1)
    ref = affine_transform(lab, vox2vox, output_shape=shape, order=0, mode="constant", cval=-1)
    assert got.dtype == lab.dtype and np.array_equal(got, ref)


def test_resample_labels_inverts_conform_on_a_1mm_scan() -> None:
    """A 1 mm RAS scan is only reordered by conform: labels go there and back exactly."""
    rng = np.random.default_rng(3)
    shape = (60, 70, 50)
    affine = np.eye(4)
    affine[:3, 3] = (-30.0, -40.0, -20.0)
    img = nib.Nifti1Image(rng.random(shape).astype(np.float32) * 100 + 1, affine)
    lab = rng.integers(0, 4, shape).astype(np.int16)
    grid = conform(img).affine
    on_grid = resample_labels(lab, affine, CONFORMED_SHAPE, grid, fill=-1)
    assert np.count_nonzero(on_grid >= 0) == lab.size  # every voxel lands once
    assert np.array_equal(resample_labels(on_grid, grid, shape, affine), lab)
    # through the general path: a quarter-voxel shift rounds back onto the same voxels
    shifted = affine.copy()
    shifted[:3, 3] += 0.25
    general = resample_labels(on_grid, grid, shape, shifted)
    assert np.array_equal(general, lab)


def test_resample_labels_on_an_oblique_grid_keeps_labels() -> None:
    lab = np.zeros((20, 20, 20), np.int16)
    lab[5:15, 5:15, 5:15] = 3
    rot = np.eye(4)
    c, s = np.cos(0.3), np.sin(0.3)
    rot[:2, :2] = [[c, -s], [s, c]]
    out = resample_labels(lab, np.eye(4), (20, 20, 20), rot)
    assert set(np.unique(out)) == {0, 3} and 0.7 < (out == 3).sum() / (lab == 3).sum() < 1.3


def test_map_aparc_aseg2label_inverts_map_label2aparc_aseg() -> None:
    classes = np.arange(labels.NUM_CLASSES)
    assert np.array_equal(map_aparc_aseg2label(map_label2aparc_aseg(classes)), classes)
    # a right parcel predicted with its left twin's class; unknown ids are background
    assert map_aparc_aseg2label(np.array([2003, 85, 1000, 5000, -1])).tolist() == [
        labels.class_index(1003), 0, 0, 0, 0]
    with pytest.raises(ValueError, match="integers"):
        map_aparc_aseg2label(np.array([2.5]))


@pytest.mark.parametrize("view", VIEWS)
def test_view_axes_match_to_view(view) -> None:
    vol = np.zeros((2, 3, 4))
    h, w, s = view_axes(view)
    assert to_view(vol, view).shape == (vol.shape[h], vol.shape[w], vol.shape[s])
