"""Fused CPU kernels (numba) for the NaN ops: one pass over the data instead of one per torch op.

Eager PyTorch spends most of a NaN op's time on memory passes (isnan, counts, masks, copies);
these kernels read each input element once. They serve CPU float32/float64 tensors; everything
else (CUDA, half precision) takes the device-agnostic torch path, which has the same semantics.
Like the NaN ops themselves, they compute no gradients. ``NANPROBE_KERNELS=torch`` forces the
torch path (the tests run both; Verrou workers use it, so nothing is compiled under Valgrind).

Kernels are compiled on first use (a few seconds) and cached on disk by numba.
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import torch

#: environment variable choosing the CPU kernels: "numba" (default) or "torch"
ENV = "NANPROBE_KERNELS"

_lock = threading.Lock()  # numba's default thread pool must not be entered from two threads
_jit = None

#: channels per thread task of the channels-last unpooling kernel
UNPOOL_CHANNEL_BLOCK = 8



def enabled(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels apply: CPU float32/float64 tensors, not disabled by ``ENV``,
    on a little-endian machine (the rounding kernels read int64 words as two 32-bit halves)."""
    if os.environ.get(ENV, "numba").lower() == "torch" or sys.byteorder != "little":
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
            return False
    return _compiled() is not None


def _compiled():
    """The compiled kernel namespace, or None when numba is not importable."""
    global _jit
    if _jit is None:
        try:
            from . import _numba_kernels
        except ImportError:  # pragma: no cover - numba is a dependency; guard for odd installs
            _jit = False
        else:
            _jit = _numba_kernels
    return _jit or None


def _run(kernel, *args):
    import numba

    with _lock:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        return kernel(*args)


def _scalar(dtype: torch.dtype) -> type:
    """The NumPy scalar type of a torch dtype (kernel scalars must match the arrays' dtype)."""
    return np.dtype(str(dtype).removeprefix("torch.")).type


def _nhwc(t: torch.Tensor) -> np.ndarray:
    """(N, H, W, C) numpy view of an (N, C, H, W) tensor (no copy)."""
    return t.detach().permute(0, 2, 3, 1).numpy()


def _nchw(t: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) contiguous numpy view (a copy only for other layouts)."""
    return t.detach().contiguous().numpy()


def channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` (4-D) is laid out channels-last rather than contiguous NCHW."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def max_pool(
    x: torch.Tensor,
    k: tuple[int, int],
    s: tuple[int, int],
    p: tuple[int, int],
    out_hw: tuple[int, int],
    tie_limit: int | None,
    tie_eps: float,
    tie_rtol: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN max pooling of (N, C, H, W) ``x`` in one pass; same rules as ``nan_max_pool2d``.

    Returns (values, int64 indices) of shape (N, C, Ho, Wo) in ``x``'s memory format.
    """
    jit = _compiled()
    n, c = x.shape[:2]
    scalar = _scalar(x.dtype)
    cl = channels_last(x)
    fmt = torch.channels_last if cl else torch.contiguous_format
    values = torch.empty(n, c, *out_hw, dtype=x.dtype, memory_format=fmt)
    indices = torch.empty(n, c, *out_hw, dtype=torch.int64, memory_format=fmt)
    args = (*k, *s, *p, tie_limit is not None, tie_limit or 0, scalar(tie_eps), scalar(tie_rtol))
    if cl:
        _run(jit.max_pool_nhwc, _nhwc(x), *args, _nhwc(values), _nhwc(indices))
    else:
        _run(jit.max_pool_nchw, _nchw(x), *args, values.numpy(), indices.numpy())
    return values, indices


def max_unpool(
    values: torch.Tensor,
    indices: torch.Tensor,
    k: tuple[int, int],
    s: tuple[int, int],
    p: tuple[int, int],
    hw: tuple[int, int],
) -> tuple[torch.Tensor, int]:
    """NaN max unpooling of (N, C, Ho, Wo) ``values`` / int64 ``indices`` into (N, C, H, W), in
    ``values``' memory format; also returns how many finite values had an out-of-range index."""
    jit = _compiled()
    n, c = values.shape[:2]
    if channels_last(values):
        out = torch.empty(n, c, *hw, dtype=values.dtype, memory_format=torch.channels_last)
        args = (_nhwc(values), _nhwc(indices.contiguous(memory_format=torch.channels_last)),
                *k, *s, *p, _nhwc(out))
        if k[0] > s[0] or k[1] > s[1]:  # overlapping windows
            return out, int(_run(jit.max_unpool_nhwc, *args, UNPOOL_CHANNEL_BLOCK))
        strays = np.empty((n, values.shape[2]), np.int64)
        _run(jit.max_unpool_nhwc_rows, *args, strays)
        bad = _run(jit.max_unpool_nhwc_strays, *args, strays) if strays.any() else 0
    else:
        out = torch.empty(n, c, *hw, dtype=values.dtype)
        bad = _run(jit.max_unpool_nchw, _nchw(values), _nchw(indices), *k, *s, *p, out.numpy())
    return out, int(bad)


