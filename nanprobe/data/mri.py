"""FastSurfer-style MRI input pipeline: load, conform, slice per view, and map outputs back.

Conventions (FastSurferCNN). A *conformed* volume is 256³, 1 mm isotropic, LIA-oriented uint8;
index it as ``vol[i, j, k]`` with i → Left, j → Inferior, k → Anterior. Each view slices a
*view volume* ``(H, W, S)`` along its last axis:

- coronal:  the conformed array itself, slice ``s`` is ``vol[:, :, s]``   (H=i, W=j);
- axial:    ``vol.transpose(2, 0, 1)``, slice ``s`` is ``vol[:, s, :].T``  (H=k, W=i);
- sagittal: ``vol.transpose(2, 1, 0)``, slice ``s`` is ``vol[s, :, :].T``  (H=k, W=j).

Networks see stacks ``(S, 7, H, W)`` of 7 neighbouring slices and emit per-slice outputs
``(S, C, H, W)``; :func:`from_view` / :func:`slices_to_volume` put those back as ``(C, X, Y, Z)``
class volumes, and :func:`aggregate_views` fuses the three views into one label volume.
"""

import zlib
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, SpatialImage
from scipy.ndimage import affine_transform

from nanprobe.data.labels import FULL_TO_SAGITTAL, LABEL_IDS, NUM_CLASSES, NUM_SAGITTAL_CLASSES

View = Literal["axial", "coronal", "sagittal"]
#: A slice selection: an index, a ``slice``/``range``, a sequence or an index/boolean array.
SliceSelection = int | slice | range | Sequence[int] | np.ndarray

VIEWS: tuple[View, ...] = ("axial", "coronal", "sagittal")
CONFORMED_SHAPE: tuple[int, int, int] = (256, 256, 256)
#: Direction cosines of a 1 mm LIA voxel grid (columns: voxel axes i, j, k in RAS world space).
LIA_DIRECTIONS: np.ndarray = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
#: FastSurfer's view-aggregation weights, in (axial, coronal, sagittal) order.
VIEW_WEIGHTS: tuple[float, float, float] = (0.4, 0.4, 0.2)

_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
# View volume (H, W, S) axes, as axes of the conformed volume (FastSurfer's transform_axial /
# transform_sagittal; coronal is the identity).
_VIEW_AXES: dict[str, tuple[int, int, int]] = {
    "coronal": (0, 1, 2),
    "axial": (2, 0, 1),
    "sagittal": (2, 1, 0),
}
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)
_AGGREGATE_CHUNK = 8  # planes along X fused at once: bounds the temporaries of 79-class volumes


class VolumeError(ValueError):
    """An MRI volume that cannot be used; the message is one line: what is wrong, what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def _check_finite(data: np.ndarray, source: str) -> None:
    if data.dtype.kind in "fc" and not np.isfinite(data).all():
        bad = data.size - np.count_nonzero(np.isfinite(data))
        raise VolumeError(
            f"{source}: {bad} non-finite (NaN/inf) voxels; "
            "fix or mask them (e.g. set them to 0) before loading or conforming"
        )


def _spatial_shape(shape: tuple[int, ...], source: str) -> tuple[int, int, int]:
    """3-D shape of an image of ``shape`` (trailing singleton axes dropped); else VolumeError."""
    if len(shape) > 3 and any(n != 1 for n in shape[3:]):
        raise VolumeError(
            f"{source}: {len(shape)}-D image of shape {shape} holds several volumes; "
            "extract a single 3-D frame first"
        )
    if len(shape) < 3 or min(shape[:3]) < 2:
        ndim = sum(n > 1 for n in shape[:3])
        raise VolumeError(
            f"{source}: {ndim}-D image of shape {shape}; a 3-D volume is required "
            "(not a single slice)"
        )
    return (shape[0], shape[1], shape[2])


def load_volume(path: str | PathLike[str]) -> SpatialImage:
    """Read a 3-D NIfTI (.nii, .nii.gz) or MGH (.mgz, .mgh) volume, voxel data loaded in memory.

    The returned image has the file's class, affine and header; its voxel array is read once
    and validated. Raises :class:`VolumeError` (one-line message) for a missing file, an
    unknown or unreadable format, truncated/corrupt voxel data, a 2-D or multi-frame image, or
    NaN/inf voxels.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file; check the path")
    name = path.name.lower()
    suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise VolumeError(
            f"{path}: unknown image format {''.join(path.suffixes) or '(no extension)'!r}; "
            f"expected one of {', '.join(_SUFFIXES)}"
        )
    try:
        img = nib.load(path)
    except _READ_ERRORS as exc:
        raise VolumeError(
            f"{path}: not a readable {suffix} image ({exc}); check that the file is a valid "
            f"{suffix} volume and re-export it if needed"
        ) from exc
    try:
        data = np.asanyarray(img.dataobj)
    except _READ_ERRORS as exc:
        raise VolumeError(
            f"{path}: truncated or corrupt voxel data ({exc}); re-copy or re-export the file"
        ) from exc
    data = data.reshape(_spatial_shape(img.shape, str(path)))
    _check_finite(data, str(path))
    loaded = type(img)(data, img.affine, img.header)
    loaded.set_data_dtype(data.dtype)  # the header now describes the in-memory (scaled) array
    return loaded


