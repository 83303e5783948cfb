"""nanify / skip_stats on a small U-Net with pooling indices and unpooling."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanprobe.ops import (
    NanConv2d,
    NanifyWarning,
    NanMaxPool2d,
    NanMaxUnpool2d,
    load_config,
    nanify,
    skip_stats,
)


class TinyUNet(nn.Module):
    """enc conv, 2x2 pool (indices), bottleneck conv, unpool, max with skip, classifier."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, width, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.unpool = nn.MaxUnpool2d(2)
        self.dec = nn.Conv2d(width, width, 3, padding="same")
        self.head = nn.Conv2d(width, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.enc(x))
        pooled, idx = self.pool(skip)
        up = self.unpool(torch.relu(self.mid(pooled)), idx, output_size=skip.shape)
        return self.head(torch.relu(self.dec(torch.maximum(up, skip))))


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.grouped = nn.Conv2d(2, 2, 3, groups=2)

    def forward(self, x):
        return F.max_pool2d(self.grouped(self.conv(x)), 2)


def brain_like(size: int = 32) -> torch.Tensor:
    """A disc of smooth intensities on an exactly-zero background (ties everywhere outside)."""
    yy, xx = torch.meshgrid(torch.arange(size.__float__()), torch.arange(float(size)),
                            indexing="ij")
    r = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt()
    img = torch.where(r < size / 3, 1.0 + 0.3 * torch.sin(xx / 2) * torch.cos(yy / 3), 0.0)
    return img[None, None]


def test_nanify_swaps_modules_and_shares_weights():
    torch.manual_seed(0)
    model = TinyUNet()
    weight = model.enc.weight
    keys = list(model.state_dict())
    nanify(model, nan_threshold=0.9)
    assert isinstance(model.enc, NanConv2d) and model.enc.weight is weight
    assert isinstance(model.pool, NanMaxPool2d) and model.pool.return_indices
    assert isinstance(model.unpool, NanMaxUnpool2d)
    assert model.dec.padding == (1, 1)  # padding="same" converted
    assert list(model.state_dict()) == keys
    assert set(model.nanify_report.converted) == {"enc", "pool", "mid", "unpool", "dec", "head"}


def test_nanified_model_equals_original_without_ties():
    torch.manual_seed(0)
    model = TinyUNet().eval()
    x = torch.randn(2, 1, 16, 16)
    expected = model(x)
    nanify(model, tie_limit=None)  # ReLU zeros tie exactly; without the tie rule: same model
    torch.testing.assert_close(model(x), expected)
    stats = skip_stats(model)
    assert stats["mid"]["total"]["skipped"] == 0 and stats["pool"]["total"]["nan_windows"] == 0


def test_unet_end_to_end_reports_skips_and_nan_stays_nan():
    torch.manual_seed(0)
    model = nanify(TinyUNet().eval(), nan_threshold=0.5)
    with torch.no_grad():
        out = model(brain_like())
    stats = skip_stats(model)
    assert stats["pool"]["last"]["nan_windows"] > 0  # background ties
    # pooled NaN marks plus the positions the bottleneck conv skipped
    assert stats["unpool"]["last"]["nan_windows"] >= stats["pool"]["last"]["nan_windows"]
    assert stats["dec"]["last"]["skipped"] > 0
    assert stats["dec"]["last"]["macs_skipped"] == stats["dec"]["last"]["skipped"] * 6 * 6 * 9
    assert torch.isnan(out).any() and not torch.isnan(out).all()
    skip_stats(model, reset=True)
    assert skip_stats(model)["dec"]["total"] == {}


def test_per_layer_mapping_and_layer_selection():
    model = nanify(TinyUNet(), layers={"dec": {"nan_threshold": 0.25}, "pool": {"tie_limit": 3}})
    assert isinstance(model.dec, NanConv2d) and model.dec.nan_threshold == 0.25
    assert model.pool.tie_limit == 3 and isinstance(model.enc, nn.Conv2d)
    assert not isinstance(model.enc, NanConv2d)
    model = nanify(TinyUNet(), layers=["en*"])
    assert isinstance(model.enc, NanConv2d) and not isinstance(model.mid, NanConv2d)


def test_config_round_trip_through_json(tmp_path):
    cfg = {"defaults": {"nan_threshold": 0.75, "fill": "noisy_max", "tie_eps": 1e-5},
           "layers": {"head": {"nan_threshold": 1.0}}, "provenance": {"by": "test"}}
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(cfg))
    model = nanify(TinyUNet(), config=path)
    assert model.mid.nan_threshold == 0.75 and model.mid.fill == "noisy_max"
    assert model.head.nan_threshold == 1.0 and math.isclose(model.pool.tie_eps, 1e-5)
    assert load_config(path)["layers"] == {"head": {"nan_threshold": 1.0}}


def test_functional_and_grouped_calls_reported_by_name():
    with pytest.warns(NanifyWarning, match="grouped"):
        model = nanify(Functional())
    report = model.nanify_report
    assert "max_pool2d" in report.not_convertible["<root>"]
    assert "groups" in report.not_convertible["grouped"]
    assert report.converted == {"conv": "NanConv2d"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers={"nope": {}}), "matches no"),
    (dict(config={"defaults": {"thresh": 1}}), "unknown options"),
    (dict(config={"bogus": {}}), "unknown keys"),
    (dict(nan_threshold=2.0), "nan_threshold"),
    (dict(fill="median"), "fill"),
    (dict(tie_limit=0), "tie_limit"),
])
def test_nanify_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nanify(TinyUNet(), **kwargs)


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        nanify(TinyUNet(), config=tmp_path / "missing.json")
