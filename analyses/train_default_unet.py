"""Build the bundled default brain from the MNI ICBM152 template and train the default U-Net.

Data. The PyPI ``nilearn`` wheel ships the ICBM152 2009a symmetric templates as 1 mm RAS uint8
volumes (``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``;
the T1 is skull-stripped: zero outside the brain). They are located without importing nilearn.
Tissue labels, with ``gm`` and ``wm`` the probability maps scaled to [0, 1] (stored value / 255):

- brain: ``T1 > 0`` (the template's own brain mask);
- 1 CSF: brain and ``gm < 0.1`` and ``wm < 0.1`` (a proxy: mostly the ventricles);
- 2 grey matter: other brain voxels with ``gm >= wm``;
- 3 white matter: other brain voxels with ``wm > gm``;
- 0 background: everything else.

The T1 is conformed with :func:`nanprobe.data.mri.conform` (256³, 1 mm, LIA, uint8; the template
is a 1 mm axis reordering, so voxels are copied exactly) and the labels are resampled onto the same
grid (same affine) by nearest neighbour.

Split. Slices of ``--view`` (default coronal) that contain brain: even slice indices train, odd
ones are held out. Neighbouring slices are 1 mm apart, so the held-out Dice measures
interpolation within one brain, not generalisation to other brains.

Training. :func:`nanprobe.models.default.build_default_unet` on 7-slice thick stacks, Adam with a
cosine learning-rate decay, loss = cross-entropy + (1 - mean soft Dice over the 4 classes).
Each batch is cropped at a random position to a window holding the whole brain (multiples of 16;
cheaper than 256²) and each stack's intensities are scaled by a random factor in
[1 - INTENSITY_JITTER, 1 + INTENSITY_JITTER] (clipped to [0, 1]). Evaluation runs on full 256²
slices. Deterministic for a given seed, thread count and torch build.

External check (optional). ``--colin27 PATH`` (Debian ``mricron-data``:
``/usr/share/mricron/templates/ch2bet.nii.gz``, the skull-stripped Colin27 brain) segments every
brain slice of another, single-subject brain, cast to float so that ``conform`` applies
FastSurfer's robust intensity scaling. There is no tissue reference for it: the record holds the
Dice of predicted brain (labels 1-3) vs the input's nonzero voxels (easy on a skull-stripped input)
and the predicted tissue fractions inside that mask, to compare with the template's.

Writes into ``--out-dir`` (default: ``nanprobe/assets`` of this source tree):
``default_brain.nii.gz``, ``default_labels.nii.gz``, ``default_unet.pt`` (state_dict, loads with
``weights_only=True``) and ``default_unet.json`` (metrics, split, seed, versions).

Usage, from the repository root (nilearn is needed only as the source of the template)::

    pip install nilearn
    python -m analyses.train_default_unet --epochs 40 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import platform
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import affine_transform

from nanprobe.data.mri import VIEWS, View, conform, load_volume, thick_slices, to_view
from nanprobe.evaluate import dice_per_class, mean_foreground_dice
from nanprobe.models.default import (
    BRAIN_ASSET,
    CLASS_NAMES,
    LABELS_ASSET,
    METRICS_ASSET,
    NUM_CLASSES,
    NUM_FILTERS,
    NUM_FILTERS_INTERPOL,
    SLICE_THICKNESS,
    WEIGHTS_ASSET,
    build_default_unet,
    segment_slices,
)

TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
CSF_MAX_PROBABILITY = 0.1
BATCH_SIZE = 8
LEARNING_RATE = 5e-3
MIN_LEARNING_RATE = 1e-4
INTENSITY_JITTER = 0.15
CROP_MULTIPLE = 16  # the U-Net needs H, W multiples of 16
CROP_MARGIN = 16  # extra voxels around the brain's bounding box in a crop
DEFAULT_OUT_DIR = Path(__file__).resolve().parents[1] / "nanprobe" / "assets"


def find_icbm152() -> dict[str, Path]:
    """Paths of the ICBM152 2009a ``t1``, ``gm`` and ``wm`` files inside an installed nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("nilearn is not installed: run `pip install nilearn` (it ships the "
                         "ICBM152 2009a template)")
    for root in spec.submodule_search_locations:
        data = Path(root) / "datasets" / "data"
        paths = {k: data / TEMPLATE.format(k) for k in ("t1", "gm", "wm")}
        if all(p.is_file() for p in paths.values()):
            return paths
    raise SystemExit(f"{TEMPLATE.format('*')} not found inside the installed nilearn")


def tissue_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """uint8 labels 0..3 from the uint8 T1 and GM/WM maps (probability = value / 255).

    See the module docstring for the rule.
    """
    gm_p, wm_p = gm / 255.0, wm / 255.0
    brain = t1 > 0
    csf = brain & (gm_p < CSF_MAX_PROBABILITY) & (wm_p < CSF_MAX_PROBABILITY)
    labels = np.zeros(t1.shape, dtype=np.uint8)
    labels[brain & ~csf & (gm_p >= wm_p)] = 2
    labels[brain & ~csf & (wm_p > gm_p)] = 3
    labels[csf] = 1
    return labels


