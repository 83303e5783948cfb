"""Fused CPU passes of the in-process MCA backend (numba): random words, random rounding of
float64 results (plain, PReLU, inference batch norm) to float32, the padded float64 operand of
its convolution, and the "flop" mode's convolution and noisy rounding. The same bits come from
torch ops where the kernels do not apply (:func:`splitmix_words_torch`,
:func:`flop_round_torch`; ``MCAMode._round_block``). Kernels compile on first use and are
cached on disk by numba; availability and threading follow :mod:`nanprobe.ops._kernels`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .ops._kernels import _run

#: SplitMix64 (Steele, Lea and Flood 2014): the Weyl increment and the two mixing multipliers
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_MUL = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
#: "flop" mode's normal draw: the sum of a word's four 16-bit fields (Irwin-Hall, n = 4) minus
#: its mean 131070, times this (sqrt(3) / 2**16): unit variance, bounded by +-2**0.5 * 3**0.5 * 2
NORMAL_SCALE = math.sqrt(3.0) / 65536.0


def _compiled():
    """The compiled kernel module (imported on first use)."""
    from . import _mca_numba

    return _mca_numba


def _elementwise_views(like: torch.Tensor, *tensors: torch.Tensor) -> tuple[np.ndarray, ...]:
    """4-D NumPy views of ``tensors`` (as many axes as ``like``, at most 4, each of ``like``'s
    size or 1) with their axes in ``like``'s memory order, and the row-major index strides of
    the original order, permuted the same way: kernels then walk memory in order but number
    elements logically."""
    lead = (None,) * (4 - like.dim())
    shape4, strides = like[lead].shape, like[lead].stride()
    index = [1, shape4[3], shape4[2] * shape4[3], shape4[1] * shape4[2] * shape4[3]][::-1]
    order = sorted(range(4), key=lambda d: (-strides[d], d))  # largest stride first
    views = tuple(t[lead].permute(order).numpy() for t in tensors)
    return (*views, np.array([index[d] for d in order], np.int64))


def splitmix_words(key: int, count: int) -> torch.Tensor:
    """``count`` int64 words of the SplitMix64 stream seeded with ``key`` (see
    :func:`splitmix_words_torch`, which gives the same bits)."""
    out = torch.empty(count, dtype=torch.int64)
    _run(_compiled().splitmix_words, np.array([key], np.int64).view(np.uint64),
         out.numpy().view(np.uint64))
    return out


def splitmix_words_torch(key: int, count: int, device: torch.device | str) -> torch.Tensor:
    """The same words as :func:`splitmix_words` from int64 torch ops (any device): products
    wrap modulo 2**64 as the unsigned ones do, and logical right shifts are arithmetic ones
    masked to the bits that remain."""
    def signed(v: int) -> int:
        return v - (1 << 64) if v >= 1 << 63 else v

    def shr(z: torch.Tensor, k: int) -> torch.Tensor:
        return (z >> k) & ((1 << (64 - k)) - 1)

    gamma, (m1, m2) = signed(SPLITMIX_GAMMA), (signed(v) for v in SPLITMIX_MUL)
    z = torch.arange(1, count + 1, dtype=torch.int64, device=device).mul_(gamma).add_(key)
    z = (z ^ shr(z, 30)).mul_(m1)
    z = (z ^ shr(z, 27)).mul_(m2)
    return z ^ shr(z, 31)


def _random_round(op: int, x: torch.Tensor, params: tuple[torch.Tensor, ...], out: torch.Tensor,
                  draws: torch.Tensor, mode: str, precision: int) -> None:
    """Run the random-rounding kernel of ``op`` and ``mode`` on ``x`` (parameters cast to
    float64 and broadcast to x's dimensions) into float32 ``out``."""
    jit = _compiled()
    lead = (1,) * (x.dim() - max((t.dim() for t in params), default=0))
    params = tuple(t.detach().to(torch.float64).reshape(lead + tuple(t.shape)) for t in params)
    views = _elementwise_views(x, x.detach(), *params, out.view(torch.int32))
    src, p4, dst_bits, index = views[0], views[1:-2], views[-2], views[-1]
    p4 = [np.ascontiguousarray(t) for t in p4]
    p4 += [np.zeros((1, 1, 1, 1))] * (3 - len(p4))
    words = draws.numpy()
    _run(jit.RANDOM_ROUND[op, mode], src, *p4, dst_bits, words.view(np.int32), words, index,
         precision)


def random_round_f32(y: torch.Tensor, out: torch.Tensor, draws: torch.Tensor, mode: str,
                     precision: int) -> None:
    """Round float64 ``y`` into float32 ``out`` (same shape, at most 4-D) like the in-process
    MCA backend's ``mode`` ("rr", "sr" or "mca" at virtual ``precision``), in one pass.
    ``draws``: int64 words of random bits (``MCAMode._draws``)."""
    _random_round(_compiled().ROUND_COPY, y, (), out, draws, mode, precision)


def prelu_round_f32(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                    draws: torch.Tensor, mode: str, precision: int) -> None:
    """PReLU of float32 ``x`` (at most 4-D; ``weight`` broadcastable to it) computed exactly
    and randomly rounded into ``out`` like :func:`random_round_f32`, in one pass."""
    _random_round(_compiled().ROUND_PRELU, x, (weight,), out, draws, mode, precision)


def batch_norm_round_f32(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                         shift: torch.Tensor, out: torch.Tensor, draws: torch.Tensor,
                         mode: str, precision: int) -> None:
    """``(x - mean) * scale + shift`` of float32 ``x`` (at most 4-D) computed in float64 from
    float64 parameters broadcastable to it, randomly rounded into ``out`` like
    :func:`random_round_f32`, in one pass."""
    _random_round(_compiled().ROUND_AFFINE, x, (mean, scale, shift), out, draws, mode,
                  precision)


def pad_transpose_f64(x: torch.Tensor, padding: tuple[int, int], out: torch.Tensor) -> None:
    """``out`` (C, N, H + 2ph, W + 2pw) float64 = (N, C, H, W) ``x``, zero-padded, in one
    pass."""
    _run(_compiled().pad_transpose_f64, x.detach().numpy(), *padding, out.numpy())


def ulp2_torch(s: torch.Tensor) -> torch.Tensor:
    """Square of the float32 ulp at each float64 ``s`` (binade clamped to float32's normal
    range), 0 at 0; the numba kernels' ``_ulp2``."""
    exponent = torch.frexp(s).exponent.clamp_(-125, 128)  # s = m * 2**e, 1/2 <= |m| < 1
    return torch.where(s == 0, 0.0, torch.ldexp(torch.ones_like(s), 2 * exponent - 48))


def flop_round_torch(s: torch.Tensor, v: torch.Tensor, key: int) -> torch.Tensor:
    """float32 of float64 reductions ``s`` with noise of variance ``v`` (same shape): ``s``
    where exact in float32 (or NaN), else the nearest float32 of ``s + sqrt(v) * g``, ``g`` the
    Irwin-Hall(4) normal of SplitMix64 word i of ``key`` for row-major element i (torch ops,
    any device; :func:`flop_round_f32` gives the same bits)."""
    words = splitmix_words_torch(key, s.numel(), s.device).view(s.shape)
    f = sum((words >> k) & 0xFFFF for k in (0, 16, 32, 48))
    g = (f.to(torch.float64) - 131070.0).mul_(NORMAL_SCALE)
    n = s.to(torch.float32)
    exact = (n.to(torch.float64) == s) | torch.isnan(s)
    return torch.where(exact, n, (s + torch.sqrt(v) * g).to(torch.float32))


def flop_round_f32(s: torch.Tensor, v: torch.Tensor, out: torch.Tensor, key: int) -> None:
    """:func:`flop_round_torch` of ``s`` and ``v`` (float64, at most 4-D, same shape) into
    float32 ``out`` (same shape, any strides) in one pass."""
    views = _elementwise_views(out, s, v, out)
    _run(_compiled().flop_round_f32, *views, np.array([key], np.int64).view(np.uint64))


def conv_flop_f32(xp: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor,
                  dilation: tuple[int, int], kw: int, block: int, key: int,
                  out: torch.Tensor) -> None:
    """A stride-1 2-D convolution in "flop" mode in one fused pass (``_mca_numba.conv_flop_f32``):
    ``xp`` the zero-padded (C, N, Hp, Wp) float64 input, ``taps`` (kh * kw, C, O) float64,
    ``bias`` (O,) float64, ``out`` (N, O, Ho, Wo) float32."""
    _run(_compiled().conv_flop_f32, xp.numpy(), taps.numpy(), bias.numpy(), *dilation, kw,
         block, np.array([key], np.int64).view(np.uint64), out.numpy())