def is_conformed(img: SpatialImage, *, eps: float = 1e-6) -> bool:
    """Whether ``img`` is FastSurfer-conformed: 256³, 1 mm isotropic, exactly LIA, uint8.

    Header-only check: shape, the affine's 3×3 part equal to :data:`LIA_DIRECTIONS` within
    ``eps`` (which pins both orientation and 1 mm voxels), and a uint8 data type.
    """
    return (
        tuple(img.shape) == CONFORMED_SHAPE
        and bool(np.all(np.abs(img.affine[:3, :3] - LIA_DIRECTIONS) <= eps))
        and img.get_data_dtype() == np.uint8
    )


def _robust_scale(data: np.ndarray, f_high: float = 0.999) -> tuple[float, float]:
    """(src_min, scale) of the intensity map ``(v - src_min) * scale`` onto 0..255.

    ``src_min`` is the minimum; ``src_min + 255 / scale`` is FastSurfer's (mri_convert's) robust
    maximum: the value below which all voxels lie except a fraction ``1 - f_high`` of the
    non-zero ones, taken as an exact order statistic rather than from a 1000-bin histogram.
    A constant image gets ``scale = 1`` (as in FastSurfer).
    """
    flat = data.ravel()
    src_min = float(flat.min())
    rank = flat.size - int((1.0 - f_high) * np.count_nonzero(flat))
    src_max = float(np.partition(flat, rank - 1)[rank - 1])
    if src_max <= src_min:  # robust maximum collapsed onto the minimum: use the full range
        src_max = float(flat.max())
    return src_min, (255.0 / (src_max - src_min) if src_max > src_min else 1.0)


def _conformed_affine(img: SpatialImage) -> np.ndarray:
    """Affine of the 256³ 1 mm LIA grid whose voxel 128 sits on the input's centre voxel."""
    centre = img.affine @ np.append(np.asarray(img.shape[:3], dtype=float) / 2.0, 1.0)
    affine = np.eye(4)
    affine[:3, :3] = LIA_DIRECTIONS
    affine[:3, 3] = centre[:3] - LIA_DIRECTIONS @ (np.asarray(CONFORMED_SHAPE) / 2.0)
    return affine


def _is_reordering(vox2vox: np.ndarray, eps: float = 1e-6) -> bool:
    """Whether the 3×3 part of ``vox2vox`` is a signed permutation (axis swaps and flips)."""
    m = np.abs(vox2vox[:3, :3])
    zero_or_one = np.all((m <= eps) | (np.abs(m - 1.0) <= eps))
    return bool(zero_or_one and np.allclose(m.sum(0), 1.0) and np.allclose(m.sum(1), 1.0))


def conform(img: SpatialImage, *, order: int = 1) -> nib.Nifti1Image:
    """Resample ``img`` FastSurfer-style to 256³, 1 mm isotropic, LIA, uint8.

    The conformed grid is centred on the input's centre voxel (``shape / 2``). Intensities of
    non-uint8 input are rescaled as FastSurfer does: ``src_min`` → 0 and the robust 0.999
    maximum → 255 (see :func:`_robust_scale`), clipped, with input-zero kept zero; uint8 input
    keeps its values. ``order`` is the spline order of the resampling (0 nearest, 1 linear).
    When the input is a pure axis reordering of a 1 mm grid (e.g. a 1 mm RAS volume), the grid
    is moved by at most half a voxel so that voxels are copied exactly, with no interpolation.
    An already conformed uint8 image passes through with its voxel array and affine unchanged.
    """
    shape = _spatial_shape(img.shape, "image")
    data = np.asanyarray(img.dataobj).reshape(shape)
    _check_finite(data, "image")
    if img.shape == shape and is_conformed(img) and data.dtype == np.uint8:
        out = nib.Nifti1Image(data, img.affine)
    else:
        affine = _conformed_affine(img)
        vox2vox = np.linalg.inv(affine) @ img.affine  # input voxel -> conformed voxel
        if _is_reordering(vox2vox):
            shift = vox2vox[:3, 3] - np.rint(vox2vox[:3, 3])
            affine[:3, 3] += LIA_DIRECTIONS @ shift
            vox2vox[:3, 3] -= shift
            order = 0
        mapped = affine_transform(
            data.astype(np.float64),
            np.linalg.inv(vox2vox),
            output_shape=CONFORMED_SHAPE,
            order=order,
            mode="constant",
            cval=0.0,
        )
        if data.dtype != np.uint8:
            src_min, scale = _robust_scale(data)
            scaled = np.clip((mapped - src_min) * scale, 0.0, 255.0)
            scaled[mapped == 0] = 0  # input background stays background
            mapped = scaled
        out = nib.Nifti1Image(np.clip(np.rint(mapped), 0, 255).astype(np.uint8), affine)
    out.header.set_xyzt_units("mm")
    return out