def resample_nearest(
    data: np.ndarray, affine: np.ndarray, target: nib.spatialimages.SpatialImage
) -> nib.Nifti1Image:
    """``data`` (on ``affine``) resampled by nearest neighbour onto ``target``'s grid."""
    out_to_in = np.linalg.inv(affine) @ target.affine  # target voxel -> source voxel
    mapped = affine_transform(data, out_to_in, output_shape=target.shape, order=0, cval=0)
    out = nib.Nifti1Image(mapped.astype(np.uint8), target.affine)
    out.header.set_xyzt_units("mm")
    return out


def build_brain(paths: dict[str, Path]) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """The conformed template T1 and its tissue labels on the same grid."""
    images = {k: nib.load(p) for k, p in paths.items()}
    arrays = {k: np.asanyarray(img.dataobj) for k, img in images.items()}
    affine = images["t1"].affine
    if any(not np.allclose(img.affine, affine) for img in images.values()):
        raise SystemExit("the ICBM152 T1 and probability maps are not on the same grid")
    t1 = conform(images["t1"])
    labels = resample_nearest(tissue_labels(arrays["t1"], arrays["gm"], arrays["wm"]), affine, t1)
    return t1, labels


def view_slices(labels: np.ndarray, view: View) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) slice indices of ``view``: brain slices with even / odd index."""
    has_brain = np.flatnonzero(to_view(labels, view).any(axis=(0, 1)))
    return has_brain[has_brain % 2 == 0], has_brain[has_brain % 2 == 1]


def crop_range(labels_view: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Per in-plane axis: (crop size, lowest, highest crop start) keeping all brain in the crop."""
    out = []
    for axis in (0, 1):
        present = np.flatnonzero(labels_view.any(axis=tuple(a for a in (0, 1, 2) if a != axis)))
        lo, hi, n = int(present[0]), int(present[-1]), labels_view.shape[axis]
        size = min(n, math.ceil((hi - lo + 1 + CROP_MARGIN) / CROP_MULTIPLE) * CROP_MULTIPLE)
        out.append((size, max(0, hi + 1 - size), min(lo, n - size)))
    return out[0], out[1]


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean over classes of the soft Dice between softmax(logits) and one-hot target."""
    prob = logits.softmax(1)
    onehot = F.one_hot(target, NUM_CLASSES).permute(0, 3, 1, 2).to(prob.dtype)
    inter = (prob * onehot).sum((0, 2, 3))
    total = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1.0 - (2.0 * inter / total.clamp_min(1.0)).mean()


def train(
    t1: np.ndarray, labels: np.ndarray, view: View, train_idx: np.ndarray, epochs: int, seed: int
) -> torch.nn.Module:
    """Train the default U-Net on the ``train_idx`` slices of ``view``; returns it in eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(thick_slices(to_view(t1, view), SLICE_THICKNESS, slices=train_idx))
    labels_view = to_view(labels, view)
    y_all = torch.from_numpy(np.moveaxis(labels_view[..., train_idx], -1, 0).astype(np.int64))
    (h_size, h_lo, h_hi), (w_size, w_lo, w_hi) = crop_range(labels_view)
    model = build_default_unet()
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    steps = epochs * math.ceil(len(train_idx) / BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps, MIN_LEARNING_RATE)
    model.train()
    for epoch in range(epochs):
        start, total, batches = time.perf_counter(), 0.0, 0
        for batch in torch.randperm(len(train_idx), generator=gen).split(BATCH_SIZE):
            h0 = int(torch.randint(h_lo, h_hi + 1, (), generator=gen))
            w0 = int(torch.randint(w_lo, w_hi + 1, (), generator=gen))
            crop = np.s_[..., h0 : h0 + h_size, w0 : w0 + w_size]
            gain = 1.0 + INTENSITY_JITTER * (2 * torch.rand(len(batch), 1, 1, 1, generator=gen) - 1)
            x = (x_all[batch][crop] * gain).clamp(0.0, 1.0)
            y = y_all[batch][crop]
            logits = model(x)
            loss = F.cross_entropy(logits, y) + soft_dice_loss(logits, y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total, batches = total + loss.item(), batches + 1
        print(f"epoch {epoch + 1:3d}/{epochs}  loss {total / batches:.4f}  "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    return model.eval()


def evaluate(
    model: torch.nn.Module, t1: np.ndarray, labels: np.ndarray, view: View, idx: np.ndarray
) -> dict[str, float]:
    """Dice per class (and the mean over CSF/GM/WM) of ``model`` on full slices ``idx``."""
    pred = segment_slices(model, t1, idx, view)
    target = np.moveaxis(to_view(labels, view)[..., idx], -1, 0)
    scores = dice_per_class(pred, target, NUM_CLASSES)
    return {**dict(zip(CLASS_NAMES, scores, strict=True)),
            "mean_foreground": mean_foreground_dice(scores)}


def evaluate_external(model: torch.nn.Module, path: Path, view: View) -> dict[str, object]:
    """Brain-mask Dice and tissue fractions of ``model`` on a skull-stripped brain at ``path``."""
    img = load_volume(path)
    floated = nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.float32), img.affine)
    vol = np.asarray(conform(floated).dataobj)
    idx = np.flatnonzero(to_view(vol, view).any(axis=(0, 1)))
    pred = segment_slices(model, vol, idx, view)
    mask = np.moveaxis(to_view(vol, view)[..., idx], -1, 0) > 0
    found = pred > 0
    fractions = np.bincount(pred[mask], minlength=NUM_CLASSES)[1:] / mask.sum()
    return {"file": path.name, "sha256": sha256(path), "slices": len(idx),
            "brain_dice": 2.0 * float((found & mask).sum()) / float(found.sum() + mask.sum()),
            "tissue_fractions": dict(zip(CLASS_NAMES[1:], fractions.tolist(), strict=True))}


