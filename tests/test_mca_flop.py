"""The in-process MCA "flop" mode against a slow, exact emulation of Verrou's per-FMA rounding."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from nanprobe import _mca_kernels, _mca_numba, mca
from nanprobe.mca import _accumulate, _conv_chunks, _matmul_chunks, mca_mode

INF = float("inf")


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------- the slow reference
def f32_neighbours(q: Fraction) -> tuple[Fraction, Fraction]:
    """The float32 values just below and just above the exact rational ``q`` (twice ``q``
    itself when it is a float32)."""
    n = np.float32(float(q))  # a neighbour: float(q) lies between the same two float32s
    if Fraction(float(n)) == q:
        return q, q
    other = np.nextafter(n, np.float32(INF if Fraction(float(n)) < q else -INF))
    lo, hi = sorted((Fraction(float(n)), Fraction(float(other))))
    return lo, hi


def exact_products(terms: list[tuple[float, float]]) -> list[Fraction]:
    return [Fraction(w) * Fraction(x) for w, x in terms]


def verrou_dot(init: float, products: list[Fraction], rng: random.Random) -> float:
    """float32 ``init + sum(products)`` accumulated in order as Verrou
    ``--rounding-mode=random`` runs it: each FMA ``acc + w * x`` is computed exactly and, when
    not a float32, replaced by one of its two float32 neighbours, each with probability 1/2."""
    acc = Fraction(init)
    for p in products:
        lo, hi = f32_neighbours(acc + p)
        acc = hi if lo != hi and rng.random() < 0.5 else lo
    return float(acc)


def conv_terms(x: Tensor, w: Tensor, o: int, r: int, c: int, pad: int) -> list[tuple]:
    """The products of output (0, o, r, c) of a stride-1 convolution, kernel tap by tap and
    input channel by channel within a tap (oneDNN's order); taps in the padding have none."""
    _, ch, h, wd = x.shape
    terms = []
    for i in range(w.shape[2]):
        for j in range(w.shape[3]):
            rr, cc = r + i - pad, c + j - pad
            if 0 <= rr < h and 0 <= cc < wd:
                terms += [(float(w[o, k, i, j]), float(x[0, k, rr, cc])) for k in range(ch)]
    return terms


def spread_ratio(fast: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per output (last axis), std of the fast samples over std of the reference samples."""
    return fast.std(0) / ref.std(0)


def conv_case() -> tuple[Tensor, Tensor, Tensor]:
    """1 x 8 x 4 x 4 input (a quarter exact zeros), 8 -> 1 channel 3x3 kernel, bias."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 4, 4, generator=g)
    x[torch.rand(x.shape, generator=g) < 0.25] = 0.0
    return x, torch.randn(1, 8, 3, 3, generator=g), torch.randn(1, generator=g)


SAMPLES = 100


@pytest.fixture(scope="module")
def conv_reference() -> np.ndarray:
    """(SAMPLES, 16) Verrou-emulated outputs of :func:`conv_case` (exact arithmetic)."""
    x, w, b = conv_case()
    rng = random.Random(0)
    outputs = [exact_products(conv_terms(x, w, 0, r, c, 1)) for r in range(4) for c in range(4)]
    return np.array([[verrou_dot(float(b[0]), p, rng) for p in outputs] for _ in range(SAMPLES)])


def conv_samples(mode: str) -> np.ndarray:
    x, w, b = conv_case()
    out = []
    for seed in range(SAMPLES):
        with mca_mode(mode, seed=seed):
            out.append(F.conv2d(x, w, b, padding=1).view(-1).double().numpy())
    return np.array(out)


def test_reference_is_verrou_random_rounding() -> None:
    """The reference itself: exact FMAs stay, inexact ones land on a neighbour half the time."""
    rng = random.Random(1)
    assert verrou_dot(0.5, exact_products([(2.0, 0.25), (0.0, 3.0)]), rng) == 1.0  # all exact
    one_third = float(np.float32(1 / 3))
    draws = [verrou_dot(0.0, exact_products([(one_third, 1 / 3)]), rng) for _ in range(400)]
    lo, hi = f32_neighbours(Fraction(one_third) * Fraction(1 / 3))
    assert set(draws) == {float(lo), float(hi)} and 150 < draws.count(float(hi)) < 250


@pytest.mark.parametrize("block", [16, 3])
def test_conv_noise_matches_per_fma_random_rounding(kernels, conv_reference: np.ndarray,
                                                    block: int, monkeypatch) -> None:
    """Per output, flop's spread matches the exact emulation's (borders with fewer taps and
    zero inputs included; ``block`` 3 splits the 8 channels in chunks of 3, 3, 2); rr's is a
    fraction of it: the random walk of 9..72 roundings.

    Centres differ by less than the spread: flop's samples scatter around the exact value,
    Verrou's around the exact value plus a fixed offset (a rounding whose exact result is a
    fixed fraction f of an ulp above its lower neighbour errs by 1/2 - f ulp on average; the
    first FMAs of a dot product of fixed data have fixed f), of the size of float32's own
    round-to-nearest error."""
    monkeypatch.setattr(mca, "FLOP_BLOCK", block)
    fast = conv_samples("flop")
    ratio = spread_ratio(fast, conv_reference)
    assert 0.85 < np.median(ratio) < 1.15 and 0.6 < ratio.min() and ratio.max() < 1.6
    rr = spread_ratio(conv_samples("rr"), conv_reference)
    assert np.median(rr) < 0.4  # the test tells rr from flop
    x, w, b = conv_case()
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=1).view(-1).numpy()
    assert (np.abs(fast.mean(0) - exact) < 5 * fast.std(0) / SAMPLES**0.5).all()
    offset = np.abs(fast.mean(0) - conv_reference.mean(0)) / conv_reference.std(0)
    assert np.median(offset) < 0.5 and offset.max() < 1.5


def linear_case() -> tuple[torch.nn.Linear, Tensor]:
    """nn.Linear 144 -> 8 (like a 3x3 convolution of 16 channels) and 2 inputs, the second
    positive (post-activation: partial sums drift)."""
    g = torch.Generator().manual_seed(4)
    layer = torch.nn.Linear(144, 8)
    with torch.no_grad():
        layer.weight.normal_(0.0, 144**-0.5, generator=g)
        layer.bias.normal_(0.0, 0.3, generator=g)
    x = torch.randn(2, 144, generator=g)
    x[1] = x[1].abs()
    return layer, x


@pytest.fixture(scope="module")
def linear_reference() -> np.ndarray:
    """(SAMPLES, 16) Verrou-emulated outputs of :func:`linear_case`: bias first, then the inner
    dimension in order."""
    layer, x = linear_case()
    w, b = layer.weight.detach(), layer.bias.detach()
    rng = random.Random(2)
    outputs = [(float(b[o]), exact_products([(float(w[o, k]), float(x[n, k]))
                                             for k in range(144)]))
               for n in range(2) for o in range(8)]
    return np.array([[verrou_dot(init, p, rng) for init, p in outputs] for _ in range(SAMPLES)])


def test_linear_noise_matches_per_fma_random_rounding(kernels, linear_reference) -> None:
    """addmm (nn.Linear) in 9 chunks of 16: the chunked estimate of the variance is within
    about 15 % of the exact per-FMA one for most outputs (10 % low at the 10th percentile)."""
    layer, x = linear_case()
    fast = []
    with torch.no_grad():
        for seed in range(SAMPLES):
            with mca_mode("flop", seed=seed):
                fast.append(layer(x).view(-1).double().numpy())
    ratio = spread_ratio(np.array(fast), linear_reference)
    assert 0.85 < np.median(ratio) < 1.15 and np.quantile(ratio, 0.1) > 0.7
    assert ratio.max() < 1.6


# ------------------------------------------------------------------- the pieces
def test_ulp2_is_the_squared_float32_spacing() -> None:
    values = np.array([1.0, 1.5, -3.0, 2.0**-126, 2.0**-140, 1e-300, 3e38, 1e300, 0.7,
                       -1e-20, 65504.0, 0.0])
    inside = np.abs(values) < 3.4e38
    spacing = np.full(values.shape, 2.0**104)  # beyond float32: its largest binade's
    spacing[inside] = np.spacing(np.abs(values[inside]).astype(np.float32))
    spacing[np.abs(values) < 2.0**-126] = 2.0**-149  # subnormal float32: fixed spacing
    want = np.where(values == 0, 0.0, spacing**2)
    assert np.array_equal(_mca_kernels.ulp2_torch(torch.from_numpy(values)).numpy(), want)
    assert np.array_equal([_mca_numba._ulp2(v) for v in values], want)


def test_flop_rounding_numba_and_torch_bits() -> None:
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) * 100
    s.view(-1)[:8] = torch.tensor([0.0, -0.0, 1.5, float("nan"), INF, -INF, 1e39, 0.1])
    v = (s.abs() * 2.0**-22) ** 2
    for case_s, case_v in ((s, v), (s.transpose(1, 3), v.transpose(1, 3)), (s[0, 1], v[0, 1])):
        out = torch.empty(case_s.shape)
        _mca_kernels.flop_round_f32(case_s, case_v, out, 77)
        want = _mca_kernels.flop_round_torch(case_s, case_v, 77)
        assert torch.equal(out.view(torch.int32), want.view(torch.int32))
    flat = _mca_kernels.flop_round_torch(s, v, 77).view(-1)
    assert flat[:3].tolist() == [0.0, 0.0, 1.5] and torch.signbit(flat[1])  # exact: kept
    assert flat[3].isnan() and flat[4:7].tolist() == [INF, -INF, INF]
    moved = flat[8:].double() - s.view(-1)[8:]
    assert (moved != 0).all()  # inexact ones all got noise, about 2**-22 |s| of it
    z = (moved / v.view(-1)[8:].sqrt()).numpy()
    assert abs(z.mean()) < 0.2 and 0.85 < z.std() < 1.15 and np.abs(z).max() < 2 * 3**0.5 + 0.01