def _view_axes(view: str) -> tuple[int, int, int]:
    try:
        return _VIEW_AXES[view]
    except KeyError:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}") from None


def _stack_axes(view: str) -> tuple[int, int, int, int]:
    """Axes of a (C, X, Y, Z) class volume giving the per-slice layout (S, C, H, W)."""
    h, w, s = _view_axes(view)
    return (1 + s, 0, 1 + h, 1 + w)


def to_view(vol: np.ndarray, view: View) -> np.ndarray:
    """View layout of a conformed-space array (a transposed view, no copy).

    - volume ``(X, Y, Z)`` → view volume ``(H, W, S)``, sliced along its last axis;
    - class volume ``(C, X, Y, Z)`` → per-slice stack ``(S, C, H, W)`` (network output layout).
    """
    vol = np.asarray(vol)
    if vol.ndim == 3:
        return vol.transpose(_view_axes(view))
    if vol.ndim == 4:
        return vol.transpose(_stack_axes(view))
    raise ValueError(f"expected a (X, Y, Z) or (C, X, Y, Z) array, got shape {vol.shape}")


def from_view(arr: np.ndarray, view: View) -> np.ndarray:
    """Inverse of :func:`to_view` (a transposed view, no copy).

    - view volume ``(H, W, S)`` → volume ``(X, Y, Z)``;
    - per-slice stack ``(S, C, H, W)`` (all S slices) → class volume ``(C, X, Y, Z)``.
    """
    arr = np.asarray(arr)
    if arr.ndim == 3:
        return arr.transpose(np.argsort(_view_axes(view)))
    if arr.ndim == 4:
        return arr.transpose(np.argsort(_stack_axes(view)))
    raise ValueError(f"expected a (H, W, S) or (S, C, H, W) array, got shape {arr.shape}")


def _slice_indices(slices: SliceSelection | None, n: int) -> np.ndarray:
    """Selected slice indices as a 1-D array (numpy indexing rules; IndexError if out of range)."""
    return np.atleast_1d(np.arange(n)[slice(None) if slices is None else slices])


def thick_slices(
    vol_view: np.ndarray, slice_thickness: int = 3, *, slices: SliceSelection | None = None
) -> np.ndarray:
    """Network input stacks ``(S, 2*slice_thickness + 1, H, W)`` float32 from a view volume.

    ``vol_view`` is ``(H, W, N)`` (see :func:`to_view`). Stack ``s`` holds slices
    ``s - t .. s + t`` (``t = slice_thickness``), neighbours beyond the volume repeating the
    edge slice; values are ``vol / 255`` clipped to [0, 1] (FastSurfer's ``get_thick_slices``
    followed by its test-time ``ToTensor``). ``slices`` selects which stacks to build (default:
    all N, in order); neighbours outside the selection still come from the full volume.
    """
    vol_view = np.asarray(vol_view)
    if vol_view.ndim != 3:
        raise ValueError(f"expected a (H, W, N) view volume, got shape {vol_view.shape}")
    n = vol_view.shape[2]
    centres = _slice_indices(slices, n)
    offsets = np.arange(-slice_thickness, slice_thickness + 1)
    neighbours = np.clip(centres[:, None] + offsets, 0, n - 1)
    stacks = vol_view[:, :, neighbours].transpose(2, 3, 0, 1).astype(np.float32, order="C")
    stacks /= np.float32(255.0)
    return np.clip(stacks, 0.0, 1.0, out=stacks)


