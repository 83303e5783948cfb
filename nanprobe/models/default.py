"""The bundled default model and brain: a small FastSurferVINN tissue segmenter and its template.

Bundled assets (``nanprobe/assets/``), produced by ``analyses/train_default_unet.py``:

- ``default_brain.nii.gz``: the MNI ICBM152 2009a symmetric T1 template (nilearn's skull-stripped
  uint8 copy), conformed with :func:`nanprobe.data.mri.conform` (256³, 1 mm, LIA, uint8);
- ``default_labels.nii.gz``: uint8 tissue labels on the same grid (same affine), derived from the
  template's GM/WM probability maps: 0 background, 1 CSF, 2 grey matter, 3 white matter (see
  :data:`CLASS_NAMES` and the training script for the exact rule);
- ``default_unet.pt``: the state_dict of :func:`build_default_unet` trained on coronal thick slices
  of that brain (every 2nd brain slice; the others are held out), loadable with
  ``weights_only=True``;
- ``default_unet.json``: the training run's metrics (held-out Dice per class), seed and versions.

Template copyright: see ``nanprobe/assets/MNI_ICBM152_NOTICE.txt``.
"""

from __future__ import annotations

import io
import json
from importlib import resources
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import torch

from nanprobe.data.mri import SliceSelection, View, load_volume, thick_slices, to_view
from nanprobe.models.fastsurfer import FastSurferVINN

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

CLASS_NAMES: tuple[str, ...] = ("background", "CSF", "grey matter", "white matter")
NUM_CLASSES = len(CLASS_NAMES)
NUM_FILTERS = 16
NUM_FILTERS_INTERPOL = 8
SLICE_THICKNESS = 3  # 7-slice stacks, as FastSurfer
DEFAULT_VIEW: View = "coronal"
WEIGHTS_ASSET = "default_unet.pt"
METRICS_ASSET = "default_unet.json"
BRAIN_ASSET = "default_brain.nii.gz"
LABELS_ASSET = "default_labels.nii.gz"


def _asset(name: str) -> Traversable:
    return resources.files("nanprobe").joinpath("assets").joinpath(name)


def build_default_unet() -> FastSurferVINN:
    """The default U-Net, randomly initialised: FastSurferVINN blocks with 16/8 filters.

    ``(N, 7, H, W)`` thick slices in [0, 1] -> ``(N, 4, H, W)`` logits over :data:`CLASS_NAMES`;
    H and W multiples of 16.
    """
    return FastSurferVINN(
        NUM_CLASSES,
        num_channels=2 * SLICE_THICKNESS + 1,
        num_filters=NUM_FILTERS,
        num_filters_interpol=NUM_FILTERS_INTERPOL,
    )


def load_default_unet() -> FastSurferVINN:
    """The default U-Net with its bundled trained weights, on CPU, in eval mode (coronal view)."""
    blob = _asset(WEIGHTS_ASSET).read_bytes()
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    model = build_default_unet()
    model.load_state_dict(state)
    return model.eval()


def default_unet_metadata() -> dict[str, Any]:
    """The training run's record: held-out Dice per class, split, seed, epochs, versions, ..."""
    return json.loads(_asset(METRICS_ASSET).read_text())


def load_default_brain() -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """The bundled brain as ``(t1, labels)`` nibabel images, voxel data in memory.

    Both are 256³ uint8 on the same conformed 1 mm LIA grid (same affine): ``t1`` holds the
    template intensities 0..255, ``labels`` the classes 0..3 of :data:`CLASS_NAMES`.
    """
    images = []
    for name in (BRAIN_ASSET, LABELS_ASSET):
        with resources.as_file(_asset(name)) as path:
            images.append(load_volume(path))
    t1, labels = images
    return t1, labels


@torch.no_grad()
def segment_slices(
    model: torch.nn.Module,
    volume: np.ndarray,
    slices: SliceSelection,
    view: View = DEFAULT_VIEW,
    *,
    batch_size: int = 8,
) -> np.ndarray:
    """Label map ``(S, H, W)`` int64 of the ``slices`` of a conformed uint8 ``volume`` in ``view``.

    Feeds 7-slice thick stacks (:func:`~nanprobe.data.mri.thick_slices`) through ``model`` in
    batches of ``batch_size`` and takes the argmax over classes.
    """
    stacks = thick_slices(to_view(volume, view), SLICE_THICKNESS, slices=slices)
    out = [
        model(torch.from_numpy(stacks[i : i + batch_size])).argmax(1)
        for i in range(0, len(stacks), batch_size)
    ]
    return torch.cat(out).numpy()
