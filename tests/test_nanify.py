"""nanify / skip_stats on a small U-Net with pooling indices and unpooling."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from nanprobe.models.fastsurfer import FastSurferVINN
from nanprobe.ops import (
    NanConv2d,
    NanifyWarning,
    NanMaxPool2d,
    NanMaxUnpool2d,
    load_config,
    nanify,
    skip_stats,
)
from nanprobe.ops._graph_fusion import FusedForward


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


# --- fusion: what the NaN ops absorb --------------------------------------------------------


def small_vinn() -> nn.Module:
    """A small FastSurferVINN (the package's model) with non-trivial batch-norm statistics."""
    torch.manual_seed(0)
    model = FastSurferVINN(3, num_channels=1, num_filters=8, num_filters_interpol=4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
        if isinstance(m, nn.PReLU):
            m.weight.data.fill_(0.2)
    return model.eval()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=tol, atol=tol)


def test_fusion_keeps_structure_and_reports_what_it_absorbed():
    model = small_vinn()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    nanify(model, nan_threshold=0.5)
    report = model.nanify_report
    assert report.fused["encode2.conv1"] == ("prelu before, bn2 folded, "
                                            "torch.maximum with conv0")
    assert report.fused["decode1.unpool"] == "torch.maximum with skip"
    assert report.fused["inp_block.conv0"] == "gn1 folded"
    assert not report.not_fused
    assert list(model.state_dict()) == list(keys)
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
    assert all(isinstance(model.get_submodule(n), t) or "conv" in n or "pool" in n
               for n, t in types.items())


@pytest.mark.parametrize("tie_limit", [None, 1])
def test_fused_model_equals_unfused(kernels, tie_limit):
    # exact ties only (the constant background): folding batch norm changes the last bits, so
    # ties within a tolerance may flip between the two models
    x = torch.cat([brain_like(64), brain_like(64).flip(-1)])
    fused = nanify(small_vinn(), tie_limit=tie_limit, tie_eps=0.0, nan_threshold=0.5)
    plain = nanify(small_vinn(), tie_limit=tie_limit, tie_eps=0.0, nan_threshold=0.5, fuse=False)
    with torch.no_grad():
        got, expected = fused(x), plain(x)
    _close(got, expected)
    stats = skip_stats(plain)
    assert skip_stats(fused) == stats
    skipped = sum(s["total"].get("skipped", 0) for s in stats.values())
    assert skipped > 0 if tie_limit else skipped == 0  # the background ties: NaN inside


def test_fused_model_falls_back_to_the_original_forward():
    x = brain_like(32)
    fused = nanify(small_vinn(), nan_threshold=0.5)
    plain = nanify(small_vinn(), nan_threshold=0.5, fuse=False)
    seen = []
    handle = fused.encode2.bn2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        _close(fused(x), plain(x))
    assert seen  # the hooked batch norm ran as a module
    handle.remove()

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Passthrough():
        _close(fused(x), plain(x))
    fused.train()
    plain.train()
    with torch.no_grad():
        _close(fused(x), plain(x))  # batch statistics: nothing folded


def test_fused_model_copies_and_pickles(tmp_path):
    x = brain_like(32)
    model = nanify(small_vinn(), nan_threshold=0.5)
    with torch.no_grad():
        expected = model(x)
    twin = copy.deepcopy(model)
    assert isinstance(twin.encode2.forward, FusedForward)
    assert twin.encode2.forward.module is twin.encode2
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        _close(twin(x), expected, 0)
        _close(loaded(x), expected, 0)
    assert loaded.encode2.forward.fn is not None  # derived again on first use


class Awkward(nn.Module):
    """Patterns fusion must leave alone or handle: an input changed in place before the
    maximum, an output used twice, a data-dependent branch in a child, a side effect."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.b = nn.Conv2d(2, 2, 3, padding=1)
        self.branchy = Branchy()
        self.logger = Logger()

    def forward(self, x):
        y = self.bn(self.a(x))
        x = x.clone()
        x.mul_(2)  # in place between the conv and the maximum: no maxout fusion
        z = self.b(x)
        out = torch.maximum(y, x) + torch.relu(z) + z  # z used twice: no activation fusion
        return self.logger(self.branchy(out))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return torch.relu(self.conv(x)) if x.sum() > 0 else self.conv(x)


class Logger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.seen: list = []

    def forward(self, x):
        self.seen.append(x.shape)
        return torch.relu(self.conv(x))


def test_fusion_leaves_what_it_cannot_prove_alone():
    torch.manual_seed(1)
    model = Awkward().eval()
    model.bn.running_mean.normal_()
    x = brain_like(16).repeat(1, 2, 1, 1)
    fused = nanify(copy.deepcopy(model), nan_threshold=0.5)
    plain = nanify(copy.deepcopy(model), nan_threshold=0.5, fuse=False)
    report = fused.nanify_report
    assert report.fused == {"a": "bn folded"}
    assert "torch.fx cannot trace" in report.not_fused["branchy"]
    assert "seen" in report.not_fused["logger"]
    assert fused.logger.seen == []  # tracing left the list alone
    with torch.no_grad():
        _close(fused(x), plain(x))
    assert len(fused.logger.seen) == 1


def test_tiny_unet_fuses_functional_relu_and_unpool_maximum(kernels):
    torch.manual_seed(0)
    fused = nanify(TinyUNet().eval(), nan_threshold=0.5)
    plain = nanify(TinyUNet().eval(), nan_threshold=0.5, fuse=False)
    plain.load_state_dict(fused.state_dict())
    assert fused.nanify_report.fused == {
        "enc": "relu after", "mid": "relu after", "unpool": "torch.maximum with enc",
        "dec": "relu after"}
    with torch.no_grad():
        _close(fused(brain_like()), plain(brain_like()), 1e-5)
