"""The numba kernels behind :mod:`nanprobe._mca_kernels` (imported lazily: compiling costs time):
SplitMix64 random words, the fused random-rounding passes, the padded float64 operand."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._mca_kernels import NORMAL_SCALE, SPLITMIX_GAMMA, SPLITMIX_MUL


@njit(parallel=True, cache=True)
def splitmix_words(key, out):
    """out[i] = SplitMix64 output i of the stream seeded with ``key`` (uint64 arrays): the state
    ``key + (i + 1) * gamma`` mixed; counter-based, so any slice is computed independently."""
    gamma = np.uint64(SPLITMIX_GAMMA)
    m1, m2 = np.uint64(SPLITMIX_MUL[0]), np.uint64(SPLITMIX_MUL[1])
    s30, s27, s31 = np.uint64(30), np.uint64(27), np.uint64(31)
    n = out.shape[0]
    for chunk in prange((n + 4095) // 4096):
        for i in range(chunk * 4096, min(n, chunk * 4096 + 4096)):
            z = key[0] + np.uint64(i + 1) * gamma
            z = (z ^ (z >> s30)) * m1
            z = (z ^ (z >> s27)) * m2
            out[i] = z ^ (z >> s31)


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
            k = q % c
            j = (q // c) % b
            i = q // (b * c)
            base = i * index[0] + j * index[1] + k * index[2]
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
def _splitmix(key, idx):
    """Word ``idx`` of the SplitMix64 stream seeded with ``key`` (uint64 key, int index)."""
    z = key + np.uint64(idx + 1) * np.uint64(SPLITMIX_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(SPLITMIX_MUL[0])
    z = (z ^ (z >> np.uint64(27))) * np.uint64(SPLITMIX_MUL[1])
    return z ^ (z >> np.uint64(31))


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
    ``s + sqrt(v) * g``, ``g`` the Irwin-Hall(4) normal of the word's four 16-bit fields."""
    n = np.float32(s)
    if np.float64(n) == s or s != s:
        return n
    f = ((word & np.uint64(0xFFFF)) + ((word >> np.uint64(16)) & np.uint64(0xFFFF))
         + ((word >> np.uint64(32)) & np.uint64(0xFFFF)) + (word >> np.uint64(48)))
    g = (np.float64(f) - 131070.0) * NORMAL_SCALE
    return np.float32(s + math.sqrt(v) * g)


@njit(parallel=True, cache=True, error_model="numpy")
def flop_round_f32(s, v, out, index, key):
    """``out`` (float32) = :func:`_flop_value` of float64 ``s`` and variance ``v`` per element
    (4-D views in memory order, see ``_elementwise_views``); element idx takes SplitMix64 word
    idx of ``key``."""
    a, b, c, w = s.shape
    for q in prange(a * b * c):
        k = q % c
        j = (q // c) % b
        i = q // (b * c)
        base = i * index[0] + j * index[1] + k * index[2]
        for m in range(w):
            out[i, j, k, m] = _flop_value(s[i, j, k, m], v[i, j, k, m],
                                          _splitmix(key[0], base + m * index[3]))


@njit(parallel=True, cache=True, error_model="numpy")
def conv_flop_f32(parts, bias, counts, rows, offs, lo, plane, wp, key, out):
    """Finish output columns ``lo .. lo + m`` of a GEMM-per-tap convolution in "flop" mode.

    ``parts`` (P, O, m) float64: the reduction's chunks (kernel tap x channel block) in
    accumulation order, each summed exactly; ``bias`` (O,) float64, the accumulator's start.
    Part p adds ``counts[rows[p], lo + offs[p] + q]`` products to output column q (its
    nonzero input channels). Per output, the partial sums S_p are accumulated in float64 and
    the variance of the per-FMA random roundings estimated as
    ``sum_p n_p * mean(ulp2(S_{p-1}), ulp2(S_p), ulp2(mid)) / 4``; the result is rounded by
    :func:`_flop_value` into ``out[b, o, r, c]`` (float32, N x O x Ho x Wo, any strides), column
    ``q`` being flat position ``b * plane + r * wp + c`` (columns with r >= Ho or c >= Wo are
    skipped). Draw index: the row-major output index."""
    p_, o_, m = parts.shape
    ho, wo = out.shape[2], out.shape[3]
    for i in prange(o_):
        s = np.empty(m)
        v = np.zeros(m)
        for q in range(m):
            s[q] = bias[i]
        for p in range(p_):
            row = rows[p]
            off = lo + offs[p]
            for q in range(m):
                a = s[q]
                z = a + parts[p, i, q]
                v[q] += counts[row, off + q] * (_ulp2(a) + _ulp2(z) + _ulp2(0.5 * (a + z)))
                s[q] = z
        for q in range(m):
            col = lo + q
            bb = col // plane
            rem = col - bb * plane
            r = rem // wp
            c = rem - r * wp
            if r < ho and c < wo:
                idx = ((bb * o_ + i) * ho + r) * wo + c
                out[bb, i, r, c] = _flop_value(s[q], v[q] * (1.0 / 12.0), _splitmix(key[0], idx))
