"""``nanprobe validate``: the paper's accuracy study on whole volumes, across subjects and views.

For every subject (an MRI volume), view and thresholds file the plain model and the model
nanified with that file (``nanify(config=...)``) segment the selected slices of the conformed
volume (all 256 by default), batch by batch, interleaved; with all three views the class
outputs are fused FastSurfer-style (weights 0.4 axial, 0.4 coronal, 0.2 sagittal on the logits;
51 sagittal classes expanded to 79). Per subject: Dice per class against the plain model and,
when ground-truth labels are given, against them; skipped conv positions and MACs; wall-clock
plain vs nanified (interleaved repetitions); segmentations in the input's space. Per view and
thresholds file, across slices and subjects: the Dice difference (nanified minus plain, per
slice), its mean and std, and paired tests (``scipy.stats.ttest_rel`` and ``wilcoxon``).

Definitions (documented in ``docs/validation.md``):

- *Dice of a slice*: the mean, over the foreground classes present in the slice of either
  segmentation, of the per-class Dice; 1.0 when neither has foreground (they agree).
- *reference*: the ground-truth labels when every subject has labels, else the plain model
  (whose Dice against itself is 1.0 on every slice, so the difference is ``Dice - 1``).
- A position a NaN convolution skipped is NaN in every class: its label is background
  (:func:`~nanprobe.evaluate.labels_from_logits`) and, in the view aggregation, it gives no
  vote (its logits count as 0).

Outputs in ``OUT``: ``validation.json`` (schema ``nanprobe-validation/1``, see
:func:`validate`), ``figures/dice_difference.png`` and per subject ``subjects/NN-NAME/``:
``subject.json``, segmentations ``{aggregated|VIEW}_plain``, ``_nanified-NAME`` and
``_diff-NAME`` (1 where the labels differ) as ``.nii.gz`` (and ``.mgz`` for FastSurfer's
label set) in the input's space, ``dice_per_slice.png`` and ``differences-NAME.png``. Every file
is written atomically; a finished subject (its ``subject.json``) is reused when the command is
rerun with the same settings, so an interrupted run resumes.
"""

from __future__ import annotations

import base64
import copy
import html
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import scipy
import torch
from scipy import stats
from torch import nn

from . import __version__
from .data import mri
from .data.labels import FULL_TO_SAGITTAL, LABEL_IDS, NUM_SAGITTAL_CLASSES, SAGITTAL_LABEL_IDS
from .data.labels import NUM_CLASSES as FASTSURFER_CLASSES
from .evaluate import (
    allocator_note,
    forward_pass,
    interleaved_rounds,
    labels_from_logits,
    machine_busy,
    ratio_spread,
    skip_table,
    speed_verdict,
    split_batches,
)
from .inputs import MRI_SUFFIXES, parse_selection
from .jsonio import atomic_path, json_safe, write_json
from .models.registry import LoadedModel, asset_sha256, file_sha256, load
from .ops import nanify, skip_stats
from .ops.nanify import load_config

VALIDATION_FILE = "validation.json"
VALIDATION_FORMAT = "nanprobe-validation/1"
SUBJECT_FILE = "subject.json"
SUBJECTS_DIR = "subjects"
FIGURES_DIR = "figures"
AGGREGATED = "aggregated"
SLICE_THICKNESS = 3  # 7-slice stacks, as FastSurfer
DEFAULT_TIMING_SLICES = 8
_VIEW_WEIGHTS = dict(zip(mri.VIEWS, mri.VIEW_WEIGHTS, strict=True))
#: FreeSurfer label id per class, for models predicting FastSurfer's label sets
_FREESURFER_IDS = {FASTSURFER_CLASSES: LABEL_IDS, NUM_SAGITTAL_CLASSES: SAGITTAL_LABEL_IDS}
Progress = Callable[[int, int, str], None]
#: ends the ``what`` of a progress call for a subject finished by an earlier run
UP_TO_DATE = " (up to date)"


# ---------------------------------------------------------------------------------------------
# statistics


def slice_dice(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of each slice ``(S,)`` float64 of two label stacks ``(S, H, W)``.

    Per slice: the mean, over the foreground classes (1..num_classes-1) present in ``pred`` or
    ``ref``, of ``2|P∩R| / (|P|+|R|)``; 1.0 when neither holds foreground (they agree). Labels
    must lie in ``0..num_classes-1``. One bincount of the per-slice confusion matrices.
    """
    cm = confusion(pred, ref, num_classes, per_slice=True)
    inter = np.diagonal(cm, axis1=1, axis2=2)[:, 1:].astype(np.float64)
    total = (cm.sum(2) + cm.sum(1))[:, 1:].astype(np.float64)
    present = total > 0
    dice = np.divide(2.0 * inter, total, out=np.zeros_like(total), where=present)
    n = present.sum(1)
    return np.where(n > 0, dice.sum(1) / np.maximum(n, 1), 1.0)


def confusion(pred: np.ndarray, ref: np.ndarray, num_classes: int, *,
              per_slice: bool = False) -> np.ndarray:
    """Confusion counts ``(C, C)`` (``[pred class, ref class]``), or ``(S, C, C)`` per slice.

    ``pred`` and ``ref``: same shape, labels in ``0..C-1`` (``(S, ...)`` with ``per_slice``).
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"label shapes differ: {pred.shape} and {ref.shape}")
    c = num_classes
    code = pred.astype(np.int64) * c + ref
    if per_slice:
        n = pred.shape[0]
        code = code.reshape(n, -1) + (np.arange(n, dtype=np.int64) * c * c)[:, None]
        return np.bincount(code.ravel(), minlength=n * c * c).reshape(n, c, c)
    return np.bincount(code.ravel(), minlength=c * c).reshape(c, c)


def agreement(cm: np.ndarray) -> dict[str, Any]:
    """Dice per class (None where a class is absent from both), mean foreground Dice and the
    fraction of identical labels, from a confusion matrix ``(C, C)``."""
    inter = np.diagonal(cm).astype(np.float64)
    total = (cm.sum(0) + cm.sum(1)).astype(np.float64)
    dice = [2.0 * i / t if t else None for i, t in zip(inter, total, strict=True)]
    fg = [d for d in dice[1:] if d is not None]
    voxels = int(cm.sum())
    return {"dice_per_class": dice, "mean_dice": float(np.mean(fg)) if fg else None,
            "identical": float(inter.sum() / voxels) if voxels else None}


