"""Forward hooks that stream every selected layer's tensors into an HDF5 file.

Layout of a capture file (one model run over S input samples, fed in batches)::

    /layers/<module name>/output          (S, ...) float  module output (tuples: output_0, ...)
    /layers/<module name>/input           (S, C, H, W)    max-pool modules: the pooled input
    /layers/<module name>/indices         (S, C, Ho, Wo)  max-pool modules: argmax indices
    /final                                (S, ...)        the model's output

A module called several times per forward gets ``<name>@2``, ``<name>@3``, ... Datasets are
chunked per sample and compressed; each batch is appended as soon as it is produced, so no
more than one batch of one layer is ever held in memory.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .integrity import uninterrupted

POOL_TYPES = (nn.MaxPool2d,)
DEFAULT_TYPES = (nn.Conv2d, nn.MaxPool2d, nn.MaxUnpool2d)


def layer_names(model: nn.Module) -> list[str]:
    """All capturable module names (every named submodule but the root)."""
    return [name for name, _ in model.named_modules() if name]


def default_layers(model: nn.Module) -> list[str]:
    """Every conv, pool and unpool, plus the model's top-level blocks (their outputs)."""
    top = {name for name, _ in model.named_children()}
    return [name for name, m in model.named_modules()
            if name and (isinstance(m, DEFAULT_TYPES) or name in top)]


def select_layers(model: nn.Module, patterns: Iterable[str] | None = None) -> list[str]:
    """Module names matching any glob pattern (default: :func:`default_layers`).

    A pattern matching nothing is a ValueError that lists the available names.
    """
    if patterns is None:
        return default_layers(model)
    names = layer_names(model)
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"layer pattern {pattern!r} matches no module; available: "
                             f"{', '.join(names)}")
        chosen += [n for n in hits if n not in chosen]
    return [n for n in names if n in chosen]  # model order


def _pool_indices(module: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, module.kernel_size, module.stride, module.padding, module.dilation,
                        module.ceil_mode, return_indices=True)[1]


def _named_tensors(name: str, module: nn.Module, inputs: tuple, output) -> Iterator[tuple]:
    """(field, tensor) pairs to record for one call of ``module``."""
    outputs = output if isinstance(output, tuple | list) else (output,)
    tensors = [t for t in outputs if isinstance(t, torch.Tensor)]
    if len(tensors) == 1:
        yield "output", tensors[0]
    else:
        for i, t in enumerate(tensors):
            yield f"output_{i}", t
    if isinstance(module, POOL_TYPES) and inputs and isinstance(inputs[0], torch.Tensor):
        yield "input", inputs[0]
        if module.return_indices and len(tensors) == 2:
            yield "indices", tensors[1]
        else:
            yield "indices", _pool_indices(module, inputs[0])


@dataclass
class LayerShape:
    """Per-sample shape and dtype of one captured field (from a dry pass)."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy()


@contextmanager
def _hooks(model: nn.Module, names: list[str], sink):
    """Register forward hooks on ``names`` calling ``sink(key, tensor)``; count calls per key."""
    calls: Counter[str] = Counter()
    handles = []

    def make(name: str, module: nn.Module):
        def hook(mod, inputs, output):
            calls[name] += 1
            group = name if calls[name] == 1 else f"{name}@{calls[name]}"
            for field, tensor in _named_tensors(name, module, inputs, output):
                sink(f"layers/{group}/{field}", tensor)
        return hook

    modules = dict(model.named_modules())
    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(make(name, modules[name])))
        yield calls
    finally:
        for h in handles:
            h.remove()


def dry_shapes(model: nn.Module, names: list[str], one_sample: torch.Tensor) -> list[LayerShape]:
    """Run one sample (1, ...) through ``model`` and return every captured field's shape."""
    shapes: dict[str, LayerShape] = {}

    def sink(key: str, tensor: torch.Tensor) -> None:
        shapes[key] = LayerShape(key, tuple(tensor.shape[1:]),
                                 np.dtype(_as_numpy(tensor[:0]).dtype))

    with torch.no_grad(), _hooks(model, names, sink):
        out = model(one_sample)
    sink("final", out if isinstance(out, torch.Tensor) else out[0])
    return list(shapes.values())


class H5Writer:
    """Appends batches of captured tensors to an open HDF5 file, one dataset per key."""

    def __init__(self, h5: h5py.File, total: int, compression: str | None = "gzip") -> None:
        self.h5, self.total, self.compression = h5, total, compression
        self.filled: Counter[str] = Counter()

    def __call__(self, key: str, tensor: torch.Tensor) -> None:
        arr = _as_numpy(tensor)
        with uninterrupted():  # HDF5 must not see an exception from a signal
            self._write(key, arr)

    def _write(self, key: str, arr: np.ndarray) -> None:
        if key not in self.h5:
            kwargs = {}
            if self.compression and arr.ndim > 1:
                kwargs = dict(chunks=(1, *arr.shape[1:]), compression=self.compression,
                              compression_opts=1 if self.compression == "gzip" else None,
                              shuffle=True)
            self.h5.create_dataset(key, shape=(self.total, *arr.shape[1:]), dtype=arr.dtype,
                                   **kwargs)
        start = self.filled[key]
        self.h5[key][start : start + arr.shape[0]] = arr
        self.filled[key] += arr.shape[0]


def capture(
    model: nn.Module,
    inputs: torch.Tensor,
    h5: h5py.File,
    names: list[str],
    *,
    batch_size: int = 4,
    context=None,
    on_batch=None,
) -> None:
    """Run ``model`` over ``inputs`` (S, ...) in batches, streaming captured tensors to ``h5``.

    ``context``: a callable returning a context manager entered around each forward (e.g. an
    MCA mode); ``on_batch(done)`` is called after each batch (progress).
    """
    writer = H5Writer(h5, total=inputs.shape[0])
    for start in range(0, inputs.shape[0], batch_size):
        batch = inputs[start : start + batch_size]
        with torch.no_grad(), _hooks(model, names, writer):
            if context is None:
                out = model(batch)
            else:
                with context():
                    out = model(batch)
        writer("final", out if isinstance(out, torch.Tensor) else out[0])
        if on_batch is not None:
            on_batch(min(start + batch_size, inputs.shape[0]))
