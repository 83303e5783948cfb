"""NaN max pooling (ties and NaN windows become NaN) and NaN max unpooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _kernels, _layout
from ._args import (
    IntPair,
    check_input,
    check_nonnegative,
    check_tie_limit,
    pair,
    pool_output_size,
)


def _pool_geometry(
    kernel_size: IntPair, stride: IntPair | None, padding: IntPair
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    k = pair(kernel_size, "kernel_size", minimum=1)
    s = pair(kernel_size if stride is None else stride, "stride", minimum=1)
    p = pair(padding, "padding", minimum=0)
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"padding must be at most half of kernel_size {k}, got {p}")
    return k, s, p


def _window_views(
    xp: torch.Tensor, k: tuple[int, int], s: tuple[int, int], out_hw: tuple[int, int]
):
    """Yield, in row-major kernel order, the (N, C, Ho, Wo) strided view of each window offset."""
    ho, wo = out_hw
    for di in range(k[0]):
        for dj in range(k[1]):
            rows = slice(di, di + s[0] * (ho - 1) + 1, s[0])
            yield xp[..., rows, dj : dj + s[1] * (wo - 1) + 1 : s[1]]


def _tie_count(
    x: torch.Tensor,
    values: torch.Tensor,
    k: tuple[int, int],
    s: tuple[int, int],
    p: tuple[int, int],
    tie_eps: float,
    tie_rtol: float,
) -> torch.Tensor:
    """Per window: entries ``w`` with ``w == m`` or ``m - w < tie_eps + tie_rtol*|m|`` (m = max).

    NaN entries and padding never count (padding is NaN here; NaN compares False), so a window
    without numbers counts 0 and every other window at least 1 (its maximum).
    """
    xp = x if p == (0, 0) else F.pad(x, (p[1], p[1], p[0], p[0]), value=float("nan"))
    tol = tie_eps + tie_rtol * values.abs() if tie_rtol > 0 else tie_eps
    count = torch.zeros(values.shape, dtype=torch.uint8 if k[0] * k[1] < 256 else torch.int32,
                        device=x.device)
    diff = torch.empty_like(values)
    hit = torch.empty(values.shape, dtype=torch.bool, device=x.device)
    # m - w < tol misses w == m only for a zero tolerance or an infinite m (inf - inf is NaN)
    check_equal = tie_eps == 0.0 or bool(torch.isinf(values).any())
    for win in _window_views(xp, k, s, tuple(values.shape[-2:])):
        torch.sub(values, win, out=diff)  # m - w >= 0 for every number w of the window
        torch.lt(diff, tol, out=hit)
        if check_equal:
            hit |= win == values
        count += hit
    return count


def _first_neg_inf_index(
    x: torch.Tensor,
    todo: torch.Tensor,
    indices: torch.Tensor,
    k: tuple[int, int],
    s: tuple[int, int],
    p: tuple[int, int],
) -> torch.Tensor:
    """Where ``todo`` (max is a real -inf), the index of the first -inf number, not of a NaN."""
    h, w = x.shape[-2:]
    ho, wo = todo.shape[-2:]
    xp = x if p == (0, 0) else F.pad(x, (p[1], p[1], p[0], p[0]), value=float("nan"))
    rows = torch.arange(ho, device=x.device)[:, None] * s[0] - p[0]
    cols = torch.arange(wo, device=x.device) * s[1] - p[1]
    todo = todo.clone()
    out = indices.clone()
    offsets = ((di, dj) for di in range(k[0]) for dj in range(k[1]))
    for (di, dj), win in zip(offsets, _window_views(xp, k, s, (ho, wo)), strict=True):
        found = todo & (win == float("-inf"))
        out = torch.where(found, (rows + di) * w + (cols + dj), out)
        todo &= ~found
    return out


def _torch_max_pool(
    x4: torch.Tensor,
    k: tuple[int, int],
    s: tuple[int, int],
    p: tuple[int, int],
    tie_limit: int | None,
    tie_eps: float,
    tie_rtol: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Device-agnostic NaN max pooling from eager torch ops (CUDA, half precision, autograd)."""
    # a NaN-free sum proves the input NaN-free (inf - inf only costs the NaN path)
    has_nan = bool(torch.isnan(x4.sum()))
    inf = float("inf")
    clean = torch.nan_to_num(x4, nan=-inf, posinf=inf, neginf=-inf) if has_nan else x4
    values, indices = F.max_pool2d(clean, k, s, p, return_indices=True)
    bad = empty = None
    if tie_limit is not None:
        count = _tie_count(x4, values, k, s, p, tie_eps, tie_rtol)
        bad = count > tie_limit
        if has_nan:
            empty = count == 0  # no number in the window
    elif has_nan:
        maybe_empty = values == -inf  # windows without numbers are among these
        if bool(maybe_empty.any()):
            empty = maybe_empty & (F.max_pool2d((~torch.isnan(x4)).to(x4.dtype), k, s, p) == 0)
    if empty is not None:
        bad = empty if bad is None else bad | empty
        neg_inf_max = (values == -inf) & ~empty  # a real -inf maximum beside NaN entries
        if bool(neg_inf_max.any()):
            indices = _first_neg_inf_index(x4, neg_inf_max, indices, k, s, p)
    if bad is not None:
        values = values.masked_fill(bad, float("nan"))
        indices = indices.masked_fill(bad, 0)
    return values, indices


