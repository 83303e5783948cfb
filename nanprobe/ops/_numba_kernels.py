"""The numba kernels behind :mod:`nanprobe.ops._kernels` (imported lazily: compiling costs time).

Two loop orders per kernel: NCHW arrays are walked plane by plane, NHWC arrays pixel by pixel
with the channel loop innermost, so that both read memory in order (and the NHWC loops
vectorise over channels).

The kernels are serial and release the GIL (``nogil``): numba's parallel backend would bring a
second OpenMP runtime beside torch's, whose idle threads spin for milliseconds after every
region and steal the cores from each other (see docs/performance.md); oneDNN's convolution, the
bulk of the work, keeps all of torch's threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange  # prange is range here: the kernels compile serial


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


@njit(cache=True, nogil=True)
def max_pool_nchw(x, kh, kw, sh, sw, ph, pw, use_tie, tie_limit, eps, rtol, values, indices):
    """x: (N, C, H, W); values, indices: (N, C, Ho, Wo). Returns the number of NaN windows."""
    n_, c_, h, w = x.shape
    ho, wo = values.shape[2], values.shape[3]
    nans = 0
    for q in prange(n_ * c_ * ho):
        i = q % ho
        c = (q // ho) % c_
        n = q // (ho * c_)
        for j in range(wo):
            v, idx = _window_max(x, n, c, i * sh - ph, j * sw - pw, kh, kw, h, w, use_tie,
                                 tie_limit, eps, rtol)
            values[n, c, i, j] = v
            indices[n, c, i, j] = idx
            nans += v != v
    return nans


@njit(cache=True, nogil=True)
def max_pool_nhwc(x, kh, kw, sh, sw, ph, pw, use_tie, tie_limit, eps, rtol, values, indices):
    """x: (N, H, W, C); values, indices: (N, Ho, Wo, C). Same rules as ``_window_max``.
    Returns the number of NaN windows."""
    n_, h, w, c_ = x.shape
    ho, wo = values.shape[1], values.shape[2]
    nans = 0
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
                nans += bad
    return nans


@njit(cache=True, nogil=True)
def max_unpool_nchw(values, indices, kh, kw, sh, sw, ph, pw, out):
    """values, indices: (N, C, Ho, Wo); out: (N, C, H, W). Finite values go to their flat index,
    NaN values paint their in-bounds window NaN (after every finite write). Returns the number
    of finite values whose index is outside [0, H*W) (those are not written)."""
    n_, c_, ho, wo = values.shape
    h, w = out.shape[2], out.shape[3]
    bad = 0
    for q in prange(n_ * c_):
        c = q % c_
        n = q // c_
        plane = out[n, c]
        plane[:] = 0.0
        for i in range(ho):
            for j in range(wo):
                v = values[n, c, i, j]
                if v == v:
                    idx = indices[n, c, i, j]
                    if idx < 0 or idx >= h * w:
                        bad += 1
                    else:
                        plane[idx // w, idx % w] = v
        for i in range(ho):
            for j in range(wo):
                if values[n, c, i, j] != values[n, c, i, j]:
                    for r in range(max(i * sh - ph, 0), min(i * sh - ph + kh, h)):
                        for col in range(max(j * sw - pw, 0), min(j * sw - pw + kw, w)):
                            plane[r, col] = np.nan
    return bad


@njit(cache=True, nogil=True)
def max_unpool_nhwc(values, indices, kh, kw, sh, sw, ph, pw, out, block):
    """values, indices: (N, Ho, Wo, C); out: (N, H, W, C). As ``max_unpool_nchw``; threads own
    blocks of ``block`` channels of one batch item."""
    n_, ho, wo, c_ = values.shape
    h, w = out.shape[1], out.shape[2]
    for q in prange(n_ * h):
        out[q // h, q % h] = 0.0
    blocks = (c_ + block - 1) // block
    bad = 0
    for q in prange(n_ * blocks):
        n = q // blocks
        c_lo = (q % blocks) * block
        c_hi = min(c_lo + block, c_)
        for i in range(ho):
            for j in range(wo):
                for c in range(c_lo, c_hi):
                    v = values[n, i, j, c]
                    if v == v:
                        idx = indices[n, i, j, c]
                        if idx < 0 or idx >= h * w:
                            bad += 1
                        else:
                            out[n, idx // w, idx % w, c] = v
        for i in range(ho):
            for j in range(wo):
                for c in range(c_lo, c_hi):
                    if values[n, i, j, c] != values[n, i, j, c]:
                        for r in range(max(i * sh - ph, 0), min(i * sh - ph + kh, h)):
                            for col in range(max(j * sw - pw, 0), min(j * sw - pw + kw, w)):
                                out[n, r, col, c] = np.nan
    return bad


@njit(inline="always")
def _in_window(idx, r_lo, r_hi, c_lo, c_hi, w):
    """(inside, row, col) of flat index ``idx`` against window rows/cols [lo, hi), no division."""
    r = r_lo
    for dr in range(1, r_hi - r_lo):
        r += idx >= (r_lo + dr) * w
    col = idx - r * w
    inside = (idx >= r_lo * w) & (idx < r_hi * w) & (col >= c_lo) & (col < c_hi)
    return inside, r, col


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def max_unpool_nhwc_rows(values, indices, kh, kw, sh, sw, ph, pw, out, strays, has_max, partner,
                         nan_count, lo, hi):
    """Non-overlapping windows (kh <= sh, kw <= sw), channels-last: one pass by pooled rows.

    Pooled row i owns output rows [i*sh - ph, (i+1)*sh - ph) (the first and last also the
    margins): it zeroes them, writes its finite values whose index lies in their own window and
    paints its NaN windows. Values pointing elsewhere ("strays", e.g. decoder values unpooled
    with an encoder's indices) are only counted per pooled row in ``strays`` (N, Ho);
    ``max_unpool_nhwc_strays`` writes them afterwards. With ``has_max`` the finished rows become
    ``maximum(out, partner)`` (partner (N, H, W, C)) while still in cache, and ``nan_count``
    (N, H, W) receives their NaN entries per pixel (only valid when no strays were found).
    Returns the number of infinite entries of the maximum. Pooled rows q = n * Ho + i in
    [lo, hi).
    """
    n_, ho, wo, c_ = values.shape
    h, w = out.shape[1], out.shape[2]
    infs = 0
    for q in range(lo, hi):
        i = q % ho
        n = q // ho
        top = i * sh - ph
        first = 0 if i == 0 else max(top, 0)
        end = h if i == ho - 1 else min(top + sh, h)
        for r in range(first, end):
            out[n, r] = 0.0
        r_lo = max(top, 0)
        r_hi = min(top + kh, h)
        count = 0
        for j in range(wo):
            c_lo = max(j * sw - pw, 0)
            c_hi = min(j * sw - pw + kw, w)
            for c in range(c_):
                v = values[n, i, j, c]
                if v == v:
                    inside, r, col = _in_window(indices[n, i, j, c], r_lo, r_hi, c_lo, c_hi, w)
                    if inside:
                        out[n, r, col, c] = v
                    else:
                        count += 1
                else:
                    for r in range(r_lo, r_hi):
                        for col in range(c_lo, c_hi):
                            out[n, r, col, c] = np.nan
        strays[n, i] = count
        if has_max:
            for r in range(first, end):
                infs += _maximum_row(out[n, r], partner[n, r], nan_count[n, r])
    return infs


@njit(cache=True, nogil=True)
def max_unpool_nhwc_strays(values, indices, kh, kw, sh, sw, ph, pw, out, strays):
    """Write the strays of ``max_unpool_nhwc_rows`` as sequential unpooling would have.

    In row-major order per batch item: a stray to flat index t is dropped when t's own window
    (at most one: windows do not overlap) is NaN (painted) or is later and wrote t itself;
    otherwise it overwrites. Returns the number of finite values with an index outside
    [0, H*W) (not written).
    """
    n_, ho, wo, c_ = values.shape
    h, w = out.shape[1], out.shape[2]
    bad = 0
    for n in prange(n_):
        for i in range(ho):
            if strays[n, i] == 0:
                continue
            top = i * sh - ph
            r_lo = max(top, 0)
            r_hi = min(top + kh, h)
            for j in range(wo):
                c_lo = max(j * sw - pw, 0)
                c_hi = min(j * sw - pw + kw, w)
                for c in range(c_):
                    v = values[n, i, j, c]
                    if v != v:
                        continue
                    t = indices[n, i, j, c]
                    if _in_window(t, r_lo, r_hi, c_lo, c_hi, w)[0]:
                        continue
                    if t < 0 or t >= h * w:
                        bad += 1
                        continue
                    r = t // w
                    col = t - r * w
                    oi = (r + ph) // sh
                    oj = (col + pw) // sw
                    if oi < ho and oj < wo and r < oi * sh - ph + kh and col < oj * sw - pw + kw:
                        owner = values[n, oi, oj, c]
                        if owner != owner:
                            continue  # painted NaN
                        if (oi > i or (oi == i and oj > j)) and indices[n, oi, oj, c] == t:
                            continue  # the later owner's own write stands
                    out[n, r, col, c] = v
    return bad


@njit(inline="always")
def _act(v, kind, slope):
    """Activation of one value: ``kind`` 0 identity, 1 ReLU (``slope`` is then 0, of v's
    type), 2 PReLU / LeakyReLU with ``slope`` (``v`` if v > 0 else slope * v). NaN stays NaN
    and ReLU(-inf) is 0, as in torch."""
    if kind == 1:
        return v if v > 0 or v != v else slope
    if kind == 2:
        return v if v > 0 else slope * v
    return v


@njit(inline="always")
def _maximum_row(row, other, nan_count):
    """In place ``row = maximum(row, other)`` (NaN if either is NaN, as ``torch.maximum``) over
    one C-contiguous row of pixels (W, C); ``nan_count`` (W,) receives the NaN entries per
    pixel. Returns the number of infinite entries."""
    flat = row.reshape(-1)
    if _maximum_flat(flat, other.reshape(-1), np.zeros(1, row.dtype)[0]):
        nan_count[:] = 0
        return 0
    return _recount(flat, nan_count, row.shape[1])


@njit(cache=True, nogil=True)
def pixel_stats_nchw(x, kind, slopes, count, total, lo, hi):
    """x: (N, C, H, W); count, total: (N, H, W) NaN entries and sum of numbers per pixel of
    ``act(x)`` (``kind``, ``slopes`` (C,): see ``_act``), for the rows q = n * H + r in
    [lo, hi)."""
    h, w = x.shape[2], x.shape[3]
    for q in range(lo, hi):
        n, r = q // h, q % h
        cnt = count[n, r]
        tot = total[n, r]
        cnt[:] = 0
        tot[:] = 0.0
        for c in range(x.shape[1]):
            s = slopes[c]
            src = x[n, c, r]
            for col in range(w):
                v = _act(src[col], kind, s)
                nan = v != v
                cnt[col] += nan
                tot[col] += 0.0 if nan else v


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def pixel_stats_nhwc(x, kind, slopes, count, total, lo, hi):
    """``pixel_stats_nchw`` for x: (N, H, W, C). Reassociation lets the channel sums
    vectorise."""
    n_, h, w, c_ = x.shape
    for q in range(lo, hi):
        n, r = q // h, q % h
        for col in range(w):
            cnt = 0
            tot = 0.0
            for c in range(c_):
                v = _act(x[n, r, col, c], kind, slopes[c])
                nan = v != v
                cnt += nan
                tot += 0.0 if nan else v
            count[n, r, col] = cnt
            total[n, r, col] = tot


@njit(cache=True, nogil=True)
def window_layout(count, total, has_total, kh, kw, sh, sw, ph, pw, dh, dw, channels, threshold,
                  count_padding, skip, partial, mean):
    """Per output position from per-pixel maps (N, H, W): skip, partial, fill mean (N, Ho, Wo).

    ``count``/``total``: NaN entries / sum of numbers per pixel (``total`` only read, and
    ``mean`` only written, if ``has_total``). r = NaN entries / window entries (in-bounds ones
    unless ``count_padding``); skip if r >= threshold; partial if computed with NaN in the
    window; mean = sum of numbers / non-NaN entries (padding zeros count as entries with
    ``count_padding``). Separable: column sums over the kH taps of each output row first, then
    sums over the kW taps. Returns the (skipped, partial) counts.
    """
    n_, h, w = count.shape
    ho, wo = skip.shape[1], skip.shape[2]
    full = channels * kh * kw
    skipped = 0
    partials = 0
    col_nans = np.zeros(w, np.int64)
    col_total = np.zeros(w, np.float64)
    for n in range(n_):
        for i in range(ho):
            col_nans[:] = 0
            col_total[:] = 0.0
            rows_in = 0
            for di in range(kh):
                r = i * sh - ph + di * dh
                if r < 0 or r >= h:
                    continue
                rows_in += 1
                for col in range(w):
                    col_nans[col] += count[n, r, col]
                if has_total:
                    for col in range(w):
                        col_total[col] += total[n, r, col]
            for j in range(wo):
                cols_in = 0
                nans = 0
                tot = 0.0
                for dj in range(kw):
                    col = j * sw - pw + dj * dw
                    if col < 0 or col >= w:
                        continue
                    cols_in += 1
                    nans += col_nans[col]
                    tot += col_total[col]
                entries = full if count_padding else channels * rows_in * cols_in
                s = nans / max(entries, 1.0) >= threshold  # as the reference computes it
                p = nans > 0 and not s
                skip[n, i, j] = s
                partial[n, i, j] = p
                if has_total:
                    mean[n, i, j] = tot / max(entries - nans, 1)
                skipped += s
                partials += p
    return skipped, partials


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def partial_means(x, kind, slopes, count, partial, kh, kw, sh, sw, ph, pw, dh, dw,
                  count_padding, mean):
    """``mean`` (N, Ho, Wo) at the partial positions only: the mean of the window's numbers of
    ``act(x)``, x: (N, H, W, C), ``count`` (N, H, W) its NaN entries per pixel. Used when the
    NaN layout came with the input, so no per-pixel sums exist; pixels that are NaN in every
    channel are not read."""
    n_, h, w, c_ = x.shape
    ho, wo = partial.shape[1], partial.shape[2]
    full = c_ * kh * kw
    for n in range(n_):
        for i in range(ho):
            for j in range(wo):
                if not partial[n, i, j]:
                    continue
                taps = 0
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
                        taps += 1
                        cnt = count[n, r, col]
                        nans += cnt
                        if cnt == c_:
                            continue
                        pixel = x[n, r, col]
                        for c in range(c_):
                            v = _act(pixel[c], kind, slopes[c])
                            tot += 0.0 if v != v else v
                entries = full if count_padding else c_ * taps
                mean[n, i, j] = tot / max(entries - nans, 1)


@njit(inline="always")
def _crop_row(out, origin, q, h, w):
    """Row q = g * rows + rr of the crops ``out`` (G, rows, cols, C) taken at ``origin[g]`` =
    (n, top, left) from an (h, w) map: ``(n, r, left, c_lo, c_hi, dst)`` with r the map row,
    [c_lo, c_hi) the crop columns inside the map and ``dst = out[g, rr]``, whose columns
    outside the map are zeroed (all of it, and r = -1, when row r is outside)."""
    rows, cols = out.shape[1], out.shape[2]
    g, rr = q // rows, q % rows
    n, top, left = origin[g, 0], origin[g, 1], origin[g, 2]
    c_lo = min(max(-left, 0), cols)
    c_hi = max(min(w - left, cols), c_lo)
    r = top + rr
    dst = out[g, rr]
    if r < 0 or r >= h:
        dst[:, :] = 0
        return n, -1, left, c_lo, c_hi, dst
    dst[:c_lo, :] = 0
    dst[c_hi:, :] = 0
    return n, r, left, c_lo, c_hi, dst


@njit(cache=True, nogil=True)
def gather_nchw(x, kind, slopes, origin, out, lo, hi):
    """``out[g]`` (rows, cols, C) = ``act(x)`` (N, C, H, W) with NaN -> 0 over the input window
    of rows [top, top + rows) and cols [left, left + cols) of item n, (n, top, left) =
    ``origin[g]``; entries outside the map are 0 (zero padding). Output rows q = g * rows + rr
    in [lo, hi). (A transposition: about 4x the time of ``gather_nhwc``.)"""
    c_ = out.shape[3]
    zero = np.zeros(1, out.dtype)[0]
    for q in range(lo, hi):
        n, r, left, c_lo, c_hi, dst = _crop_row(out, origin, q, x.shape[2], x.shape[3])
        if r < 0:
            continue
        for c in range(c_):
            s = slopes[c]
            src = x[n, c, r]
            for cc in range(c_lo, c_hi):
                v = _act(src[left + cc], kind, s)
                dst[cc, c] = zero if v != v else v


@njit(cache=True, nogil=True)
def gather_nhwc(x, kind, slopes, origin, out, lo, hi):
    """``gather_nchw`` for x: (N, H, W, C)."""
    c_ = out.shape[3]
    zero = np.zeros(1, out.dtype)[0]
    for q in range(lo, hi):
        n, r, left, c_lo, c_hi, dst = _crop_row(out, origin, q, x.shape[1], x.shape[2])
        if r < 0:
            continue
        src = x[n, r]
        for cc in range(c_lo, c_hi):
            pixel = src[left + cc]
            out_pixel = dst[cc]
            for c in range(c_):
                v = _act(pixel[c], kind, slopes[c])
                out_pixel[c] = zero if v != v else v


@njit(cache=True, nogil=True)
def band_rects(skip, band_rows, merge_gap, rects):
    """Rectangles (n, r0, r1, c0, c1), inclusive, covering the computed positions of skip
    (N, Ho, Wo), written to ``rects`` (R, 5); returns how many. Per batch item and band of
    ``band_rows`` output rows: the runs of columns holding a computed position, runs closer
    than ``merge_gap`` columns merged, each with the rows of its computed positions."""
    n_, ho, wo = skip.shape
    used = np.zeros(wo, np.bool_)
    count = 0
    for n in range(n_):
        for top in range(0, ho, band_rows):
            bottom = min(top + band_rows, ho)
            used[:] = False
            for i in range(top, bottom):
                for j in range(wo):
                    if not skip[n, i, j]:
                        used[j] = True
            j = 0
            while j < wo:
                if not used[j]:
                    j += 1
                    continue
                c0 = j
                c1 = j
                gap = 0
                j += 1
                while j < wo and gap <= merge_gap:
                    if used[j]:
                        c1 = j
                        gap = 0
                    else:
                        gap += 1
                    j += 1
                j = c1 + 1
                r0, r1 = -1, -1
                for i in range(top, bottom):
                    for jj in range(c0, c1 + 1):
                        if not skip[n, i, jj]:
                            if r0 < 0:
                                r0 = i
                            r1 = i
                            break
                rects[count, 0] = n
                rects[count, 1] = r0
                rects[count, 2] = r1
                rects[count, 3] = c0
                rects[count, 4] = c1
                count += 1
    return count


@njit(cache=True, nogil=True)
def fill_outside(y, covered, nan_count, lo, hi):
    """NaN in y (N, Ho, Wo, C_out) at the positions not ``covered`` (N, Ho, Wo) by a computed
    rectangle; ``nan_count`` (N, Ho, Wo) = C_out there. Rows q = n * Ho + i in [lo, hi)."""
    ho, wo, cout = y.shape[1], y.shape[2], y.shape[3]
    for q in range(lo, hi):
        n, i = q // ho, q % ho
        j = 0
        while j < wo:
            if covered[n, i, j]:
                j += 1
                continue
            end = j + 1
            while end < wo and not covered[n, i, end]:
                end += 1
            y[n, i, j:end, :] = np.nan
            nan_count[n, i, j:end] = cout
            j = end


@njit(inline="always")
def _count_row(out):
    """(NaN entries, infinite entries) of one pixel's channels."""
    nans = 0
    infs = 0
    for v in out:
        nans += v != v
        infs += abs(v) == np.inf
    return nans, infs


@njit(inline="always")
def _finish_flat(src, out, kind, slopes, has_max, partner, zero, c_):
    """``out = maximum(act(src), partner)`` over flat pixels of ``c_`` channels (entry e has
    channel e % c_; ``out`` must not overlap ``src`` or ``partner``); returns whether every
    result is finite. One loop per case, without branches inside, so that each vectorises
    (per-channel slopes: a loop over the channels of each pixel); finiteness comes from a sum
    of ``v - v`` (0 unless NaN or inf)."""
    probe = zero
    size = src.shape[0]
    if kind == 2 and has_max:
        for k in range(size // c_):
            pixel = slice(k * c_, (k + 1) * c_)
            s_, o_, p_ = src[pixel], out[pixel], partner[pixel]
            for c in range(c_):
                v = s_[c]
                a = slopes[c] * v
                v = v if v > 0 else a
                p = p_[c]
                m = v if v >= p else p
                m = v if v != v else m
                o_[c] = m
                probe += m - m
    elif kind == 2:
        for k in range(size // c_):
            pixel = slice(k * c_, (k + 1) * c_)
            s_, o_ = src[pixel], out[pixel]
            for c in range(c_):
                v = s_[c]
                a = slopes[c] * v
                v = v if v > 0 else a
                o_[c] = v
                probe += v - v
    elif kind == 1 and has_max:
        for e in range(size):
            v = src[e]
            v = v if v > 0 or v != v else zero
            p = partner[e]
            m = v if v >= p else p
            m = v if v != v else m
            out[e] = m
            probe += m - m
    elif kind == 1:
        for e in range(size):
            v = src[e]
            v = v if v > 0 or v != v else zero
            out[e] = v
            probe += v - v
    elif has_max:
        for e in range(size):
            v = src[e]
            p = partner[e]
            m = v if v >= p else p
            m = v if v != v else m
            out[e] = m
            probe += m - m
    else:
        for e in range(size):
            v = src[e]
            out[e] = v
            probe += v - v
    return probe == probe


@njit(inline="always")
def _maximum_flat(buf, partner, zero):
    """In place ``buf = maximum(buf, partner)``; returns whether every result is finite."""
    probe = zero
    for e in range(buf.shape[0]):
        v = buf[e]
        p = partner[e]
        m = v if v >= p else p
        m = v if v != v else m
        buf[e] = m
        probe += m - m
    return probe == probe


@njit(inline="always")
def _recount(out, nan_count, c_):
    """NaN entries per pixel of flat ``out`` into ``nan_count``; returns the infinite ones."""
    infs = 0
    for k in range(nan_count.shape[0]):
        pixel_nans, pixel_infs = _count_row(out[k * c_ : (k + 1) * c_])
        nan_count[k] = pixel_nans
        infs += pixel_infs
    return infs


@njit(inline="always")
def _finish_run(src, out, kind, slopes, has_max, partner, nan_count, zero, c_):
    """``out = maximum(act(src), partner)`` over a run of pixels, flat (pixels * ``c_``);
    ``nan_count`` (pixels,) receives the NaN entries per pixel (counted pixel by pixel only when
    the run holds a NaN or an infinity). Returns the number of infinite entries."""
    if _finish_flat(src, out, kind, slopes, has_max, partner, zero, c_):
        nan_count[:] = 0
        return 0
    return _recount(out, nan_count, c_)


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def write_bands(y, bands, rects, skip, partial, mean, add_mean, x, count, wt, kh, kw, sh, sw, ph,
                pw, dh, dw, pre_kind, pre_slopes, post_kind, post_slopes, has_max, partner,
                nan_count, lo, hi):
    """Write the band results into the output, finishing every position in one pass.

    y: (N, Ho, Wo, C_out); bands: (G, rows, cols, C_out) = conv(act(x) with NaN -> 0) + bias
    over the output rectangles ``rects`` (G, 5) = (n, r0, r1, c0, c1) (inclusive; band g covers
    exactly rect g). Per position of a rectangle: NaN if skipped;
    else the band value, plus (``add_mean`` at partial positions) mean * (sum of the weights at
    the NaN entries of the window of ``act(x)``), rounded to y's dtype, then the post-activation
    (``post_kind``/``post_slopes``) and, with ``has_max``, ``maximum(value, partner)`` (partner
    (N, Ho, Wo, C_out)). y, bands and partner are C-contiguous, y overlapping neither; x: (N, H, W,
    C_in); count: (N, H, W) NaN entries per pixel of act(x); wt: (kH, kW, C_in + 1, C_out)
    weights, the last row their sum over C_in. ``nan_count`` (N, Ho, Wo) receives the output's
    NaN entries per position. Rectangle rows q = g * rows + k in [lo, hi) (every rectangle has
    ``rows`` rows). Runs of positions that need no fill are finished as one flat loop. Returns
    the number of infinite output entries.
    """
    rows, cols = bands.shape[1], bands.shape[2]
    ho, wo, cout = y.shape[1], y.shape[2], y.shape[3]
    cin, h, w = x.shape[3], x.shape[1], x.shape[2]
    yf, bf = y.reshape(-1), bands.reshape(-1)
    pf = partner.reshape(-1) if has_max else bf
    acc = np.zeros(cout, np.float64)
    filled = np.empty(cout, y.dtype)
    zero = np.zeros(1, y.dtype)[0]
    infs = 0
    for q in range(lo, hi):
        g = q // rows
        n, r0, c0, c1 = rects[g, 0], rects[g, 1], rects[g, 3], rects[g, 4]
        i = r0 + q % rows
        row_out = ((n * ho + i) * wo) * cout
        row_band = ((g * rows + i - r0) * cols - c0) * cout
        j = c0
        while j <= c1:
            if skip[n, i, j]:
                yf[row_out + j * cout : row_out + (j + 1) * cout] = np.nan
                nan_count[n, i, j] = cout
                j += 1
                continue
            if add_mean and partial[n, i, j]:
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
                            acc += wt[di, dj, cin]
                            continue
                        pixel = x[n, r, col]
                        for c in range(cin):
                            v = _act(pixel[c], pre_kind, pre_slopes[c])
                            if v != v:
                                acc += wt[di, dj, c]
                m = mean[n, i, j]
                src = bf[row_band + j * cout : row_band + (j + 1) * cout]
                for co in range(cout):
                    filled[co] = src[co] + m * acc[co]  # rounded to y's dtype, as unfused
                at = row_out + j * cout
                infs += _finish_run(filled, yf[at : at + cout], post_kind, post_slopes, has_max,
                                    pf[at : at + cout] if has_max else filled,
                                    nan_count[n, i, j : j + 1], zero, cout)
                j += 1
                continue
            end = j + 1
            while end <= c1 and not skip[n, i, end] and not (add_mean and partial[n, i, end]):
                end += 1
            at, size = row_out + j * cout, (end - j) * cout
            src = bf[row_band + j * cout : row_band + end * cout]
            infs += _finish_run(src, yf[at : at + size], post_kind, post_slopes, has_max,
                                pf[at : at + size] if has_max else src,
                                nan_count[n, i, j:end], zero, cout)
            j = end
    return infs


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def post_ops(src, out, post_kind, post_slopes, has_max, partner, nan_count, lo, hi):
    """out = (``has_max``) ``maximum(act(src), partner)``, all (N, H, W, C) C-contiguous and
    not overlapping; ``nan_count`` (N, H, W) receives the NaN entries per pixel. Rows
    q = n * H + r in [lo, hi). Returns the number of infinite entries."""
    h, w, c_ = src.shape[1], src.shape[2], src.shape[3]
    sf, of = src.reshape(-1), out.reshape(-1)
    pf = partner.reshape(-1) if has_max else sf
    zero = np.zeros(1, out.dtype)[0]
    infs = 0
    for q in range(lo, hi):
        n, r = q // h, q % h
        row = slice(q * w * c_, (q + 1) * w * c_)
        infs += _finish_run(sf[row], of[row], post_kind, post_slopes, has_max,
                            pf[row] if has_max else sf[row], nan_count[n, r], zero, c_)
    return infs


@njit(cache=True, nogil=True)
def noisy_max_partial(y, x, wt, bias, pn, pr, pc, noise, sigma, lowest, kh, kw, sh, sw, ph, pw,
                      dh, dw, count_padding):
    """Overwrite ``y`` (N, C_out, Ho, Wo) at the partially-NaN positions (pn, pr, pc) with the
    dot products of their windows filled the ``noisy_max`` way.

    x: (N, C_in, H, W); wt: (kH*kW, C_in, C_out); bias: (C_out,); noise: (P, C_in, kH*kW), one
    N(0, 1) draw per window entry in the reference's order. A NaN entry becomes m + sigma*noise,
    m the max of the window's numbers (padding zeros count with ``count_padding``); padding
    entries are 0. ``sigma`` and ``lowest`` (-inf) are scalars of x's dtype, so that the fill is
    computed in that precision, as the torch path does.
    """
    cin, h, w = x.shape[1], x.shape[2], x.shape[3]
    cout = wt.shape[2]
    zero = sigma - sigma
    for p in prange(pn.shape[0]):
        n, i, j = pn[p], pr[p], pc[p]
        peak = lowest
        for di in range(kh):
            r = i * sh - ph + di * dh
            for dj in range(kw):
                col = j * sw - pw + dj * dw
                if r < 0 or r >= h or col < 0 or col >= w:
                    if count_padding:
                        peak = max(peak, zero)
                    continue
                for c in range(cin):
                    v = x[n, c, r, col]
                    if v == v:
                        peak = max(peak, v)
        acc = bias.copy()
        for di in range(kh):
            r = i * sh - ph + di * dh
            for dj in range(kw):
                col = j * sw - pw + dj * dw
                if r < 0 or r >= h or col < 0 or col >= w:
                    continue  # padding entries are 0
                t = di * kw + dj
                for c in range(cin):
                    v = x[n, c, r, col]
                    if v != v:
                        v = peak + sigma * noise[p, c, t]
                    for co in range(cout):
                        acc[co] += v * wt[t, c, co]
        for co in range(cout):
            y[n, co, i, j] = acc[co]
