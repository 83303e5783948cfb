"""NaN convolution: skip output positions whose window is mostly NaN, fill the rest.

Two implementations with the same semantics:

- ``reference``: unfold the whole input (im2col) and apply the rules column by column; slow and
  memory hungry but obviously correct;
- ``fast``: per batch item and band of output rows, one dense ``F.conv2d`` over the band's
  active (non-skipped) rectangle, on the input with NaN replaced by 0 (equally shaped
  rectangles share one call). That is already exact wherever a window holds no NaN; the few
  partially-NaN windows (a thin border band in practice) then get the mean fill's term added by
  linearity (or, for ``noisy_max``, are recomputed). Skipped positions cost nothing but their
  NaN write. On CPU the NaN bookkeeping (per-pixel counts, skip/partial decisions, band
  rectangles, NaN-free crops, writing the bands with NaN and the mean-fill term) runs in numba
  kernels (:mod:`._kernels`), elsewhere in torch ops.

The CPU kernels also absorb what surrounds a convolution in a network (``pre_activation``,
``post_activation``, ``maxout``; batch norm is folded into the weights by :class:`NanConv2d`),
record how many NaN entries each output pixel holds (:mod:`._layout`) and read that record
instead of scanning when the input came from a NaN op unchanged.

``impl="auto"`` uses the banded path when the bands save enough work, otherwise a single dense
convolution over the whole map (the same code with one band).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import _kernels, _layout
from ._args import IntPair, check_choice, check_fraction, check_input, check_nonnegative, pair
from ._scratch import scratch
from .fusion import Activation

#: named fills; a finite number is a fill too (a constant; "zero" is the constant 0)
FILLS = ("mean", "noisy_max", "zero")
IMPLS = ("auto", "reference", "fast")

#: output rows per band of the fast path
BAND_ROWS = 64
#: band rectangles grow to multiples of this many (rows, columns), so bands share conv2d calls
BAND_QUANTUM = (4, 8)
#: CPU kernels: runs of computed columns in a band closer than this many columns share a
#: rectangle (farther apart, e.g. the brain and the corners of an image, each get their own)
BAND_MERGE_GAP = 16
#: ``auto`` runs one dense conv unless the bands cover at most this fraction of the output map
AUTO_MAX_BAND_FRACTION = 0.85
#: ``auto`` bands a batch item only when its dense convolution has at least this many MACs or
#: its input this many elements (below both, the calls' overhead outweighs what bands save)
AUTO_MIN_MACS = 2.5e7
AUTO_MIN_ELEMENTS = 1 << 18
#: NaN-free CPU convolutions with at least this many MACs run in channels-last layout
CHANNELS_LAST_MIN_MACS = 1e8
#: gathered window entries per chunk when recomputing partially-NaN windows
GATHER_CHUNK = 1 << 22


Rect = tuple[int, int, int, int, int]  # (item, r0, r1, c0, c1), inclusive output positions
Fill = str | float


def check_fill(fill: Fill) -> Fill:
    """``fill`` if it is one of :data:`FILLS` or a finite number (returned as float), else a
    ValueError naming the accepted values."""
    if isinstance(fill, int | float) and not isinstance(fill, bool):
        if math.isfinite(fill):
            return float(fill)
        raise ValueError(f"a constant fill must be a finite number, got {fill!r}")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(map(repr, FILLS))} or a finite "
                         f"number (a constant), got {fill!r}")
    return fill


def parse_fill(text: str) -> Fill:
    """A fill given as text (command line): a name of :data:`FILLS` or a number, checked."""
    try:
        return check_fill(text if text in FILLS else float(text))
    except ValueError:
        raise ValueError(f"fill must be one of {', '.join(FILLS)} or a number, got {text!r}"
                         ) from None


def fill_constant(fill: Fill) -> float | None:
    """The value a constant fill writes (0 for ``"zero"``), None for ``mean``/``noisy_max``."""
    if fill == "zero":
        return 0.0
    return None if isinstance(fill, str) else float(fill)


@dataclass(frozen=True)
class ConvSkipStats:
    """What one ``nan_conv2d`` call did (counts summed over the batch).

    ``positions``: output positions (N * Ho * Wo); ``skipped``: those set to NaN without
    computing; ``partial``: computed ones whose window held NaN (filled); ``positions_executed``
    = positions - skipped, the positions given a value; ``positions_computed``: positions the
    dense convolutions actually computed (the band rectangles, which also cover some skipped
    positions; all positions when it ran dense), the work that was really done.
    """

    positions: int
    skipped: int
    partial: int
    macs_per_position: int
    positions_executed: int
    positions_computed: int

    @property
    def macs(self) -> int:
        return self.positions * self.macs_per_position

    @property
    def macs_skipped(self) -> int:
        return self.skipped * self.macs_per_position


@dataclass(frozen=True)
class _Geometry:
    k: tuple[int, int]
    s: tuple[int, int]
    p: tuple[int, int]
    d: tuple[int, int]
    out_hw: tuple[int, int]


def _check_conv_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    groups: int,
) -> tuple[torch.Tensor, bool, _Geometry]:
    x4, squeeze = check_input(x)
    if groups != 1:
        raise ValueError(f"groups must be 1 (grouped convolution is not supported), got {groups!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 4-D tensor (C_out, C_in, kH, kW), got {got}")
    if weight.shape[1] != x4.shape[1]:
        raise ValueError(f"weight expects C_in={weight.shape[1]} input channels but input has "
                         f"{x4.shape[1]} (groups must be 1)")
    if weight.dtype != x4.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from input dtype {x4.dtype}")
    if bias is not None and (not isinstance(bias, torch.Tensor)
                             or tuple(bias.shape) != (weight.shape[0],)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},), got {got}")
    k = (int(weight.shape[2]), int(weight.shape[3]))
    s = pair(stride, "stride", minimum=1)
    p = pair(padding, "padding", minimum=0)
    d = pair(dilation, "dilation", minimum=1)
    h, w = x4.shape[-2:]
    ho = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"input of spatial size {(h, w)} is too small for kernel {k} with "
                         f"padding {p} and dilation {d}")
    return x4, squeeze, _Geometry(k, s, p, d, (ho, wo))


@dataclass(frozen=True)
class _NanLayout:
    """Where the NaNs are, at pixel and window level (counts are exact small integers), for
    the torch path; the mean fill is computed later, from gathered windows, at the partial
    positions only.
    """

    per_pixel: torch.Tensor  # (N, H, W) NaN entries over channels
    skip: torch.Tensor  # (N, Ho, Wo) bool
    partial: torch.Tensor  # (N, Ho, Wo) bool: computed, but the window holds NaN
    channels: int
    nan_count: torch.Tensor  # (N, Ho, Wo) NaN entries per window
    entries: torch.Tensor  # (1, Ho, Wo) entries per window that count

    def skip_counts(self) -> tuple[int, int]:
        """Numbers of skipped and of partial positions."""
        return int(self.skip.sum()), int(self.partial.sum())

    @property
    def pixel_uniform(self) -> bool:
        """Every pixel is NaN in all channels or in none (then windows decompose per pixel)."""
        return bool(((self.per_pixel == 0) | (self.per_pixel == self.channels)).all())


def _nan_free(x: torch.Tensor, pre: Activation | None = None) -> bool:
    """Whether ``x`` (and ``pre(x)``) certainly holds no NaN, from one cheap sum.

    A corner pixel is looked at first (NaN backgrounds show there); a sum that is not NaN
    proves the absence of NaN (inf - inf only costs the counting pass), and a finite one also
    that no -inf meets a zero slope of ``pre``.
    """
    if bool(torch.isnan(x[:, :, 0, 0]).any()):
        return False
    total = x.sum()
    if pre is not None and not pre.keeps_numbers():
        return bool(torch.isfinite(total))
    return not bool(torch.isnan(total))


def _pixel_nans(x: torch.Tensor) -> torch.Tensor | None:
    """NaN entries per pixel (N, H, W) by torch ops; None when ``x`` holds no NaN."""
    if _nan_free(x):
        return None
    # a uint8 channel sum is much faster than a bool -> int one; exact while C < 256
    count_dtype = torch.uint8 if x.shape[1] < 256 else torch.int32
    return torch.isnan(x).view(torch.uint8).sum(1, dtype=count_dtype)


def _axis_taps(size: int, k: int, s: int, p: int, d: int, out: int, device) -> torch.Tensor:
    """In-bounds taps of each output position along one axis, (out,)."""
    pos = torch.arange(out, device=device)[:, None] * s - p + torch.arange(k, device=device) * d
    return ((pos >= 0) & (pos < size)).sum(1)


def _window_sum(m: torch.Tensor, g: _Geometry) -> torch.Tensor:
    """Sum of (N, H, W) ``m`` over each output position's in-bounds taps, (N, Ho, Wo).

    Separable: kH shifted row slices, then kW shifted column slices of the zero-padded map.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.k, g.s, g.p, g.d
    ho, wo = g.out_hw
    mp = F.pad(m, (pw, pw, ph, ph)) if ph or pw else m
    rows = mp[:, 0 : sh * (ho - 1) + 1 : sh].clone()
    for i in range(1, kh):
        rows += mp[:, i * dh : i * dh + sh * (ho - 1) + 1 : sh]
    out = rows[..., 0 : sw * (wo - 1) + 1 : sw].clone()
    for j in range(1, kw):
        out += rows[..., j * dw : j * dw + sw * (wo - 1) + 1 : sw]
    return out


