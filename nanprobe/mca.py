"""In-process Monte Carlo Arithmetic: random rounding of every aten op result, Verrou-style.

``with mca_mode("rr", seed=s): model(x)`` runs a forward whose floating-point op results are
randomly rounded: the fast embedded stand-in for Verrou (a Valgrind tool, 500-900x slower). It is
a :class:`~torch.utils._python_dispatch.TorchDispatchMode`, so it sees every aten op below
autograd, whatever the model's Python code looks like.

How one op is perturbed (float32, float16 and bfloat16 results):

1. The op is recomputed in float64 from its inputs, cast up exactly (Python float scalars and
   higher-precision inputs are first rounded to the working dtype, as the op itself sees them).
   The working-precision result is not computed at all. 2-D stride-1 convolutions on CPU use a
   GEMM-per-kernel-tap float64 convolution (PyTorch's own float64 CPU one is ~15x slower than
   float32). Inference batch norm is ``(x - mean) * (weight / sqrt(var + eps)) + bias``.
2. Per element, the float64 result ``y`` is **exact** when it is representable in the working
   dtype, and is then returned as it is. Verrou never rounds an exact operation either, and that
   decides where pooling ties survive: a convolution of an exactly-zero background plus bias is
   exact, so its max-pool windows stay tied in every sample.
3. An inexact ``y`` is rounded to one of its two neighbours in the working dtype:

   - ``"rr"`` (:func:`mca_mode`'s default; runs default to ``"flop"``): each with probability
     1/2, like Verrou ``--rounding-mode=random``;
   - ``"sr"``: stochastic rounding, the farther neighbour with probability
     ``|y - nearest| / ulp``, like Verrou ``nearness`` (unbiased: the expected result is ``y``);
   - ``"mca"``: verificarlo's random-rounding noise at virtual precision ``t`` (``precision``),
     ``round_to_nearest(y + 2**(floor(log2|y|) + 1 - t) * xi)`` with ``xi ~ U(-1/2, 1/2)``,
     computed in float64; ``t = 24`` is about one float32 ulp, smaller ``t`` is larger noise
     (use ``t <= 11`` for float16, ``t <= 8`` for bfloat16, or the noise rounds away);
   - ``"flop"``: Verrou ``--rounding-mode=random`` on every FLOP, float32 convolutions and
     matrix products carrying the noise of all their rounded FMAs (see **Reductions**); other
     results as in ``"rr"``.

   Edge cases: results that overflow the working dtype stay ``±inf``; NaN stays NaN; inexact
   results whose residual ``y - nearest`` underflows float32 (``|y|`` below about 1e-29) are
   rounded to nearest.

Ops whose results are selections or copies of their inputs (views, max / max pooling, max
unpooling, relu / clamp, ``maximum``, ``cat``, indexing, ``where``, padding, nearest upsampling,
comparisons, ...) are exact by nature and run natively, without the float64 recompute; so do ops
without floating-point tensor inputs (factories, integer ops) and random ops (``rand``, dropout).
Integer and bool results (pooling indices, masks) are never perturbed. Conversions to a lower
precision (``.float()`` of a float64 tensor, ``copy_`` into one) are randomly rounded like any op.
In-place and ``out=`` ops are recomputed on float64 copies, rounded and written back into the
original tensors, so aliasing is kept. An op whose float64 recompute fails (but which runs
natively) passes through unperturbed, with a one-time warning.

**Granularity.** ``"rr"``, ``"sr"`` and ``"mca"`` round once per op *result*, not once per
FLOP inside a GEMM or a convolution as Verrou does: a convolution's output carries at most one
ulp of noise around its float64 value, where under Verrou the K rounded FMAs of each output
drift by about ``sqrt(K)`` ulps of their partial sums. They underestimate the noise of long
reductions (against Verrou on the default U-Net, ``"rr"`` finds half of the deepest pooling
layer's unstable windows). Samples scatter around the float64 value of each op, not around
PyTorch's float32 result (which differs from it by its own accumulation error, the same in
every sample).

**Reductions ("flop" mode).** Float32 convolutions (any dimension, stride, dilation, groups;
transposed too) and matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``) are summed in
float64 in chunks, in the order oneDNN and MKL accumulate: bias (``beta * input``) first, then
per kernel tap, blocks of at most :data:`FLOP_BLOCK` input channels, at least
:data:`FLOP_MIN_CHUNKS` chunks in all (the inner dimension of a matrix product likewise).
Verrou rounds each FMA ``S = acc + w * x`` whose exact result is not a float32 up or down with
probability 1/2: an error of variance ``ulp(S)**2 / 4`` whatever S's position between its
neighbours. The K errors of an output add up to a random walk, modelled as one normal draw
(Irwin-Hall of four 16-bit uniforms) of variance ``sum_p n_p * (ulp2(S_{p-1}) + ulp2(S_p)) / 8``
over the chunks p, ``S_p`` the partial sum after chunk p and ``n_p`` its products with a nonzero
input (``acc + 0 * w`` is exact; zero weights are counted). The result is the nearest float32
of the float64 sum plus that noise, or the sum itself when it is exact (a zero background plus
bias stays exact, and its pooling ties survive). Against an exact emulation of per-FMA random
rounding (``tests/test_mca_flop.py``) the spread per output is within about 15 %; over every
convolution output of the default U-Net the estimate's standard deviation is 0.90-1.11 times
the exact per-FMA one (10th-90th percentile; ``benchmarks/bench_mca_fidelity.py --part
model``). Verrou's per-FMA errors also have a mean, ``(1/2 - f) ulp`` for an exact result a
fraction f of an ulp above its lower neighbour; while the partial sums of fixed data are not yet
randomised, these add up to an offset of the size of float32's own rounding error, the same in
every sample. The model leaves it out: its samples centre on the exact value. Other reductions
(``sum``, ``mean``, norms, ``mv``, ``dot``) and ``out=`` / in-place products are rounded once,
as in ``"rr"``; so are float16 / bfloat16 products (CPU kernels accumulate them in float32 and
round once) and float64 ones (no wider format to recompute in).

**float64 models.** No wider dtype is available to recompute in, so exactness is unknown.
Decision: an element representable in float32 is taken as exact (zeros, copied biases, integers,
any float32-valued data such as a float32 model cast to float64; an inexact result lands there
with probability about ``2**-29``). Every other element of an op outside the exact list is
treated as the nearest rounding of an unknown value uniform within half an ulp: ``"rr"`` moves it
one ulp down or up with probability 1/4 each, ``"sr"`` 1/8 each (their rates under that model),
``"mca"`` adds the noise above.

**Reproducibility.** Random draws come from the mode's own ``torch.Generator`` (one per device,
seeded with ``seed``), never the global RNG, in op order: each rounded result takes one draw,
the key of a SplitMix64 stream of 64-bit words that holds its random bits (``rr``: one bit per
element, ``sr``: 32, of which the top 24 make its uniform, ``mca``: 64, of which the top 53
do; a ``"flop"`` reduction: 64, the four 16-bit fields of its normal). A given model, input
and seed give a bit-identical sample (on one machine and thread count: float64 GEMMs may sum in
another order elsewhere). The stream continues across ``with`` blocks of one mode object (each
forward gets fresh noise); build a new mode with the same seed to replay. Version 0.4.0 reads
the words differently from 0.3.0 (``MCAMode._draws``), which drew differently from earlier
versions: the same seed gives other, equally valid samples.

**Cost.** Each perturbed result costs a float64 recompute plus the rounding: for float32
results in ``"rr"``, ``"sr"`` and ``"flop"`` one fused pass on CPU (:mod:`nanprobe._mca_kernels`,
bit-identical to the torch ops used elsewhere; PReLU and inference batch norm are even computed
in that pass, and a ``"flop"`` convolution is computed, its variance estimated and rounded in
one), otherwise about ten elementwise passes run block by block in cache. On 2 CPU threads a
forward of FastSurferVINN (16 filters, eval, no_grad) on four 256x256 slices takes 2.9-3.7x its
plain time in ``"rr"`` (3.6-3.8x when the plain forward pays no page faults on fresh outputs),
3.5-4.2x in ``"sr"``, 3.7-4.9x in ``"flop"`` and 7-11x in ``"mca"`` (docs/verrou.md); most of
it is the float64 convolution. ``"flop"``'s fused convolution costs about 1.5x ``"rr"``'s
(GEMMs per tap) at 16 channels, 2.3x at 71.
"""

