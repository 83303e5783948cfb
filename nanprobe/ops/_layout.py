"""NaN layouts carried from the NaN op that wrote a tensor to the next NaN op that reads it.

The op that writes an output knows, at no extra cost, how many NaN entries each pixel holds;
the next NaN convolution would otherwise re-read the whole map to find them. The counts are
kept in a side table keyed by the output tensor's identity and checked on every use: the same
tensor object, still alive, with the same version counter (every in-place torch op bumps it),
data pointer, shape and strides. Anything else (a copy, a view, user code that modifies or
replaces the tensor) finds nothing and the consumer scans the data, so a stale entry can never
be used. Changes that bypass the version counter (writes through ``.numpy()`` or ``.data``)
are not seen, as autograd does not see them either. Inference-mode tensors have no version
counter, so nothing is carried for them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PixelNaNs:
    """NaN entries per pixel (N, H, W) int32 of an (N, C, H, W) map, and whether its numbers
    are all finite (no +-inf)."""

    count: torch.Tensor
    finite: bool


@dataclass(frozen=True)
class _Entry:
    ref: weakref.ref
    version: int
    data_ptr: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    layout: PixelNaNs


_table: dict[int, _Entry] = {}


def _trackable(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_inference() and t.device.type == "cpu"


def remember(t: torch.Tensor, count: torch.Tensor, finite: bool) -> None:
    """Record that (N, C, H, W) ``t`` holds ``count`` (N, H, W) NaN entries per pixel."""
    if not _trackable(t):
        return
    key = id(t)

    def forget(ref: weakref.ref, key: int = key) -> None:
        entry = _table.get(key)
        if entry is not None and entry.ref is ref:
            del _table[key]

    _table[key] = _Entry(weakref.ref(t, forget), t._version, t.data_ptr(), tuple(t.shape),
                         t.stride(), PixelNaNs(count, finite))


def recall(t: torch.Tensor) -> PixelNaNs | None:
    """The layout recorded for exactly this tensor, unchanged since; None otherwise."""
    entry = _table.get(id(t))
    if entry is None or entry.ref() is not t or not _trackable(t):
        return None
    if (t._version, t.data_ptr(), tuple(t.shape), t.stride()) != (
            entry.version, entry.data_ptr, entry.shape, entry.stride):
        return None
    return entry.layout


def nan_entries(t: torch.Tensor) -> int:
    """Number of NaN entries of ``t``: from its carried layout when it has one (no pass over
    ``t``), else counted."""
    layout = recall(t)
    if layout is not None:
        return int(layout.count.numpy().sum())
    return int(torch.isnan(t).sum())
