"""The numba kernels behind :mod:`nanprobe._mca_kernels` (imported lazily: compiling costs time):
SplitMix64 random words, the fused random-rounding passes, the padded float64 operand, and the
"flop" mode's noisy rounding and fused convolution."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._mca_kernels import NORMAL_SCALE, SPLITMIX_GAMMA, SPLITMIX_MUL


@njit(inline="always")
def _splitmix(key, idx):
    """Word ``idx`` of the SplitMix64 stream seeded with ``key`` (uint64 key, int index)."""
    z = key + np.uint64(idx + 1) * np.uint64(SPLITMIX_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(SPLITMIX_MUL[0])
    z = (z ^ (z >> np.uint64(27))) * np.uint64(SPLITMIX_MUL[1])
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def _element(q, b, c, index):
    """Outer coordinates (i, j, k) of row q of a 4-D view (a, b, c, w) walked in prange order,
    and the flat memory index of its first element (``index``: the view's element strides):
    element m of the row takes random word ``base + m * index[3]``."""
    k = q % c
    j = (q // c) % b
    i = q // (b * c)
    return i, j, k, i * index[0] + j * index[1] + k * index[2]


@njit(parallel=True, cache=True)
def splitmix_words(key, out):
    """out[i] = SplitMix64 output i of the stream seeded with ``key`` (uint64 arrays): the state
    ``key + (i + 1) * gamma`` mixed; counter-based, so any slice is computed independently."""
    n = out.shape[0]
    for chunk in prange((n + 4095) // 4096):
        for i in range(chunk * 4096, min(n, chunk * 4096 + 4096)):
            out[i] = _splitmix(key[0], i)


#: operations of the random-rounding kernels: the float64 value of an element of x
ROUND_COPY, ROUND_PRELU, ROUND_AFFINE = 0, 1, 2


def _random_round_kernel(op: int, mode: str):
    """The random-rounding kernel of one operation and mode (both compile-time constants: a
    branch on them inside the element loop halves its speed).

    ``kernel(x, p0, p1, p2, out_bits, halves, words, index, precision)`` computes a float64
    value per element of ``x`` and rounds it randomly to float32, exact values kept. The value
    (``op``): ``ROUND_COPY`` x itself (a float64 result); ``ROUND_PRELU``
    ``x if x > 0 else p0 * x``; ``ROUND_AFFINE`` ``(x - p0) * p1 + p2`` (inference batch
    norm). A float32 x is widened first, so these are exact or rounded once in float64.
    p0..p2: float64, 4-D, each axis of x's size or 1 (broadcast).

    Rounding, as ``MCAMode._round_block`` does it (identical bits): n = nearest float32,
    r = float32(value - n); where r != 0 and n is finite the other neighbour is n one ulp
    towards r (its bits one step up when n's sign matches r's, down otherwise; n = +-0 has r
    of its own sign). Element idx's random bits (``MCAMode._draws``), with ``halves`` the
    32-bit halves of the int64 ``words``, low half first: ``rr`` takes the other neighbour when
    bit ``idx % 32`` of ``halves[idx // 32]`` is set (bit ``idx % 64`` of word ``idx // 64``);
    ``sr`` when the 24-bit uniform ``(halves[idx] >> 8 & 0xFFFFFF) / 2**24`` is below
    ``r / (other - n)``; ``mca`` replaces an inexact value v by
    ``float32(v + (u - 1/2) * 2**(e - precision))``, ``v = m * 2**e`` with 1/2 <= |m| < 1 and
    the 53-bit uniform ``u = (words[idx] >> 11) / 2**53``. idx: the element's row-major index,
    ``i*index[0] + j*index[1] + k*index[2] + m*index[3]``.

    Arrays are 4-D with axes in memory order; ``out_bits`` is the float32 result seen as
    int32. Branch-free where the data decide: random branches mispredict half the time.
    """
    rr, sr = mode == "rr", mode == "sr"

    @njit(parallel=True, cache=True, error_model="numpy")
    def kernel(x, p0, p1, p2, out_bits, halves, words, index, precision):
        a, b, c, w = x.shape
        ba, bb, bc, bw = p0.shape[0] > 1, p0.shape[1] > 1, p0.shape[2] > 1, p0.shape[3] > 1
        s = index[3]
        exponent, magnitude = np.int32(0x7F800000), np.int32(0x7FFFFFFF)
        for q in prange(a * b * c):
            i, j, k, base = _element(q, b, c, index)
            for m in range(w):
                idx = base + m * s
                v = np.float64(x[i, j, k, m])
                if op == ROUND_PRELU:
                    scaled = p0[i * ba, j * bb, k * bc, m * bw] * v
                    v = v if v > 0 else scaled
                elif op == ROUND_AFFINE:
                    at = (i * ba, j * bb, k * bc, m * bw)
                    v = (v - p0[at]) * p1[at] + p2[at]
                n = np.float32(v)
                bits = n.view(np.int32)
                if not rr and not sr:  # mca: noise at the virtual precision
                    u = np.float64((words[idx] >> 11) & 0x1FFFFFFFFFFFFF) * 2.0**-53
                    scale = math.ldexp(1.0, math.frexp(v)[1] - precision)
                    noisy = np.float32(v + (u - 0.5) * scale)
                    out_bits[i, j, k, m] = noisy.view(np.int32) if v != n else bits
                    continue
                r = np.float32(v - np.float64(n))
                rbits = r.view(np.int32)
                inexact = ((rbits & magnitude) != 0) & ((bits & exponent) != exponent)
                step = np.int32(1) | ((bits ^ rbits) >> np.int32(31))  # +1 or -1
                if sr:
                    u = np.float32((halves[idx] >> 8) & 0xFFFFFF) * np.float32(2**-24)
                    take = np.int32(u < r / (np.int32(bits + step).view(np.float32) - n))
                else:
                    take = (halves[idx >> 5] >> np.int32(idx & 31)) & np.int32(1)
                out_bits[i, j, k, m] = bits + (step & -(take & np.int32(inexact)))

    return kernel


#: the random-rounding kernels by (operation, mode)
RANDOM_ROUND = {(op, mode): _random_round_kernel(op, mode)
                for op in (ROUND_COPY, ROUND_PRELU, ROUND_AFFINE) for mode in ("rr", "sr", "mca")}


@njit(parallel=True, cache=True)
def pad_transpose_f64(x, ph, pw, xp):
    """xp (C, N, H + 2ph, W + 2pw) float64 = x (N, C, H, W), any float dtype and strides,
    zero-padded by (ph, pw) and channel-major: the operand of a GEMM-per-tap convolution."""
    n_, c_, h, w = x.shape
    hp, wp = xp.shape[2], xp.shape[3]
    for q in prange(c_ * n_):
        c = q // n_
        n = q % n_
        for r in range(hp):
            rr = r - ph
            if rr < 0 or rr >= h:
                xp[c, n, r, :] = 0.0
                continue
            for col in range(pw):
                xp[c, n, r, col] = 0.0
            for col in range(w):
                xp[c, n, r, col + pw] = x[n, c, rr, col]
            for col in range(pw + w, wp):
                xp[c, n, r, col] = 0.0


# ------------------------------------------------------------------ "flop" mode (reductions)
@njit(inline="always")
def _ulp2(s):
    """Square of the float32 ulp at float64 ``s`` (its binade clamped to float32's normal
    range), 0.0 at 0: ``2**(2k - 46)``, ``k = floor(log2|s|)``, built from the bits."""
    k = ((np.float64(s).view(np.int64) >> np.int64(52)) & np.int64(0x7FF)) - np.int64(1023)
    k = min(max(k, np.int64(-126)), np.int64(127))
    sq = np.int64((np.int64(2) * k + np.int64(977)) << np.int64(52))  # exponent 2k - 46 + 1023
    return sq.view(np.float64) if s != 0.0 else 0.0


@njit(inline="always")
def _flop_value(s, v, word):
    """float32 of the reduction ``s`` (float64) with Gaussian-like noise of variance ``v``:
    ``s`` itself when it is exact in float32 (or NaN), else the nearest float32 of
    ``s + sqrt(v) * g``, ``g`` the Irwin-Hall(4) normal of the word's four 16-bit fields.
    Branch-free (both computed, one kept): the loops around it vectorise."""
    n = np.float32(s)
    f = ((word & np.uint64(0xFFFF)) + ((word >> np.uint64(16)) & np.uint64(0xFFFF))
         + ((word >> np.uint64(32)) & np.uint64(0xFFFF)) + (word >> np.uint64(48)))
    g = (np.float64(f) - 131070.0) * NORMAL_SCALE
    noisy = np.float32(s + math.sqrt(v) * g)
    return n if (np.float64(n) == s) | (s != s) else noisy


@njit(parallel=True, cache=True, error_model="numpy")
def flop_round_f32(s, v, out, index, key):
    """``out`` (float32) = :func:`_flop_value` of float64 ``s`` and variance ``v`` per element
    (4-D views in memory order, see ``_elementwise_views``); element idx takes SplitMix64 word
    idx of ``key``."""
    a, b, c, w = s.shape
    for q in prange(a * b * c):
        i, j, k, base = _element(q, b, c, index)
        for m in range(w):
            out[i, j, k, m] = _flop_value(s[i, j, k, m], v[i, j, k, m],
                                          _splitmix(key[0], base + m * index[3]))


#: output columns and output channels per task of :func:`conv_flop_f32` (its three
#: accumulator tiles, 8 KiB each, stay in L1)
FLOP_COLUMNS, FLOP_CHANNELS = 64, 16


@njit(parallel=True, cache=True, error_model="numpy")
def conv_flop_f32(xp, wt, bias, dh, dw, kw, block, key, out):
    """A stride-1 2-D convolution in "flop" mode, one fused pass (see ``nanprobe.mca``).

    ``xp`` (C, N, Hp, Wp) float64: the zero-padded input; ``wt`` (T, C, O) float64: the
    weights tap by tap (T = kh * kw, row-major); ``bias`` (O,) float64, the accumulators'
    start; ``out`` (N, O, Ho, Wo) float32, any strides. Each output sums its products in
    float64, kernel tap by tap and, within a tap, input channel by channel in blocks of
    ``block``; after each block its variance grows by ``n * (ulp2(S_before) + ulp2(S_after))
    / 8`` (n: the block's nonzero inputs), and the result is :func:`_flop_value` of the sum,
    with SplitMix64 word idx of ``key`` for row-major output idx. Tasks: one output row,
    :data:`FLOP_COLUMNS` columns and :data:`FLOP_CHANNELS` output channels."""
    c_, n_ = xp.shape[0], xp.shape[1]
    t_, o_ = wt.shape[0], wt.shape[2]
    ho, wo = out.shape[2], out.shape[3]
    width, depth = FLOP_COLUMNS, FLOP_CHANNELS
    blocks, tiles = (wo + width - 1) // width, (o_ + depth - 1) // depth
    for task in prange(n_ * ho * blocks * tiles):
        q0 = (task % blocks) * width
        o0 = ((task // blocks) % tiles) * depth
        r = (task // (blocks * tiles)) % ho
        n = task // (blocks * tiles * ho)
        m, d = min(width, wo - q0), min(depth, o_ - o0)
        acc = np.empty((depth, width))
        var = np.zeros((depth, width))
        ulp = np.empty((depth, width))
        cnt = np.empty(width)
        for o in range(d):
            u0 = _ulp2(bias[o0 + o])
            for q in range(m):
                acc[o, q] = bias[o0 + o]
                ulp[o, q] = u0
        for t in range(t_):
            row = r + (t // kw) * dh
            col = q0 + (t % kw) * dw
            for c0 in range(0, c_, block):
                for q in range(m):
                    cnt[q] = 0.0
                for c in range(c0, min(c_, c0 + block)):
                    x = xp[c, n, row, col:col + m]
                    for q in range(m):
                        cnt[q] += 1.0 if x[q] != 0.0 else 0.0
                    for o in range(d):
                        w = wt[t, c, o0 + o]
                        for q in range(m):
                            acc[o, q] += w * x[q]
                for o in range(d):
                    for q in range(m):
                        u = _ulp2(acc[o, q])
                        var[o, q] += cnt[q] * (ulp[o, q] + u)
                        ulp[o, q] = u
        k = key[0]
        for o in range(d):
            base = ((n * o_ + o0 + o) * ho + r) * wo + q0
            for q in range(m):
                out[n, o0 + o, r, q0 + q] = _flop_value(acc[o, q], var[o, q] * 0.125,
                                                        _splitmix(k, base + q))
