"""Turn an input spec (``default``, ``mnist``, an MRI file or a ``.npy`` array) into model input.

MRI volumes (NIfTI / MGZ) are conformed FastSurfer-style when needed and cut into 7-slice thick
stacks of the selected slices in the model's view; images come as (S, C, H, W) arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import mri
from .models.registry import LoadedModel, asset_sha256, file_sha256

MRI_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
#: slices through the volume's centre used when none are selected (every layer of a
#: FastSurfer-like U-Net captured for 2 slices is ~250 MB per file)
DEFAULT_MRI_SLICES = "127:129"
DEFAULT_IMAGE_SAMPLES = "0:32"


@dataclass
class PreparedInput:
    """Model input (S, C, H, W) float32 plus where it came from (for provenance)."""

    tensor: torch.Tensor
    spec: str
    sha256: str
    indices: list[int]
    view: str | None = None
    labels: np.ndarray | None = field(default=None, repr=False)  # (S, H, W) or (S,) if known

    def provenance(self) -> dict:
        return {"input": self.spec, "input_sha256": self.sha256, "selection": self.indices,
                "view": self.view, "input_shape": list(self.tensor.shape)}


def parse_selection(text: str | None, n: int, default: str) -> list[int]:
    """Indices from ``"a:b"``, ``"a:b:step"``, ``"i,j,k"`` or ``"i"`` (0 <= index < n)."""
    text = default if text is None else text.strip()
    try:
        if ":" in text:
            parts = [int(p) if p else None for p in text.split(":")]
            if len(parts) > 3 or parts[2:] == [0]:
                raise ValueError
        else:
            indices = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"cannot read the selection {text!r}: use START:STOP[:STEP], "
                         "I,J,K or I") from None
    if ":" in text:
        start, stop = parts[0], parts[1]
        if (start is not None and not 0 <= start < n) or (stop is not None and not 0 < stop <= n):
            raise ValueError(f"selection {text!r} reaches outside the {n} available items: "
                             f"START must be in [0, {n}) and STOP in (0, {n}]")
        indices = list(range(n))[slice(*parts)]
    bad = [i for i in indices if not 0 <= i < n]
    if not indices or bad:
        raise ValueError(f"selection {text!r} must pick indices in [0, {n}); "
                         f"{'got none' if not indices else f'out of range: {bad[:5]}'}")
    return indices


def _load_npy(path: Path) -> np.ndarray:
    """The array in ``path``; a one-line ValueError naming the file when it cannot be read."""
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise ValueError(f"{path} holds Python objects, not numbers; save a float array "
                             "shaped (S, C, H, W) (np.save(path, x.astype(np.float32)))") from None
        raise ValueError(f"cannot read {path} as an .npy array: {err}") from None
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read {path} as an .npy array: {err}") from None


def _mri_input(img, spec: str, digest: str, loaded: LoadedModel, slices: str | None,
               view: str | None, labels_img=None) -> PreparedInput:
    view = view or loaded.view or "coronal"
    if view not in mri.VIEWS:
        raise ValueError(f"view must be one of {', '.join(mri.VIEWS)}, got {view!r}")
    if not mri.is_conformed(img):
        img = mri.conform(img)
    vol = np.asarray(img.dataobj)
    vol_view = mri.to_view(vol, view)
    indices = parse_selection(slices, vol_view.shape[-1], DEFAULT_MRI_SLICES)
    stacks = mri.thick_slices(vol_view, 3, slices=indices)
    labels = None
    if labels_img is not None:
        label_view = mri.to_view(np.asarray(labels_img.dataobj), view)
        labels = np.ascontiguousarray(label_view[..., indices].transpose(2, 0, 1))
    return PreparedInput(torch.from_numpy(stacks), spec, digest, indices, view, labels)


def prepare_input(spec: str, loaded: LoadedModel, *, slices: str | None = None,
                  view: str | None = None) -> PreparedInput:
    """Resolve ``spec`` for ``loaded``'s input kind; ``slices`` selects slices / samples."""
    if loaded.input_kind == "image" and spec in ("default", "mnist"):
        from .data.mnist import load_heldout

        images, labels = load_heldout()
        idx = parse_selection(slices, len(images), DEFAULT_IMAGE_SAMPLES)
        return PreparedInput(torch.from_numpy(images[idx]), "mnist-heldout",
                             asset_sha256("mnist_heldout.npz"), idx, None, labels[idx])
    if spec == "default":
        if loaded.input_kind != "mri-thick-slices":
            raise ValueError(f"input 'default' is the bundled brain, but model {loaded.spec!r} "
                             "takes images; pass an .npy array of its inputs")
        from .models.default import BRAIN_ASSET, load_default_brain

        t1, labels_img = load_default_brain()
        return _mri_input(t1, "default-brain", asset_sha256(BRAIN_ASSET), loaded, slices, view,
                          labels_img)
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"input {spec!r} is neither 'default', 'mnist' nor an existing file")
    digest = file_sha256(path)
    if path.name.endswith(MRI_SUFFIXES):
        if loaded.input_kind == "image":
            raise ValueError(f"model {loaded.spec!r} takes images, not an MRI volume ({path})")
        return _mri_input(mri.load_volume(path), str(path), digest, loaded, slices, view)
    if path.suffix == ".npy":
        arr = _load_npy(path)
        if arr.ndim != 4 or not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{path} must hold a float array shaped (S, C, H, W), got "
                             f"{arr.dtype} {arr.shape}")
        finite = np.isfinite(arr)
        if not finite.all():
            bad = arr.size - int(np.count_nonzero(finite))
            raise ValueError(f"{path}: {bad} of {arr.size} values are non-finite (NaN/inf); "
                             "nanprobe measures finite inputs: fix or mask them (e.g. set them "
                             "to 0) first")
        if loaded.input_shape is not None and tuple(arr.shape[1:]) != tuple(loaded.input_shape):
            raise ValueError(f"{path} holds samples shaped {arr.shape[1:]}, but model "
                             f"{loaded.spec!r} expects {tuple(loaded.input_shape)}")
        idx = parse_selection(slices, len(arr), f"0:{len(arr)}")
        return PreparedInput(torch.from_numpy(np.ascontiguousarray(arr[idx], np.float32)),
                             str(path), digest, idx)
    raise ValueError(f"cannot read input {path}: use a NIfTI/MGZ volume ({', '.join(MRI_SUFFIXES)})"
                     " or an .npy array (S, C, H, W)")