def _nan_layout(
    x: torch.Tensor, g: _Geometry, nan_threshold: float, count_padding: bool
) -> _NanLayout | None:
    """Torch path: count NaNs per pixel and per window; ``skip = r >= nan_threshold``.

    None when there is nothing to do: no NaN in ``x`` and ``nan_threshold > 0``.

    r = NaN entries / window entries; window entries are the in-bounds ones unless
    ``count_padding`` (then all C_in*kH*kW). ``partial`` marks the computed positions whose
    window holds at least one NaN.
    """
    n, c, h, w = x.shape
    per_pixel = _pixel_nans(x)
    if per_pixel is None:  # NaN-free: nothing to do unless a threshold of 0 skips everything
        if nan_threshold > 0:
            return None
        per_pixel = torch.zeros(n, h, w, dtype=torch.int32, device=x.device)
    elif nan_threshold > 0 and not bool(per_pixel.any()):
        return None
    dtype = torch.float64 if c * g.k[0] * g.k[1] >= 1 << 24 else torch.float32
    nan_count = _window_sum(per_pixel.to(dtype), g)
    if count_padding:
        entries = torch.full((1, 1, 1), c * g.k[0] * g.k[1], dtype=dtype, device=x.device)
    else:
        rows = _axis_taps(h, g.k[0], g.s[0], g.p[0], g.d[0], g.out_hw[0], x.device)
        cols = _axis_taps(w, g.k[1], g.s[1], g.p[1], g.d[1], g.out_hw[1], x.device)
        entries = (rows[:, None] * cols * c).to(dtype)[None]
    ratio = nan_count.double() / entries.double().clamp_min(1.0)
    skip = ratio >= nan_threshold
    return _NanLayout(per_pixel, skip, (nan_count > 0) & ~skip, c, nan_count=nan_count,
                      entries=entries)


