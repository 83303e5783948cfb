"""The numba kernels behind :mod:`nanprobe.ops._kernels` (imported lazily: compiling costs time).

Two loop orders per kernel: NCHW arrays are walked plane by plane, NHWC arrays pixel by pixel
with the channel loop innermost, so that both read memory in order (and the NHWC loops
vectorise over channels).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(inline="always")
def _window_max(x, n, c, r0, c0, kh, kw, h, w, use_tie, tie_limit, eps, rtol):
    """(value, flat index) of one NCHW window: NaN-ignoring max with the tie rule."""
    m = x[n, c, 0, 0]
    idx = -1
    for di in range(kh):
        r = r0 + di
        if r < 0 or r >= h:
            continue
        for dj in range(kw):
            col = c0 + dj
            if col < 0 or col >= w:
                continue
            v = x[n, c, r, col]
            if v == v and (idx < 0 or v > m):
                m = v
                idx = r * w + col
    if idx < 0:
        return np.nan, 0
    if use_tie:
        tol = eps + rtol * abs(m)
        ties = 0
        for di in range(kh):
            r = r0 + di
            if r < 0 or r >= h:
                continue
            for dj in range(kw):
                col = c0 + dj
                if col < 0 or col >= w:
                    continue
                v = x[n, c, r, col]
                if v == m or m - v < tol:
                    ties += 1
        if ties > tie_limit:
            return np.nan, 0
    return m, idx


@njit(parallel=True, cache=True)
def max_pool_nchw(x, kh, kw, sh, sw, ph, pw, use_tie, tie_limit, eps, rtol, values, indices):
    """x: (N, C, H, W); values, indices: (N, C, Ho, Wo)."""
    n_, c_, h, w = x.shape
    ho, wo = values.shape[2], values.shape[3]
    for q in prange(n_ * c_ * ho):
        i = q % ho
        c = (q // ho) % c_
        n = q // (ho * c_)
        for j in range(wo):
            v, idx = _window_max(x, n, c, i * sh - ph, j * sw - pw, kh, kw, h, w, use_tie,
                                 tie_limit, eps, rtol)
            values[n, c, i, j] = v
            indices[n, c, i, j] = idx


@njit(parallel=True, cache=True)
def max_pool_nhwc(x, kh, kw, sh, sw, ph, pw, use_tie, tie_limit, eps, rtol, values, indices):
    """x: (N, H, W, C); values, indices: (N, Ho, Wo, C). Same rules as ``_window_max``."""
    n_, h, w, c_ = x.shape
    ho, wo = values.shape[1], values.shape[2]
    for q in prange(n_ * ho):
        i = q % ho
        n = q // ho
        r0 = i * sh - ph
        m = np.empty(c_, x.dtype)
        idx = np.empty(c_, np.int64)
        ties = np.empty(c_, np.int64)
        for j in range(wo):
            c0 = j * sw - pw
            m[:] = np.nan
            idx[:] = -1
            ties[:] = 0
            for di in range(kh):
                r = r0 + di
                if r < 0 or r >= h:
                    continue
                for dj in range(kw):
                    col = c0 + dj
                    if col < 0 or col >= w:
                        continue
                    flat = r * w + col
                    for c in range(c_):
                        v = x[n, r, col, c]
                        take = (v == v) & ((idx[c] < 0) | (v > m[c]))
                        m[c] = v if take else m[c]
                        idx[c] = flat if take else idx[c]
            if use_tie:
                for di in range(kh):
                    r = r0 + di
                    if r < 0 or r >= h:
                        continue
                    for dj in range(kw):
                        col = c0 + dj
                        if col < 0 or col >= w:
                            continue
                        for c in range(c_):
                            v = x[n, r, col, c]
                            mc = m[c]
                            ties[c] += (v == mc) | (mc - v < eps + rtol * abs(mc))
            for c in range(c_):
                bad = idx[c] < 0 or (use_tie and ties[c] > tie_limit)
                values[n, i, j, c] = np.nan if bad else m[c]
                indices[n, i, j, c] = 0 if bad else idx[c]


@njit(parallel=True, cache=True)
def pixel_stats_nchw(x, count, total):
    """x: (N, C, H, W); count, total: (N, H, W) NaN entries and sum of numbers per pixel."""
    n_, c_, h, w = x.shape
    for q in prange(n_ * h):
        r = q % h
        n = q // h
        cnt = count[n, r]
        tot = total[n, r]
        cnt[:] = 0
        tot[:] = 0.0
        for c in range(c_):
            for col in range(w):
                v = x[n, c, r, col]
                nan = v != v
                cnt[col] += nan
                tot[col] += 0.0 if nan else v


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def pixel_stats_nhwc(x, count, total):
    """x: (N, H, W, C); count, total: (N, H, W). Reassociation lets the channel sums vectorise."""
    n_, h, w, c_ = x.shape
    for q in prange(n_ * h):
        r = q % h
        n = q // h
        for col in range(w):
            cnt = 0
            tot = 0.0
            for c in range(c_):
                v = x[n, r, col, c]
                nan = v != v
                cnt += nan
                tot += 0.0 if nan else v
            count[n, r, col] = cnt
            total[n, r, col] = tot


@njit(parallel=True, cache=True)
def window_layout(count, total, kh, kw, sh, sw, ph, pw, dh, dw, channels, threshold,
                  count_padding, nan_count, skip, partial, mean):
    """Per output position from per-pixel maps (N, H, W): NaN entries, skip, partial, fill mean.

    ``count``/``total``: NaN entries / sum of numbers per pixel; outputs (N, Ho, Wo).
    r = NaN entries / window entries (in-bounds ones unless ``count_padding``); skip if
    r >= threshold; mean = sum of numbers / non-NaN entries (padding zeros count as entries
    with ``count_padding``).
    """
    n_, h, w = count.shape
    ho, wo = skip.shape[1], skip.shape[2]
    full = channels * kh * kw
    for q in prange(n_ * ho):
        i = q % ho
        n = q // ho
        for j in range(wo):
            inside = 0
            nans = 0
            tot = 0.0
            for di in range(kh):
                r = i * sh - ph + di * dh
                if r < 0 or r >= h:
                    continue
                for dj in range(kw):
                    col = j * sw - pw + dj * dw
                    if col < 0 or col >= w:
                        continue
                    inside += channels
                    nans += count[n, r, col]
                    tot += total[n, r, col]
            entries = full if count_padding else inside
            ratio = nans / max(entries, 1.0)
            s = ratio >= threshold
            nan_count[n, i, j] = nans
            skip[n, i, j] = s
            partial[n, i, j] = nans > 0 and not s
            mean[n, i, j] = tot / max(entries - nans, 1)


@njit(parallel=True, cache=True)
def finish_conv(y, x, count, wt, skip, partial, mean, kh, kw, sh, sw, ph, pw, dh, dw,
                add_mean):
    """NaN at skipped positions; at partial ones add mean * (sum of the weights at NaN entries).

    y: (N, Ho, Wo, C_out) holding conv(x with NaN -> 0) + bias; x: (N, C_in, H, W) any layout;
    count: (N, H, W) NaN entries per pixel; wt: (kH, kW, C_in + 1, C_out) weights, the last
    row their sum over C_in (for pixels NaN in every channel); skip/partial/mean: (N, Ho, Wo).
    """
    n_, ho, wo, cout = y.shape
    cin, h, w = x.shape[1], x.shape[2], x.shape[3]
    for q in prange(n_ * ho):
        i = q % ho
        n = q // ho
        acc = np.empty(cout, wt.dtype)
        for j in range(wo):
            if skip[n, i, j]:
                for co in range(cout):
                    y[n, i, j, co] = np.nan
                continue
            if not (add_mean and partial[n, i, j]):
                continue
            acc[:] = 0.0
            for di in range(kh):
                r = i * sh - ph + di * dh
                if r < 0 or r >= h:
                    continue
                for dj in range(kw):
                    col = j * sw - pw + dj * dw
                    if col < 0 or col >= w:
                        continue
                    nans = count[n, r, col]
                    if nans == 0:
                        continue
                    if nans == cin:
                        for co in range(cout):
                            acc[co] += wt[di, dj, cin, co]
                        continue
                    for c in range(cin):
                        v = x[n, c, r, col]
                        if v != v:
                            for co in range(cout):
                                acc[co] += wt[di, dj, c, co]
            m = mean[n, i, j]
            for co in range(cout):
                y[n, i, j, co] += m * acc[co]