@torch.no_grad()
def nan_max_pool2d(
    x: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    *,
    tie_limit: int | None = 1,
    tie_eps: float = 1e-7,
    tie_rtol: float = 0.0,
    return_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """Max pooling that marks numerically unstable windows as NaN.

    ``x``: (N, C, H, W) or (C, H, W) float. Windows are those of ``F.max_pool2d`` (floor mode,
    padding with -inf). Per window, NaN entries are ignored and ``m`` is the max of the rest:

    - all entries NaN: value NaN, index 0;
    - more than ``tie_limit`` entries ``w`` with ``w == m`` or ``|w - m| < tie_eps + tie_rtol*|m|``
      (``m`` itself counts): value NaN, index 0 (``tie_limit=None`` disables this rule);
    - otherwise: ``m`` and PyTorch's flat index ``h*W + w`` of the first maximum (row-major).

    Returns ``(values, indices)`` of shape (N, C, Ho, Wo) (int64 indices), or only ``values``
    when ``return_indices=False``. Without ties and NaN it equals ``F.max_pool2d``.
    """
    values, indices, _ = nan_max_pool2d_with_count(
        x, kernel_size, stride, padding, tie_limit=tie_limit, tie_eps=tie_eps,
        tie_rtol=tie_rtol)
    return (values, indices) if return_indices else values


@torch.no_grad()
def nan_max_pool2d_with_count(
    x: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    *,
    tie_limit: int | None = 1,
    tie_eps: float = 1e-7,
    tie_rtol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`nan_max_pool2d` (values and indices) and its number of NaN windows (used by
    :class:`NanMaxPool2d`; the CPU kernel counts them as it writes)."""
    x4, squeeze = check_input(x)
    k, s, p = _pool_geometry(kernel_size, stride, padding)
    check_tie_limit(tie_limit)
    tie_eps = check_nonnegative(tie_eps, "tie_eps")
    tie_rtol = check_nonnegative(tie_rtol, "tie_rtol")
    h, w = x4.shape[-2:]
    out_hw = (pool_output_size(h, k[0], s[0], p[0]), pool_output_size(w, k[1], s[1], p[1]))
    if min(out_hw) < 1:
        raise ValueError(f"input of spatial size {(h, w)} is smaller than kernel_size {k}")
    if _kernels.enabled(x4):
        values, indices, nans = _kernels.max_pool(x4, k, s, p, out_hw, tie_limit, tie_eps,
                                                  tie_rtol)
    else:
        values, indices = _torch_max_pool(x4, k, s, p, tie_limit, tie_eps, tie_rtol)
        nans = int(torch.isnan(values).sum())
    if squeeze:
        values, indices = values.squeeze(0), indices.squeeze(0)
    return values, indices, nans


@torch.no_grad()
def nan_max_unpool2d(
    values: torch.Tensor,
    indices: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    output_size: tuple[int, ...] | torch.Size | None = None,
    *,
    maxout: torch.Tensor | None = None,
) -> torch.Tensor:
    """Max unpooling that spreads NaN marks over their window.

    ``values``/``indices``: (N, C, Ho, Wo) or (C, Ho, Wo), as returned by
    :func:`nan_max_pool2d`. Finite values are scattered to their flat index in a zero map, as
    ``F.max_unpool2d`` does; a NaN value writes NaN to every in-bounds position of its window
    (its index is ignored). Output: (N, C, H, W) with ``(H, W)`` from ``output_size`` (the last two
    entries are used) or the default ``(Ho - 1)*stride - 2*padding + kernel_size``.

    ``maxout``: a tensor shaped like the output; the result is then
    ``torch.maximum(unpooled, maxout)`` (FastSurfer's decoder), which the CPU kernels compute
    while the unpooled rows are still in cache.
    """
    v4, squeeze = check_input(values, "values")
    if not isinstance(indices, torch.Tensor) or indices.shape != values.shape:
        got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"indices must be a tensor shaped like values {tuple(values.shape)}, "
                         f"got {got}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    k, s, p = _pool_geometry(kernel_size, stride, padding)
    i4 = indices.reshape(v4.shape).to(torch.int64)
    n, c, ho, wo = v4.shape
    if output_size is None:
        h = (ho - 1) * s[0] - 2 * p[0] + k[0]
        w = (wo - 1) * s[1] - 2 * p[1] + k[1]
    else:
        if len(output_size) < 2:
            raise ValueError(f"output_size must end with (H, W), got {tuple(output_size)}")
        h, w = int(output_size[-2]), int(output_size[-1])
        expected = (pool_output_size(h, k[0], s[0], p[0]), pool_output_size(w, k[1], s[1], p[1]))
        if expected != (ho, wo):
            raise ValueError(f"output_size {(h, w)} is inconsistent with pooled size {(ho, wo)} "
                             f"for kernel_size={k}, stride={s}, padding={p}")
    partner = None
    if maxout is not None:
        if not isinstance(maxout, torch.Tensor) or maxout.numel() != n * c * h * w:
            got = tuple(maxout.shape) if isinstance(maxout, torch.Tensor) else type(maxout)
            raise ValueError(f"maxout must be a tensor shaped like the output "
                             f"{(n, c, h, w)}, got {got}")
        partner = maxout.reshape(n, c, h, w)
    if _kernels.enabled(v4) and (partner is None or (
            _kernels.enabled(partner) and partner.dtype == v4.dtype)):
        out, bad, count, finite = _kernels.max_unpool(v4, i4, k, s, p, (h, w), partner)
        if bad:
            raise ValueError(f"indices out of range for an output of size {(h, w)}: "
                             f"expected values in [0, {h * w})")
        if count is not None:
            _layout.remember(out, count, finite)
        return out.squeeze(0) if squeeze else out
    nan = torch.isnan(v4)
    has_nan = bool(nan.any())
    if has_nan:  # send a NaN window's write into its own window, which is painted NaN below
        rows = (torch.arange(ho, device=v4.device) * s[0] - p[0]).clamp_min(0)
        cols = (torch.arange(wo, device=v4.device) * s[1] - p[1]).clamp_min(0)
        i4 = torch.where(nan, rows[:, None] * w + cols, i4)
    lo, hi = (int(v) for v in torch.aminmax(i4))
    if lo < 0 or hi >= h * w:
        raise ValueError(f"indices out of range for an output of size {(h, w)}: "
                         f"expected values in [0, {h * w})")
    out = v4.new_zeros(n, c, h, w)
    out.view(n, c, h * w).scatter_(2, i4.flatten(2), v4.flatten(2))
    if has_nan:
        hp = max(h + 2 * p[0], (ho - 1) * s[0] + k[0])
        wp = max(w + 2 * p[1], (wo - 1) * s[1] + k[1])
        spread = torch.zeros(n, c, hp, wp, dtype=torch.bool, device=v4.device)
        for view in _window_views(spread, k, s, (ho, wo)):
            view |= nan
        out.masked_fill_(spread[..., p[0] : p[0] + h, p[1] : p[1] + w], float("nan"))
    if partner is not None:
        out = torch.maximum(out, partner)
    return out.squeeze(0) if squeeze else out
