"""nan_max_pool2d / nan_max_unpool2d against loops and against PyTorch where semantics coincide."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_ops import loop_max_pool2d, loop_max_unpool2d

from nanprobe.ops import _layout, nan_max_pool2d, nan_max_unpool2d

NAN = float("nan")


@st.composite
def pool_cases(draw):
    k = draw(st.integers(1, 3))
    s = draw(st.integers(1, 3))
    p = draw(st.integers(0, k // 2))
    h = draw(st.integers(max(k - 2 * p, 1), 9))
    w = draw(st.integers(max(k - 2 * p, 1), 9))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    # few distinct levels -> many exact and near ties; some NaN
    levels = draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 1.0 + 1e-8, 1.5, -2.0, NAN, NAN,
                                            -math.inf, math.inf]),
                           min_size=n * c * h * w, max_size=n * c * h * w))
    x = torch.tensor(levels, dtype=dtype).reshape(n, c, h, w)
    tie_limit = draw(st.sampled_from([None, 1, 2]))
    tie_eps = draw(st.sampled_from([0.0, 1e-7, 0.25, 0.6]))
    tie_rtol = draw(st.sampled_from([0.0, 0.1]))
    return x, k, s, p, tie_limit, tie_eps, tie_rtol


@settings(max_examples=150, deadline=None)
@given(pool_cases(), st.booleans())
def test_pool_matches_loop_reference(kernels, case, channels_last):
    x, k, s, p, tie_limit, tie_eps, tie_rtol = case
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    v, i = nan_max_pool2d(x, k, s, p, tie_limit=tie_limit, tie_eps=tie_eps, tie_rtol=tie_rtol)
    rv, ri = loop_max_pool2d(x, k, s, p, tie_limit, tie_eps, tie_rtol)
    assert torch.equal(torch.isnan(v), torch.isnan(rv))
    assert torch.equal(v.nan_to_num(), rv.nan_to_num())
    assert torch.equal(i, ri)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.integers(0, 2**31 - 1))
def test_pool_equals_torch_without_ties_or_nan(kernels, k, s, p, seed):
    p = min(p, k // 2)
    x = torch.randn(2, 3, 11, 8, generator=torch.Generator().manual_seed(seed))
    v, i = nan_max_pool2d(x, k, s, p)
    tv, ti = F.max_pool2d(x, k, s, p, return_indices=True)
    assert torch.equal(v, tv) and torch.equal(i, ti)


def test_exact_tie_is_nan_and_index_zero(kernels):
    x = torch.tensor([[[[1.0, 1.0], [0.0, 0.5]]]])
    v, i = nan_max_pool2d(x, 2)
    assert math.isnan(v.item()) and i.item() == 0
    v, i = nan_max_pool2d(x, 2, tie_limit=2)
    assert v.item() == 1.0 and i.item() == 0  # first maximum in row-major order
    v, i = nan_max_pool2d(x, 2, tie_limit=None)
    assert v.item() == 1.0


def test_tie_exactly_at_eps_is_not_a_tie(kernels):
    x = torch.tensor([[[[1.0, 0.75], [0.0, 0.0]]]])
    assert nan_max_pool2d(x, 2, tie_eps=0.25)[0].item() == 1.0  # |0.75 - 1| == eps: not < eps
    assert math.isnan(nan_max_pool2d(x, 2, tie_eps=0.2500001)[0].item())
    assert math.isnan(nan_max_pool2d(x, 2, tie_eps=0.0, tie_rtol=0.26)[0].item())


def test_nan_entries_are_ignored_and_all_nan_window_is_nan(kernels):
    x = torch.tensor([[[[NAN, 2.0, NAN, NAN], [1.0, NAN, NAN, NAN]]]])
    v, i = nan_max_pool2d(x, 2)
    assert v[0, 0, 0, 0].item() == 2.0 and i[0, 0, 0, 0].item() == 1
    assert math.isnan(v[0, 0, 0, 1].item()) and i[0, 0, 0, 1].item() == 0


def test_all_nan_input_and_3d_input(kernels):
    v, i = nan_max_pool2d(torch.full((3, 4, 4), NAN), 2)
    assert v.shape == (3, 2, 2) and torch.isnan(v).all() and (i == 0).all()
    assert nan_max_pool2d(torch.randn(3, 4, 4), 2, return_indices=False).shape == (3, 2, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=2, stride=0), "stride"),
    (dict(kernel_size=2, padding=2), "padding"),
    (dict(kernel_size=2, tie_limit=0), "tie_limit"),
    (dict(kernel_size=2, tie_eps=-1.0), "tie_eps"),
    (dict(kernel_size=2, tie_rtol=float("nan")), "tie_rtol"),
    (dict(kernel_size=(2, 2, 2)), "kernel_size"),
])
def test_pool_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nan_max_pool2d(torch.randn(1, 1, 4, 4), **kwargs)


def test_pool_bad_input():
    with pytest.raises(ValueError, match="4-D"):
        nan_max_pool2d(torch.randn(4, 4), 2)
    with pytest.raises(ValueError, match="floating"):
        nan_max_pool2d(torch.ones(1, 1, 4, 4, dtype=torch.int64), 2)


@settings(max_examples=80, deadline=None)
@given(pool_cases(), st.booleans())
def test_unpool_matches_loop_reference(kernels, case, channels_last):
    x, k, s, p, tie_limit, tie_eps, tie_rtol = case
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    v, i = nan_max_pool2d(x, k, s, p, tie_limit=tie_limit, tie_eps=tie_eps, tie_rtol=tie_rtol)
    out = nan_max_unpool2d(v, i, k, s, p, output_size=x.shape)
    ref = loop_max_unpool2d(v, i, k, s, p, x.shape[-2], x.shape[-1])
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.integers(1, 2),
       st.integers(1, 3), st.integers(2, 9), st.integers(2, 9), st.floats(0.0, 1.0),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_unpool_foreign_indices_match_loop_reference(kernels, k, s, p, n, c, h, w, stray,
                                                     channels_last, seed):
    """Indices that point outside their own window (a decoder unpooled with an encoder's
    indices, or any index map): sequential scatter order, then NaN windows."""
    p = min(p, k // 2)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    if min(ho, wo) < 1:
        return
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, c, ho, wo, generator=g).round()  # few levels: clashes show order
    values[torch.rand(values.shape, generator=g) < 0.2] = NAN
    own = nan_max_pool2d(torch.randn(n, c, h, w, generator=g), k, s, p)[1]
    foreign = torch.randint(0, h * w, values.shape, generator=g)
    indices = torch.where(torch.rand(values.shape, generator=g) < stray, foreign, own)
    if channels_last:
        values = values.contiguous(memory_format=torch.channels_last)
        indices = indices.contiguous(memory_format=torch.channels_last)
    out = nan_max_unpool2d(values, indices, k, s, p, output_size=(h, w))
    ref = loop_max_unpool2d(values, indices, k, s, p, h, w)
    assert torch.equal(out.nan_to_num(7.5), ref.nan_to_num(7.5))


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.integers(2, 9),
       st.integers(2, 9), st.sampled_from([0.0, 0.3]), st.booleans(), st.integers(0, 2**31 - 1))
def test_unpool_absorbs_maximum(kernels, k, s, p, h, w, stray, channels_last, seed):
    """``maxout``: torch.maximum(unpooled, maxout), computed in the unpooling pass; on the numba
    path the output carries its exact NaN count per pixel."""
    p = min(p, k // 2)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    if min(ho, wo) < 1:
        return
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(2, 3, ho, wo, generator=g)
    values[torch.rand(values.shape, generator=g) < 0.3] = NAN
    own = nan_max_pool2d(torch.randn(2, 3, h, w, generator=g), k, s, p)[1]
    foreign = torch.randint(0, h * w, values.shape, generator=g)
    indices = torch.where(torch.rand(values.shape, generator=g) < stray, foreign, own)
    partner = torch.randn(2, 3, h, w, generator=g)
    partner[torch.rand(partner.shape, generator=g) < 0.2] = NAN
    partner[0, 0, 0, 0] = math.inf
    if channels_last:
        values, indices, partner = (t.contiguous(memory_format=torch.channels_last)
                                    for t in (values, indices, partner))
    out = nan_max_unpool2d(values, indices, k, s, p, output_size=(h, w), maxout=partner)
    ref = torch.maximum(loop_max_unpool2d(values, indices, k, s, p, h, w), partner)
    assert torch.equal(out.nan_to_num(7.5), ref.nan_to_num(7.5))
    carried = _layout.recall(out)
    if kernels == "numba":
        assert torch.equal(carried.count, torch.isnan(ref).sum(1, dtype=torch.int32))
        assert carried.finite == (not torch.isinf(ref).any())
    else:
        assert carried is None


@pytest.mark.parametrize("k, s, p, size", [(2, 2, 0, (8, 8)), (3, 2, 1, (9, 7)), (2, 1, 0, (5, 6))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_unpool_equals_torch_for_finite_values(kernels, k, s, p, size, channels_last):
    x = torch.randn(2, 3, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    v, i = F.max_pool2d(x, k, s, p, return_indices=True)
    assert torch.equal(nan_max_unpool2d(v, i, k, s, p, output_size=x.shape),
                       F.max_unpool2d(v, i, k, s, p, output_size=x.shape))
    default = F.max_unpool2d(v, i, k, s, p)
    assert torch.equal(nan_max_unpool2d(v, i, k, s, p), default)


def test_unpool_spreads_nan_over_window(kernels):
    x = torch.tensor([[[[1.0, 1.0, 0.0, 3.0], [0.0, 0.0, 2.0, 1.0]]]])
    v, i = nan_max_pool2d(x, 2)
    out = nan_max_unpool2d(v, i, 2, output_size=x.shape)
    assert torch.isnan(out[..., :2]).all()
    assert out[0, 0, 0, 3].item() == 3.0 and out[0, 0, 1, 2].item() == 0.0
    # a NaN value's index is ignored, even when it is out of range
    garbage = i.masked_fill(torch.isnan(v), 10**6)
    assert torch.equal(nan_max_unpool2d(v, garbage, 2, output_size=x.shape).nan_to_num(9.0),
                       out.nan_to_num(9.0))


def test_unpool_bad_arguments(kernels):
    v, i = nan_max_pool2d(torch.randn(1, 1, 4, 4), 2)
    with pytest.raises(ValueError, match="indices"):
        nan_max_unpool2d(v, i.float(), 2)
    with pytest.raises(ValueError, match="indices"):
        nan_max_unpool2d(v, i[..., :1], 2)
    with pytest.raises(ValueError, match="out of range"):
        nan_max_unpool2d(v, i + 100, 2)
    with pytest.raises(ValueError, match="output_size"):
        nan_max_unpool2d(v, i, 2, output_size=(9, 9))


def test_fused_kernels_dispatch(monkeypatch):
    from nanprobe.ops import _kernels

    monkeypatch.setenv(_kernels.ENV, "numba")
    x = torch.randn(1, 2, 4, 4)
    assert _kernels.enabled(x) and _kernels.enabled(x.double())
    assert not _kernels.enabled(x.half())  # numba has no half precision: torch path
    monkeypatch.setenv(_kernels.ENV, "torch")
    assert not _kernels.enabled(x)


def test_inference_only_inputs_that_require_grad(kernels):
    x = torch.randn(1, 2, 4, 4, requires_grad=True)  # e.g. a layer output outside no_grad
    v, i = nan_max_pool2d(x, 2)
    assert not v.requires_grad
    assert torch.equal(v, F.max_pool2d(x.detach(), 2))
    assert not nan_max_unpool2d(v, i, 2).requires_grad