def paired_statistics(plain: Sequence[float], nanified: Sequence[float]) -> dict[str, Any]:
    """Paired comparison of per-slice scores: nanified minus plain.

    Pairs where either score is NaN are dropped. Returns ``dice_diff_mean``, ``dice_diff_std``
    (sample std, ddof=1; None below 2 pairs), ``n_pairs``, ``p_ttest`` (``scipy.stats.ttest_rel``,
    two-sided) and ``p_wilcoxon`` (``scipy.stats.wilcoxon`` on the differences, two-sided,
    zero differences dropped as in Wilcoxon's test), plus ``t_statistic``,
    ``wilcoxon_statistic``, ``n_nonzero``, ``dice_diff_min``, ``dice_diff_max`` and ``note``.

    Degenerate cases, without warnings: fewer than 2 pairs -> both p None; every difference
    exactly 0 (the two models agree on every slice) -> both p = 1.0, t = 0 (no evidence of a
    difference; the tests themselves are undefined); a constant non-zero difference -> t is
    infinite and p_ttest = 0.0 (Wilcoxon is computed as usual).
    """
    a = np.asarray(plain, dtype=np.float64)
    b = np.asarray(nanified, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"expected two 1-D score series of equal length, got {a.shape}, {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = b - a
    n = int(d.size)
    out: dict[str, Any] = {
        "dice_diff_mean": float(d.mean()) if n else None,
        "dice_diff_std": float(d.std(ddof=1)) if n >= 2 else None,
        "n_pairs": n, "p_ttest": None, "p_wilcoxon": None, "t_statistic": None,
        "wilcoxon_statistic": None, "n_nonzero": int(np.count_nonzero(d)),
        "dice_diff_min": float(d.min()) if n else None,
        "dice_diff_max": float(d.max()) if n else None, "note": None,
    }
    if n < 2:
        out["note"] = "fewer than 2 pairs: no test"
        return out
    if not d.any():
        out.update(p_ttest=1.0, p_wilcoxon=1.0, t_statistic=0.0,
                   note="every difference is 0: tests undefined, p = 1 reported")
        return out
    if np.all(d == d[0]):
        out.update(p_ttest=0.0, t_statistic=float(np.copysign(np.inf, d[0])),
                   note="constant non-zero difference: t infinite, p_ttest = 0")
    else:
        t = stats.ttest_rel(b, a)
        out.update(p_ttest=float(t.pvalue), t_statistic=float(t.statistic))
    w = stats.wilcoxon(d)
    out.update(p_wilcoxon=float(w.pvalue), wilcoxon_statistic=float(w.statistic))
    return out


#: the keys of a view x thresholds entry of ``validation.json["views"]``
SCHEMA_KEYS = ("dice_diff_mean", "dice_diff_std", "n_pairs", "p_ttest", "p_wilcoxon")


def significance(p: float | None) -> str:
    """``***`` p < 0.001, ``**`` < 0.01, ``*`` < 0.05, ``n.s.`` otherwise, ``n/a`` without test."""
    if p is None:
        return "n/a"
    return "***" if p < 1e-3 else "**" if p < 1e-2 else "*" if p < 0.05 else "n.s."


# ---------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class ThresholdsFile:
    """A thresholds config given to ``validate``: its short name, file, checksum and content."""

    name: str
    path: Path
    sha256: str
    config: dict[str, Any]


def load_thresholds(paths: Sequence[str | Path]) -> list[ThresholdsFile]:
    """Read and check thresholds configs (``nanify``'s ``load_config`` format).

    Names are the file stems, made unique with the parent folder's name (then a number).
    """
    if not paths:
        raise ValueError("give at least one --thresholds file: a thresholds.json written by "
                         "`nanprobe calibrate` (or any nanify(config=...) JSON)")
    files: list[ThresholdsFile] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ValueError(f"thresholds file {path} does not exist; make one with "
                             "`nanprobe calibrate MODEL INPUT --out DIR` (DIR/thresholds.json)")
        try:
            config = json.loads(path.read_text())
            load_config(config)
        except json.JSONDecodeError as err:
            raise ValueError(f"thresholds file {path} is not valid JSON: {err}") from None
        except ValueError as err:
            raise ValueError(f"thresholds file {path}: {err} (give a thresholds.json, not a "
                             "calibration.json)") from None
        files.append(ThresholdsFile(_unique_name(path, [f.name for f in files]), path,
                                    file_sha256(path), config))
    return files


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def _unique_name(path: Path, taken: Sequence[str]) -> str:
    for name in (path.stem, f"{path.parent.name}-{path.stem}"):
        name = _safe_name(name)
        if name not in taken:
            return name
    i = 2
    while f"{_safe_name(path.stem)}-{i}" in taken:
        i += 1
    return f"{_safe_name(path.stem)}-{i}"


def parse_views(views: str | Sequence[str]) -> tuple[str, ...]:
    """``"axial,coronal"`` (or a sequence) -> views in the given order; ValueError if unknown."""
    items = [v.strip() for v in (views.split(",") if isinstance(views, str) else views)]
    items = [v for v in items if v]
    bad = [v for v in items if v not in mri.VIEWS]
    if bad or not items:
        what = f"unknown view {bad[0]!r} in --views" if bad else "no view given in --views"
        raise ValueError(f"{what}; use a comma-separated subset of {', '.join(mri.VIEWS)}")
    if len(set(items)) != len(items):
        raise ValueError(f"--views names a view twice: {','.join(items)}")
    return tuple(items)


@dataclass
class Subject:
    """One input volume, conformed, with its own grid (for the outputs) and optional labels."""

    index: int
    spec: str
    name: str
    sha256: str
    grid_shape: tuple[int, int, int]
    grid_affine: np.ndarray
    volume: np.ndarray  # conformed (256, 256, 256) uint8
    affine: np.ndarray  # of the conformed grid
    labels: np.ndarray | None = field(default=None, repr=False)  # conformed grid, class indices
    labels_spec: str | None = None
    labels_sha256: str | None = None

    @property
    def dirname(self) -> str:
        return f"{self.index + 1:02d}-{self.name}"


def _input_name(spec: str) -> str:
    if spec == "default":
        return "default-brain"
    name = Path(spec).name
    for suffix in MRI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _safe_name(name)


def _check_volume_spec(spec: str, what: str) -> None:
    """ValueError unless ``spec`` is ``default`` (inputs) or an existing NIfTI/MGZ file."""
    if spec == "default" and what == "input":
        return
    if not str(spec).lower().endswith(MRI_SUFFIXES):
        raise ValueError(f"{what} {spec!r} is not an MRI volume: validate takes NIfTI/MGZ files "
                         f"({', '.join(MRI_SUFFIXES)})"
                         + (" or 'default' (the bundled brain)" if what == "input" else ""))
    if not Path(spec).is_file():
        raise ValueError(f"{what} {spec} does not exist; check the path")


def _read_volume(spec: str, what: str) -> tuple[Any, str]:
    _check_volume_spec(spec, what)
    return mri.load_volume(spec), file_sha256(Path(spec))


def _label_classes(data: np.ndarray, space: str, num_classes: int, source: str) -> np.ndarray:
    """Ground-truth labels as class indices (int16) of the model's label space."""
    if data.dtype.kind == "f":
        if not np.array_equal(data, np.round(data)):
            raise ValueError(f"labels {source} hold non-integer values; give a label volume")
        data = data.astype(np.int64)
    if space == "freesurfer":
        return mri.map_aparc_aseg2label(data)
    lo, hi = int(data.min()), int(data.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels {source} hold values {lo}..{hi}, but the model has "
                         f"{num_classes} classes (0..{num_classes - 1}); give labels in its "
                         "class indices")
    return data.astype(np.int16)


def load_subject(index: int, spec: str, labels: str | None, *, label_space: str,
                 num_classes: int, bundled_labels: bool) -> Subject:
    """Read, conform and label one input. ``labels``: None (the bundled brain's labels when
    ``bundled_labels``, else none), ``"none"``, ``"default"`` (the bundled labels; only with the
    bundled brain) or a NIfTI/MGZ label volume (any grid: resampled by nearest neighbour)."""
    if spec == "default":
        from .models.default import BRAIN_ASSET, LABELS_ASSET, load_default_brain

        img, bundled = load_default_brain()
        sha = asset_sha256(BRAIN_ASSET)
        if labels is None and bundled_labels:
            labels = "default"
    else:
        img, sha = _read_volume(spec, "input")
        bundled = None
    conformed = img if mri.is_conformed(img) else mri.conform(img)
    volume = np.asarray(conformed.dataobj, dtype=np.uint8)
    subject = Subject(index, spec, _input_name(spec), sha, tuple(img.shape[:3]),
                      np.asarray(img.affine, dtype=np.float64), volume,
                      np.asarray(conformed.affine, dtype=np.float64))
    if labels is None or labels == "none":
        return subject
    if labels == "default":
        if bundled is None:
            raise ValueError(f"--labels default names the bundled brain's labels, but input "
                             f"{spec!r} is not the bundled brain; give its own label volume")
        label_img, label_sha = bundled, asset_sha256(LABELS_ASSET)
    else:
        label_img, label_sha = _read_volume(labels, "labels")
    data = _label_classes(np.asarray(label_img.dataobj), label_space, num_classes, labels)
    subject.labels = mri.resample_labels(data, label_img.affine, mri.CONFORMED_SHAPE,
                                         subject.affine, fill=0)
    subject.labels_spec, subject.labels_sha256 = labels, label_sha
    return subject


# ---------------------------------------------------------------------------------------------
# models


@dataclass
class ViewModel:
    """The plain model of a view, its nanified twins (one per thresholds file) and classes."""

    loaded: LoadedModel
    nanified: list[nn.Module]
    generators: list[torch.Generator]
    num_classes: int

    @property
    def variants(self) -> list[nn.Module]:
        return [self.loaded.model, *self.nanified]


def _check_model(loaded: LoadedModel) -> None:
    if loaded.input_kind == "image" or loaded.task == "classification":
        raise ValueError(f"model {loaded.spec!r} classifies images; validate is for MRI "
                         "segmentation models (thick slices of a volume). For a classifier's "
                         "accuracy use `nanprobe calibrate`")


def load_view_models(model: str | LoadedModel | Mapping[str, LoadedModel], views: Sequence[str],
                     checkpoints: Sequence[str | Path] = (), *,
                     trust: bool = False) -> dict[str, LoadedModel]:
    """The model of each view.

    ``model``: a registry spec, a loaded model (used for every view) or a mapping view -> model.
    ``checkpoints``: none (the spec's bundled weights, every view), one (every view) or one per
    view in ``views`` order. FastSurfer specs need one checkpoint per view (one network each).
    """
    if isinstance(model, LoadedModel):
        loaded = {v: model for v in views}
    elif isinstance(model, Mapping):
        missing = [v for v in views if v not in model]
        if missing:
            raise ValueError(f"no model given for view(s) {', '.join(missing)}")
        loaded = {v: model[v] for v in views}
    else:
        cks = [Path(c) for c in checkpoints]
        fastsurfer = model.startswith("fastsurfer-")
        if len(cks) > 1 and len(cks) != len(views):
            raise ValueError(f"give --checkpoint once (every view) or once per view in --views "
                             f"order ({len(views)}); got {len(cks)}")
        if fastsurfer and len(cks) != len(views):
            raise ValueError(f"{model} has one network per view: give --checkpoint once per view, "
                             f"in the order of --views ({', '.join(views)})")
        if len(cks) == len(views) and (len(cks) > 1 or fastsurfer):
            loaded = {}
            for view, ck in zip(views, cks, strict=True):
                named = {v for v in mri.VIEWS if v in str(ck).lower()}
                if len(named) == 1 and view not in named:
                    raise ValueError(f"checkpoint {ck} names view {named.pop()!r} but is given "
                                     f"for {view!r}; order --checkpoint as --views")
                loaded[view] = load(model, checkpoint=ck, view=view, trust=trust)
        else:  # one network for every view
            one = load(model, checkpoint=cks[0] if cks else None, trust=trust)
            loaded = {v: one for v in views}
    for one in loaded.values():
        _check_model(one)
    return loaded


def _num_classes(loaded: LoadedModel) -> int:
    if loaded.num_classes:
        return int(loaded.num_classes)
    with torch.no_grad():
        out = loaded.model(torch.zeros(1, 2 * SLICE_THICKNESS + 1, *mri.CONFORMED_SHAPE[:2]))
    return int(out.shape[1])


def _nanify_all(loaded: Mapping[str, LoadedModel], thresholds: Sequence[ThresholdsFile]
                ) -> dict[str, ViewModel]:
    """One nanified copy per plain model and thresholds file (shared by views sharing a model)."""
    made: dict[int, ViewModel] = {}
    out = {}
    for view, one in loaded.items():
        key = id(one.model)
        if key not in made:
            gens = [torch.Generator() for _ in thresholds]
            nets = []
            for tf, gen in zip(thresholds, gens, strict=True):
                try:
                    nets.append(nanify(copy.deepcopy(one.model), config=tf.config,
                                       generator=gen).eval())
                except ValueError as err:
                    raise ValueError(f"thresholds file {tf.path} does not fit model "
                                     f"{one.spec!r}: {err}") from None
            made[key] = ViewModel(one, nets, gens, _num_classes(one))
        out[view] = made[key]
    return out


def _label_space(classes: Mapping[str, int]) -> str:
    """``"freesurfer"`` when every view predicts FastSurfer's classes (79, sagittal 51), else
    ``"index"`` (labels are class indices)."""
    fs = all(c == FASTSURFER_CLASSES or (v == "sagittal" and c == NUM_SAGITTAL_CLASSES)
             for v, c in classes.items())
    return "freesurfer" if fs else "index"


def _aggregate_classes(classes: Mapping[str, int]) -> int:
    """Classes of the fused volume; ValueError when the views' models cannot be fused."""
    full = {c for v, c in classes.items() if not (v == "sagittal" and c == NUM_SAGITTAL_CLASSES
                                                  and classes.get("axial") == FASTSURFER_CLASSES)}
    if len(full) != 1:
        raise ValueError(f"cannot fuse the views: their models predict {dict(classes)} classes; "
                         "give views whose models share one label set (or 51 sagittal classes "
                         "with 79 elsewhere), or fewer views")
    return full.pop()


# ---------------------------------------------------------------------------------------------
# the study


def validate(
    model: str | LoadedModel | Mapping[str, LoadedModel],
    inputs: Sequence[str],
    thresholds: Sequence[str | Path],
    out_dir: str | Path,
    *,
    views: str | Sequence[str] = mri.VIEWS,
    labels: Sequence[str | None] | None = None,
    checkpoints: Sequence[str | Path] = (),
    trust: bool = False,
    slices: str | None = None,
    batch_size: int = 4,
    repeats: int = 3,
    timing_slices: int = DEFAULT_TIMING_SLICES,
    seed: int = 0,
    figures: bool = True,
    provenance_extra: Mapping[str, Any] | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Validate nanified models against the plain one on whole volumes; write ``out_dir``.

    ``inputs``: ``"default"`` (the bundled brain) or NIfTI/MGZ volumes. ``thresholds``: one or
    more thresholds.json files. ``labels``: one entry per input (see :func:`load_subject`);
    default: the bundled labels for the bundled brain with the bundled model. ``slices``:
    which slices of every view to run (``START:STOP[:STEP]``, ``I,J,K``; default all). Timing:
    ``repeats`` interleaved rounds over the ``timing_slices`` central selected slices of each
    view (0 to skip). ``seed`` seeds the ``noisy_max`` fill. ``on_progress(done, total, what)``
    follows the batches; ``what`` is ``"NN-NAME VIEW"`` (the subject's folder), or ``"NN-NAME"`` +
    :data:`UP_TO_DATE` for a subject finished by an earlier run.

    Returns (and writes as ``validation.json``): ``format``; ``views``: view -> thresholds name
    -> ``dice_diff_mean``, ``dice_diff_std``, ``n_pairs``, ``p_ttest``, ``p_wilcoxon`` (see
    :func:`paired_statistics`); ``statistics``: the same keys with the test statistics,
    ``against`` and the degenerate-case ``note``; ``subjects``: one record per input (see
    ``docs/validation.md``); ``thresholds``: name -> path, sha256 and content; ``settings``;
    ``figures``; ``provenance``.
    """
    out_dir = Path(out_dir)
    view_list = parse_views(views)
    if batch_size < 1 or repeats < 0 or timing_slices < 0:
        raise ValueError(f"batch_size must be >= 1 and repeats, timing_slices >= 0; got "
                         f"{batch_size}, {repeats}, {timing_slices}")
    inputs = list(inputs)
    if not inputs:
        raise ValueError("give at least one input volume ('default' or a NIfTI/MGZ file)")
    if labels is not None and len(labels) not in (0, len(inputs)):
        raise ValueError(f"give --labels once per input ({len(inputs)}), in the same order, or "
                         f"not at all; got {len(labels)} (use 'none' for an input without)")
    label_specs = list(labels) if labels else [None] * len(inputs)
    files = load_thresholds(thresholds)
    for inp, lab in zip(inputs, label_specs, strict=True):  # fail early, before any model
        _check_volume_spec(inp, "input")
        if lab not in (None, "none", "default"):
            _check_volume_spec(lab, "labels")
    selection = {v: parse_selection(slices, mri.CONFORMED_SHAPE[mri.slice_axis(v)],
                                    f"0:{mri.CONFORMED_SHAPE[mri.slice_axis(v)]}")
                 for v in view_list}
    loaded = load_view_models(model, view_list, checkpoints, trust=trust)
    setup = _nanify_all(loaded, files)
    classes = {v: setup[v].num_classes for v in view_list}
    space = _label_space(classes)
    fuse = set(view_list) == set(mri.VIEWS)
    agg_classes = _aggregate_classes(classes) if fuse else None
    bundled_labels = all(one.spec == "default" for one in loaded.values())
    settings = {"views": list(view_list), "aggregated": fuse,
                "view_weights": _VIEW_WEIGHTS if fuse else None, "slices": slices or "all",
                "selection": {v: _compact(selection[v]) for v in view_list},
                "batch_size": batch_size, "repeats": repeats, "timing_slices": timing_slices,
                "seed": seed, "label_space": space, "classes": classes,
                "aggregated_classes": agg_classes}
    weights = {v: loaded[v].weights_sha256 for v in view_list}
    batches_per_subject = sum(-(-len(selection[v]) // batch_size) for v in view_list)
    total = batches_per_subject * len(inputs)
    load_before = os.getloadavg()
    records = []
    for i, (inp, lab) in enumerate(zip(inputs, label_specs, strict=True)):
        subject = load_subject(i, inp, lab, label_space=space,
                               num_classes=agg_classes or max(classes.values()),
                               bundled_labels=bundled_labels)
        fingerprint = {"input_sha256": subject.sha256, "labels_sha256": subject.labels_sha256,
                       "weights_sha256": weights, "settings": settings,
                       "thresholds": {f.name: f.sha256 for f in files},
                       "nanprobe_version": __version__}
        done = i * batches_per_subject

        def progress(k: int, what: str, _done: int = done, _name: str = subject.dirname) -> None:
            if on_progress:
                on_progress(_done + k, total, f"{_name} {what}")

        record = _finished(out_dir, subject, fingerprint)
        if record is None:
            record = _run_subject(subject, setup, view_list, selection, files, fingerprint,
                                  out_dir, fuse=fuse, agg_classes=agg_classes, space=space,
                                  batch_size=batch_size, repeats=repeats,
                                  timing_slices=timing_slices, seed=seed, figures=figures,
                                  progress=progress)
        elif on_progress:
            on_progress(done + batches_per_subject, total, subject.dirname + UP_TO_DATE)
        records.append(record)

    against = "labels" if all(r["labels"] is not None for r in records) else "plain"
    pooled = {v: {f.name: _pooled(records, v, f.name, against) for f in files}
              for v in view_list}
    result: dict[str, Any] = {
        "format": VALIDATION_FORMAT,
        "views": {v: {n: {k: s[k] for k in SCHEMA_KEYS} for n, s in per.items()}
                  for v, per in pooled.items()},
        "statistics": {v: {n: {**s, "against": against} for n, s in per.items()}
                       for v, per in pooled.items()},
        "against": against,
        "subjects": records,
        "thresholds": {f.name: {"path": str(f.path), "sha256": f.sha256, "config": f.config}
                       for f in files},
        "settings": settings,
        "provenance": {
            "model": next(iter(loaded.values())).spec,
            "checkpoints": [str(c) for c in checkpoints],
            "weights_sha256": weights,
            "inputs": [{"input": r["input"], "input_sha256": r["input_sha256"],
                        "labels": r["labels"], "labels_sha256": r["labels_sha256"]}
                       for r in records],
            "nanprobe_version": __version__, "torch_version": str(torch.__version__),
            "numpy_version": np.__version__, "scipy_version": scipy.__version__,
            "nibabel_version": nib.__version__, "threads": torch.get_num_threads(),
            "allocator": allocator_note(), "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
            "created": datetime.now(timezone.utc).isoformat(), **(provenance_extra or {}),
        },
        "figures": {},
    }
    if figures:
        from .validate_plots import plot_dice_difference

        path = plot_dice_difference(result, out_dir / FIGURES_DIR / "dice_difference.png")
        result["figures"]["dice_difference"] = path.relative_to(out_dir).as_posix()
    write_json(out_dir / VALIDATION_FILE, result)
    return json_safe(result)


def _compact(indices: Sequence[int]) -> str:
    """``[0, 2, 4]`` -> ``"0:5:2"`` when evenly spaced, else the comma list."""
    idx = list(indices)
    if len(idx) > 1:
        step = idx[1] - idx[0]
        if step > 0 and all(b - a == step for a, b in zip(idx, idx[1:], strict=False)):
            return f"{idx[0]}:{idx[-1] + 1}" + (f":{step}" if step != 1 else "")
    return ",".join(map(str, idx))


def _finished(out_dir: Path, subject: Subject, fingerprint: Mapping[str, Any]
              ) -> dict[str, Any] | None:
    """The record of a subject finished earlier with the same fingerprint (files intact)."""
    path = out_dir / SUBJECTS_DIR / subject.dirname / SUBJECT_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != json_safe(fingerprint):
        return None
    if not all((out_dir / f).is_file() for f in _files_of(record)):
        return None
    return record


def _files_of(record: Mapping[str, Any]) -> list[str]:
    out = []
    for entry in record.get("files", {}).values():
        out.extend(entry.values() if isinstance(entry, Mapping) else [entry])
    return out


def pooled_pairs(records: Sequence[Mapping[str, Any]], view: str, name: str,
                 against: str) -> tuple[np.ndarray, np.ndarray]:
    """(plain, nanified) per-slice Dice of ``view`` and thresholds ``name`` over all subjects,
    against ``"labels"`` or ``"plain"`` (the plain model's Dice against itself is 1.0)."""
    plain: list[float] = []
    nan: list[float] = []
    for r in records:
        v = r["views"][view]
        if against == "labels":
            plain.extend(v["plain"]["dice_per_slice_vs_labels"])
            nan.extend(v["nanified"][name]["dice_per_slice_vs_labels"])
        else:
            series = v["nanified"][name]["dice_per_slice_vs_plain"]
            plain.extend([1.0] * len(series))
            nan.extend(series)
    return np.asarray(plain, float), np.asarray(nan, float)


def _pooled(records: Sequence[Mapping[str, Any]], view: str, name: str,
            against: str) -> dict[str, Any]:
    return paired_statistics(*pooled_pairs(records, view, name, against))


def _run_subject(subject: Subject, setup: Mapping[str, ViewModel], views: Sequence[str],
                 selection: Mapping[str, list[int]], files: Sequence[ThresholdsFile],
                 fingerprint: Mapping[str, Any], out_dir: Path, *, fuse: bool,
                 agg_classes: int | None, space: str, batch_size: int, repeats: int,
                 timing_slices: int, seed: int, figures: bool,
                 progress: Callable[[int, str], None]) -> dict[str, Any]:
    """Segment one subject plain and nanified in every view; write its files and record."""
    started = (datetime.now(timezone.utc).isoformat(), time.perf_counter(), os.getloadavg())
    names = [f.name for f in files]
    n_var = 1 + len(files)
    acc = None
    if fuse:  # fused logits on the selected grid: (C, X selected, Y selected, Z selected)
        grid = {mri.slice_axis(v): np.asarray(selection[v]) for v in views}
        acc = [np.zeros((agg_classes, *(len(grid[a]) for a in range(3))), np.float32)
               for _ in range(n_var)]
    finals: dict[str, list[np.ndarray]] = {}
    record_views: dict[str, Any] = {}
    done = 0
    for view in views:
        vm = setup[view]
        for gen in vm.generators:
            gen.manual_seed(seed)
        for net in vm.nanified:
            skip_stats(net, reset=True)
        idx = selection[view]
        vol_view = mri.to_view(subject.volume, view)
        labels = [np.full(mri.CONFORMED_SHAPE, -1, np.int16) for _ in range(n_var)]
        seconds = np.zeros(n_var)
        expand = fuse and vm.num_classes != agg_classes  # 51 sagittal -> 79 classes
        if fuse:
            h, w, _ = mri.view_axes(view)
            in_plane = np.ix_(grid[h], grid[w])
            position = {s: n for n, s in enumerate(idx)}
        progress(done, view)
        for start in range(0, len(idx), batch_size):
            part = idx[start:start + batch_size]
            x = torch.from_numpy(mri.thick_slices(vol_view, SLICE_THICKNESS, slices=part))
            for k, net in enumerate(vm.variants):
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = net(x)
                seconds[k] += time.perf_counter() - t0
                lab = labels_from_logits(out).numpy().astype(np.int16)
                mri.to_view(labels[k], view)[..., part] = np.moveaxis(lab, 0, -1)
                if acc is not None:
                    logits = out.nan_to_num(nan=0.0).numpy()[(slice(None), slice(None),
                                                              *in_plane)]
                    if expand:
                        logits = mri.sagittal_to_full(logits, axis=1)
                    rows = [position[s] for s in part]
                    mri.to_view(acc[k], view)[rows] += np.float32(_VIEW_WEIGHTS[view]) * logits
            done += 1
            progress(done, view)
        skips = [_overall_skip(net) for net in vm.nanified]
        timing = _timing(vm, vol_view, idx, batch_size, repeats, timing_slices)
        record_views[view] = _view_record(subject, view, vm, labels, idx, names, space, seconds,
                                          skips, timing)
        if not fuse:
            finals[view] = labels
    if acc is not None:
        finals[AGGREGATED] = [_fuse(a, grid) for a in acc]
        del acc
    record_aggregated = None
    if fuse:
        record_aggregated = _volume_record(subject, finals[AGGREGATED], agg_classes, names)
    subject_dir = out_dir / SUBJECTS_DIR / subject.dirname
    classes = {v: setup[v].num_classes for v in views}
    classes[AGGREGATED] = agg_classes
    files_written = _write_segmentations(subject, finals, classes, names, space, subject_dir,
                                         out_dir)
    record = {
        "name": subject.name, "index": subject.index, "input": subject.spec,
        "input_sha256": subject.sha256, "labels": subject.labels_spec,
        "labels_sha256": subject.labels_sha256, "input_shape": list(subject.grid_shape),
        "input_affine": subject.grid_affine.tolist(), "conformed_affine": subject.affine.tolist(),
        "dir": subject_dir.relative_to(out_dir).as_posix(), "views": record_views,
        AGGREGATED: record_aggregated, "files": files_written, "fingerprint": fingerprint,
        "computed": {"created": started[0], "seconds": time.perf_counter() - started[1],
                     "load_average_before": list(started[2]),
                     "load_average_after": list(os.getloadavg())},
    }
    if figures:
        from .validate_plots import plot_dice_per_slice, plot_differences

        figs = {"dice_per_slice": plot_dice_per_slice(record, subject_dir / "dice_per_slice.png")}
        key = next(iter(finals))
        for k, name in enumerate(names, start=1):
            figs[f"differences-{name}"] = plot_differences(
                subject.volume, finals[key][0], finals[key][k],
                subject_dir / f"differences-{name}.png",
                title=f"{subject.name}: labels that differ, {key}, plain vs {name}")
        record["files"]["figures"] = {k: p.relative_to(out_dir).as_posix()
                                      for k, p in figs.items()}
    write_json(subject_dir / SUBJECT_FILE, record)
    return json_safe(record)


def _overall_skip(net: nn.Module) -> dict[str, float]:
    rows = skip_table(skip_stats(net, reset=True))
    last = rows[-1] if rows else {"skipped": 0.0, "macs_skipped": 0.0}
    return {"positions": float(last["skipped"]), "macs": float(last["macs_skipped"])}


def _timing(vm: ViewModel, vol_view: np.ndarray, idx: Sequence[int], batch_size: int,
            repeats: int, timing_slices: int) -> list[dict[str, Any] | None]:
    """Per nanified model: seconds of plain and nanified over the central ``timing_slices``
    selected slices in ``repeats`` interleaved rounds (median, min, max, all), the speed-up
    (plain / nanified per round: median and min-max, :func:`~nanprobe.evaluate.ratio_spread`),
    its :func:`~nanprobe.evaluate.speed_verdict` and, when the machine was too busy to trust
    the timing, why (:func:`~nanprobe.evaluate.machine_busy`)."""
    k = min(timing_slices, len(idx))
    if repeats == 0 or k == 0:
        return [None] * len(vm.nanified)
    mid = (len(idx) - k) // 2
    chosen = list(idx[mid:mid + k])
    x = torch.from_numpy(mri.thick_slices(vol_view, SLICE_THICKNESS, slices=chosen))
    batches = split_batches(x, batch_size)
    fns = [forward_pass(net, batches) for net in vm.variants]
    load_before = os.getloadavg()[0]
    rounds = interleaved_rounds(fns, repeats, warmup=False)  # [model][round]
    load_after = os.getloadavg()[0]
    for net in vm.nanified:
        skip_stats(net, reset=True)  # the timing passes are not part of the skip counts
    out = []
    for nan in rounds[1:]:
        ratio = ratio_spread(rounds[0], nan)
        lo, hi = ratio["range"]
        out.append({"slices": _compact(chosen), "repeats": repeats,
                    "plain_seconds": _spread(rounds[0]), "nanified_seconds": _spread(nan),
                    "speedup": ratio["median"], "speedup_min": lo, "speedup_max": hi,
                    "verdict": speed_verdict(lo, hi),
                    "slowdown": ratio["median"] < 1.0,
                    "load_average": [load_before, load_after],
                    "busy": machine_busy(load_before, load_after, (lo, hi), ratio["median"])})
    return out


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {"median": float(np.median(values)), "min": float(min(values)),
            "max": float(max(values)), "all": [float(v) for v in values]}


def _view_truth(labels: np.ndarray, view_classes: int, space: str) -> np.ndarray:
    """Ground truth in a view's class space (79 -> 51 for FastSurfer's sagittal network)."""
    if space == "freesurfer" and view_classes == NUM_SAGITTAL_CLASSES:
        return FULL_TO_SAGITTAL.astype(np.int16)[labels]
    return labels


def _stack(volume: np.ndarray, view: str, idx: Sequence[int]) -> np.ndarray:
    """The ``idx`` slices of a conformed volume in ``view`` as ``(S, H, W)``."""
    return np.moveaxis(mri.to_view(volume, view)[..., list(idx)], -1, 0)


def _view_record(subject: Subject, view: str, vm: ViewModel, labels: Sequence[np.ndarray],
                 idx: Sequence[int], names: Sequence[str], space: str, seconds: np.ndarray,
                 skips: Sequence[dict[str, float]],
                 timing: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    c = vm.num_classes
    stacks = [_stack(lab, view, idx) for lab in labels]
    truth = None
    if subject.labels is not None:
        truth = _stack(_view_truth(subject.labels, c, space), view, idx)
        if int(truth.max()) >= c:
            raise ValueError(f"labels {subject.labels_spec} hold classes beyond the {c} of the "
                             f"{view} model; give labels in its class indices")

    def vs_labels(stack: np.ndarray) -> tuple[Any, Any]:
        if truth is None:
            return None, None
        return (agreement(confusion(stack, truth, c)),
                slice_dice(stack, truth, c).tolist())

    plain_vs, plain_slices = vs_labels(stacks[0])
    nanified = {}
    for k, name in enumerate(names, start=1):
        nan_vs, nan_slices = vs_labels(stacks[k])
        vs_plain_slices = slice_dice(stacks[k], stacks[0], c).tolist()
        nanified[name] = {
            "dice_per_slice_vs_plain": vs_plain_slices,
            "dice_per_slice_vs_labels": nan_slices,
            "vs_plain": agreement(confusion(stacks[k], stacks[0], c)),
            "vs_labels": nan_vs, "skip": skips[k - 1], "pass_seconds": float(seconds[k]),
            "timing": timing[k - 1],
            "test": (paired_statistics(plain_slices, nan_slices) if truth is not None
                     else paired_statistics([1.0] * len(idx), vs_plain_slices)),
        }
    return {"classes": c, "slices": _compact(idx), "slice_indices": list(map(int, idx)),
            "plain": {"vs_labels": plain_vs, "dice_per_slice_vs_labels": plain_slices,
                      "pass_seconds": float(seconds[0])},
            "nanified": nanified}


def _fuse(acc: np.ndarray, grid: Mapping[int, np.ndarray], chunk: int = 8) -> np.ndarray:
    """Conformed label volume (int16): the argmax over classes of the fused logits ``acc``
    ``(C, |X sel|, |Y sel|, |Z sel|)`` on the voxels selected in every view, -1 elsewhere."""
    fused = np.empty(acc.shape[1:], np.int16)
    for x0 in range(0, acc.shape[1], chunk):
        fused[x0:x0 + chunk] = acc[:, x0:x0 + chunk].argmax(0)
    out = np.full(mri.CONFORMED_SHAPE, -1, np.int16)
    out[np.ix_(grid[0], grid[1], grid[2])] = fused
    return out


def _volume_record(subject: Subject, vols: Sequence[np.ndarray], num_classes: int,
                   names: Sequence[str]) -> dict[str, Any]:
    """Dice per class of fused volumes (predicted voxels only) vs plain and vs labels."""
    mask = vols[0] >= 0
    plain = vols[0][mask]
    truth = subject.labels[mask] if subject.labels is not None else None

    def vs(target: np.ndarray | None, pred: np.ndarray) -> dict[str, Any] | None:
        return None if target is None else agreement(confusion(pred, target, num_classes))

    return {"classes": num_classes, "voxels": int(mask.sum()),
            "plain": {"vs_labels": vs(truth, plain)},
            "nanified": {name: {"vs_plain": vs(plain, vols[k][mask]),
                                "vs_labels": vs(truth, vols[k][mask])}
                         for k, name in enumerate(names, start=1)}}


def _write_segmentations(subject: Subject, finals: Mapping[str, Sequence[np.ndarray]],
                         classes: Mapping[str, int], names: Sequence[str], space: str,
                         subject_dir: Path, out_dir: Path) -> dict[str, dict[str, str]]:
    """Label volumes in the input's space (shape and affine): plain, nanified, difference."""
    written: dict[str, dict[str, str]] = {}
    exts = (".nii.gz", ".mgz") if space == "freesurfer" else (".nii.gz",)
    for key, vols in finals.items():
        ids = _FREESURFER_IDS[classes[key]] if space == "freesurfer" else None

        def to_input(vol: np.ndarray, _ids: np.ndarray | None = ids) -> np.ndarray:
            if _ids is not None:
                vol = np.where(vol < 0, -1, _ids[np.maximum(vol, 0)]).astype(np.int16)
            return mri.resample_labels(vol, subject.affine, subject.grid_shape,
                                       subject.grid_affine, fill=0)

        items = {"plain": to_input(vols[0])}
        for k, name in enumerate(names, start=1):
            items[f"nanified-{name}"] = to_input(vols[k])
            differ = ((vols[k] != vols[0]) & (vols[0] >= 0)).astype(np.uint8)
            items[f"diff-{name}"] = mri.resample_labels(differ, subject.affine,
                                                        subject.grid_shape,
                                                        subject.grid_affine, fill=0)
        for what, data in items.items():
            for ext in exts:
                path = subject_dir / f"{key}_{what}{ext}"
                _save_volume(data, subject.grid_affine, path)
                written.setdefault(key, {})[f"{what}{ext}"] = path.relative_to(out_dir).as_posix()
    return written


def _save_volume(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    if path.name.endswith(".mgz"):
        img: Any = nib.MGHImage(data, affine)
    else:
        img = nib.Nifti1Image(data, affine)
        img.header.set_xyzt_units("mm")
    img.set_data_dtype(data.dtype)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


# ---------------------------------------------------------------------------------------------
# text and HTML


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    """The pooled statistics and, per subject, the fused (or per-view) agreement and speed."""
    against = result.get("against", "plain")
    lines = [f"Dice difference per slice (nanified - plain, both vs {against}), pooled over "
             f"{len(result['subjects'])} subject(s):",
             f"{'view':<9} {'thresholds':<16} {'mean':>10} {'std':>9} {'n':>6} "
             f"{'p t-test':>9} {'p Wilcoxon':>10}"]
    for view, per in result["views"].items():
        for name, s in per.items():
            lines.append(f"{view:<9} {name:<16} {_fmt(s['dice_diff_mean'], '+.2e'):>10} "
                         f"{_fmt(s['dice_diff_std'], '.2e'):>9} {s['n_pairs']:>6} "
                         f"{_fmt(s['p_ttest'], '.3g'):>9} {_fmt(s['p_wilcoxon'], '.3g'):>10}")
    for r in result["subjects"]:
        who = Path(r["dir"]).name  # NN-NAME: unique when an input is given twice
        for view, v in r["views"].items():
            for name, n in v["nanified"].items():
                t = n["timing"]
                speed = "" if t is None else f", speed-up {_speed(t)}"
                lines.append(f"{who} {view} {name}: labels identical to plain "
                             f"{_fmt(n['vs_plain']['identical'], '.4%')}, MACs skipped "
                             f"{n['skip']['macs']:.1%}{speed}")
        agg = r.get(AGGREGATED)
        if agg:
            for name, n in agg["nanified"].items():
                lines.append(f"{who} aggregated {name}: labels identical to plain "
                             f"{_fmt(n['vs_plain']['identical'], '.4%')}, mean Dice vs plain "
                             f"{_fmt(n['vs_plain']['mean_dice'], '.5f')}")
    return lines


def _speed(t: Mapping[str, Any]) -> str:
    """``0.93x [0.88-1.11], no measurable difference`` (+ why it is unreliable): the words are
    the verdict's, so a median below 1 with a range straddling 1 is not called a slowdown."""
    text = (f"{t['speedup']:.2f}x [{t['speedup_min']:.2f}-{t['speedup_max']:.2f}], "
            f"{t.get('verdict')}")
    return text + (f"; timing unreliable: {t['busy']}" if t.get("busy") else "")


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def find_validation(run_dir: str | Path) -> Path | None:
    """``validation.json`` in ``run_dir`` or ``run_dir/validation/`` (None if neither)."""
    for path in (Path(run_dir) / VALIDATION_FILE, Path(run_dir) / "validation" / VALIDATION_FILE):
        if path.is_file():
            return path
    return None


def report_section(run_dir: str | Path) -> str | None:
    """HTML (escaped) of the validation results found by :func:`find_validation`, or None.

    A table of the pooled statistics per view and thresholds file, per subject the fused
    agreement, skips and speed, and the figures embedded as ``data:`` URIs.
    """
    path = find_validation(run_dir)
    if path is None:
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"<p class=\"warn\">{_e(path)} is not readable: {_e(err)}</p>"
    if not isinstance(result, dict) or result.get("format") != VALIDATION_FORMAT:
        return f"<p class=\"warn\">{_e(path)} is not a {_e(VALIDATION_FORMAT)} file.</p>"
    base = path.parent
    against = result.get("against", "plain")
    rows = []
    for view, per in result["views"].items():
        for name, s in per.items():
            rows.append([view, name, _fmt(s["dice_diff_mean"], "+.2e"),
                         _fmt(s["dice_diff_std"], ".2e"), s["n_pairs"],
                         f"{_fmt(s['p_ttest'], '.3g')} {significance(s['p_ttest'])}",
                         f"{_fmt(s['p_wilcoxon'], '.3g')} {significance(s['p_wilcoxon'])}"])
    parts = [f"<p>{_e(path)}: {len(result['subjects'])} subject(s), Dice per slice of the "
             f"nanified and the plain model against {_e(against)}; difference = nanified "
             "minus plain; paired t-test and Wilcoxon signed-rank test over slices.</p>",
             _html_table(["view", "thresholds", "mean diff", "std", "pairs", "p t-test",
                          "p Wilcoxon"], rows)]
    subject_rows = []
    for r in result["subjects"]:
        for view, v in r["views"].items():
            for name, n in v["nanified"].items():
                t = n.get("timing")
                subject_rows.append([
                    r["name"], view, name, _fmt(n["vs_plain"]["identical"], ".4%"),
                    _fmt(n["skip"]["macs"], ".1%"),
                    "n/a" if t is None else _speed(t)])
    parts.append(_html_table(["subject", "view", "thresholds", "labels identical to plain",
                              "MACs skipped", "speed-up, median [min-max] of the rounds"],
                             subject_rows))
    figures = [(result.get("figures", {}).get("dice_difference"), "Dice difference per view")]
    if result["subjects"]:
        first = result["subjects"][0]
        for key, rel in first.get("files", {}).get("figures", {}).items():
            figures.append((rel, f"{first['name']}: {key.replace('_', ' ')}"))
    parts.extend(_html_img(base, rel, cap) for rel, cap in figures if rel)
    return "\n".join(parts)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>"
                     for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _html_img(base: Path, rel: str, caption: str) -> str:
    path = base / rel
    inside = path.resolve().is_relative_to(base.resolve())
    data = path.read_bytes() if inside and path.is_file() else b""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return f'<p class="missing">figure {_e(rel)} is missing or not a PNG</p>'
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{b64}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")

