"""Fused CPU kernels (numba) for the NaN ops: one pass over the data instead of one per torch op.

Eager PyTorch spends most of a NaN op's time on memory passes (isnan, counts, masks, copies);
these kernels read each input element once. They serve CPU float32/float64 tensors; everything
else (CUDA, half precision) takes the device-agnostic torch path, which has the same semantics.
Like the NaN ops themselves, they compute no gradients. ``NANPROBE_KERNELS=torch`` forces the
torch path (the tests run both; Verrou workers use it, so nothing is compiled under Valgrind).

Kernels are compiled on first use (a few seconds) and cached on disk by numba. The NaN ops'
kernels are serial and release the GIL: the only thread pool they meet is torch's (numba's
OpenMP backend is a second OpenMP runtime whose idle threads spin against torch's; see
docs/performance.md). :func:`_run` runs the MCA backend's parallel kernels on numba's pool.
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import torch

from ._scratch import scratch
from ._threads import run_rows

#: environment variable choosing the CPU kernels: "numba" (default) or "torch"
ENV = "NANPROBE_KERNELS"

_lock = threading.Lock()  # numba's thread pool (MCA kernels) must not be entered from two threads
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
    """Call a parallel numba kernel (the MCA backend's) on numba's pool, torch's threads."""
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


def _cl(t: torch.Tensor) -> torch.Tensor:
    """``t`` (4-D) in channels-last memory (a copy only if it is not): the kernels read
    C-contiguous (N, H, W, C) views."""
    return t if t.is_contiguous(memory_format=torch.channels_last) else t.contiguous(
        memory_format=torch.channels_last)


def _dummy(like: np.ndarray) -> np.ndarray:
    """A tiny array of ``like``'s type standing for an absent argument (never ``like`` itself:
    an argument that may alias the output keeps the compiler from vectorising)."""
    return np.zeros((1,) * like.ndim, like.dtype)


def channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` (4-D) is laid out channels-last rather than contiguous NCHW."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def act_args(act, channels: int, dtype: torch.dtype) -> tuple[int, np.ndarray]:
    """``(kind, slopes)`` of an activation for the kernels: kind 0 none, 1 ReLU, 2 slope-based
    (PReLU / LeakyReLU), slopes (channels,) of ``dtype``."""
    scalar = _scalar(dtype)
    if act is None:
        return 0, np.zeros(channels, scalar)
    return act.kind, act.slopes(channels, dtype).numpy()


def max_pool(
    x: torch.Tensor,
    k: tuple[int, int],
    s: tuple[int, int],
    p: tuple[int, int],
    out_hw: tuple[int, int],
    tie_limit: int | None,
    tie_eps: float,
    tie_rtol: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """NaN max pooling of (N, C, H, W) ``x`` in one pass; same rules as ``nan_max_pool2d``.

    Returns (values, int64 indices) of shape (N, C, Ho, Wo) in ``x``'s memory format, and the
    number of NaN windows.
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
        nans = jit.max_pool_nhwc(_nhwc(x), *args, _nhwc(values), _nhwc(indices))
    else:
        nans = jit.max_pool_nchw(_nchw(x), *args, values.numpy(), indices.numpy())
    return values, indices, int(nans)


def max_unpool(
    values: torch.Tensor,
    indices: torch.Tensor,
    k: tuple[int, int],
    s: tuple[int, int],
    p: tuple[int, int],
    hw: tuple[int, int],
    partner: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, torch.Tensor | None, bool]:
    """NaN max unpooling of (N, C, Ho, Wo) ``values`` / int64 ``indices`` into (N, C, H, W), in
    ``values``' memory format, then ``maximum(out, partner)`` if ``partner`` (N, C, H, W) is given.

    Returns the output, how many finite values had an out-of-range index, and (with
    ``partner``) the output's NaN entries per pixel (N, H, W) int32 and whether it is free of
    infinities; else None and False.
    """
    jit = _compiled()
    n, c = values.shape[:2]
    count = torch.empty(n, *hw, dtype=torch.int32) if partner is not None else None
    if channels_last(values):
        out = torch.empty(n, c, *hw, dtype=values.dtype, memory_format=torch.channels_last)
        args = (_nhwc(values), _nhwc(indices.contiguous(memory_format=torch.channels_last)),
                *k, *s, *p, _nhwc(out))
        if k[0] > s[0] or k[1] > s[1]:  # overlapping windows
            bad = int(jit.max_unpool_nhwc(*args, UNPOOL_CHANNEL_BLOCK))
        else:
            strays = np.empty((n, values.shape[2]), np.int64)
            fused = partner is not None
            other = _nhwc(_cl(partner)) if fused else _dummy(args[-1])
            counts = count.numpy() if fused else np.empty((1, 1, 1), np.int32)
            rows = n * values.shape[2]
            infs = run_rows(lambda lo, hi: jit.max_unpool_nhwc_rows(
                *args, strays, fused, other, counts, lo, hi), rows)
            if not strays.any():
                return out, 0, count, fused and infs == 0
            # the maximum must follow the strays' writes: unpool again without it
            run_rows(lambda lo, hi: jit.max_unpool_nhwc_rows(
                *args, strays, False, other, counts, lo, hi), rows)
            bad = int(jit.max_unpool_nhwc_strays(*args, strays))
    else:
        out = torch.empty(n, c, *hw, dtype=values.dtype)
        bad = int(jit.max_unpool_nchw(_nchw(values), _nchw(indices), *k, *s, *p, out.numpy()))
    if partner is None:
        return out, bad, None, False
    out, infs = post_ops(out, None, partner, count)
    return out, bad, count, infs == 0


def pixel_stats(x: torch.Tensor, act=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel of ``act(x)`` ((N, C, H, W) ``x``, ``act`` None or an activation): NaN entries
    over the channels (int32) and the sum of the numbers (float64), both (N, H, W) in scratch
    buffers valid until the next call on this thread, in one pass over ``x``."""
    n, c, h, w = x.shape
    kind, slopes = act_args(act, c, x.dtype)
    count = scratch("pixel_nans", (n, h, w), torch.int32)
    total = scratch("pixel_sums", (n, h, w), torch.float64)
    jit = _compiled()
    kernel, xv = ((jit.pixel_stats_nhwc, _nhwc(x)) if channels_last(x)
                  else (jit.pixel_stats_nchw, _nchw(x)))
    cv, tv = count.numpy(), total.numpy()
    run_rows(lambda lo, hi: kernel(xv, kind, slopes, cv, tv, lo, hi), n * h)
    return count, total


def window_layout(
    count: torch.Tensor,
    total: torch.Tensor | None,
    k: tuple[int, int],
    s: tuple[int, int],
    p: tuple[int, int],
    d: tuple[int, int],
    out_hw: tuple[int, int],
    channels: int,
    threshold: float,
    count_padding: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(skip, partial, mean float64), each (N, Ho, Wo) in scratch buffers valid until the next
    call on this thread, from per-pixel maps, and the numbers of skipped and of partial
    positions. Without ``total`` the mean is left uninitialised."""
    jit = _compiled()
    shape = (count.shape[0], *out_hw)
    skip = scratch("skip", shape, torch.bool)
    partial = scratch("partial", shape, torch.bool)
    mean = scratch("mean_fill", shape, torch.float64)
    totals = np.empty((1, 1, 1)) if total is None else total.numpy()
    skipped, partials = jit.window_layout(
        count.numpy(), totals, total is not None, *k, *s, *p, *d, channels, float(threshold),
        count_padding, skip.numpy(), partial.numpy(), mean.numpy())
    return skip, partial, mean, int(skipped), int(partials)


def partial_means(
    x: torch.Tensor,
    act,
    count: torch.Tensor,
    partial: torch.Tensor,
    mean: torch.Tensor,
    k: tuple[int, int],
    s: tuple[int, int],
    p: tuple[int, int],
    d: tuple[int, int],
    count_padding: bool,
) -> None:
    """Fill ``mean`` (N, Ho, Wo) float64 at the ``partial`` positions with the mean of the
    window's numbers of ``act(x)`` (channels-last ``x``); ``count``: (N, H, W) NaN entries per
    pixel."""
    kind, slopes = act_args(act, x.shape[1], x.dtype)
    _compiled().partial_means(_nhwc(x), kind, slopes, count.numpy(), partial.numpy(),
                              *k, *s, *p, *d, count_padding, mean.numpy())


def band_rects(skip: torch.Tensor, band_rows: int, merge_gap: int
               ) -> list[tuple[int, int, int, int, int]]:
    """``(n, r0, r1, c0, c1)`` (inclusive) covering the computed positions of (N, Ho, Wo)
    ``skip``: per batch item and band of ``band_rows`` output rows, one per run of columns that
    holds a computed position (runs closer than ``merge_gap`` columns merged), with the rows of
    its computed positions. Disjoint, in band order."""
    n, ho, wo = skip.shape
    rects = np.empty((n * -(-ho // band_rows) * (wo // 2 + 1), 5), np.int64)
    count = _compiled().band_rects(skip.numpy(), band_rows, merge_gap, rects)
    return [tuple(r) for r in rects[:count].tolist()]


def gather(x: torch.Tensor, act, origin: np.ndarray, out: torch.Tensor) -> None:
    """``out[g]`` = ``act(x)`` with NaN -> 0 (zero outside the map) over the input window at
    ``origin[g]`` = (n, top, left) of out's spatial size; ``out``: (G, C, rows, cols)
    channels-last."""
    kind, slopes = act_args(act, x.shape[1], x.dtype)
    jit = _compiled()
    kernel, xv = (jit.gather_nhwc, _nhwc(x)) if channels_last(x) else (jit.gather_nchw, _nchw(x))
    ov = _nhwc(out)
    run_rows(lambda lo, hi: kernel(xv, kind, slopes, origin, ov, lo, hi),
             out.shape[0] * out.shape[2])


def fill_outside(y: torch.Tensor, rects: list[tuple[int, int, int, int, int]],
                 nan_count: torch.Tensor) -> None:
    """NaN in channels-last ``y`` (N, C_out, Ho, Wo) outside the rectangles ``rects``
    (n, r0, r1, c0, c1), inclusive; ``nan_count`` (N, Ho, Wo) = C_out there."""
    n, _, ho, wo = y.shape
    covered = scratch("covered", (n, ho, wo), torch.bool).numpy()
    covered[:] = False
    for i, r0, r1, c0, c1 in rects:
        covered[i, r0 : r1 + 1, c0 : c1 + 1] = True
    yv, cv, kernel = _nhwc(y), nan_count.numpy(), _compiled().fill_outside
    run_rows(lambda lo, hi: kernel(yv, covered, cv, lo, hi), n * ho)


def write_bands(
    y: torch.Tensor,
    bands: torch.Tensor,
    rects: np.ndarray,
    skip: torch.Tensor,
    partial: torch.Tensor,
    mean: torch.Tensor,
    add_mean: bool,
    x: torch.Tensor,
    count: torch.Tensor,
    wt: np.ndarray,
    g: tuple[tuple[int, int], ...],
    pre=None,
    post=None,
    partner: torch.Tensor | None = None,
    nan_count: torch.Tensor | None = None,
) -> int:
    """Finish the positions of the output rectangles ``rects`` (G, 5) = (n, r0, r1, c0, c1) of
    channels-last ``y`` from the band results ``bands`` (G, C_out, rows, cols), channels-last
    (not overlapping ``y``): NaN where
    skipped, the mean fill's term at partial positions (``add_mean``), the post-activation and
    the maximum with ``partner``. ``g``: (k, s, p, d) pairs; ``wt`` from :func:`tap_weights`.
    Fills ``nan_count`` (N, Ho, Wo); returns the number of infinite output entries."""
    cout = y.shape[1]
    pre_kind, pre_slopes = act_args(pre, x.shape[1], x.dtype)
    post_kind, post_slopes = act_args(post, cout, y.dtype)
    yv = _nhwc(y)
    other = _nhwc(_cl(partner)) if partner is not None else _dummy(yv)
    args = (yv, _nhwc(_cl(bands)), rects, skip.numpy(), partial.numpy(), mean.numpy(), add_mean,
            _nhwc(x), count.numpy(), wt, *g[0], *g[1], *g[2], *g[3], pre_kind,
            pre_slopes, post_kind, post_slopes, partner is not None, other, nan_count.numpy())
    kernel = _compiled().write_bands
    return run_rows(lambda lo, hi: kernel(*args, lo, hi), len(rects) * bands.shape[2])


def tap_weights(weight: torch.Tensor) -> np.ndarray:
    """(kH, kW, C_in + 1, C_out) view of a (C_out, C_in, kH, kW) weight for the mean fill's
    term, the last row the sum over C_in (for pixels NaN in every channel)."""
    wt = weight.detach().permute(2, 3, 1, 0)
    return torch.cat([wt, wt.sum(2, keepdim=True)], 2).contiguous().numpy()


def post_ops(src: torch.Tensor, post, partner: torch.Tensor | None,
             nan_count: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A new channels-last (N, C, H, W) tensor holding the activation ``post`` (or None) of
    ``src``, then its maximum with ``partner`` (or None); ``nan_count`` (N, H, W) int32
    receives its NaN entries per pixel. Returns it and the number of infinite entries."""
    src = _cl(src)
    out = torch.empty_like(src, memory_format=torch.channels_last)
    kind, slopes = act_args(post, src.shape[1], src.dtype)
    sv, ov = _nhwc(src), _nhwc(out)
    other = _nhwc(_cl(partner)) if partner is not None else _dummy(sv)
    args = (sv, ov, kind, slopes, partner is not None, other, nan_count.numpy())
    kernel = _compiled().post_ops
    return out, run_rows(lambda lo, hi: kernel(*args, lo, hi), src.shape[0] * src.shape[2])


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
    jit.noisy_max_partial(y.numpy(), x.detach().numpy(), wt, b, pn, pr, pc,
                          noise.reshape(len(pn), cin, -1).numpy(), scalar(sigma), scalar(-np.inf),
                          *k, *s, *p, *d, count_padding)