def test_irwin_hall_normals() -> None:
    """Unit variance, zero mean, bounded by 2 * sqrt(3), symmetric: from 65,536 words."""
    s = torch.full((65_536,), 1.0 + 2.0**-30, dtype=torch.float64)  # inexact in float32
    out = _mca_kernels.flop_round_torch(s, torch.full_like(s, 1e-6**2), key=3).double()
    z = ((out - s) / 1e-6).numpy()
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02 and np.abs(z).max() <= 2 * 3**0.5
    assert abs((z**3).mean()) < 0.05 and abs((z**4).mean() - 2.7) < 0.1  # Irwin-Hall(4): 2.7


@pytest.mark.parametrize(
    "kwargs",
    [{"padding": 1}, {"stride": 2, "padding": 1}, {"dilation": 2}, {"groups": 2, "padding": 1},
     {"dim": 1, "stride": 2}, {"dim": 3, "padding": 1}, {"transposed": True, "stride": 2},
     {"transposed": True, "groups": 2}],
)
def test_convolution_chunks_add_up(kwargs: dict, monkeypatch) -> None:
    """Tap x channel-block chunks sum to the float64 convolution; their counts to the number
    of products with a nonzero input."""
    monkeypatch.setattr(mca, "FLOP_BLOCK", 3)
    kw = dict(kwargs)
    d, transposed, groups = kw.pop("dim", 2), kw.pop("transposed", False), kw.get("groups", 1)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 8, *(7,) * d, generator=g, dtype=torch.float64)
    x[x.abs() < 0.5] = 0.0
    shape = (8, 6 // groups, *(3,) * d) if transposed else (6, 8 // groups, *(3,) * d)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    conv = getattr(F, f"conv{'_transpose' if transposed else ''}{d}d")
    want = conv(x, w, **kw)
    ones = conv((x != 0).double(), torch.ones_like(w), **kw)
    full = [kw.get(k, v) for k, v in (("stride", 1), ("padding", 0), ("dilation", 1))]
    params = [[p] * d for p in full]
    chunks = list(_conv_chunks(x, w, *params, transposed, [0] * d, groups))
    assert len(chunks) == 3**d * -(-(8 // groups) // 3)  # taps x blocks of 3 channels
    torch.testing.assert_close(sum(c[0] for c in chunks), want, rtol=0, atol=1e-12)
    assert torch.equal(sum(c[1] for c in chunks), ones)
    with mca_mode("flop", seed=0):
        y = conv(x.float(), w.float(), **kw)
    assert y.dtype == torch.float32 and y.shape == want.shape
    assert (y.double() - want).abs().max() < 1e-4 and not torch.equal(y, want.float())


def test_matmul_chunks_and_scalars() -> None:
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(3, 5, 37, generator=g), torch.randn(3, 37, 4, generator=g)
    a[a.abs() < 0.3] = 0.0
    chunks = list(_matmul_chunks(a.double(), b.double(), 0.5))
    assert len(chunks) == 8  # blocks of 5: at least 8 chunks
    torch.testing.assert_close(sum(c[0] for c in chunks), 0.5 * a.double() @ b.double())
    assert torch.equal(sum(c[1] for c in chunks), (a != 0).double() @ torch.ones(3, 37, 4).double())
    inp = torch.randn(5, 4, generator=g)
    inp_nan = torch.full((5, 4), float("nan"))
    with mca_mode("flop", seed=1):
        got = {"mm": torch.mm(a[0], b[0]), "bmm": torch.bmm(a, b),
               "addmm": torch.addmm(inp, a[0], b[0], beta=2.0, alpha=0.5),
               "baddbmm": torch.baddbmm(inp, a, b, alpha=0.5),
               "beta0": torch.addmm(inp_nan, a[0], b[0], beta=0)}
    want = {"mm": a[0] @ b[0], "bmm": a @ b, "addmm": 2 * inp + 0.5 * a[0] @ b[0],
            "baddbmm": inp + 0.5 * a @ b, "beta0": a[0] @ b[0]}
    for k, v in want.items():
        assert torch.allclose(got[k], v, rtol=1e-4, atol=1e-5), k
        assert not torch.equal(got[k], v), k
    s, v = _accumulate(None, chunks)
    assert s.shape == (3, 5, 4) and bool((v > 0).all())


def test_fast_convolution_matches_the_generic_path(monkeypatch) -> None:
    """The fused numba pass and the torch ops give the same draws and the same model (20
    output channels and 70 columns: two tiles of each in the numba pass, the second short)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 20, 9, 70, generator=g)
    x[:, :, :3] = 0.0  # a zero band: exact outputs there
    w, b = torch.randn(20, 20, 3, 3, generator=g), torch.randn(20, generator=g)
    got = []
    for path in ("numba", "torch"):
        monkeypatch.setenv("NANPROBE_KERNELS", path)
        for layout in (torch.contiguous_format, torch.channels_last):
            with mca_mode("flop", seed=9):
                got.append(F.conv2d(x.contiguous(memory_format=layout), w, b, padding=1))
    assert got[1].is_contiguous(memory_format=torch.channels_last)
    for other in got[1:]:
        same = (other == got[0]).double().mean().item()
        assert same > 0.999, same
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    assert torch.equal(got[0][:, :, :2], exact[:, :, :2].float())  # bias exactly
    assert torch.equal(got[0][:, :, :2], b.view(1, 20, 1, 1).expand(2, 20, 2, 70))
    assert (got[0][:, :, 3:] != exact[:, :, 3:].float()).double().mean() > 0.5


def test_other_dtypes_round_like_rr() -> None:
    """Half-precision products accumulate in float32 on CPU and are rounded once; float64 has
    no wider recompute: flop rounds them as rr does, with the same draws."""
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(8, 33, generator=g), torch.randn(33, 5, generator=g)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        res = []
        for mode in ("rr", "flop"):
            with mca_mode(mode, seed=2):
                res.append(a.to(dtype) @ b.to(dtype))
        assert torch.equal(res[0], res[1])


def test_flop_sample_is_reproducible_and_exact_ties_survive() -> None:
    g = torch.Generator().manual_seed(10)
    x = torch.zeros(1, 4, 8, 8)
    x[..., :4] = torch.randn(1, 4, 8, 4, generator=g)
    w, b = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, generator=g)
    runs = []
    for seed in (3, 3, 4):
        with mca_mode("flop", seed=seed):
            runs.append(F.max_pool2d(F.conv2d(x, w, b, padding=1), 2, return_indices=True))
    assert torch.equal(runs[0][0], runs[1][0]) and not torch.equal(runs[0][0], runs[2][0])
    for values, idx in runs:  # columns 6.. see only zeros: conv = bias, ties kept at index 0
        assert torch.equal(values[..., 3:], b.view(1, 6, 1, 1).expand(1, 6, 4, 1))
        assert torch.equal(idx[..., 3] % 8, torch.full((1, 6, 4), 6))