from __future__ import annotations

import itertools
import math
import operator
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import _mca_kernels
from .ops import _kernels
from .ops._scratch import scratch

__all__ = ["MODES", "MCAMode", "mca_mode"]

MODES: tuple[str, ...] = ("rr", "sr", "mca", "flop")
_MAX_PRECISION = 52  # float64 has 53 significant bits; t must leave room for the noise

_F64 = torch.float64
_LOW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# 2**(53 - significand bits + 1): a float64 residual is at least 2**-(53 - p) ulp of the p-bit
# neighbour, so n + STEP * d lands at least two ulps away, on the residual's side.
_STEP = {torch.float32: 2.0**30, torch.float16: 2.0**43, torch.bfloat16: 2.0**46}
# draws per random int64 word: bits (rr), 32-bit halves (sr), the word (mca)
_PER_WORD = {"rr": 64, "sr": 2, "mca": 1}
_BLOCK = 1 << 17  # elements rounded at a time: its ~10 passes then run in cache (2x faster)

# Ops whose floating-point results are selections / copies / exact transformations of their
# inputs. Names without the in-place trailing underscore; matched on the schema name.
_EXACT_OPS = frozenset(
    """
    abs absolute adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d alias all amax amin
    aminmax any argmax argmin argsort as_strided_scatter bitwise_and bitwise_not bitwise_or
    bitwise_xor cat ceil channel_shuffle clamp clamp_max clamp_min clip clone concat concatenate
    constant_pad_nd contiguous copysign count_nonzero cummax cummin detach_copy diag diag_embed
    diagonal_copy diagonal_scatter embedding empty empty_like empty_strided eq equal expand_copy
    fill fix flip fliplr flipud floor fmax fmin frac fractional_max_pool2d fractional_max_pool3d
    full full_like gather ge gt hardtanh im2col index index_copy index_fill index_select
    is_nonzero isfinite isin isinf isnan isneginf isposinf kthvalue le lift_fresh_copy
    _local_scalar_dense logical_and logical_not logical_or logical_xor lt masked_fill
    masked_scatter masked_select max max_pool1d max_pool1d_with_indices max_pool2d
    max_pool2d_with_indices max_pool3d max_pool3d_with_indices max_unpool2d max_unpool3d maximum
    median min minimum mode msort nan_to_num nanmedian narrow_copy ne neg negative new_empty
    new_empty_strided new_full new_ones new_zeros nonzero ones ones_like permute_copy
    pixel_shuffle pixel_unshuffle positive reflection_pad1d reflection_pad2d reflection_pad3d
    relu relu6 repeat replication_pad1d replication_pad2d replication_pad3d _reshape_copy roll
    rot90 round scalar_tensor scatter select_copy select_scatter sgn sign signbit slice_copy
    slice_scatter sort split_copy split_with_sizes_copy squeeze_copy stack t_copy take
    take_along_dim threshold topk transpose_copy tril triu trunc unbind_copy unfold_copy
    _unique2 unique_consecutive unique_dim _unsafe_view unsqueeze_copy upsample_nearest1d
    upsample_nearest2d upsample_nearest3d _upsample_nearest_exact1d _upsample_nearest_exact2d
    _upsample_nearest_exact3d view_copy where zero zeros zeros_like
    """.split()
)
# Overloads of exact ops that do arithmetic (round(x, decimals), scatter with a reduction).
_INEXACT_OVERLOADS = frozenset({("round", "decimals"), ("scatter", "reduce"),
                                ("scatter", "value_reduce"), ("scatter", "reduce_out"),
                                ("scatter", "value_reduce_out")})