def slices_to_volume(
    outputs: np.ndarray,
    view: View,
    slice_indices: SliceSelection,
    shape: tuple[int, int, int] = CONFORMED_SHAPE,
    *,
    fill: float | None = None,
) -> np.ndarray:
    """Place per-slice outputs of ``view`` back into a conformed-space volume.

    ``outputs`` is ``(S, C, H, W)`` (probabilities/logits) → returns ``(C, *shape)``, or
    ``(S, H, W)`` (labels) → returns ``shape``; output slice ``n`` lands on view slice
    ``slice_indices[n]``. Voxels of slices not given hold ``fill``: by default NaN for floating
    outputs and -1 for integer outputs. The result dtype holds both the outputs and ``fill``.
    """
    outputs = np.asarray(outputs)
    h, w, s = _view_axes(view)
    idx = _slice_indices(slice_indices, shape[s])
    if outputs.ndim not in (3, 4) or outputs.shape[0] != len(idx):
        raise ValueError(
            f"expected (S, C, H, W) or (S, H, W) outputs with S={len(idx)} slices, "
            f"got shape {outputs.shape}"
        )
    if outputs.shape[-2:] != (shape[h], shape[w]):
        raise ValueError(
            f"{view} slices of a {shape} volume are {(shape[h], shape[w])}, "
            f"got {outputs.shape[-2:]}"
        )
    if fill is None:
        fill = np.nan if outputs.dtype.kind in "fc" else -1
    dtype = np.result_type(outputs.dtype, np.min_scalar_type(fill))
    if outputs.ndim == 4:
        vol = np.full((outputs.shape[1], *shape), fill, dtype=dtype)
        to_view(vol, view)[idx] = outputs
    else:
        vol = np.full(shape, fill, dtype=dtype)
        to_view(vol, view)[..., idx] = np.moveaxis(outputs, 0, -1)
    return vol


def sagittal_to_full(pred: np.ndarray, *, axis: int = 0) -> np.ndarray:
    """Expand 51 sagittal classes on ``axis`` to the 79 classes (FastSurfer ``sagittal2full``).

    Both hemispheres of a lateralised structure (e.g. Left-/Right-Cerebral-White-Matter,
    ctx-lh-/ctx-rh-precuneus) receive the value of their merged sagittal class.
    """
    pred = np.asarray(pred)
    if pred.shape[axis] != NUM_SAGITTAL_CLASSES:
        raise ValueError(
            f"expected {NUM_SAGITTAL_CLASSES} sagittal classes on axis {axis}, "
            f"got shape {pred.shape}"
        )
    return np.take(pred, FULL_TO_SAGITTAL, axis=axis)


def aggregate_views(
    axial: np.ndarray,
    coronal: np.ndarray,
    sagittal: np.ndarray,
    *,
    weights: tuple[float, float, float] = VIEW_WEIGHTS,
) -> np.ndarray:
    """Fuse the three views' class volumes into a class-label volume ``(X, Y, Z)`` (int32).

    ``axial`` and ``coronal`` are ``(79, X, Y, Z)`` probabilities or logits (e.g. from
    :func:`from_view` or :func:`slices_to_volume`); ``sagittal`` is ``(51, X, Y, Z)`` (expanded
    with :func:`sagittal_to_full`) or already ``(79, X, Y, Z)``. The label is the argmax of
    ``wa*axial + wc*coronal + ws*sagittal``, accumulated in that order in the inputs' precision as
    FastSurfer does, with ``weights = (wa, wc, ws)``. Voxels where any view is NaN (slices not
    predicted) get -1. Map labels to FreeSurfer ids with :func:`map_label2aparc_aseg`.
    """
    axial, coronal, sagittal = (np.asarray(a) for a in (axial, coronal, sagittal))
    expand = sagittal.shape[0] == NUM_SAGITTAL_CLASSES
    spatial = axial.shape[1:]
    for name, arr, classes in (
        ("axial", axial, (NUM_CLASSES,)),
        ("coronal", coronal, (NUM_CLASSES,)),
        ("sagittal", sagittal, (NUM_CLASSES, NUM_SAGITTAL_CLASSES)),
    ):
        if arr.ndim != 4 or arr.shape[0] not in classes or arr.shape[1:] != spatial:
            raise ValueError(
                f"{name}: expected a class volume of shape (C, X, Y, Z) with C in {classes} "
                f"and (X, Y, Z) = {spatial}, got {arr.shape}"
            )
    wa, wc, ws = weights
    labels = np.empty(axial.shape[1:], dtype=np.int32)
    for x0 in range(0, axial.shape[1], _AGGREGATE_CHUNK):
        part = np.s_[:, x0 : x0 + _AGGREGATE_CHUNK]
        sag = sagittal_to_full(sagittal[part]) if expand else sagittal[part]
        acc = axial[part] * wa
        acc += coronal[part] * wc
        acc += sag * ws
        chunk = acc.argmax(axis=0)
        chunk[np.isnan(acc).any(axis=0)] = -1
        labels[x0 : x0 + _AGGREGATE_CHUNK] = chunk
    return labels


