"""nan_conv2d: loop oracle, reference vs fast, PyTorch where semantics coincide, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_ops import loop_conv2d_mean

from nanprobe.ops import _kernels, _layout, nan_conv2d, nan_conv2d_with_stats
from nanprobe.ops import conv as conv_mod
from nanprobe.ops.fusion import RELU, SLOPE, Activation

NAN = float("nan")


@st.composite
def conv_cases(draw, max_size=10):
    k = draw(st.integers(1, 3))
    s = draw(st.integers(1, 2))
    d = draw(st.integers(1, 2))
    p = draw(st.integers(0, 2))
    span = d * (k - 1) + 1
    h = draw(st.integers(max(span - 2 * p, 1), max_size))
    w = draw(st.integers(max(span - 2 * p, 1), max_size))
    n, c, co = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    kind = draw(st.sampled_from(["none", "blob", "scatter", "all"]))
    if kind == "blob":  # a NaN rectangle in every channel
        r0, c0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        x[..., r0 : r0 + draw(st.integers(1, h)), c0 : c0 + draw(st.integers(1, w))] = NAN
    elif kind == "scatter":  # single NaN entries in random channels
        x = x.masked_fill(torch.rand(x.shape, generator=g, dtype=torch.float64) < 0.3, NAN)
    elif kind == "all":
        x.fill_(NAN)
    weight = torch.randn(co, c, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(co, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    threshold = draw(st.sampled_from([0.0, 0.3, 0.5, 0.75, 1.0]))
    count_padding = draw(st.booleans())
    return x, weight, bias, s, p, d, threshold, count_padding


def _same(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=tol, atol=tol)


@settings(max_examples=40, deadline=None)
@given(conv_cases(max_size=6))
def test_reference_matches_loop_oracle(case):
    x, weight, bias, s, p, d, threshold, count_padding = case
    ref = nan_conv2d(x, weight, bias, s, p, d, nan_threshold=threshold,
                     count_padding=count_padding, impl="reference")
    loop = loop_conv2d_mean(x, weight, bias, s, p, d, threshold, count_padding)
    _same(ref, loop, 1e-9)


@settings(max_examples=120, deadline=None)
@given(conv_cases(), st.sampled_from(["mean", "noisy_max", "zero", -0.75]),
       st.sampled_from(["fast", "auto"]),
       st.booleans())
def test_fast_matches_reference(kernels, case, fill, impl, channels_last):
    x, weight, bias, s, p, d, threshold, count_padding = case
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kwargs = dict(nan_threshold=threshold, fill=fill, count_padding=count_padding, sigma=0.5)
    ref = nan_conv2d(x, weight, bias, s, p, d, impl="reference",
                     generator=torch.Generator().manual_seed(7), **kwargs)
    fast = nan_conv2d(x, weight, bias, s, p, d, impl=impl,
                      generator=torch.Generator().manual_seed(7), **kwargs)
    _same(fast, ref, 1e-9)  # same skip set; noisy_max draws in the same order


def test_fast_matches_reference_float32_with_bands(kernels, monkeypatch):
    monkeypatch.setattr(conv_mod, "BAND_ROWS", 4)  # several bands on a small map
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 40, 33, generator=g)
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(33.0), indexing="ij")
    x = x.masked_fill(((yy - 20) / 15) ** 2 + ((xx - 16) / 11) ** 2 > 1, NAN)
    x[0, 1, 20, 16] = NAN  # an isolated partial NaN
    w, b = torch.randn(6, 5, 3, 3, generator=g), torch.randn(6, generator=g)
    for threshold in (1.0, 0.5):
        ref, rs = nan_conv2d_with_stats(x, w, b, padding=1, nan_threshold=threshold,
                                        impl="reference")
        fast, fs = nan_conv2d_with_stats(x, w, b, padding=1, nan_threshold=threshold, impl="fast")
        _same(fast, ref, 1e-4)
        assert (rs.skipped, rs.partial) == (fs.skipped, fs.partial) and fs.skipped > 0
        assert fs.positions_executed < fs.positions  # the bands left skipped regions out


@pytest.mark.parametrize("impl", ["reference", "fast", "auto"])
@pytest.mark.parametrize("kwargs", [dict(), dict(padding=1), dict(stride=2, padding=2),
                                    dict(dilation=2, padding=(2, 1)), dict(stride=(2, 1))])
def test_equals_torch_without_nan(kernels, impl, kwargs):
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3, 4, 13, 11, generator=g), torch.randn(5, 4, 3, 3, generator=g), None
    torch.testing.assert_close(nan_conv2d(x, w, b, impl=impl, **kwargs),
                               F.conv2d(x, w, b, **kwargs), rtol=1e-5, atol=1e-5)


def test_large_nan_free_conv_equals_torch(monkeypatch):
    monkeypatch.setattr(conv_mod, "CHANNELS_LAST_MIN_MACS", 1e5)  # the channels-last path
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(2, 8, 32, 32, generator=g), torch.randn(6, 8, 3, 3, generator=g),
               torch.randn(6, generator=g))
    torch.testing.assert_close(nan_conv2d(x, w, b, padding=1), F.conv2d(x, w, b, padding=1),
                               rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 20), st.integers(1, 40), st.integers(1, 6),
       st.integers(0, 6), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_band_rects_kernel_covers_computed_positions_tightly(n, ho, wo, band_rows, gap, density,
                                                             seed):
    g = torch.Generator().manual_seed(seed)
    skip = torch.rand(n, ho, wo, generator=g) >= density
    skip[:, :, wo // 3 : wo // 3 + gap + 2] = True  # a gap wider than merge_gap in every row
    rects = _kernels.band_rects(skip, band_rows, gap)
    covered = torch.zeros(n, ho, wo, dtype=torch.int64)
    for i, r0, r1, c0, c1 in rects:
        assert r0 // band_rows == r1 // band_rows and 0 <= c0 <= c1 < wo  # inside one band
        box = ~skip[i, r0 : r1 + 1, c0 : c1 + 1]
        assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()  # tight
        covered[i, r0 : r1 + 1, c0 : c1 + 1] += 1
    assert covered.max() <= 1  # disjoint
    assert (covered[~skip] == 1).all()  # every computed position in a rectangle
    # columns of one band's rectangles are separated by more than the merge gap
    for i in range(n):
        for top in range(0, ho, band_rows):
            spans = sorted((c0, c1) for j, r0, _, c0, c1 in rects if j == i and r0 // band_rows
                           == top // band_rows)
            assert all(b[0] - a[1] - 1 > gap for a, b in zip(spans, spans[1:], strict=False))


def test_threshold_edges_and_all_nan(kernels):
    x = torch.randn(1, 2, 6, 6)
    w = torch.randn(3, 2, 3, 3)
    assert torch.isnan(nan_conv2d(x, w, nan_threshold=0.0)).all()  # r >= 0 always
    assert torch.isnan(nan_conv2d(torch.full((1, 2, 6, 6), NAN), w, padding=1)).all()
    x[0, 0, 0, 0] = NAN  # one NaN out of 18 entries: computed at threshold 1, mean-filled
    y = nan_conv2d(x, w, nan_threshold=1.0)
    assert not torch.isnan(y).any()
    window = x[0, :, :3, :3]
    filled = window.nan_to_num(nan=window.nanmean().item())
    torch.testing.assert_close(y[0, :, 0, 0], (w * filled).sum((1, 2, 3)))
    for fill, value in (("zero", 0.0), (-0.42, -0.42)):
        y = nan_conv2d(x, w, nan_threshold=1.0, fill=fill)
        torch.testing.assert_close(y[0, :, 0, 0], (w * window.nan_to_num(nan=value)).sum((1, 2, 3)))


def test_count_padding_reactivates_border_of_nan_background(kernels):
    x = torch.full((1, 1, 8, 8), NAN)
    x[..., 3:5, 3:5] = 1.0
    w = torch.ones(1, 1, 3, 3)
    default = nan_conv2d(x, w, padding=1, nan_threshold=0.7)
    paper = nan_conv2d(x, w, padding=1, nan_threshold=0.7, count_padding=True)
    # corner window: 4 in-bounds NaN entries of 4 (r=1) vs 4 NaN of 9 entries (r=0.44)
    assert torch.isnan(default[0, 0, 0, 0]) and not torch.isnan(paper[0, 0, 0, 0])


def test_noisy_max_is_reproducible_and_near_the_max(kernels):
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 3.0
    x[0, 0, 1, 1] = NAN
    w = torch.zeros(1, 1, 3, 3)
    w[0, 0, 0, 0] = 1.0  # output = the window's top-left entry
    run = [nan_conv2d(x, w, fill="noisy_max", sigma=1e-2,
                      generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(run[0], run[1])
    assert abs(run[0][0, 0, 1, 1].item() - 3.0) < 0.1  # window at (1,1): max of the rest is 3


def test_3d_input_and_float64(kernels):
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    x[0, 0, 0] = NAN
    y = nan_conv2d(x, torch.randn(3, 2, 3, 3, dtype=torch.float64))
    assert y.shape == (3, 4, 4) and y.dtype == torch.float64


@pytest.mark.parametrize("kwargs, match", [
    (dict(groups=2), "groups"),
    (dict(nan_threshold=1.5), "nan_threshold"),
    (dict(nan_threshold=-0.1), "nan_threshold"),
    (dict(fill="median"), "fill"),
    (dict(fill=float("nan")), "fill"),
    (dict(fill=True), "fill"),
    (dict(impl="cuda"), "impl"),
    (dict(sigma=-1.0), "sigma"),
    (dict(stride=0), "stride"),
    (dict(dilation=(1, 0)), "dilation"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nan_conv2d(torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3), **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="4-D"):
        nan_conv2d(torch.randn(6, 6), torch.randn(3, 2, 3, 3))
    with pytest.raises(ValueError, match="C_in"):
        nan_conv2d(torch.randn(1, 4, 6, 6), torch.randn(3, 2, 3, 3))
    with pytest.raises(ValueError, match="bias"):
        nan_conv2d(torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3), torch.randn(4))
    with pytest.raises(ValueError, match="too small"):
        nan_conv2d(torch.randn(1, 2, 2, 2), torch.randn(3, 2, 3, 3))


@pytest.mark.parametrize("rate", [0.001, 0.2])  # few partial windows (gather) / many (mask conv)
@pytest.mark.parametrize("whole_pixels", [False, True])
def test_mean_fill_paths(kernels, rate, whole_pixels):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 40, 30, generator=g, dtype=torch.float64)
    shape = (2, 1, 40, 30) if whole_pixels else x.shape
    x = x.masked_fill(torch.rand(shape, generator=g, dtype=torch.float64) < rate, NAN)
    w = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64)
    for threshold in (1.0, 0.3):
        ref = nan_conv2d(x, w, padding=1, nan_threshold=threshold, impl="reference")
        _same(nan_conv2d(x, w, padding=1, nan_threshold=threshold, impl="fast"), ref, 1e-9)


def test_inference_only_weight_that_requires_grad(kernels):
    x = torch.randn(1, 2, 6, 6)
    x[0, :, :2, :2] = NAN
    w = torch.randn(3, 2, 3, 3, requires_grad=True)  # nn.Conv2d parameters do
    y = nan_conv2d(x, w, padding=1)
    assert not y.requires_grad and torch.isnan(y).any()


# --- absorbed operations, positions counters, carried NaN layouts ---------------------------

ACTIVATIONS = {
    "none": None,
    "relu": Activation(RELU),
    "leaky": Activation(SLOPE, 0.1),
    "prelu": Activation(SLOPE, torch.tensor([0.25])),
    "prelu_c": "per-channel",  # one slope per channel, drawn per case
    "zero_slope": Activation(SLOPE, 0.0),  # turns -inf into NaN
}


def _activation(name: str, channels: int, g: torch.Generator) -> Activation | None:
    act = ACTIVATIONS[name]
    if act == "per-channel":
        return Activation(SLOPE, torch.randn(channels, generator=g, dtype=torch.float64))
    return act


@settings(max_examples=120, deadline=None)
@given(conv_cases(), st.sampled_from(["mean", "zero", 0.5, "noisy_max"]),
       st.sampled_from(sorted(ACTIVATIONS)), st.sampled_from(sorted(ACTIVATIONS)),
       st.booleans(), st.booleans(), st.booleans())
def test_absorbed_operations_match_composed_reference(kernels, case, fill, pre_name, post_name,
                                                      with_maxout, channels_last, infinities):
    x, weight, bias, s, p, d, threshold, count_padding = case
    g = torch.Generator().manual_seed(11)
    # a zero slope turns -inf into NaN: the NaN layout is the activated one's. (The mean fill
    # of a window whose numbers include an infinity is itself infinite; the fill term is then
    # added by linearity and may be inf where the reference gets inf - inf = NaN.)
    if infinities and fill != "mean":
        x = x.masked_fill(torch.rand(x.shape, generator=g, dtype=x.dtype) < 0.1, -math.inf)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pre = _activation(pre_name, x.shape[1], g)
    post = _activation(post_name, weight.shape[0], g)
    kwargs = dict(nan_threshold=threshold, fill=fill, count_padding=count_padding, sigma=0.5)
    plain = nan_conv2d(x if pre is None else pre(x), weight, bias, s, p, d, impl="reference",
                       generator=torch.Generator().manual_seed(7), **kwargs)
    partner = None
    if with_maxout:
        partner = torch.randn(plain.shape, generator=g, dtype=x.dtype)
        partner = partner.masked_fill(torch.rand(plain.shape, generator=g) < 0.2, NAN)
    expected = plain if post is None else post(plain)
    if partner is not None:
        expected = torch.maximum(expected, partner)
    got = nan_conv2d(x, weight, bias, s, p, d, pre_activation=pre, post_activation=post,
                     maxout=partner, generator=torch.Generator().manual_seed(7), **kwargs)
    _same(got, expected, 1e-9)


def test_positions_counters(kernels):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 48, 40, generator=g)
    x[0, :, :30] = NAN
    x[1, :, :, 25:] = NAN
    w = torch.randn(5, 4, 3, 3, generator=g)
    y, st_ = nan_conv2d_with_stats(x, w, padding=1, nan_threshold=0.6, impl="fast")
    skipped = int(torch.isnan(y).all(1).sum())
    assert st_.skipped == skipped > 0
    assert st_.positions_executed == st_.positions - st_.skipped  # given a value
    assert st_.positions_executed <= st_.positions_computed < st_.positions  # bands, not all


def _spy(monkeypatch) -> list:
    """Record the calls of the per-pixel NaN scan of the numba path (which carries layouts)."""
    monkeypatch.setenv("NANPROBE_KERNELS", "numba")
    calls = []
    original = _kernels.pixel_stats

    def counting(*args, **kw):
        calls.append(args[0].shape)
        return original(*args, **kw)

    monkeypatch.setattr(_kernels, "pixel_stats", counting)
    return calls


def _chain_input() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A NaN op output (conv + PReLU + maxout) that carries its layout, and the next weight."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 40, 36, generator=g)
    x[..., :12, :] = NAN
    x[0, 2, 30, 30] = NAN  # one channel only
    w1, w2 = torch.randn(6, 6, 3, 3, generator=g), torch.randn(5, 6, 3, 3, generator=g)
    y = nan_conv2d(x, w1, padding=1, nan_threshold=0.5, maxout=x,
                   post_activation=Activation(SLOPE, torch.tensor([0.2])))
    return y, w2, x


def test_carried_layout_is_exact_and_used(monkeypatch):
    calls = _spy(monkeypatch)
    y, w2, _ = _chain_input()
    carried = _layout.recall(y)
    assert carried is not None
    assert torch.equal(carried.count, torch.isnan(y).sum(1, dtype=torch.int32))
    calls.clear()
    for pre in (None, Activation(RELU)):
        got = nan_conv2d(y, w2, padding=1, nan_threshold=0.5, pre_activation=pre)
        ref = nan_conv2d(y.clone() if pre is None else pre(y), w2, padding=1,
                         nan_threshold=0.5, impl="reference")
        _same(got, ref, 1e-4)
    assert calls == []  # neither call scanned its input for NaN


def test_stale_or_other_tensors_are_scanned(monkeypatch):
    calls = _spy(monkeypatch)
    y, w2, _ = _chain_input()
    calls.clear()
    y[1, :, 30:34, 10:14] = NAN  # in place: the version counter moves on
    assert _layout.recall(y) is None
    got = nan_conv2d(y, w2, padding=1, nan_threshold=0.5)
    _same(got, nan_conv2d(y, w2, padding=1, nan_threshold=0.5, impl="reference"), 1e-4)
    assert len(calls) == 1
    fresh, _, _ = _chain_input()
    assert _layout.recall(fresh) is not None
    for other in (fresh.clone(), fresh[:, :6], fresh.detach()):  # new objects: scanned
        assert _layout.recall(other) is None
    # a zero slope turns -inf into NaN: a carried layout with infinities is not used then
    partner = torch.zeros(2, 5, 40, 36)
    partner[0, 1, 25, 3] = -math.inf
    partner[1, 0, 36, 7] = math.inf
    z = nan_conv2d(fresh, w2, padding=1, nan_threshold=0.5,
                   maxout=-partner)  # -inf at (1, 0, 36, 7)
    assert not _layout.recall(z).finite
    zero = Activation(SLOPE, 0.0)
    calls.clear()
    got = nan_conv2d(z, w2[:, :5], padding=1, pre_activation=zero)
    assert len(calls) == 1
    _same(got, nan_conv2d(zero(z), w2[:, :5], padding=1, impl="reference"), 1e-4)


def test_inference_mode_carries_nothing(monkeypatch):
    monkeypatch.setenv("NANPROBE_KERNELS", "numba")
    _, w2, x = _chain_input()
    with torch.inference_mode():
        y = nan_conv2d(x, w2[:, :6].repeat(2, 1, 1, 1)[:6], padding=1, maxout=x)
        assert _layout.recall(y) is None
        got = nan_conv2d(y, w2, padding=1)
    _same(got, nan_conv2d(y, w2, padding=1, impl="reference"), 1e-4)


def test_bad_absorbed_arguments():
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="maxout"):
        nan_conv2d(x, w, maxout=torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match="pre_activation"):
        nan_conv2d(x, w, pre_activation=torch.relu)