# In-place metadata / storage changes: never recomputed.
_METADATA_OPS = frozenset({"set", "resize", "resize_as", "_resize_output", "record_stream"})
_CONVERSIONS = frozenset({"_to_copy", "copy"})
# Their schemas do not say so, but in training they update running_mean / running_var (args 3, 4).
_LEGACY_BATCH_NORMS = frozenset({"aten::native_batch_norm", "aten::cudnn_batch_norm",
                                 "aten::miopen_batch_norm"})
_CONVOLUTION = torch.ops.aten.convolution.default
_PRELU = torch.ops.aten._prelu_kernel.default
_BATCH_NORM = torch.ops.aten.native_batch_norm.default


@dataclass(frozen=True)
class _Plan:
    """How the mode treats one op overload (computed once per overload)."""

    kind: str  # "native", "generic", "convert" or "index_put"
    writes: tuple[int | str, ...] = ()  # positions (inputs) / names (kwarg-only outs) written
    ret_alias: tuple[int | None, ...] = ()  # per return: index into ``writes`` it aliases


_PLANS: dict[Any, _Plan] = {}
_WARNED: set[str] = set()


def _plan(func: Any) -> _Plan:
    """The cached plan of one op overload."""
    plan = _PLANS.get(func)
    if plan is None:
        plan = _PLANS[func] = _make_plan(func)
    return plan


def _make_plan(func: Any) -> _Plan:
    """Native (exact by nature, views, random, no tensor result), conversion or generic."""
    schema = func._schema
    base = schema.name.split("::")[-1]
    base = base[:-1] if base.endswith("_") and not base.endswith("__") else base
    if (torch.Tag.nondeterministic_seeded in func.tags or torch.Tag.inplace_view in func.tags
            or base in _METADATA_OPS):
        return _Plan("native")
    write_args = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if not write_args and not any("Tensor" in str(r.type) for r in schema.returns):
        return _Plan("native")  # no tensor result
    if not write_args and any(r.alias_info is not None for r in schema.returns):
        return _Plan("native")  # a view
    if base in ("index_put", "_index_put_impl"):
        return _generic_plan(func, "index_put")  # exact unless accumulate=True
    if base in _EXACT_OPS and (base, func._overloadname) not in _INEXACT_OVERLOADS:
        return _Plan("native")
    if base in _CONVERSIONS:
        return _Plan("convert")
    return _generic_plan(func)


def _generic_plan(func: Any, kind: str = "generic") -> _Plan:
    """Plan of an op recomputed in float64: which arguments it writes, which returns alias them."""
    schema = func._schema
    write_args = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    positional = [a.name for a in schema.arguments if not a.kwarg_only]
    writes: list[int | str] = []
    if schema.name in _LEGACY_BATCH_NORMS and not write_args:  # update running stats in training
        return _Plan(kind, (3, 4), tuple(None for _ in schema.returns))
    for a in write_args:
        if a.kwarg_only:
            writes.append(a.name)
        else:
            writes.append(positional.index(a.name))
    ret_alias: list[int | None] = []
    for r in schema.returns:
        match = None
        if r.alias_info is not None:
            for i, a in enumerate(write_args):
                if a.alias_info.before_set & r.alias_info.before_set:
                    match = i
        ret_alias.append(match)
    return _Plan(kind, tuple(writes), tuple(ret_alias))


def _round_scalar(x: float, dtype: torch.dtype) -> float:
    """Python float ``x`` rounded to nearest in ``dtype`` (as an op in ``dtype`` would see it)."""
    if dtype == torch.float32 or dtype == torch.float16:
        try:
            return struct.unpack("f" if dtype == torch.float32 else "e",
                                 struct.pack("f" if dtype == torch.float32 else "e", x))[0]
        except OverflowError:
            return float("inf") if x > 0 else float("-inf")
    return torch.tensor(x, dtype=dtype).item()


def _tensors(x: Any) -> list[Tensor]:
    """``x`` if a tensor, the tensors of ``x`` if a list or tuple, else none."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for t in x if isinstance(t, Tensor)]
    return []


def _blocks(shape: torch.Size) -> list[tuple]:
    """Indices cutting a tensor of ``shape`` into blocks of at most :data:`_BLOCK` elements."""
    if math.prod(shape) <= _BLOCK:
        return [(...,)]
    k, inner = len(shape), 1
    while k > 0 and inner * shape[k - 1] <= _BLOCK:  # dims k.. fit in one block
        k -= 1
        inner *= shape[k]
    run = max(1, _BLOCK // inner)  # dim k - 1 is cut in runs of this length
    return [(*outer, slice(i, i + run)) for outer in itertools.product(*map(range, shape[:k - 1]))
            for i in range(0, shape[k - 1], run)]


def _promote(floats: list[Tensor]) -> torch.dtype:
    """PyTorch's result dtype of some float tensors (0-dim ones only count when all are 0-dim)."""
    dims = [t for t in floats if t.dim() > 0] or floats
    dtype = dims[0].dtype
    for t in dims[1:]:
        if t.dtype != dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


#: ``_conv64`` applies all kernel taps to one chunk of output columns of about this many bytes
#: before the next (1.2-1.5x faster than tap by tap over the whole output, measured here)
CONV64_CHUNK_BYTES = 16 << 20
CONV64_MIN_CHUNK = 8192


def _padded64(x: Tensor, ph: int, pw: int) -> Tensor:
    """(C, N, H + 2ph, W + 2pw) float64 scratch copy of (N, C, H, W) ``x``, zero-padded: the
    operand of a GEMM-per-tap convolution (valid until the next call on this thread)."""
    n, c, h, wd = x.shape
    xp = scratch("mca_conv_input", (c, n, h + 2 * ph, wd + 2 * pw), _F64)
    if _kernels.enabled(x):  # upcast, pad and transpose in one pass
        _mca_kernels.pad_transpose_f64(x, (ph, pw), xp)
    else:
        if ph or pw:  # zero only the border
            xp[:, :, :ph].zero_()
            xp[:, :, ph + h:].zero_()
            xp[:, :, ph:ph + h, :pw].zero_()
            xp[:, :, ph:ph + h, pw + wd:].zero_()
        xp[:, :, ph:ph + h, pw:pw + wd].copy_(x.transpose(0, 1))
    return xp