def _conv_into_scratch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       s: tuple[int, int], p: tuple[int, int], d: tuple[int, int]
                       ) -> torch.Tensor:
    """``F.conv2d`` of channels-last ``x`` into a per-thread channels-last scratch buffer
    (valid until the next call): a temporary that a fresh allocation would page-fault in on
    every call (about 1 ms per MB on small VMs)."""
    n, _, h, w = x.shape
    kh, kw = weight.shape[2:]
    ho = (h + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    wo = (w + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    out = scratch("conv_output", (n, ho, wo, weight.shape[0]), x.dtype).permute(0, 3, 1, 2)
    return torch.ops.aten.convolution.out(x, weight, bias, list(s), list(p), list(d), False,
                                          [0, 0], 1, out=out)


def _scratch_cl(shape: tuple[int, int, int, int], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised channels-last (N, C, H, W) tensor for a temporary convolution input, in
    a per-thread buffer (:func:`~nanprobe.ops._scratch.scratch`) valid until the next call."""
    n, c, h, w = shape
    return scratch("conv_input", (n, h, w, c), like.dtype, like.device).permute(0, 3, 1, 2)


def _dense(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, g: _Geometry
) -> torch.Tensor:
    """``F.conv2d``; large CPU convolutions run in channels-last layout, which oneDNN computes
    markedly faster (1.2-1.6x here, conversion included) to the same values up to rounding."""
    n = x.shape[0]
    macs = n * g.out_hw[0] * g.out_hw[1] * weight.numel()
    if x.device.type == "cpu" and macs >= CHANNELS_LAST_MIN_MACS:
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = _scratch_cl(tuple(x.shape), x).copy_(x)
        weight = _derived(weight, "channels_last", _channels_last)
    return F.conv2d(x, weight, bias, g.s, g.p, g.d)


def _fill_columns(
    cols: torch.Tensor,
    data: torch.Tensor,
    fill: Fill,
    sigma: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """Replace the NaN entries of window columns (P, K) by the fill; ``data`` marks real entries."""
    nan = torch.isnan(cols)
    constant = fill_constant(fill)
    if constant is not None:
        return cols.masked_fill(nan, constant)
    if fill == "mean":
        total = torch.where(data, cols, 0).sum(1, keepdim=True)
        value = total / data.sum(1, keepdim=True).clamp_min(1)
    else:
        peak = torch.where(data, cols, float("-inf")).amax(1, keepdim=True)
        value = peak + sigma * noise
    return torch.where(nan, value, cols)


def _noise(
    count: int, k: int, like: torch.Tensor, fill: Fill, generator: torch.Generator | None
) -> torch.Tensor | None:
    """One N(0, 1) draw per window entry of each partially-NaN position, in row-major order."""
    if fill != "noisy_max" or count == 0:
        return None
    return torch.randn(count, k, generator=generator, dtype=like.dtype, device=like.device)


def _reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    g: _Geometry,
    nan_threshold: float,
    fill: Fill,
    sigma: float,
    generator: torch.Generator | None,
    count_padding: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    cout = weight.shape[0]
    cols = F.unfold(x, g.k, dilation=g.d, padding=g.p, stride=g.s)  # (N, K, L), zero padding
    inside = F.unfold(torch.ones(1, c, h, w, dtype=x.dtype, device=x.device), g.k,
                      dilation=g.d, padding=g.p, stride=g.s) > 0  # (1, K, L)
    entries = torch.ones_like(inside) if count_padding else inside
    nan = torch.isnan(cols)
    ratio = nan.sum(1).double() / entries.sum(1).double().clamp_min(1.0)  # (N, L)
    skip = ratio >= nan_threshold
    partial = nan.any(1) & ~skip
    cols_t = cols.transpose(1, 2)  # (N, L, K)
    part_cols = cols_t[partial]  # (P, K), row-major position order
    data = (entries.transpose(1, 2) & ~nan.transpose(1, 2))[partial]
    noise = _noise(part_cols.shape[0], part_cols.shape[1], x, fill, generator)
    filled = cols_t.clone()
    if part_cols.shape[0]:
        filled[partial] = _fill_columns(part_cols, data, fill, sigma, noise)
    out = filled @ weight.reshape(cout, -1).T  # (N, L, C_out)
    if bias is not None:
        out = out + bias
    out = out.masked_fill(skip.unsqueeze(-1), float("nan"))
    shape = (n, *g.out_hw)
    return out.transpose(1, 2).reshape(n, cout, *g.out_hw), skip.reshape(shape), partial.reshape(
        shape)


def _bands(active: torch.Tensor, band_rows: int) -> list[Rect]:
    """Rectangles ``(n, r0, r1, c0, c1)`` (inclusive) covering the active (N, Ho, Wo) positions.

    One rectangle per batch item and band of ``band_rows`` output rows that holds an active
    position: its active rows, and the columns from the first to the last active one.
    """
    n, ho, wo = active.shape
    bands = -(-ho // band_rows)
    pad = bands * band_rows - ho
    row_any = active.any(2)  # (N, Ho)
    rows = torch.arange(ho, device=active.device).expand(n, ho)
    first = active.to(torch.uint8).argmax(2)
    last = wo - 1 - active.flip(2).to(torch.uint8).argmax(2)
    none, big = -1, ho + wo

    def reduce(values: torch.Tensor, empty: int, lowest: bool) -> torch.Tensor:
        v = F.pad(torch.where(row_any, values, empty), (0, pad), value=empty)
        v = v.view(n, bands, band_rows)
        return v.amin(2) if lowest else v.amax(2)

    rect = torch.stack([torch.arange(n, device=active.device)[:, None].expand(n, bands),
                        reduce(rows, big, True), reduce(rows, none, False),
                        reduce(first, big, True), reduce(last, none, False)], 2)
    return [tuple(r) for r in rect[rect[..., 2] >= 0].tolist()]


def _widen(a: int, b: int, lo: int, hi: int, quantum: int) -> tuple[int, int]:
    """[a, b] grown to a multiple of ``quantum`` (at most [lo, hi]) inside [lo, hi]."""
    size = min(-(-(b - a + 1) // quantum) * quantum, hi - lo + 1)
    b = min(a + size - 1, hi)
    return b - size + 1, b


def _quantise(rects: list[Rect], ho: int, wo: int) -> list[Rect]:
    """Rectangles widened to multiples of ``BAND_QUANTUM`` (rows, columns) within their band,
    so that more of them share a shape (and a conv2d call); they stay disjoint."""
    out = []
    for i, r0, r1, c0, c1 in rects:
        top = r0 // BAND_ROWS * BAND_ROWS
        out.append((i, *_widen(r0, r1, top, min(top + BAND_ROWS, ho) - 1, BAND_QUANTUM[0]),
                    *_widen(c0, c1, 0, wo - 1, BAND_QUANTUM[1])))
    return out


def _dense_crops(x: torch.Tensor, g: _Geometry, rects: list[Rect]) -> torch.Tensor:
    """(len(rects), C, h, w) channels-last batch of the zero-padded, NaN-free input regions that
    the equally shaped output rectangles read.

    Channels-last: oneDNN's convolution is markedly faster on it, and the copy is one conv2d
    would make of a strided view anyway.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.k, g.s, g.p, g.d
    h, w = x.shape[-2:]
    _, r0, r1, c0, c1 = rects[0]
    rows, cols = (r1 - r0) * sh + dh * (kh - 1) + 1, (c1 - c0) * sw + dw * (kw - 1) + 1
    buf = _scratch_cl((len(rects), x.shape[1], rows, cols), x)
    for k, (i, r0, _, c0, _) in enumerate(rects):
        top, left = r0 * sh - ph, c0 * sw - pw
        t, b = max(top, 0), min(top + rows, h)
        le, ri = max(left, 0), min(left + cols, w)
        dst = buf[k]
        if (t, b, le, ri) != (top, top + rows, left, left + cols):  # reaches into the padding
            dst[:, : t - top].zero_()
            dst[:, b - top :].zero_()
            dst[:, :, : le - left].zero_()
            dst[:, :, ri - left :].zero_()
            dst = dst[:, t - top : b - top, le - left : ri - left]
        torch.nan_to_num(x[i, :, t:b, le:ri], nan=0.0, posinf=float("inf"),
                         neginf=float("-inf"), out=dst)
    return buf


def _fill_outside(y: torch.Tensor, rects: list[Rect]) -> None:
    """Write NaN to every output position of (N, C, Ho, Wo) ``y`` outside the band rectangles
    (sorted by item, then rows; disjoint)."""
    nan = float("nan")
    for i in range(y.shape[0]):
        done = 0
        for _, r0, r1, c0, c1 in (r for r in rects if r[0] == i):
            y[i, :, done:r0, :] = nan
            y[i, :, r0 : r1 + 1, :c0] = nan
            y[i, :, r0 : r1 + 1, c1 + 1 :] = nan
            done = r1 + 1
        y[i, :, done:, :] = nan


def _banded(x: torch.Tensor, weight: torch.Tensor, g: _Geometry, band_area: int,
            banded: bool | None) -> bool:
    """Whether to convolve band rectangles covering ``band_area`` output positions rather than
    the whole map; ``banded=None``: decide (``impl="auto"``), else as given."""
    n = x.shape[0]
    ho, wo = g.out_hw
    if band_area == 0:  # everything skipped
        return True
    if band_area == n * ho * wo:  # the bands are the whole map: one dense call
        return False
    if banded is None:
        big = ho * wo * weight.numel() >= AUTO_MIN_MACS or x[0].numel() >= AUTO_MIN_ELEMENTS
        return big and band_area <= AUTO_MAX_BAND_FRACTION * n * ho * wo
    return banded


def _band_groups(rects: list[Rect], ho: int, wo: int) -> dict[tuple[int, int], list[Rect]]:
    """Quantised rectangles grouped by shape (rows - 1, cols - 1): one conv2d per group."""
    shapes: dict[tuple[int, int], list[Rect]] = {}
    for rect in _quantise(rects, ho, wo):
        shapes.setdefault((rect[2] - rect[1], rect[4] - rect[3]), []).append(rect)
    return shapes


def _fast(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    g: _Geometry,
    layout: _NanLayout,
    fill: Fill,
    sigma: float,
    generator: torch.Generator | None,
    count_padding: bool,
    banded: bool | None,
) -> tuple[torch.Tensor, int]:
    """Torch path: banded dense conv + exact handling of partial windows. ``banded=None``:
    decide.

    Returns the output and the number of positions computed. The convolution of the input with
    NaN -> 0 is already the zero fill; the mean and constant fills add value * (sum of the
    weights at the window's NaN entries) by linearity, ``noisy_max`` recomputes the partial
    windows. Each band is masked while its output is small and the area outside the bands is
    filled by slices, so no pass over the whole output is spent on skips.
    """
    skip = layout.skip
    n = x.shape[0]
    cout = weight.shape[0]
    ho, wo = g.out_hw
    rects = _bands(~skip, BAND_ROWS)
    band_area = sum((r1 - r0 + 1) * (c1 - c0 + 1) for _, r0, r1, c0, c1 in rects)
    w_cl = weight.contiguous(memory_format=torch.channels_last)
    if not _banded(x, weight, g, band_area, banded):  # one NaN-free copy, one conv2d
        dense = _scratch_cl(tuple(x.shape), x)
        torch.nan_to_num(x, nan=0.0, posinf=float("inf"), neginf=float("-inf"), out=dense)
        y = F.conv2d(dense, w_cl, bias, g.s, g.p, g.d)
        band_area = n * ho * wo
        y.masked_fill_(skip.unsqueeze(1), float("nan"))
    else:
        y = torch.empty(n, cout, ho, wo, dtype=x.dtype, device=x.device,
                        memory_format=torch.channels_last)
        _fill_outside(y, rects)
        band_area = 0
        for (rows, cols), group in _band_groups(rects, ho, wo).items():
            bands = F.conv2d(_dense_crops(x, g, group), w_cl, bias, g.s, 0, g.d)
            band_area += len(group) * (rows + 1) * (cols + 1)
            for band, (i, r0, r1, c0, c1) in zip(bands, group, strict=True):
                band.masked_fill_(skip[i, None, r0 : r1 + 1, c0 : c1 + 1], float("nan"))
                y[i, :, r0 : r1 + 1, c0 : c1 + 1] = band

    constant = fill_constant(fill)
    linear = fill == "mean" or constant is not None
    if linear and not (fill == "mean" or constant):  # the zero fill adds nothing
        return y, band_area
    where = layout.partial.nonzero(as_tuple=True)  # row-major, as in the reference
    if where[0].numel():
        if linear:
            _add_mean_fill(x, weight, g, y, where, layout, constant)
        else:
            _recompute_partial(x, weight, bias, g, y, where, fill, sigma, generator,
                               count_padding)
    return y, band_area


_DERIVED: dict[tuple[int, str], tuple] = {}


def _channels_last(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().contiguous(memory_format=torch.channels_last)


def _derived(weight: torch.Tensor, kind: str, make):
    """``make(weight)``, cached per weight tensor and ``kind`` until the weight changes (same
    checks as the carried NaN layouts): a copy per call is a small torch op, and under load
    every small parallel op can wait a whole time slice for its second thread."""
    if weight.is_inference():  # no version counter: nothing can be cached safely
        return make(weight)
    key = (id(weight), kind)
    state = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype)
    entry = _DERIVED.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == state:
        return entry[2]
    value = make(weight)

    def forget(ref, key=key):
        if _DERIVED.get(key, (None,))[0] is ref:
            del _DERIVED[key]

    _DERIVED[key] = (weakref.ref(weight, forget), state, value)
    return value


def _kernel_dense(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    g: _Geometry,
    pre: Activation | None,
    post: Activation | None,
    maxout: torch.Tensor | None,
) -> torch.Tensor:
    """CPU kernels, NaN-free input: ``maximum(post(conv(pre(x))), maxout)``, the activations
    and the maximum in one pass over the output (which then carries its NaN layout)."""
    if post is None and maxout is None and pre is None:
        return _dense(x, weight, bias, g)
    if pre is not None or not _kernels.channels_last(x):
        n = x.shape[0]
        xa = _scratch_cl(tuple(x.shape), x)
        _kernels.gather(x, pre, np.array([(i, 0, 0) for i in range(n)], np.int64), xa)
        x = xa
    w_cl = _derived(weight, "channels_last", _channels_last)
    if post is None and maxout is None:
        return F.conv2d(x, w_cl, bias, g.s, g.p, g.d)
    src = _conv_into_scratch(x, w_cl, bias, g.s, g.p, g.d)
    count = torch.empty(src.shape[0], *src.shape[2:], dtype=torch.int32)
    y, infs = _kernels.post_ops(src, post, maxout, count)
    _layout.remember(y, count, infs == 0)
    return y


def _kernel_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    g: _Geometry,
    nan_threshold: float,
    fill: Fill,
    sigma: float,
    generator: torch.Generator | None,
    count_padding: bool,
    banded: bool | None,
    pre: Activation | None,
    post: Activation | None,
    maxout: torch.Tensor | None,
) -> tuple[torch.Tensor, int, int, int]:
    """CPU kernels: the NaN convolution of ``pre(x)``, then ``post`` and the maximum with
    ``maxout``, all NaN bookkeeping in numba passes.

    Per-pixel NaN counts come from the layout carried with ``x`` (:mod:`._layout`) or one scan;
    skip/partial decisions and band rectangles from those small maps; each group of equally
    shaped rectangles is copied NaN-free (``pre`` applied) into one channels-last batch and
    convolved; one pass then writes every output position: NaN where skipped, the band value
    plus the linear fill's term, the post-activation and the maximum, counting the output's NaN
    entries per pixel, which the output carries on. Returns (y, skipped, partial, positions
    computed).
    """
    n, c = x.shape[:2]
    cout = weight.shape[0]
    ho, wo = g.out_hw
    carried = _layout.recall(x)
    if carried is not None and pre is not None and not (carried.finite or pre.keeps_numbers()):
        carried = None  # a zero slope could turn -inf into NaN: count on the activated input
    count = total = None
    if carried is not None:  # numpy reductions: no torch parallel region for small maps
        count = carried.count
        nan_free = nan_threshold > 0 and not count.numpy().any()
    else:
        nan_free = nan_threshold > 0 and _nan_free(x, pre)
        if not nan_free:
            count, total = _kernels.pixel_stats(x, pre)
            nan_free = nan_threshold > 0 and not count.numpy().any()
    if nan_free:
        return _kernel_dense(x, weight, bias, g, pre, post, maxout), 0, 0, n * ho * wo

    skip, partial, mean, skipped, partials = _kernels.window_layout(
        count, total, g.k, g.s, g.p, g.d, g.out_hw, c, nan_threshold, count_padding)
    constant = fill_constant(fill)
    linear = fill == "mean" or constant is not None
    add = partials > 0 and (fill == "mean" or bool(constant))  # the zero fill adds nothing
    if add and constant is not None:
        mean.fill_(constant)
    elif add and total is None:
        _kernels.partial_means(x, pre, count, partial, mean, g.k, g.s, g.p, g.d, count_padding)
    wt = _derived(weight, "taps", _kernels.tap_weights) if add else np.zeros(
        (1, 1, 1, 1), _kernels._scalar(weight.dtype))
    post_k, maxout_k = (post, maxout) if linear else (None, None)  # noisy_max: after recompute
    kgeom = (g.k, g.s, g.p, g.d)

    rects = _kernels.band_rects(skip, BAND_ROWS, BAND_MERGE_GAP)
    band_area = sum((r1 - r0 + 1) * (c1 - c0 + 1) for _, r0, r1, c0, c1 in rects)
    w_cl = _derived(weight, "channels_last", _channels_last)
    nan_count = torch.empty(n, ho, wo, dtype=torch.int32)
    infs = 0
    if not _banded(x, weight, g, band_area, banded):  # one NaN-free copy, one conv2d
        dense = _scratch_cl(tuple(x.shape), x)
        _kernels.gather(x, pre, np.array([(i, 0, 0) for i in range(n)], np.int64), dense)
        full = _conv_into_scratch(dense, w_cl, bias, g.s, g.p, g.d)
        y = torch.empty(n, cout, ho, wo, dtype=x.dtype, memory_format=torch.channels_last)
        whole = np.array([(i, 0, ho - 1, 0, wo - 1) for i in range(n)], np.int64)
        infs = _kernels.write_bands(y, full, whole, skip, partial, mean, add, x, count, wt,
                                    kgeom, pre, post_k, maxout_k, nan_count)
        band_area = n * ho * wo
    else:
        y = torch.empty(n, cout, ho, wo, dtype=x.dtype, memory_format=torch.channels_last)
        groups = _band_groups(rects, ho, wo)
        _kernels.fill_outside(y, [r for grp in groups.values() for r in grp], nan_count)
        band_area = 0
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.k, g.s, g.p, g.d
        for (rows, cols), group in groups.items():  # one conv2d per band shape
            origin = np.array([(i, r0 * sh - ph, c0 * sw - pw) for i, r0, _, c0, _ in group],
                              np.int64)
            crops = _scratch_cl((len(group), c, rows * sh + dh * (kh - 1) + 1,
                                 cols * sw + dw * (kw - 1) + 1), x)
            _kernels.gather(x, pre, origin, crops)
            bands = _conv_into_scratch(crops, w_cl, bias, g.s, (0, 0), g.d)
            infs += _kernels.write_bands(y, bands, np.array(group, np.int64), skip, partial,
                                         mean, add, x, count, wt, kgeom, pre, post_k, maxout_k,
                                         nan_count)
            band_area += len(group) * (rows + 1) * (cols + 1)
    if not linear:  # noisy_max: recompute the partial windows, then the post-processing
        where = partial.nonzero(as_tuple=True)  # row-major, as in the reference
        if where[0].numel():
            noise = _noise(len(where[0]), weight[0].numel(), x, fill, generator)
            _kernels.noisy_max_partial(y, x if pre is None else pre(x), weight, bias, where,
                                       noise, sigma, g.k, g.s, g.p, g.d, count_padding)
        y, infs = _kernels.post_ops(y, post, maxout, nan_count)
    _layout.remember(y, nan_count, infs == 0)
    return y, skipped, partials, band_area


def _taps(
    g: _Geometry, where: tuple[torch.Tensor, ...], hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input rows, cols (clamped) and in-bounds mask (P, kH*kW) of each partial window's taps."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.k, g.s, g.p, g.d
    _, pr, pc = where
    dev = pr.device
    tap_r = (torch.arange(kh, device=dev) * dh).repeat_interleave(kw)
    tap_c = (torch.arange(kw, device=dev) * dw).repeat(kh)
    rows = (pr * sh - ph)[:, None] + tap_r
    cols = (pc * sw - pw)[:, None] + tap_c
    inside = (rows >= 0) & (rows < hw[0]) & (cols >= 0) & (cols < hw[1])
    return rows.clamp(0, hw[0] - 1), cols.clamp(0, hw[1] - 1), inside


def _add_mean_fill(
    x: torch.Tensor,
    weight: torch.Tensor,
    g: _Geometry,
    y: torch.Tensor,
    where: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    layout: _NanLayout,
    constant: float | None = None,
) -> None:
    """Torch path: add the mean (or ``constant``) fill's contribution at partial positions, by
    linearity.

    ``y`` already holds conv(x with NaN -> 0) + bias there, so only mu * (sum of the weights at
    the window's NaN entries) is missing, mu = (sum of the window's numbers) / their count, or
    the constant. The window sums come from the gathered windows (P, kH*kW, C_in). NaNs
    spanning whole pixels: the NaN taps are per-pixel flags too. Channel-wise NaN: gather the
    windows' NaN flags (P, kH*kW, C_in) when they are few, else a NaN-mask convolution over the
    channels that hold NaN.
    """
    pn, pr, pc = where
    cout = weight.shape[0]
    rows, cols, inside = _taps(g, where, x.shape[-2:])
    if constant is None:
        entries = layout.entries.expand_as(layout.nan_count)[pn, pr, pc]
        count = (entries - layout.nan_count[pn, pr, pc]).clamp_min(1).to(x.dtype)
        tap_total = torch.nansum(x[pn[:, None], :, rows, cols], 2)  # (P, T) sums of numbers
        mean = (tap_total * inside).sum(1) / count
    else:
        mean = torch.full(pn.shape, constant, dtype=x.dtype, device=x.device)
    if layout.pixel_uniform:
        nan_taps = (layout.per_pixel[pn[:, None], rows, cols] > 0) & inside  # (P, T)
        tap_weight = weight.sum(1).reshape(cout, -1).T  # (T, C_out)
        y[pn, :, pr, pc] += (nan_taps.to(x.dtype) @ tap_weight) * mean[:, None]
    elif len(pn) * weight[0].numel() <= x.numel() // 2:
        window = x[pn[:, None], :, rows, cols]  # (P, T, C)
        nan_taps = torch.isnan(window) & inside[..., None]
        tap_weight = weight.permute(0, 2, 3, 1).reshape(cout, -1).T  # (T*C, C_out), tap-major
        y[pn, :, pr, pc] += (nan_taps.flatten(1).to(x.dtype) @ tap_weight) * mean[:, None]
    else:  # many partial windows: a dense NaN-mask convolution, no gathers
        nan = torch.isnan(x)
        channels = nan.flatten(2).any(2).any(0).nonzero()[:, 0]
        nan_sum = F.conv2d(nan[:, channels].to(x.dtype), weight[:, channels], None, g.s, g.p, g.d)
        mean_map = torch.zeros_like(layout.nan_count, dtype=x.dtype)
        mean_map[pn, pr, pc] = mean
        y += nan_sum.mul_(mean_map[:, None])


def _recompute_partial(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    g: _Geometry,
    y: torch.Tensor,
    where: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    fill: str,
    sigma: float,
    generator: torch.Generator | None,
    count_padding: bool,
) -> None:
    """Overwrite ``y`` at the partially-NaN positions with their exactly filled dot products.

    Window columns are gathered tap-major (P, kH*kW, C_in) and matched with the weight in that
    order; the noise is drawn in the reference's (c, kh, kw) order and transposed.
    """
    c = x.shape[1]
    cout = weight.shape[0]
    pn, pr, pc = where
    rows, cols, inside = _taps(g, where, x.shape[-2:])
    taps = rows.shape[1]
    wmat = weight.permute(0, 2, 3, 1).reshape(cout, -1).T  # (T*C, C_out)
    noise = _noise(len(pn), c * taps, x, fill, generator)
    step = max(1, GATHER_CHUNK // (c * taps))
    for lo in range(0, len(pn), step):
        sl = slice(lo, lo + step)
        ins = inside[sl, :, None].expand(-1, -1, c)
        window = x[pn[sl, None], :, rows[sl], cols[sl]].masked_fill_(~ins, 0)  # (p, T, C)
        data = ~torch.isnan(window)
        if not count_padding:
            data &= ins
        chunk_noise = None if noise is None else noise[sl].view(-1, c, taps).transpose(1, 2)
        filled = _fill_columns(window.flatten(1), data.flatten(1), fill, sigma,
                               None if chunk_noise is None else chunk_noise.flatten(1))
        out = filled @ wmat
        if bias is not None:
            out += bias
        y[pn[sl], :, pr[sl], pc[sl]] = out


def _check_fusion(pre, post, maxout, x4: torch.Tensor, cout: int, g: _Geometry
                  ) -> torch.Tensor | None:
    """Validate the absorbed operations; ``maxout`` as 4-D (it must match the output)."""
    for name, act in (("pre_activation", pre), ("post_activation", post)):
        if act is not None and not isinstance(act, Activation):
            raise ValueError(f"{name} must be None or a nanprobe.ops.fusion.Activation "
                             f"(see fusion.activation), got {type(act).__name__}")
    if maxout is None:
        return None
    shape = (x4.shape[0], cout, *g.out_hw)
    if not isinstance(maxout, torch.Tensor) or maxout.numel() != math.prod(shape):
        got = tuple(maxout.shape) if isinstance(maxout, torch.Tensor) else type(maxout).__name__
        raise ValueError(f"maxout must be a tensor shaped like the output {shape}, got {got}")
    return maxout.reshape(shape)


@torch.no_grad()
def nan_conv2d_with_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    nan_threshold: float = 1.0,
    fill: Fill = "mean",
    sigma: float = 1e-3,
    generator: torch.Generator | None = None,
    count_padding: bool = False,
    impl: str = "auto",
    groups: int = 1,
    pre_activation: Activation | None = None,
    post_activation: Activation | None = None,
    maxout: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ConvSkipStats]:
    """:func:`nan_conv2d` that also returns what it skipped (used by :class:`NanConv2d`)."""
    x4, squeeze, g = _check_conv_args(x, weight, bias, stride, padding, dilation, groups)
    nan_threshold = check_fraction(nan_threshold, "nan_threshold")
    fill = check_fill(fill)
    check_choice(impl, "impl", IMPLS)
    sigma = check_nonnegative(sigma, "sigma")
    pre, post = pre_activation, post_activation
    partner = _check_fusion(pre, post, maxout, x4, weight.shape[0], g)
    n, c = x4.shape[:2]
    positions = n * g.out_hw[0] * g.out_hw[1]
    macs_per_position = weight.shape[0] * c * g.k[0] * g.k[1]
    banded = True if impl == "fast" else None

    kernels = impl != "reference" and _kernels.enabled(x4, weight, *(
        [] if partner is None else [partner])) and (partner is None or partner.dtype == x4.dtype)
    if kernels:
        y, skipped, partials, computed = _kernel_conv(
            x4, weight, bias, g, nan_threshold, fill, sigma, generator, count_padding, banded,
            pre, post, partner)
    else:  # torch ops, the absorbed operations one after another
        xin = x4 if pre is None else pre(x4)
        if impl == "reference":
            y, skip, partial = _reference(xin, weight, bias, g, nan_threshold, fill, sigma,
                                          generator, count_padding)
            computed = positions
            skipped, partials = int(skip.sum()), int(partial.sum())
        else:
            layout = _nan_layout(xin, g, nan_threshold, count_padding)
            if layout is None:  # no NaN: the plain convolution
                y, skipped, partials, computed = _dense(xin, weight, bias, g), 0, 0, positions
            else:
                skipped, partials = layout.skip_counts()
                y, computed = _fast(xin, weight, bias, g, layout, fill, sigma, generator,
                                    count_padding, banded)
        if post is not None:
            y = post(y)
        if partner is not None:
            y = torch.maximum(y, partner)
    stats = ConvSkipStats(positions, skipped, partials, macs_per_position, positions - skipped,
                          computed)
    return (y.squeeze(0) if squeeze else y), stats


def nan_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    nan_threshold: float = 1.0,
    fill: Fill = "mean",
    sigma: float = 1e-3,
    generator: torch.Generator | None = None,
    count_padding: bool = False,
    impl: str = "auto",
    groups: int = 1,
    pre_activation: Activation | None = None,
    post_activation: Activation | None = None,
    maxout: torch.Tensor | None = None,
) -> torch.Tensor:
    """2-D convolution that skips output positions whose input window is mostly NaN.

    ``x``: (N, C_in, H, W) or (C_in, H, W); ``weight``: (C_out, C_in, kH, kW); ``bias``: (C_out,).
    The window of an output position is its C_in*kH*kW input entries; r = NaN entries / window
    entries, counting only in-bounds entries unless ``count_padding`` (zero padding then counts as
    non-NaN, as in the paper). If ``r >= nan_threshold`` the position is skipped: NaN in every
    output channel. Otherwise the window's NaNs are replaced by the fill and the usual dot product
    plus bias is taken: ``fill="mean"``: the mean of the window's non-NaN entries;
    ``fill="noisy_max"``: independent draws from N(max of the non-NaN entries, ``sigma``)
    (reproducible with ``generator``); ``fill="zero"``: 0 (ReLU's value where it cuts); a
    finite number: that constant. Without NaN it equals ``F.conv2d``. (The fast path adds
    the mean fill's term by linearity: if a window's numbers include +-inf, its mean is
    infinite and the result may be +-inf where the per-entry sum gives inf - inf = NaN.)

    ``impl``: ``"reference"`` (im2col, slow, obviously correct), ``"fast"`` (banded dense conv
    over the active region) or ``"auto"`` (banded only when it saves work). ``groups`` must be 1.

    Absorbed operations (:mod:`nanprobe.ops.fusion`): the result is
    ``torch.maximum(post_activation(nan_conv2d(pre_activation(x))), maxout)``, each part
    applied only when given; on CPU the kernels apply them in their own passes (``maxout``:
    a tensor shaped like the output, e.g. FastSurfer's maxout with the block input).
    Returns (N, C_out, Ho, Wo) (or (C_out, Ho, Wo) for 3-D input); when the input holds NaN
    the result may be in channels-last memory layout (same values and shape).
    """
    return nan_conv2d_with_stats(
        x, weight, bias, stride, padding, dilation, nan_threshold=nan_threshold, fill=fill,
        sigma=sigma, generator=generator, count_padding=count_padding, impl=impl, groups=groups,
        pre_activation=pre_activation, post_activation=post_activation, maxout=maxout,
    )[0]
