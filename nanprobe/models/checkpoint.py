"""Load FastSurfer's published checkpoints into :mod:`nanprobe.models.fastsurfer` networks.

Supported files (never downloaded here; pass a local path):

* v2 FastSurferVINN ``aparc_vinn_{axial,coronal,sagittal}_v2.0.0.pkl``: weights under
  ``"model_state"``;
* v1 FastSurferCNN ``Epoch_30_training_state.pkl``: weights under ``"model_state_dict"``, keys
  possibly prefixed with ``"module."`` (saved from ``nn.DataParallel``).

The version is detected from the weight keys and the view family from the classifier's class count
(79 axial/coronal, 51 sagittal; axial and coronal checkpoints have identical layouts).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nanprobe.models.fastsurfer import (
    FastSurferCNN,
    FastSurferVINN,
    fastsurfer_cnn,
    fastsurfer_vinn,
    num_classes_for_view,
)

_WEIGHT_ENTRIES = ("model_state", "model_state_dict")  # v2, v1
_DDP_PREFIX = "module."
_CLASSIFIER_WEIGHT = "classifier.conv.weight"
_SHOWN = 3  # offending keys named per category in error messages
_VIEW_OF_CLASSES = {
    num_classes_for_view("axial"): "axial/coronal",
    num_classes_for_view("sagittal"): "sagittal",
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, untrusted or does not match the expected layout."""


def _first(keys: list[str]) -> str:
    """``"a, b, c (+N more)"`` for the first few ``keys``."""
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _shape(value: object) -> str:
    """``[d0, d1, ...]`` for a tensor, else the type name."""
    return str(list(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def _torch_load(path: Path, *, trust: bool, map_location: str | torch.device) -> Any:
    """``torch.load`` with ``weights_only=True``; full unpickling only if refused and ``trust``."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused is None:
            raise _unreadable(path, err) from err
        if not trust:
            raise CheckpointError(
                f"{path}: the file holds Python objects beyond tensors ({refused[1]}) and needs "
                "full unpickling, which can run arbitrary code stored in the file; if you trust "
                "its source, pass trust=True (a truncated file can also cause this refusal)"
            ) from err
    except Exception as err:  # torch.load reports corruption with many exception types
        raise _unreadable(path, err) from err
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # as above
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    """One-line error for a file ``torch.load`` cannot read."""
    lines = str(err).strip().splitlines()
    reason = lines[0].split(". ")[0] if lines else "no details"
    return CheckpointError(
        f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {reason}); the file is "
        "truncated, corrupted or not written by torch.save - copy an intact FastSurfer .pkl file"
    )


def _weights(path: Path, obj: Any) -> dict[str, Tensor]:
    """The state dict stored in a loaded checkpoint, with any ``module.`` prefix removed."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a dict with 'model_state' (v2) or 'model_state_dict' (v1), "
            f"got {type(obj).__name__}"
        )
    entry = next((name for name in _WEIGHT_ENTRIES if name in obj), None)
    if entry is None or not isinstance(obj[entry], Mapping):
        raise CheckpointError(
            f"{path}: no 'model_state' (v2) or 'model_state_dict' (v1) weights dict; "
            f"top-level keys are {_first([str(k) for k in obj])}"
        )
    return {str(k).removeprefix(_DDP_PREFIX): v for k, v in obj[entry].items()}


def load_fastsurfer_checkpoint(
    path: str | os.PathLike[str],
    view: str,
    *,
    trust: bool = False,
    map_location: str | torch.device = "cpu",
) -> FastSurferCNN | FastSurferVINN:
    """Build the FastSurfer network stored in ``path`` for ``view`` and load its weights.

    Returns a :class:`FastSurferVINN` (v2) or :class:`FastSurferCNN` (v1) in eval mode on
    ``map_location``. The file is read with ``torch.load(weights_only=True)``; only when that is
    refused and ``trust`` is True is it fully unpickled (FastSurfer files may hold numpy scalars;
    full unpickling can execute code, so only trust files from a trusted source).

    Raises :class:`CheckpointError` (a ValueError) when the file is missing, unreadable or
    untrusted, when its class count belongs to another view, or when its keys or shapes differ
    from the expected layout; ValueError for an unknown ``view``.
    """
    expected_classes = num_classes_for_view(view)
    path = Path(path)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(
            f"{path}: {state}; pass the path of a FastSurfer checkpoint file "
            "(aparc_vinn_<view>_v2.0.0.pkl or Epoch_30_training_state.pkl)"
        )
    weights = _weights(path, _torch_load(path, trust=trust, map_location=map_location))

    is_vinn = any(k.startswith(("inp_block.", "outp_block.")) for k in weights)
    classifier = weights.get(_CLASSIFIER_WEIGHT)
    if isinstance(classifier, Tensor) and classifier.dim() > 0:
        found = int(classifier.shape[0])
        if found != expected_classes and found in _VIEW_OF_CLASSES:
            raise CheckpointError(
                f"{path}: checkpoint is a {_VIEW_OF_CLASSES[found]} model ({found} classes) but "
                f"view={view!r} needs {expected_classes} classes; load it with the matching view"
            )

    model = fastsurfer_vinn(view) if is_vinn else fastsurfer_cnn(view)
    family = "sagittal" if view == "sagittal" else "axial_coronal"
    layout = f"fastsurfer_{'vinn_v2' if is_vinn else 'cnn_v1'}_{family}"
    reference = model.state_dict()
    missing = [k for k in reference if k not in weights]
    unexpected = [k for k in weights if k not in reference]
    wrong_shape = [
        f"{k} {_shape(v)} (expected {_shape(reference[k])})"
        for k, v in weights.items()
        if k in reference and (not isinstance(v, Tensor) or v.shape != reference[k].shape)
    ]
    problems = [
        f"{label} {_first(keys)}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong_shape),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"{path}: weights do not match layout {layout}: {'; '.join(problems)}"
        )
    model.load_state_dict(weights)
    return model.to(map_location).eval()