@dataclass(frozen=True)
class _Grid:
    """Geometry of a 2-D stride-1 convolution computed as one GEMM per tap on the zero-padded,
    channel-major input flattened to (C, N * Hp * Wp): output (b, o, r, q) is flat column
    ``b * plane + r * wp + q``, and tap (i, j) reads its input ``i * dh * wp + j * dw`` further."""

    n: int
    c: int
    o: int
    kh: int
    kw: int
    ph: int
    pw: int
    dh: int
    dw: int
    hp: int
    wp: int
    ho: int
    wo: int

    @property
    def plane(self) -> int:
        return self.hp * self.wp

    @property
    def cols(self) -> int:
        """Flat columns whose taps are all in range (the outputs and some padding rows)."""
        return self.n * self.plane - self.dh * (self.kh - 1) * self.wp - self.dw * (self.kw - 1)

    def offset(self, i: int, j: int) -> int:
        return i * self.dh * self.wp + j * self.dw


def _grid(x: Tensor, w: Tensor, b: Tensor | None, stride: list[int], padding: list[int],
          dilation: list[int], transposed: bool, groups: int) -> _Grid | None:
    """The :class:`_Grid` of a CPU 2-D convolution, or None where GEMM-per-tap does not apply
    (strided, transposed, grouped, not 2-D, not CPU, empty, or arguments aten refuses)."""
    if (transposed or groups != 1 or x.dim() != 4 or w.dim() != 4 or x.device.type != "cpu"
            or any(s != 1 for s in stride) or x.numel() == 0):
        return None
    (n, c, h, wd), (o, wc, kh, kw) = x.shape, w.shape
    if wc != c or (b is not None and b.shape != (o,)):
        return None  # let aten raise its own error
    (ph, pw), (dh, dw) = padding, dilation
    hp, wp = h + 2 * ph, wd + 2 * pw
    ho, wo = hp - dh * (kh - 1), wp - dw * (kw - 1)
    if ho <= 0 or wo <= 0:
        return None
    return _Grid(n, c, o, kh, kw, ph, pw, dh, dw, hp, wp, ho, wo)


def _conv64(x: Tensor, w: Tensor, b: Tensor | None, stride: list[int], padding: list[int],
            dilation: list[int], transposed: bool, groups: int) -> Tensor | None:
    """Float64 2-D convolution as one GEMM per kernel tap on a zero-padded copy of ``x``.

    ``x``, ``w``, ``b`` may be of the working dtype (they are cast up exactly here).

    PyTorch's own float64 CPU convolution (im2col) is ~15x slower than its float32 one; this is
    1-2.5x (measured here), taps applied chunk by chunk of output columns while the chunk is in
    cache. Returns None where it does not apply (see :func:`_grid`).
    The padded copy and the result live in per-thread scratch buffers (no page faults): the
    result is valid until the next call on this thread.
    """
    g = _grid(x, w, b, stride, padding, dilation, transposed, groups)
    if g is None:
        return None
    flat = _padded64(x, g.ph, g.pw).view(g.c, -1)
    cols = g.cols
    taps = w.to(_F64).permute(2, 3, 0, 1).contiguous()  # (kh, kw, o, c)
    out = scratch("mca_conv_output", (g.o, cols), _F64)
    bias = None if b is None else b.to(_F64)[:, None]
    step = max(CONV64_MIN_CHUNK, CONV64_CHUNK_BYTES // (8 * g.o))
    for lo in range(0, cols, step):  # all taps per chunk of columns, while it is in cache
        hi = min(cols, lo + step)
        dst = out[:, lo:hi]
        if bias is None:
            torch.mm(taps[0, 0], flat[:, lo:hi], out=dst)
        else:
            torch.addmm(bias, taps[0, 0], flat[:, lo:hi], out=dst)
        for i in range(g.kh):
            for j in range(g.kw):
                if i or j:
                    off = g.offset(i, j)
                    dst.addmm_(taps[i, j], flat[:, off + lo:off + hi])
    # output (b, oc, r, q) sits at flat position b * plane + r * wp + q of channel row oc
    return out.as_strided((g.n, g.o, g.ho, g.wo), (g.plane, cols, g.wp, 1))


# ------------------------------------------------------------------ "flop" mode: reductions
#: "flop" mode splits each reduction into chunks of at most this many products: per kernel tap,
#: blocks of input channels (convolutions); blocks of the inner dimension (matrix products)...
FLOP_BLOCK = 16
#: ...and into at least this many chunks (a 1x1 convolution of 16 channels: blocks of 2)
FLOP_MIN_CHUNKS = 8
_MATMULS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                      torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default})


def _blocks_of(n: int, block: int) -> list[slice]:
    return [slice(j, min(n, j + block)) for j in range(0, n, block)]


