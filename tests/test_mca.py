"""Tests of the in-process Monte Carlo Arithmetic backend (``nanprobe.mca``)."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from nanprobe import _mca_kernels, mca
from nanprobe.mca import _BLOCK, MODES, MCAMode, _blocks, _conv64, mca_mode
from nanprobe.models.fastsurfer import FastSurferVINN
from nanprobe.models.mnist import MnistCNN

INF = float("inf")


pytestmark = pytest.mark.usefixtures("one_thread")


def neighbours(exact: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The two ``dtype`` neighbours (round down, round up) of float64 ``exact``."""
    n = exact.to(dtype)
    down = torch.where(n.double() > exact, torch.nextafter(n, torch.full_like(n, -INF)), n)
    up = torch.where(n.double() < exact, torch.nextafter(n, torch.full_like(n, INF)), n)
    return down, up


def matmul_case(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(48, 40, generator=g).to(dtype)
    b = torch.randn(40, 32, generator=g).to(dtype)
    return a, b, a.double() @ b.double()


@pytest.mark.parametrize("mode", MODES)
def test_fused_rounding_is_bit_identical_to_the_torch_path(mode: str, monkeypatch) -> None:
    """The numba kernel and the blockwise torch ops round every element the same way."""
    g = torch.Generator().manual_seed(5)
    y = torch.randn(3, 5, 7, 11, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(
        -42, 40, (3, 5, 7, 11), generator=g)  # subnormal residuals ... float32 overflow
    y.view(-1)[:40] = torch.tensor([0.0, -0.0, 1.0, 0.5, -3.0, 2.0**-149, 3.0e38, 3.5e38, -1e39,
                                    INF, -INF, float("nan"), 1e-46, 1.0 + 2.0**-30] * 3)[:40]
    cases = [y, y.transpose(1, 3), y[0, :, 2], y[1, 1, 1, :7]]  # strided, 2-D, 1-D
    for case in cases:
        got = []
        for path in ("numba", "torch"):
            monkeypatch.setenv("NANPROBE_KERNELS", path)
            got.append(MCAMode(mode, seed=11)._round(case, torch.float32))
        assert torch.equal(got[0].view(torch.int32), got[1].view(torch.int32))
        assert not torch.equal(got[0], case.float()), "nothing was rounded"
    zeros = torch.full((64,), -0.0, dtype=torch.float64)  # exact: even the sign is kept
    for path in ("numba", "torch"):
        monkeypatch.setenv("NANPROBE_KERNELS", path)
        assert torch.signbit(MCAMode(mode, seed=0)._round(zeros, torch.float32)).all()


def test_random_words_are_splitmix64_on_both_paths() -> None:
    """The rounding draws: SplitMix64 words, the numba kernel and the torch ops bit-identical
    (the first output of seed 0 is SplitMix64's published 0xE220A8397B1DCDAF)."""
    assert _mca_kernels.splitmix_words(0, 1).item() == 0xE220A8397B1DCDAF - 2**64
    for key in (0, 1, -(2**63), 2**63 - 1, 123456789):
        for count in (1, 4097, 10_000):
            fast = _mca_kernels.splitmix_words(key, count)
            assert torch.equal(fast, _mca_kernels.splitmix_words_torch(key, count, "cpu"))
    bits = _mca_kernels.splitmix_words(7, 4096).view(torch.uint8)
    ones = sum(int((bits >> k & 1).sum()) for k in range(8)) / (bits.numel() * 8)
    assert abs(ones - 0.5) < 0.01  # fair bits


def both_kernel_paths(module: torch.nn.Module, x: Tensor, mode: str, monkeypatch) -> Tensor:
    """``module(x)`` under MCA with the numba kernels, checked bit-identical to the torch path."""
    got = []
    for path in ("numba", "torch"):
        monkeypatch.setenv("NANPROBE_KERNELS", path)
        with torch.no_grad(), mca_mode(mode, seed=4):
            got.append(module(x))
    assert torch.equal(got[0].view(torch.int32), got[1].view(torch.int32))
    return got[0]


@pytest.mark.parametrize("mode", MODES)
def test_fused_prelu_is_bit_identical_to_the_generic_path(mode: str, monkeypatch) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 6, 7, generator=g)
    x.view(-1)[:8] = torch.tensor([0.0, -0.0, float("nan"), INF, -INF, 3e38, -3e38, -1e-40])
    for weight in (torch.tensor([0.3]), torch.rand(5, generator=g) - 0.5):  # inexact products
        module = torch.nn.PReLU(len(weight))
        module.weight.data = weight
        for case in (x, x.contiguous(memory_format=torch.channels_last), x[0, 1]):
            if case.dim() < 4 and len(weight) > 1:
                continue
            got = both_kernel_paths(module, case, mode, monkeypatch)
            assert not torch.equal(got, F.prelu(case, weight)), "nothing was rounded"


@pytest.mark.parametrize("mode", MODES)
def test_fused_batch_norm_is_bit_identical_to_the_torch_formula(mode: str, monkeypatch) -> None:
    """Inference batch norm: one numba pass and the float64 torch ops give the same bits, close
    to PyTorch's float32 result; ``x == mean`` gives the bias exactly."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 5, 6, 7, generator=g)
    for affine in (True, False):
        bn = torch.nn.BatchNorm2d(5, affine=affine).eval()
        bn.running_mean.uniform_(-1, 1, generator=g)
        bn.running_var.uniform_(0.5, 2, generator=g)
        if affine:
            bn.weight.data.uniform_(-2, 2, generator=g)
            bn.bias.data.uniform_(-1, 1, generator=g)
        case = x.clone()
        case[:, :, 0, 0] = bn.running_mean  # (x - mean) * scale + bias == bias
        for layout in (case, case.contiguous(memory_format=torch.channels_last)):
            got = both_kernel_paths(bn, layout, mode, monkeypatch)
            with torch.no_grad():
                plain = bn(layout)
            assert not torch.equal(got, plain), "nothing was rounded"
            torch.testing.assert_close(got, plain, rtol=3e-7, atol=1e-6)
            shift = bn.bias if affine else torch.zeros(5)
            assert torch.equal(got[:, :, 0, 0], shift.expand(2, 5))


# ------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "random", "seed": 0}, "rr, sr, mca"),
        ({"mode": "rr", "seed": 0, "precision": 0}, "from 1 to 52"),
        ({"mode": "mca", "seed": 0, "precision": 53}, "from 1 to 52"),
        ({"mode": "rr", "seed": 0, "precision": True}, "from 1 to 52"),
        ({"mode": "rr", "seed": 1.5}, "seed must be an int"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mca_mode(**kwargs)


def test_mode_object() -> None:
    mode = mca_mode("sr", seed=3, precision=20)
    assert isinstance(mode, MCAMode) and MODES == ("rr", "sr", "mca", "flop")
    assert (mode.mode, mode.seed, mode.precision) == ("sr", 3, 20)


# ------------------------------------------------------------------------------ reproducibility
def small_net(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    y = F.conv2d(x, w, b, padding=1)
    y = F.batch_norm(y, torch.zeros(4), torch.full((4,), 2.0), training=False)
    return torch.softmax(F.max_pool2d(torch.tanh(y), 2), dim=1)


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_bit_identical_different_seed_differs(kernels, mode: str) -> None:
    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(s, generator=g) for s in ((2, 3, 16, 16), (4, 3, 3, 3), (4,)))
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(123)  # the global RNG must not matter...
        with mca_mode(mode, seed=seed):
            runs.append(small_net(x, w, b))
        torch.rand(5)  # ...nor be consumed differently
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert torch.allclose(runs[0], small_net(x, w, b), rtol=1e-4, atol=1e-6)


def test_stream_continues_across_with_blocks() -> None:
    a, b, _ = matmul_case()
    mode = mca_mode(seed=0)
    with mode:
        first = a @ b
    with mode:
        second = a @ b
    with mca_mode(seed=0):
        replay = a @ b
    assert not torch.equal(first, second) and torch.equal(first, replay)


# ------------------------------------------------------------------------------- inexact results
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["rr", "sr"])
def test_rounds_to_a_neighbour_of_the_float64_result(kernels, mode: str,
                                                     dtype: torch.dtype) -> None:
    a, b, exact = matmul_case(dtype)
    down, up = neighbours(exact, dtype)
    with mca_mode(mode, seed=5):
        y = a @ b
    assert y.dtype == dtype
    assert bool(((y == down) | (y == up)).all())  # never more than one ulp from float64
    inexact = down != up
    assert int(inexact.sum()) > 0.9 * exact.numel()
    moved = (y != exact.to(dtype))[inexact].double().mean().item()  # not the nearest
    if mode == "rr":  # 1/2 on average over 1,536 inexact elements
        assert 0.4 < moved < 0.6
    else:  # |y - nearest| / ulp is uniform on [0, 1/2]: 1/4 on average
        assert 0.15 < moved < 0.35


def test_rr_changes_low_bits_of_float32_results(kernels) -> None:
    a, b, exact = matmul_case()
    with mca_mode(seed=2):
        y = a @ b
    native = a @ b
    diff = (y.double() - exact).abs() / (torch.nextafter(y, torch.full_like(y, INF)) - y).double()
    assert bool((diff <= 1).all())
    assert not torch.equal(y, native) and torch.allclose(y, native, rtol=1e-5, atol=1e-5)


def test_sr_is_unbiased(kernels) -> None:
    # one op on 40,000 equal elements: 1 + 1e-8 is 0.0839 ulp above 1
    x = torch.ones(40_000)
    with mca_mode("sr", seed=11):
        y = x + 1e-8
    ulp = 2.0**-23
    p = (float(torch.tensor(1e-8, dtype=torch.float32)) + 1.0 - 1.0) / ulp
    up = (y == 1 + ulp).double().mean().item()
    assert bool(((y == 1) | (y == 1 + ulp)).all())
    assert abs(up - p) < 6 * math.sqrt(p * (1 - p) / x.numel())
    # many draws of one sum average to its float64 value
    v = torch.randn(257, generator=torch.Generator().manual_seed(3))
    exact = v.double().sum().item()
    draws = []
    for seed in range(400):
        with mca_mode("sr", seed=seed):
            draws.append(v.sum().item())
    down, up_ = (float(t) for t in neighbours(torch.tensor(exact, dtype=torch.float64),
                                              torch.float32))
    assert set(draws) <= {down, up_}
    q = (exact - down) / (up_ - down)
    mean = sum(draws) / len(draws)
    assert abs(mean - exact) < 6 * (up_ - down) * math.sqrt(q * (1 - q) / len(draws))


def test_mca_noise_grows_as_precision_shrinks() -> None:
    a, b, exact = matmul_case()
    rel = {}
    for t in (10, 24):
        with mca_mode("mca", seed=4, precision=t):
            y = a @ b
        rel[t] = ((y.double() - exact).abs() / exact.abs()).max().item()
    assert rel[24] < 2.0**-22
    assert 2.0**-14 < rel[10] < 2.0**-9  # |noise| <= 2**(floor(log2|y|) + 1 - t) / 2


# --------------------------------------------------------------------------------- exact results
@pytest.mark.parametrize("mode", MODES)
def test_exact_results_are_untouched(kernels, mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 3, 12, 12, generator=g), torch.randn(5, 3, 3, 3), torch.randn(5)
    tied = torch.tensor([[1.5, 1.5, 0.25, 0.25], [1.5, 1.5, 0.25, 0.25]]).view(1, 1, 2, 4)
    for seed in range(4):
        with mca_mode(mode, seed=seed):
            conv0 = F.conv2d(torch.zeros(2, 3, 8, 8), w, b, padding=1)
            twice, relu, half = x * 2, torch.relu(x), x.double() * 0.5
            values, indices = F.max_pool2d(tied, 2, return_indices=True)
            cast = torch.tensor([0.5, 3.0, -2.25], dtype=torch.float64).float()
        assert torch.equal(conv0, b.view(1, 5, 1, 1).expand(2, 5, 8, 8))
        assert torch.equal(twice, x * 2) and torch.equal(relu, torch.relu(x))
        assert torch.equal(half, x.double() * 0.5)  # float64: representable in float32
        assert torch.equal(values, torch.tensor([[[[1.5, 0.25]]]]))
        assert torch.equal(indices, torch.tensor([[[[0, 2]]]]))
        assert torch.equal(cast, torch.tensor([0.5, 3.0, -2.25]))


def test_non_finite_results(kernels) -> None:
    x = torch.tensor([INF, -INF, float("nan"), 3e38, 1.0, 1e-45])
    for seed in range(3):
        with mca_mode(seed=seed):
            y = x * 1.5
        assert y[:2].tolist() == [INF, -INF] and math.isnan(y[2]) and y[3] == INF
        assert y[4] == 1.5


def test_integer_and_bool_ops_pass_through() -> None:
    i = torch.arange(-6, 7)
    x = torch.randn(13, generator=torch.Generator().manual_seed(0))
    with mca_mode(seed=0):
        out = (i * 3 + 1, i // 4, i.sum(), x > 0, x.argmax(), torch.where(x > 0, i, -i),
               torch.bincount(i + 6), (x > 0).sum())
    native = (i * 3 + 1, i // 4, i.sum(), x > 0, x.argmax(), torch.where(x > 0, i, -i),
              torch.bincount(i + 6), (x > 0).sum())
    for got, want in zip(out, native, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


# ------------------------------------------------------------------- in-place, out=, tuples, ...
def test_in_place_and_out_keep_aliasing() -> None:
    a, b, exact = matmul_case()
    down, up = neighbours(exact, torch.float32)
    c = a @ b
    view = c[:4]
    out = torch.empty(0)
    with mca_mode(seed=1):
        ret = c.copy_(torch.zeros_like(c)).addmm_(a, b)
        ret_out = torch.mm(a, b, out=out)
        x = torch.ones(6)
        ret_add = x.add_(1e-8)
        pair = [torch.ones(200), torch.full((100,), 2.0)]
        torch._foreach_add_(pair, 3e-8)  # in place on a list, returns nothing
    assert ret is c and torch.equal(view, c[:4])  # same tensor, views still alias it
    assert ret_out is out and out.shape == (48, 32)
    for y in (c, out):
        assert bool(((y == down) | (y == up)).all()) and not torch.equal(y, exact.float())
    assert ret_add is x and bool(((x == 1) | (x == 1 + 2.0**-23)).all())
    for t, base in zip(pair, (1.0, 2.0), strict=True):  # rr: the nearest or the next float
        moved = t == base * (1 + 2.0**-23)
        assert bool((moved | (t == base)).all()) and 0.3 < moved.double().mean().item() < 0.7


def test_tuple_outputs() -> None:
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))
    with mca_mode(seed=0):
        values, idx = torch.max(x, dim=1)
        std, mean = torch.std_mean(x, dim=1)
    assert torch.equal(values, x.max(dim=1).values) and torch.equal(idx, x.argmax(dim=1))
    assert idx.dtype == torch.int64
    assert torch.allclose(std, x.std(dim=1)) and torch.allclose(mean, x.mean(dim=1))


def test_training_step() -> None:
    """Backward, optimiser and BatchNorm running-stat updates all run (and round) in the mode."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3))
    twin = copy.deepcopy(net)
    x, target = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    for model, mode in ((net, mca_mode(seed=0)), (twin, contextlib.nullcontext())):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with mode:
            F.cross_entropy(model(x), target).backward()
            opt.step()
    for (name, got), want in zip(net.state_dict().items(), twin.state_dict().values(),
                                 strict=True):
        assert torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-6), name
    assert not torch.equal(net[1].running_mean, torch.zeros(4))
    assert not torch.equal(net[0].weight, twin[0].weight)  # rounded differently