def pixel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel of (N, C, H, W) ``x``: NaN entries over the channels (int32) and the sum of the
    numbers (float64), both (N, H, W), in one pass over ``x``."""
    jit = _compiled()
    n, _, h, w = x.shape
    count = torch.empty(n, h, w, dtype=torch.int32)
    total = torch.empty(n, h, w, dtype=torch.float64)
    if channels_last(x):
        _run(jit.pixel_stats_nhwc, _nhwc(x), count.numpy(), total.numpy())
    else:
        _run(jit.pixel_stats_nchw, _nchw(x), count.numpy(), total.numpy())
    return count, total


def window_layout(
    count: torch.Tensor,
    total: torch.Tensor,
    k: tuple[int, int],
    s: tuple[int, int],
    p: tuple[int, int],
    d: tuple[int, int],
    out_hw: tuple[int, int],
    channels: int,
    threshold: float,
    count_padding: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(skip, partial, mean float64), each (N, Ho, Wo), from per-pixel maps, and the numbers
    of skipped and of partial positions."""
    jit = _compiled()
    shape = (count.shape[0], *out_hw)
    skip = torch.empty(shape, dtype=torch.bool)
    partial = torch.empty(shape, dtype=torch.bool)
    mean = torch.empty(shape, dtype=torch.float64)
    skipped, partials = _run(jit.window_layout, count.numpy(), total.numpy(), *k, *s, *p, *d,
                             channels, float(threshold), count_padding, skip.numpy(),
                             partial.numpy(), mean.numpy())
    return skip, partial, mean, int(skipped), int(partials)


def band_rects(skip: torch.Tensor, band_rows: int) -> list[tuple[int, int, int, int, int]]:
    """``(n, r0, r1, c0, c1)`` (inclusive) per batch item and band of ``band_rows`` output rows
    of (N, Ho, Wo) ``skip`` that computes anything: its computed rows and column span."""
    jit = _compiled()
    n, ho = skip.shape[:2]
    rects = np.empty((n, -(-ho // band_rows), 4), np.int64)
    _run(jit.band_rects, skip.numpy(), band_rows, rects)
    return [(i, *r) for i in range(n) for r in rects[i].tolist() if r[0] >= 0]


def finish_conv(
    y: torch.Tensor,
    x: torch.Tensor,
    count: torch.Tensor,
    weight: torch.Tensor,
    skip: torch.Tensor,
    partial: torch.Tensor,
    mean: torch.Tensor,
    k: tuple[int, int],
    s: tuple[int, int],
    p: tuple[int, int],
    d: tuple[int, int],
    add_mean: bool,
) -> None:
    """In place on ``y`` (N, C_out, Ho, Wo) = conv(x with NaN -> 0) + bias: NaN at skipped
    positions and, if ``add_mean``, the mean fill's term at partial ones. ``count``: (N, H, W)
    NaN entries per pixel of ``x``."""
    jit = _compiled()
    wt = weight.detach().permute(2, 3, 1, 0)  # (kH, kW, C_in, C_out)
    wt = torch.cat([wt, wt.sum(2, keepdim=True)], 2).contiguous().numpy()
    _run(jit.finish_conv, _nhwc(y), x.detach().numpy(), count.numpy(), wt, skip.numpy(),
         partial.numpy(), mean.numpy(), *k, *s, *p, *d, add_mean)


def noisy_max_partial(
    y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    where: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    noise: torch.Tensor,
    sigma: float,
    k: tuple[int, int],
    s: tuple[int, int],
    p: tuple[int, int],
    d: tuple[int, int],
    count_padding: bool,
) -> None:
    """In place on ``y`` (N, C_out, Ho, Wo): the ``noisy_max``-filled dot products at the
    positions ``where`` (row-major), with ``noise`` (P, C_in * kH * kW) drawn in that order."""
    jit = _compiled()
    cout, cin = weight.shape[:2]
    scalar = _scalar(x.dtype)
    wt = weight.detach().permute(2, 3, 1, 0).reshape(-1, cin, cout).contiguous().numpy()
    b = (torch.zeros(cout, dtype=x.dtype) if bias is None else bias.detach()).contiguous().numpy()
    pn, pr, pc = (t.contiguous().numpy() for t in where)
    _run(jit.noisy_max_partial, y.numpy(), x.detach().numpy(), wt, b, pn, pr, pc,
         noise.reshape(len(pn), cin, -1).numpy(), scalar(sigma), scalar(-np.inf), *k, *s, *p,
         *d, count_padding)