def tissue_fractions(labels: np.ndarray) -> dict[str, float]:
    """Fraction of the brain (labels > 0) in each tissue class."""
    counts = np.bincount(labels.ravel(), minlength=NUM_CLASSES)[1:]
    return dict(zip(CLASS_NAMES[1:], (counts / counts.sum()).tolist(), strict=True))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--view", choices=VIEWS, default="coronal")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--colin27", type=Path, default=None,
                        help="skull-stripped Colin27 (ch2bet.nii.gz) for an external check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    sources = find_icbm152()
    t1_img, labels_img = build_brain(sources)
    for img, name in ((t1_img, BRAIN_ASSET), (labels_img, LABELS_ASSET)):
        nib.save(img, args.out_dir / name)
    t1, labels = np.asarray(t1_img.dataobj), np.asarray(labels_img.dataobj)
    counts = np.bincount(labels.ravel(), minlength=NUM_CLASSES)
    print("voxels per class:", dict(zip(CLASS_NAMES, counts.tolist(), strict=True)))

    train_idx, heldout_idx = view_slices(labels, args.view)
    print(f"{args.view}: {len(train_idx)} training slices, {len(heldout_idx)} held out")
    start = time.perf_counter()
    model = train(t1, labels, args.view, train_idx, args.epochs, args.seed)
    seconds = time.perf_counter() - start
    heldout = evaluate(model, t1, labels, args.view, heldout_idx)
    training = evaluate(model, t1, labels, args.view, train_idx)
    for name, value in heldout.items():
        print(f"held-out Dice {name:16s} {value:.4f}   (training slices {training[name]:.4f})")

    external = None
    if args.colin27 is not None:
        external = evaluate_external(model, args.colin27, args.view)
        print(f"Colin27: brain Dice {external['brain_dice']:.4f}, tissue fractions "
              f"{external['tissue_fractions']} (template: {tissue_fractions(labels)})")

    weights = args.out_dir / WEIGHTS_ASSET
    torch.save(model.state_dict(), weights)
    record = {
        "architecture": {"class": "FastSurferVINN", "num_classes": NUM_CLASSES,
                         "num_channels": 2 * SLICE_THICKNESS + 1, "num_filters": NUM_FILTERS,
                         "num_filters_interpol": NUM_FILTERS_INTERPOL, "kernel_size": 3,
                         "parameters": sum(p.numel() for p in model.parameters())},
        "view": args.view,
        "classes": list(CLASS_NAMES),
        "voxels_per_class": counts.tolist(),
        "tissue_fractions": tissue_fractions(labels),
        "split": {"rule": "brain slices of the view: even index train, odd index held out",
                  "train_slices": len(train_idx), "heldout_slices": len(heldout_idx)},
        "heldout_dice": heldout,
        "train_dice": training,
        "training": {"epochs": args.epochs, "seed": args.seed, "threads": args.threads,
                     "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE,
                     "min_learning_rate": MIN_LEARNING_RATE,
                     "intensity_jitter": INTENSITY_JITTER, "seconds": round(seconds, 1)},
        "external_colin27": external,
        "sha256": {name: sha256(args.out_dir / name)
                   for name in (WEIGHTS_ASSET, BRAIN_ASSET, LABELS_ASSET)},
        "sources": {p.name: sha256(p) for p in sources.values()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **{pkg: importlib.metadata.version(pkg)
                        for pkg in ("numpy", "scipy", "nibabel", "nilearn")}},
    }
    (args.out_dir / METRICS_ASSET).write_text(json.dumps(record, indent=2) + "\n")
    print(f"trained in {seconds:.0f} s; wrote {weights} and {METRICS_ASSET} "
          f"({weights.stat().st_size / 1024:.0f} KiB weights)")


if __name__ == "__main__":
    main()