def map_label2aparc_aseg(labels: np.ndarray) -> np.ndarray:
    """Map class labels (0..78) to FreeSurfer aparc.DKTatlas+aseg ids; negative labels stay -1."""
    labels = np.asarray(labels)
    return np.where(labels < 0, np.int32(-1), LABEL_IDS[np.maximum(labels, 0)])


def view_axes(view: View) -> tuple[int, int, int]:
    """Axes ``(h, w, s)`` of a conformed ``(X, Y, Z)`` volume that form the rows, columns and
    slices of ``view`` (see :func:`to_view`); ValueError for an unknown view."""
    return _view_axes(view)


def slice_axis(view: View) -> int:
    """Axis of a conformed ``(X, Y, Z)`` volume that ``view`` slices along (coronal 2, axial 1,
    sagittal 0)."""
    return _view_axes(view)[2]


def resample_labels(
    labels: np.ndarray,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    target_affine: np.ndarray,
    *,
    fill: int = 0,
) -> np.ndarray:
    """Labels ``(X, Y, Z)`` on the grid ``affine`` resampled onto the grid (``shape``,
    ``target_affine``) by nearest neighbour; same dtype, never interpolated.

    Each target voxel takes the label of the source voxel nearest to its world position; voxels
    outside the source volume get ``fill``. With ``affine`` the conformed grid of an image and
    ``target_affine`` / ``shape`` the image's own, this is the inverse of :func:`conform` for
    segmentations; when :func:`conform` only reordered axes (a 1 mm input) the round trip
    copies voxels exactly.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a (X, Y, Z) label volume, got shape {labels.shape}")
    vox2vox = np.linalg.inv(np.asarray(affine, float)) @ np.asarray(target_affine, float)
    offset = vox2vox[:3, 3]
    if _is_reordering(vox2vox) and np.allclose(offset, np.rint(offset), atol=1e-6):
        return _reorder_labels(labels, vox2vox, tuple(shape), fill)
    return affine_transform(labels, vox2vox, output_shape=tuple(shape), order=0,
                            mode="constant", cval=fill, output=labels.dtype)


def _reorder_labels(labels: np.ndarray, vox2vox: np.ndarray, shape: tuple[int, int, int],
                    fill: int) -> np.ndarray:
    """:func:`resample_labels` for a signed axis permutation with integer shift: copies."""
    out = np.full(shape, fill, dtype=labels.dtype)
    order, reads, writes = [], [], []
    for a in range(3):  # output axis a reads input axis src: i = sign * o + shift
        src = int(np.argmax(np.abs(vox2vox[:3, a])))
        sign = int(np.rint(vox2vox[src, a]))
        i = sign * np.arange(shape[a]) + int(np.rint(vox2vox[src, 3]))
        ok = np.flatnonzero((i >= 0) & (i < labels.shape[src]))
        if ok.size == 0:
            return out
        first, last = int(i[ok[0]]), int(i[ok[-1]])
        order.append(src)
        reads.append(slice(first, last + sign if last + sign >= 0 else None, sign))
        writes.append(slice(int(ok[0]), int(ok[-1]) + 1))
    out[tuple(writes)] = labels.transpose(order)[tuple(reads)]
    return out


def map_aparc_aseg2label(ids: np.ndarray) -> np.ndarray:
    """FreeSurfer aparc.DKTatlas+aseg ids -> the 79 network classes (int16); the inverse of
    :func:`map_label2aparc_aseg` on the network's labels.

    A right-hemisphere cortical id without its own class (e.g. 2003) takes its left twin's
    class (1003), as FastSurfer predicts those parcels with one class for both hemispheres;
    every other id without a class (e.g. 85 optic chiasm, 1000/2000 unknown cortex) becomes
    background (0).
    """
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"FreeSurfer label ids must be integers, got dtype {ids.dtype}")
    lut = np.zeros(int(max(LABEL_IDS.max(), 2999)) + 1, dtype=np.int16)
    lut[LABEL_IDS] = np.arange(len(LABEL_IDS), dtype=np.int16)
    rh = np.arange(2000, 3000)
    orphan = rh[lut[rh] == 0]
    lut[orphan] = lut[orphan - 1000]
    known = (ids >= 0) & (ids < len(lut))
    return np.where(known, lut[np.where(known, ids, 0)], np.int16(0)).astype(np.int16)