def test_conversion_to_lower_precision_is_rounded() -> None:
    x = torch.randn(500, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    down, up = neighbours(x, torch.float32)
    with mca_mode(seed=0):
        y = x.float()
        z = torch.empty(500).copy_(x)
    for r in (y, z):
        assert r.dtype == torch.float32 and bool(((r == down) | (r == up)).all())
        assert 150 < int((r != x.float()).sum()) < 350


def test_float64_results() -> None:
    """No wider recompute: float32-representable results kept, others moved by <= 1 ulp."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 40, generator=g).double(), torch.randn(40, 40, generator=g).double()
    exact = a @ b
    for mode, rate in (("rr", 0.5), ("sr", 0.25)):
        with mca_mode(mode, seed=0):
            y = a @ b
            w = torch.ones(1, 1, 3, 3, dtype=torch.float64)
            conv0 = F.conv2d(torch.zeros(1, 1, 6, 6, dtype=torch.float64), w,
                             torch.tensor([0.75], dtype=torch.float64), padding=1)
        steps = {torch.nextafter(exact, torch.full_like(exact, s)) for s in (-INF, INF)}
        ok = (y == exact) | torch.stack([y == t for t in steps]).any(0)
        assert bool(ok.all())
        moved = (y != exact).double().mean().item()
        assert abs(moved - rate) < 0.06
        assert bool((conv0 == 0.75).all())


# ------------------------------------------------------------------------------- fallbacks
@torch.library.custom_op("nanprobe_test::float32_only", mutates_args=())
def float32_only(x: Tensor) -> Tensor:
    if x.dtype != torch.float32:
        raise TypeError("float32 only")
    return x * 3


def test_op_without_float64_kernel_passes_through_with_one_warning() -> None:
    x = torch.randn(10)
    with pytest.warns(RuntimeWarning, match="float32_only"):
        with mca_mode(seed=0):
            y = float32_only(x)
    assert torch.equal(y, x * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with mca_mode(seed=0):
            y = float32_only(x)
    assert torch.equal(y, x * 3)


def test_user_errors_still_raise_and_the_op_stays_perturbed() -> None:
    a, b, _ = matmul_case()
    with mca_mode(seed=0), pytest.raises(RuntimeError):
        torch.mm(a, a)
    with mca_mode(seed=0):
        y = a @ b
    assert not torch.equal(y, a @ b)


@pytest.mark.parametrize(
    "shape",
    [(5,), (3 * _BLOCK + 7,), (3, _BLOCK // 2 + 1), (2, 3, 5, _BLOCK // 8), (7, _BLOCK + 1),
     (_BLOCK // 2, 3)],
)
def test_blocks_cover_every_element_once(shape: tuple[int, ...]) -> None:
    seen = torch.zeros(shape, dtype=torch.int32)
    for index in _blocks(torch.Size(shape)):
        assert 0 < seen[index].numel() <= _BLOCK
        seen[index] += 1
    assert bool((seen == 1).all())
    with mca_mode(seed=0):  # a large op is rounded block by block to the same neighbours
        y = torch.full(shape, 1.0) + 3e-8
    assert bool(((y == 1) | (y == 1 + 2.0**-23)).all())
    assert 0.3 < (y > 1).double().mean().item() < 0.7 or y.numel() < 100


# ------------------------------------------------------------------------------ convolution
@pytest.mark.parametrize(
    ("n", "c", "o", "k", "padding", "dilation", "bias"),
    [(2, 3, 5, 3, (1, 1), (1, 1), True), (1, 4, 2, 1, (0, 0), (1, 1), False),
     (2, 3, 4, 3, (2, 2), (2, 2), True), (3, 2, 3, 5, (1, 0), (2, 1), False)],
)
def test_float64_convolution(n: int, c: int, o: int, k: int, padding: tuple[int, int],
                             dilation: tuple[int, int], bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(n, c, 9, 11, generator=g).double(), torch.randn(o, c, k, k).double()
    b = torch.randn(o).double() if bias else None
    got = _conv64(x, w, b, [1, 1], list(padding), list(dilation), False, 1)
    want = F.conv2d(x, w, b, padding=padding, dilation=dilation)
    assert got is not None and got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert _conv64(x, w, b, [2, 2], list(padding), list(dilation), False, 1) is None


@pytest.mark.parametrize("bias", [True, False])
def test_float64_convolution_in_column_chunks(monkeypatch, bias: bool) -> None:
    """Chunks of 7 output columns (the last one short) give the same bits as one chunk."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 3, 9, 11, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    b = torch.randn(4, generator=g) if bias else None
    whole = _conv64(x, w, b, [1, 1], [1, 1], [1, 1], False, 1).clone()
    monkeypatch.setattr(mca, "CONV64_MIN_CHUNK", 1)
    monkeypatch.setattr(mca, "CONV64_CHUNK_BYTES", 8 * 4 * 7)
    chunked = _conv64(x, w, b, [1, 1], [1, 1], [1, 1], False, 1)
    assert torch.equal(chunked, whole)
    want = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    assert torch.allclose(chunked, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs", [{"padding": 1}, {"stride": 2}, {"groups": 2}])
def test_convolutions_round_to_neighbours(kernels, kwargs: dict) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 10, 10, generator=g)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 4 // kwargs.get("groups", 1), 3, 3, generator=g)
    b = torch.randn(6, generator=g)
    down, up = neighbours(F.conv2d(x.double(), w.double(), b.double(), **kwargs), torch.float32)
    with mca_mode(seed=0):
        y, y_cl = F.conv2d(x, w, b, **kwargs), F.conv2d(x_cl, w, b, **kwargs)
    for r in (y, y_cl):
        assert bool(((r == down) | (r == up)).all())
    assert y.is_contiguous()
    assert y_cl.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------- pooling ties, Verrou's fact
def first_pool_indices(model: torch.nn.Module, pool: torch.nn.Module, x: Tensor,
                       mode: MCAMode | None) -> Tensor:
    """Argmax indices of ``pool``'s 2x2 windows in one forward of ``model``."""
    seen: list[Tensor] = []
    handle = pool.register_forward_hook(
        lambda _m, inp, _o: seen.append(F.max_pool2d(inp[0], 2, return_indices=True)[1]))
    try:
        with torch.no_grad():
            if mode is None:
                model(x)
            else:
                with mode:
                    model(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("mode", ["rr", "flop"])
def test_mnist_zero_background_ties_survive_noisy_background_ties_flip(mode: str) -> None:
    """conv(0) + bias is exact, so zero-background windows stay tied; 0.1 ones do not."""
    torch.manual_seed(0)
    model = MnistCNN().eval()
    pool = model.layers[2]
    x = torch.zeros(2, 1, 28, 28)
    x[:, :, 10:18, 11:17] = torch.rand(2, 1, 8, 6)
    far = torch.ones(14, 14, dtype=torch.bool)  # windows whose inputs are all background
    far[4:10, 4:10] = False
    for background, flips_expected in ((0.0, False), (0.1, True)):
        xb = torch.where(x == 0, torch.tensor(background), x)
        native = first_pool_indices(model, pool, xb, None)
        flipped = 0
        for seed in range(3):
            got = first_pool_indices(model, pool, xb, mca_mode(mode, seed=seed))
            flipped += int((got != native)[..., far].sum())
        if flips_expected:
            assert flipped > 1000  # of 3 x 2 x 32 x 160 tied windows, ~3/4 expected
        else:
            assert flipped == 0


def vinn_with_exact_zero_background() -> FastSurferVINN:
    """The small VINN with zero conv biases: zero inputs stay exactly zero through every layer."""
    torch.manual_seed(0)
    model = FastSurferVINN(num_classes=4, num_filters=16, num_filters_interpol=8).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.bias.zero_()
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 2.0)
    return model


def vinn_indices(model: FastSurferVINN, x: Tensor, mode: MCAMode | None) -> list[Tensor]:
    found: list[Tensor] = []
    hooks = [getattr(model, f"encode{i}").register_forward_hook(
        lambda _m, _i, out: found.append(out[2])) for i in range(1, 5)]
    try:
        with torch.no_grad():
            if mode is None:
                logits = model(x)
            else:
                with mode:
                    logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    assert logits.shape == (1, 4, 64, 64) and bool(torch.isfinite(logits).all())
    return found


@pytest.mark.parametrize("mode", ["rr", "flop"])
def test_vinn_pool_indices_flip_on_noisy_background_only(mode: str) -> None:
    model = vinn_with_exact_zero_background()
    x = torch.zeros(1, 7, 64, 64)
    x[..., 4:12, 6:10] = torch.rand(7, 8, 4, generator=torch.Generator().manual_seed(1))
    noisy = torch.where(x == 0, torch.tensor(0.1), x)
    zero_native, noisy_native = vinn_indices(model, x, None), vinn_indices(model, noisy, None)
    flips = 0
    for seed in range(2):
        zero = vinn_indices(model, x, mca_mode(mode, seed=seed))
        for got, want in zip(zero, zero_native, strict=True):
            assert torch.equal(got, want)  # exact zeros: every tie survives, at every level
        first = vinn_indices(model, noisy, mca_mode(mode, seed=seed))[0]
        flips += int((first != noisy_native[0])[..., 16:, 16:].sum())  # far from the structure
    assert flips > 500  # of 2 x 16 x 256 background windows, ~half expected