def _flop_block(channels: int, taps: int) -> int:
    """Channels per chunk of a reduction over ``channels`` x ``taps`` products (taps outer):
    at most :data:`FLOP_BLOCK`, small enough for :data:`FLOP_MIN_CHUNKS` chunks in all (the
    variance estimate of a chunk assumes its partial sums run straight from its start to its
    end: with fewer, longer chunks it strays, measured)."""
    per_tap = -(-FLOP_MIN_CHUNKS // max(taps, 1))
    return max(1, min(FLOP_BLOCK, -(-channels // per_tap)))


def _conv_flop_fast(x: Tensor, w: Tensor, b: Tensor | None, g: _Grid, key: int,
                    memory_format: torch.memory_format) -> Tensor:
    """float32 "flop" result of a float32 convolution on the grid ``g`` (CPU, numba), in one
    fused pass: the same model and draws as :func:`_conv_chunks` + :func:`_accumulate` +
    :func:`~nanprobe._mca_kernels.flop_round_torch` (float64 sums in another order)."""
    xp = _padded64(x, g.ph, g.pw)
    taps = w.to(_F64).permute(2, 3, 1, 0).reshape(g.kh * g.kw, g.c, g.o).contiguous()
    bias = b.to(_F64) if b is not None else torch.zeros(g.o, dtype=_F64)
    out = torch.empty((g.n, g.o, g.ho, g.wo), dtype=torch.float32, memory_format=memory_format)
    block = _flop_block(g.c, g.kh * g.kw)
    _mca_kernels.conv_flop_f32(xp, taps, bias, (g.dh, g.dw), g.kw, block, key, out)
    return out


def _conv_chunks(x: Tensor, w: Tensor, stride: list[int], padding: list[int],
                 dilation: list[int], transposed: bool, output_padding: list[int],
                 groups: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(chunk sum, products counted) of a float64 convolution without bias, per kernel tap and
    block of input channels (of each group, :func:`_flop_block`), in that order; products with
    a zero input count as exact, zero weights do not. Any dimensionality, stride, dilation,
    groups; transposed convolutions by masked weights (slow)."""
    taps = list(itertools.product(*map(range, w.shape[2:])))
    per_group = w.shape[0] // groups if transposed else w.shape[1]
    block = _flop_block(per_group, len(taps))
    if transposed:
        nonzero = (x != 0).to(x.dtype)
        for tap in taps:
            for blk in _blocks_of(per_group, block):
                mask = torch.zeros_like(w)
                for gi in range(groups):
                    mask[(slice(gi * per_group + blk.start, gi * per_group + blk.stop),
                          slice(None), *tap)] = 1
                yield tuple(torch.ops.aten.convolution(t, m, None, stride, padding, dilation,
                                                       True, output_padding, groups)
                            for t, m in ((x, w * mask), (nonzero, mask)))
        return
    d = w.dim() - 2
    xp = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
    size = [(xp.shape[2 + k] - dilation[k] * (w.shape[2 + k] - 1) - 1) // stride[k] + 1
            for k in range(d)]
    for tap in taps:
        index = tuple(slice(t * dl, t * dl + (n - 1) * st + 1, st)
                      for t, dl, n, st in zip(tap, dilation, size, stride, strict=True))
        xs = xp[(slice(None), slice(None), *index)]
        wt = w[(slice(None), slice(None), *(slice(t, t + 1) for t in tap))]
        for blk in _blocks_of(per_group, block):
            chans = (torch.arange(groups)[:, None] * per_group
                     + torch.arange(blk.start, blk.stop)).view(-1)
            xb = xs if blk.stop - blk.start == per_group else xs[:, chans.to(xs.device)]
            wb = wt[:, blk]
            ones = torch.ones_like(wb)
            yield tuple(torch.ops.aten.convolution(t, m, None, [1] * d, [0] * d, [1] * d,
                                                   False, [0] * d, groups)
                        for t, m in ((xb, wb), ((xb != 0).to(xb.dtype), ones)))


def _matmul_chunks(a: Tensor, b: Tensor, alpha: float = 1.0) -> Iterator[tuple[Tensor, Tensor]]:
    """(chunk sum, products counted) of ``alpha * a @ b`` (float64, 2-D or batched 3-D) per
    block of the inner dimension (:func:`_flop_block`); products with a zero factor count as
    exact."""
    for blk in _blocks_of(a.shape[-1], _flop_block(a.shape[-1], 1)):
        ak, bk = a[..., blk], b[..., blk, :]
        part = ak @ bk
        yield (part if alpha == 1 else part * alpha,
               (ak != 0).to(a.dtype) @ (bk != 0).to(b.dtype))


def _accumulate(init: Tensor | None, chunks: Iterable[tuple[Tensor, Tensor]]
                ) -> tuple[Tensor, Tensor]:
    """``(s, v)``: the float64 sum ``init + sum of chunks`` accumulated in order, and the
    variance of Verrou's per-FMA random roundings along the way (the "flop" model): a product
    added to a partial sum S rounds it up or down with probability 1/2, an error of variance
    ``ulp(S)**2 / 4`` whatever S's position between its neighbours; a chunk of n counted
    products, whose partial sums run from S to S', adds ``n * (ulp2(S) + ulp2(S')) / 8``."""
    s, v = init, None
    for part, count in chunks:
        a = s if s is not None else torch.zeros_like(part)
        z = a + part
        term = count * (_mca_kernels.ulp2_torch(a) + _mca_kernels.ulp2_torch(z))
        s, v = z, term if v is None else v + term
    if s is None:
        raise ValueError("a reduction without terms")
    return s, (torch.zeros_like(s) if v is None else v * 0.125)


class MCAMode(TorchDispatchMode):
    """Randomly round every inexact floating-point aten op result (see the module docstring)."""

    def __init__(self, mode: str = "rr", *, seed: int, precision: int = 24) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        try:
            seed = operator.index(seed)
        except TypeError:
            raise ValueError(f"seed must be an int; got {seed!r}") from None
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed must be an int in [-2**63, 2**64); got {seed}")
        try:
            bits = None if isinstance(precision, bool) else operator.index(precision)
        except TypeError:
            bits = None
        if bits is None or not 1 <= bits <= _MAX_PRECISION:
            raise ValueError(f"precision must be an int from 1 to {_MAX_PRECISION} (bits); "
                             f"got {precision!r}")
        self.mode = mode
        self._rounding = "rr" if mode == "flop" else mode  # of results outside reductions
        self.seed = seed
        self.precision = bits
        self._generators: dict[torch.device, torch.Generator] = {}

    def __repr__(self) -> str:
        return f"MCAMode({self.mode!r}, seed={self.seed}, precision={self.precision})"

    # ---------------------------------------------------------------- random draws
    def _gen(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
            gen.manual_seed(self.seed)
        return gen

    def _key(self, device: torch.device) -> int:
        """One draw of the mode's generator: the key of a SplitMix64 stream."""
        return int(torch.empty((), dtype=torch.int64, device=device)
                   .random_(-(2**63), None, generator=self._gen(device)))

    def _mca_noise(self, y: Tensor, u: Tensor) -> Tensor:
        """Verificarlo's noise ``2**(floor(log2|y|) + 1 - t) * (u - 1/2)``, ``u`` uniform."""
        exponent = torch.frexp(y).exponent  # y = m * 2**e, 1/2 <= |m| < 1: floor(log2|y|) = e - 1
        scale = exponent.to(_F64).sub_(self.precision).exp2_()
        return (u - 0.5).mul_(scale)

    def _round(self, y: Tensor, dtype: torch.dtype,
               memory_format: torch.memory_format = torch.preserve_format) -> Tensor:
        """Float64 ``y`` randomly rounded to ``dtype`` (float32/16, bfloat16); exact kept.

        Works block by block (:data:`_BLOCK` elements) so that its passes stay in cache.
        """
        out = torch.empty_like(y, dtype=dtype, memory_format=memory_format)
        if out.numel() == 0:
            return out
        draws = self._draws(out)
        if dtype == torch.float32 and y.dim() <= 4 and _kernels.enabled(y):  # one fused pass
            _mca_kernels.random_round_f32(y, out, draws, self._rounding, self.precision)
            return out
        draws = self._expand(out, draws)
        size = min(out.numel(), _BLOCK)
        scratch64 = torch.empty(size, dtype=_F64, device=y.device)
        scratch32 = torch.empty(size, dtype=torch.float32, device=y.device)
        for index in _blocks(out.shape):
            self._round_block(y[index], out[index], None if draws is None else draws[index],
                              scratch64, scratch32)
        return out

    def _draws(self, out: Tensor) -> Tensor:
        """The random bits that round ``out``, drawn for the whole result at once as int64
        words; element i (row-major) takes, for ``rr``, bit i % 64 of word i // 64; for
        ``sr``, 32-bit half i % 2 (low half first) of word i // 2, whose top 24 bits make its
        uniform; for ``mca``, word i, whose top 53 bits make its uniform. The words are a
        SplitMix64 stream keyed by one draw of the mode's generator (computed by a numba
        kernel on CPU, by torch ops elsewhere; the same bits)."""
        device = out.device
        key = self._key(device)
        count = -(-out.numel() // _PER_WORD[self._rounding])
        if device.type == "cpu" and _kernels.enabled():
            return _mca_kernels.splitmix_words(key, count)
        return _mca_kernels.splitmix_words_torch(key, count, device)

    def _expand(self, out: Tensor, draws: Tensor) -> Tensor:
        """Torch path: the draw of each element of ``out``, shaped like it: ``rr`` bits as 0.0 /
        1.0, ``sr`` 24-bit uniforms in [0, 1) (float32), ``mca`` 53-bit ones (float64)."""
        if self._rounding == "mca":
            u = (draws >> 11).bitwise_and_(2**53 - 1).to(_F64).mul_(2.0**-53)
            return u.view(out.shape)
        per_word = _PER_WORD[self._rounding]
        shifts = torch.arange(per_word, device=out.device) * (64 // per_word)
        if self._rounding == "rr":
            values = (draws[:, None] >> shifts).bitwise_and_(1)  # (words, 64): row-major i
        else:
            values = (draws[:, None] >> (shifts + 8)).bitwise_and_(0xFFFFFF)
        values = values.view(-1)[:out.numel()].to(torch.float32).view(out.shape)
        return values if self._rounding == "rr" else values.mul_(2.0**-24)

    def _fused_prelu(self, args: tuple, kwargs: dict) -> Tensor | None:
        """PReLU of a float32 input computed exactly and rounded in one pass (CPU, rr/sr), with
        the generic path's bits; None where that does not apply."""
        if kwargs or len(args) != 2:
            return None
        x, w = args
        if not (isinstance(x, Tensor) and isinstance(w, Tensor) and x.dtype == w.dtype
                == torch.float32 and x.dim() <= 4 and _kernels.enabled(x, w)):
            return None
        try:
            if torch.broadcast_shapes(w.shape, x.shape) != x.shape:
                return None
        except RuntimeError:
            return None  # aten raises its own error
        out = torch.empty_like(x)
        _mca_kernels.prelu_round_f32(x, w, out, self._draws(out), self._rounding, self.precision)
        return out

    def _inference_batch_norm(self, args: tuple, kwargs: dict,
                              dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor] | None:
        """Inference-mode ``native_batch_norm`` as ``(x - mean) * scale + bias`` in float64,
        ``scale = weight / sqrt(var + eps)``, rounded (float32 rr/sr on CPU: one fused pass);
        None in training mode or with parameters of another dtype (the generic path then).

        This fixes the float64 formula, so that the fused pass and the torch ops give the same
        bits (ATen's own float64 kernel folds the mean into the shift and may fuse
        multiply-adds). An element with ``x == mean`` gets ``bias`` exactly.
        """
        if kwargs or len(args) != 8:
            return None
        x, weight, bias, mean, var, training, _, eps = args
        if training or not isinstance(mean, Tensor) or not isinstance(var, Tensor) or x.dim() < 2:
            return None
        c = x.shape[1]
        if any(t is not None and (t.dtype != x.dtype or t.shape != (c,) or t.device != x.device)
               for t in (weight, bias, mean, var)):
            return None
        shape = (c,) + (1,) * (x.dim() - 2)
        root = torch.sqrt(var.to(_F64) + _round_scalar(eps, dtype))
        scale = (weight.to(_F64) if weight is not None else torch.ones_like(root)) / root
        shift = bias.to(_F64) if bias is not None else torch.zeros(c, dtype=_F64, device=x.device)
        mean64, scale, shift = (t.view(shape) for t in (mean.to(_F64), scale, shift))
        if dtype == torch.float32 and x.dim() <= 4 and _kernels.enabled(x):
            out = torch.empty_like(x)
            _mca_kernels.batch_norm_round_f32(x, mean64, scale, shift, out, self._draws(out),
                                          self._rounding, self.precision)
        else:
            out = self._round((x.to(_F64) - mean64) * scale + shift, dtype)
        empty = x.new_empty(0)  # ATen's saved mean / inverse std, empty in inference
        return out, empty, empty

    def _flop(self, func: Any, args: tuple, kwargs: dict, up: Any) -> Tensor | None:
        """A float32 convolution or matrix product in "flop" mode (see the module docstring),
        or None for the generic path (arguments it does not know, an empty reduction)."""
        fmt = torch.contiguous_format
        if func is _CONVOLUTION:
            if kwargs or len(args) != 9:
                return None
            x, w, b, stride, padding, dilation, transposed, output_padding, groups = args
            if x.dim() == 4 and _kernels.channels_last(x):
                fmt = torch.channels_last
            if x.dtype == w.dtype == torch.float32 and (b is None or b.dtype == torch.float32):
                g = _grid(x, w, b, stride, padding, dilation, transposed, groups)
                if g is not None and _kernels.enabled(x, w):
                    return _conv_flop_fast(x, w, b, g, self._key(x.device), fmt)
            x64, w64, b64 = up(x), up(w), up(b)
            if x64.dim() < 3 or w64.dim() != x64.dim() or x64.shape[1] == 0:
                return None  # unbatched or empty: the generic path (aten checks arguments)
            init = None if b64 is None else b64.view(1, -1, *(1,) * (x64.dim() - 2))
            chunks = _conv_chunks(x64, w64, stride, padding, dilation, transposed,
                                  output_padding, groups)
        else:
            if set(kwargs) - {"beta", "alpha"}:
                return None
            scalars = [up(kwargs.get(k, 1)) for k in ("beta", "alpha")]
            if not all(isinstance(c, int | float) for c in scalars):
                return None
            beta, alpha = scalars
            if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
                (a, b), init = args, None
            else:
                inp, a, b = args
                init = None if beta == 0 else up(inp) * beta
            a64, b64 = up(a), up(b)
            if a64.shape[-1] == 0 or a64.dim() != b64.dim():
                return None
            chunks = _matmul_chunks(a64, b64, alpha)
        s, v = _accumulate(init, chunks)
        return self._flop_finish(s, v.expand(s.shape), fmt)

    def _flop_finish(self, s: Tensor, v: Tensor, memory_format: torch.memory_format) -> Tensor:
        """float32 of the float64 reductions ``s`` with noise of variance ``v``: exact results
        kept, the others the nearest float32 of ``s + sqrt(v) * g`` (one draw: the key of the
        words of the normals ``g``)."""
        key = self._key(s.device)
        if s.dim() == 4:
            out = torch.empty(s.shape, dtype=torch.float32, device=s.device,
                              memory_format=memory_format)
        else:
            out = torch.empty(s.shape, dtype=torch.float32, device=s.device)
        if out.numel() == 0:
            return out
        if s.dim() <= 4 and _kernels.enabled(s, v):
            _mca_kernels.flop_round_f32(s, v, out, key)
        else:
            out.copy_(_mca_kernels.flop_round_torch(s, v, key))
        return out

    def _round_block(self, y: Tensor, n: Tensor, draws: Tensor | None, scratch64: Tensor,
                     scratch32: Tensor) -> None:
        """Round float64 ``y`` into ``n`` (same shape) in place, using the scratch buffers.

        ``draws``: the block's random bits (rr, 0.0/1.0) or uniform numbers (sr, mca)."""
        n.copy_(y)  # nearest
        if self._rounding == "mca":
            z = self._mca_noise(y, draws).add_(y).to(n.dtype)
            n.copy_(torch.where(y != n, z, n))
            return
        shape, m, dtype = n.shape, n.numel(), n.dtype
        # Residual d = y - n: 0 exactly where y is exact (NaN and inf results count as exact).
        # nextafter(n, n + STEP * d) is the other neighbour of y, or n itself where d = 0.
        # Same-dtype ops only: mixed-dtype ones cost hidden temporaries.
        n64 = scratch64[:m].view(shape).copy_(n)
        d = scratch32[:m].view(shape).copy_(torch.sub(y, n64, out=n64))
        d.nan_to_num_(nan=0.0, posinf=1.0, neginf=-1.0)
        step = _STEP[dtype]
        if self._rounding == "rr":
            d.mul_(draws)  # keep n with probability 1/2
        else:  # sr: the other neighbour with probability |y - n| / |other - n|
            gap = torch.empty_like(n)
            torch.nextafter(n, torch.add(n, d, alpha=step, out=gap), out=gap).sub_(n)
            p = torch.div(d, gap, out=gap) if dtype == torch.float32 else d / gap
            d.mul_(draws < p)  # p is NaN only where d is 0
        target = torch.add(n, d, alpha=step)
        target = torch.where(d == 0, n, target.to(dtype))  # exact (also -0.0): kept
        torch.nextafter(n, target, out=n)

    def _perturb64(self, y: Tensor) -> Tensor:
        """Float64 result of unknown exactness, perturbed (see the module docstring)."""
        if y.numel() == 0:
            return y
        unknown = y != y.to(torch.float32)
        if self._rounding == "mca":
            noise = self._mca_noise(y, self._expand(y, self._draws(y)))
            return torch.where(unknown, noise.add_(y), y)
        r = torch.empty(y.shape, dtype=torch.uint8, device=y.device)
        r.random_(0, 4 if self._rounding == "rr" else 8, generator=self._gen(y.device))
        top = 3 if self._rounding == "rr" else 7
        inf = torch.tensor(float("inf"), dtype=_F64, device=y.device)
        down = unknown & (r == 0)
        up = unknown.logical_and_(r == top)
        out = torch.where(up, torch.nextafter(y, inf), y)
        return torch.where(down, torch.nextafter(y, -inf), out)

    def _result(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """Perturbed value of one op output ``y`` (float64 recompute) in working ``dtype``."""
        if dtype == _F64:
            return self._perturb64(y) if y.dtype == _F64 else y
        if y.dtype == _F64 and dtype in _LOW_FLOATS:
            return self._round(y, dtype)
        return y

    # ---------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        plan = _plan(func)
        if plan.kind == "native":
            return func(*args, **kwargs)
        if plan.kind == "convert":
            return self._convert(func, args, kwargs)
        if plan.kind == "index_put":
            accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
            if not accumulate:
                return func(*args, **kwargs)
        return self._generic(func, plan, args, kwargs)

    def _convert(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """``_to_copy`` / ``copy`` / ``copy_``: round when the destination is less precise."""
        if func._schema.name.endswith("_to_copy"):
            src, dst_dtype = args[0], kwargs.get("dtype") or args[0].dtype
        else:
            src, dst_dtype = args[1], args[0].dtype
        if (not isinstance(src, Tensor) or not src.is_floating_point()
                or dst_dtype not in _LOW_FLOATS or src.dtype == dst_dtype
                or torch.promote_types(src.dtype, dst_dtype) == dst_dtype):
            return func(*args, **kwargs)
        rounded = self._round(src.to(_F64), dst_dtype)
        if func._schema.name.endswith("_to_copy"):
            return func(rounded, *args[1:], **kwargs)
        return func(args[0], rounded, *args[2:], **kwargs)

    def _generic(self, func: Any, plan: _Plan, args: tuple, kwargs: dict) -> Any:
        flat, spec = tree_flatten((args, kwargs))
        floats = [x for x in flat if isinstance(x, Tensor) and x.is_floating_point()]
        if not floats or any(isinstance(x, Tensor) and x.is_complex() for x in flat):
            return func(*args, **kwargs)
        dtype = kwargs.get("dtype")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            outs = {id(kwargs.get(w)) for w in plan.writes if isinstance(w, str)}
            inputs = [t for t in floats if id(t) not in outs]
            dtype = _promote(inputs) if inputs else _promote(floats)
        if dtype == _F64:
            result = func(*args, **kwargs)
            return self._finish(plan, args, kwargs, result, None, dtype)
        if dtype not in _LOW_FLOATS:
            return func(*args, **kwargs)

        def up(x: Any) -> Any:
            if isinstance(x, Tensor):
                if not x.is_floating_point():
                    return x
                if x.dtype != dtype and torch.promote_types(x.dtype, dtype) != dtype:
                    x = x.to(dtype)  # e.g. a float64 0-dim scalar in a float32 op
                return x.to(_F64)
            if isinstance(x, float):
                return _round_scalar(x, dtype)
            if isinstance(x, torch.dtype) and x.is_floating_point:
                return _F64
            return x

        if self.mode == "flop" and dtype == torch.float32 and (func is _CONVOLUTION
                                                               or func in _MATMULS):
            reduced = self._flop(func, args, kwargs, up)
            if reduced is not None:
                return reduced
        if func is _PRELU:
            fused = self._fused_prelu(args, kwargs)
            if fused is not None:
                return fused
        if func is _BATCH_NORM:
            normed = self._inference_batch_norm(args, kwargs, dtype)
            if normed is not None:
                return normed
        args64 = kwargs64 = None
        if func is _CONVOLUTION and not kwargs:
            # operands of the working dtype are cast up inside _conv64, in one pass
            if all(t.dtype == dtype for t in args[:3] if isinstance(t, Tensor)):
                conv = args
            else:
                args64, kwargs64 = tree_unflatten([up(x) for x in flat], spec)
                conv = args64
            y = _conv64(*conv[:6], conv[6], conv[8])
            if y is not None:
                fmt = (torch.channels_last if _kernels.channels_last(args[0])
                       else torch.contiguous_format)
                return self._round(y, dtype, fmt)
        if args64 is None:
            args64, kwargs64 = tree_unflatten([up(x) for x in flat], spec)
        try:
            result = func(*args64, **kwargs64)
        except Exception as exc:  # a user error, or no float64 kernel: told apart below
            native = func(*args, **kwargs)  # a user error raises here, as without the mode
            _PLANS[func] = _Plan("native")
            if str(func) not in _WARNED:
                _WARNED.add(str(func))
                warnings.warn(f"nanprobe.mca: {func} could not be recomputed in float64 "
                              f"({type(exc).__name__}: {exc}); it runs unperturbed",
                              RuntimeWarning, stacklevel=3)
            return native
        return self._finish(plan, args, kwargs, result, (args64, kwargs64), dtype)

    def _finish(self, plan: _Plan, args: tuple, kwargs: dict, result: Any,
                recomputed: tuple[tuple, dict] | None, dtype: torch.dtype) -> Any:
        """Round the outputs; write mutated arguments back; keep returns aliased to them."""
        originals: list[Any] = []
        for w in plan.writes:
            orig = kwargs.get(w) if isinstance(w, str) else (args[w] if w < len(args) else None)
            originals.append(orig)
            if recomputed is None:  # float64: computed in place, perturb in place
                pairs = [(t, t) for t in _tensors(orig)]
            else:
                a64, k64 = recomputed
                new = k64.get(w) if isinstance(w, str) else a64[w]
                pairs = list(zip(_tensors(orig), _tensors(new), strict=True))
            for dst, src in pairs:
                if not dst.is_floating_point():
                    continue
                value = self._result(src, dst.dtype if dst.dtype in _LOW_FLOATS else _F64)
                if dst.shape != value.shape:
                    dst.resize_(value.shape)
                dst.copy_(value)

        def fix(x: Any) -> Any:
            return self._result(x, dtype) if isinstance(x, Tensor) else x

        if not plan.writes:
            if isinstance(result, Tensor):
                return fix(result)
            if isinstance(result, (tuple, list)):
                return type(result)(fix(x) if isinstance(x, Tensor) else x for x in result)
            return result
        single = not isinstance(result, (tuple, list))
        items = [result] if single else list(result)
        out = []
        for i, x in enumerate(items):
            alias = plan.ret_alias[i] if i < len(plan.ret_alias) else None
            if alias is not None and originals[alias] is not None:
                out.append(originals[alias])
            else:
                out.append(fix(x) if isinstance(x, Tensor) else x)
        return out[0] if single else type(result)(out)


def mca_mode(mode: str = "rr", *, seed: int, precision: int = 24) -> MCAMode:
    """A context manager randomly rounding every floating-point op result inside it.

    ``mode``: ``"rr"`` (Verrou random, once per result), ``"sr"`` (stochastic, Verrou
    nearness), ``"mca"`` (verificarlo noise at ``precision`` bits) or ``"flop"`` (Verrou random
    per FMA of convolutions and matrix products, modelled); ``seed`` makes the sample
    bit-reproducible.
    """
    return MCAMode(mode, seed=seed, precision=precision)

