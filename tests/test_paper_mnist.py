"""The paper-conventions reproduction of analyses/paper_mnist_table.py against loop oracles
written from the paper's algorithms (its committed ``nan_ops.py``): the batch-wide mean fill,
Table 1's skip count, the folds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the analyses/ scripts

from analyses.paper_mnist_table import (  # noqa: E402
    PAPER,
    PAPER_FILLS,
    PAPER_POOLING,
    BatchMeanNanConv2d,
    evaluate_folds,
    goal,
    paper_folds,
    paper_nanified,
)
from nanprobe.data.mnist import load_heldout  # noqa: E402
from nanprobe.models.registry import load  # noqa: E402
from nanprobe.ops import nan_max_pool2d  # noqa: E402


def batch_mean_conv_oracle(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           padding: int, threshold: float) -> torch.Tensor:
    """The paper's committed NaN convolution, one output position at a time: NaN share per
    sample over C*k*k of the zero-padded window, its NaNs replaced by the mean of the numbers
    of that window over the whole batch (0 when none), conv, NaN where the share >= t."""
    n, _, h, w = x.shape
    cout, _, k, _ = weight.shape
    xp = F.pad(x, (padding,) * 4)
    out = torch.empty(n, cout, h + 2 * padding - k + 1, w + 2 * padding - k + 1,
                      dtype=torch.float64)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            patch = xp[:, :, i : i + k, j : j + k].double()
            nan = torch.isnan(patch)
            ratio = nan.sum((1, 2, 3)) / nan[0].numel()
            numbers = patch[~nan]
            fill = numbers.mean() if numbers.numel() else torch.tensor(0.0, dtype=torch.float64)
            filled = torch.where(nan, fill, patch)
            value = (filled[:, None] * weight.double()[None]).sum((2, 3, 4)) + bias.double()
            out[:, :, i, j] = torch.where(ratio[:, None] >= threshold, float("nan"), value)
    return out


@pytest.mark.parametrize("threshold", [1.0, 0.5, 0.3])
def test_batch_mean_conv_matches_the_paper_loop(threshold):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 4, 7, 6, generator=g)
    x[0, :, 2:6, 1:5] = float("nan")  # a NaN block in every channel: skipped inside at t = 1
    x[1, 1:3][torch.rand(2, 7, 6, generator=g) < 0.5] = float("nan")  # channel-wise NaN
    x[2, :, :, :2] = float("nan")  # NaN at the border: padding keeps the share below 1
    conv = nn.Conv2d(4, 5, 3, padding=1)
    module = BatchMeanNanConv2d(conv, threshold)
    got = module(x)
    want = batch_mean_conv_oracle(x, conv.weight.detach(), conv.bias.detach(), 1, threshold)
    torch.testing.assert_close(got.double(), want, equal_nan=True, rtol=1e-5, atol=1e-5)
    skipped = torch.isnan(want).all(1)
    assert module.last_stats["skipped"] == int(skipped.sum()) > 0
    assert module.last_stats["positions"] == skipped.numel()
    assert module.last_stats["macs_skipped"] == int(skipped.sum()) * 5 * 4 * 9
    assert torch.isnan(got).any(1).equal(skipped)  # NaN in all channels or in none


def test_batch_mean_conv_without_nan_is_the_convolution():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.rand(2, 2, 5, 5)
    torch.testing.assert_close(BatchMeanNanConv2d(conv, 1.0)(x), conv(x).detach())


def test_folds_are_stratified_disjoint_and_independent_of_order():
    images, labels = load_heldout()
    folds = paper_folds(images, labels)
    assert len(folds) == 5 and sorted(np.concatenate(folds).tolist()) == list(range(1000))
    for fold in folds:
        assert np.bincount(labels[fold], minlength=10).tolist() == [20] * 10
    order = np.random.default_rng(0).permutation(1000)
    shuffled = paper_folds(images[order], labels[order])
    for fold, other in zip(folds, shuffled, strict=True):
        assert sorted(images[i].tobytes() for i in fold) == sorted(
            images[order][i].tobytes() for i in other)


def test_table1_skips_are_the_papers_count_on_conv2():
    """conv2 sees pool1's NaN only (conv1's input has none): its skipped positions are the
    windows of pool1's output whose C*3*3 zero-padded entries are all NaN (t = 1), counted
    here directly from the plain model with the paper's pooling rule."""
    loaded = load("mnist-paper")
    images, labels = load_heldout()
    x = torch.from_numpy(images[:40])
    result = evaluate_folds(paper_nanified(loaded, 1.0, "zero"), x, labels[:40],
                            [np.arange(20), np.arange(20, 40)])
    with torch.no_grad():
        relu1 = loaded.model.layers[:3](x)
    pooled = nan_max_pool2d(relu1, 2, **PAPER_POOLING, return_indices=False)
    nan = F.pad(torch.isnan(pooled).double(), (1, 1, 1, 1))  # padding counts as a number
    full = F.avg_pool2d(nan, 3, 1).mean(1) == 1.0  # every entry of the window NaN
    assert result["skip_layers"]["conv2"] == pytest.approx(full.double().mean().item())
    assert result["skip_layers"]["conv1"] == 0.0 and result["skip_layers"]["conv2"] > 0.05
    assert result["skip_table1"] == pytest.approx(
        np.mean([result["skip_layers"][n] for n in ("conv2", "conv3", "conv4")]))
    assert len(result["accuracy_folds"]) == 2


def test_goal_picks_the_most_accurate_fill_that_skips_enough():
    row = {"accuracy": 0.97, "skip_table1": 0.05}
    fills = {"a": {"1": row}, "b": {"1": {**row, "accuracy": 0.98}},
             "c": {"1": {**row, "skip_table1": 0.01}}, "d": {"1": {**row, "accuracy": 0.9}}}
    g = goal(0.985, fills)
    assert g["fills_meeting_it"] == ["a", "b"] and g["best_fill"] == "b"
    assert goal(0.985, {"d": fills["d"]})["best_fill"] is None
    assert set(PAPER_FILLS) >= {"noisy_max", "mean", "batch_mean", "zero"} and 1.0 in PAPER
