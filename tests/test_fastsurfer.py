"""FastSurfer networks (layouts, forward semantics) and the checkpoint loader (real files)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nanprobe.models.checkpoint import CheckpointError, load_fastsurfer_checkpoint
from nanprobe.models.fastsurfer import (
    CompetitiveDecoderBlock,
    FastSurferCNN,
    FastSurferVINN,
    fastsurfer_cnn,
    fastsurfer_vinn,
    num_classes_for_view,
)

LAYOUTS = json.loads(
    (Path(__file__).parent / "fixtures" / "fastsurfer_state_dict_layouts.json").read_text()
)["layouts"]
Factory = Callable[[str], nn.Module]


def _layout(model: nn.Module) -> list[dict[str, object]]:
    return [
        {"key": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in model.state_dict().items()
    ]


def _small_vinn() -> FastSurferVINN:
    return FastSurferVINN(num_filters=16, num_filters_interpol=8, num_classes=4)


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random biases, BatchNorm affine/statistics, PReLU slopes; convs keep their random init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif key.endswith("num_batches_tracked"):
                t.fill_(1234)
            elif t.dim() <= 1:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    return model.eval()


def _input(size: int = 32, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 7, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("layout", "factory", "view"),
    [
        ("fastsurfer_cnn_v1_axial_coronal", fastsurfer_cnn, "axial"),
        ("fastsurfer_cnn_v1_sagittal", fastsurfer_cnn, "sagittal"),
        ("fastsurfer_vinn_v2_axial_coronal", fastsurfer_vinn, "coronal"),
        ("fastsurfer_vinn_v2_sagittal", fastsurfer_vinn, "sagittal"),
    ],
)
def test_state_dict_matches_published_layout(layout: str, factory: Factory, view: str) -> None:
    assert _layout(factory(view)) == LAYOUTS[layout]


def test_small_vinn_has_the_published_block_structure() -> None:
    assert list(_small_vinn().state_dict()) == list(fastsurfer_vinn("axial").state_dict())
    assert list(FastSurferCNN(4, num_filters=8).state_dict()) == list(
        fastsurfer_cnn("axial").state_dict()
    )


@pytest.mark.parametrize(
    ("factory", "view"),
    [(fastsurfer_cnn, "axial"), (fastsurfer_cnn, "sagittal")]
    + [(fastsurfer_vinn, "coronal"), (fastsurfer_vinn, "sagittal")],
)
def test_default_size_models_run(factory: Factory, view: str) -> None:
    with torch.no_grad():
        out = factory(view).eval()(_input(32))
    assert out.shape == (1, num_classes_for_view(view), 32, 32)
    assert torch.isfinite(out).all()


def test_small_vinn_forward_shape_and_pooling_indices() -> None:
    model = _small_vinn().eval()
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 4 and all(p.return_indices for p in pools)
    assert sum(isinstance(m, nn.MaxUnpool2d) for m in model.modules()) == 4
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 11 * 4 + 1
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    for pool in pools:
        pool.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        out = model(_input(64, batch=2))
    assert out.shape == (2, 4, 64, 64)
    assert [tuple(idx.shape) for _, idx in captured] == [(2, 16, s, s) for s in (32, 16, 8, 4)]
    assert all(idx.dtype == torch.int64 for _, idx in captured)


def test_encoder_returns_pooled_map_skip_and_indices() -> None:
    model = _small_vinn().eval()
    with torch.no_grad():
        pooled, skip, indices = model.encode1(model.inp_block(_input(64)))
    assert skip.shape == (1, 16, 64, 64) and pooled.shape == indices.shape == (1, 16, 32, 32)
    assert torch.equal(skip.flatten(2).gather(2, indices.flatten(2)), pooled.flatten(2))


def test_decoder_maxout_propagates_nan() -> None:
    block = CompetitiveDecoderBlock(4, 3, num_convs=4, last_kernel_size=3).eval()
    skip = torch.zeros(1, 4, 8, 8)
    skip[0, 0, 3, 3] = float("nan")
    pooled, indices = nn.functional.max_pool2d(torch.randn(1, 4, 8, 8), 2, return_indices=True)
    with torch.no_grad():
        assert torch.isnan(block(pooled, skip, indices)).any()
        assert torch.isfinite(block(pooled, torch.zeros_like(skip), indices)).all()


def test_vinn_accepts_only_1mm() -> None:
    with pytest.raises(ValueError, match="only 1 mm"):
        FastSurferVINN(voxel_size=0.8)
    model = _small_vinn().eval()
    x = _input(32)
    with torch.no_grad():
        reference = model(x)
        assert torch.equal(model(x, torch.ones(1, 2), np.ones(2)), reference)
        for scale, scale_out in [(0.8, 1.0), (1.0, [1.0, 0.7])]:
            with pytest.raises(ValueError, match="only 1 mm"):
                model(x, scale, scale_out)


@pytest.mark.parametrize("model", [_small_vinn(), FastSurferCNN(4, num_filters=8)])
def test_input_size_must_be_a_multiple_of_16(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.zeros(1, 7, 40, 32))


@pytest.mark.parametrize("factory", [fastsurfer_cnn, fastsurfer_vinn])
def test_unknown_view_is_refused(factory: Factory) -> None:
    with pytest.raises(ValueError, match="axial, coronal, sagittal"):
        factory("transverse")


def _save_fastsurfer(model: nn.Module, path: Path, **extra: object) -> Path:
    """Write ``model`` the way FastSurfer's published checkpoints store it."""
    state = model.state_dict()
    if isinstance(model, FastSurferVINN):
        torch.save({"model_state": state, "epoch": 30, **extra}, path)
    else:
        torch.save({"model_state_dict": state, "epoch": 30, **extra}, path)
    return path


def _assert_same_model(loaded: nn.Module, source: nn.Module) -> None:
    assert type(loaded) is type(source) and not loaded.training
    assert _layout(loaded) == _layout(source)
    x = _input(16)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


@pytest.mark.parametrize(
    ("factory", "view"),
    [(fastsurfer_cnn, "axial"), (fastsurfer_cnn, "sagittal")]
    + [(fastsurfer_vinn, "coronal"), (fastsurfer_vinn, "sagittal")],
)
def test_checkpoint_round_trip_is_bit_identical(
    tmp_path: Path, factory: Factory, view: str
) -> None:
    source = _randomised(factory(view))
    path = _save_fastsurfer(source, tmp_path / "model.pkl")
    _assert_same_model(load_fastsurfer_checkpoint(path, view), source)


def test_v1_checkpoint_with_dataparallel_prefix_in_legacy_format(tmp_path: Path) -> None:
    source = _randomised(fastsurfer_cnn("coronal"))
    prefixed = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "Epoch_30_training_state.pkl"
    torch.save({"model_state_dict": prefixed}, path, _use_new_zipfile_serialization=False)
    _assert_same_model(load_fastsurfer_checkpoint(str(path), "coronal"), source)


def test_checkpoint_for_another_view_is_refused(tmp_path: Path) -> None:
    path = _save_fastsurfer(fastsurfer_vinn("sagittal"), tmp_path / "sag.pkl")
    with pytest.raises(CheckpointError, match="sagittal model .51 classes. but view='axial'"):
        load_fastsurfer_checkpoint(path, "axial")
    path = _save_fastsurfer(fastsurfer_cnn("axial"), tmp_path / "ax.pkl")
    with pytest.raises(CheckpointError, match="axial/coronal model .79 classes. but view='sag"):
        load_fastsurfer_checkpoint(path, "sagittal")
    with pytest.raises(ValueError, match="view must be one of"):
        load_fastsurfer_checkpoint(path, "transverse")


def test_numpy_scalar_needs_trust(tmp_path: Path) -> None:
    source = _randomised(fastsurfer_vinn("axial"))
    path = _save_fastsurfer(source, tmp_path / "vinn.pkl", best_metric=np.float64(0.93))
    with pytest.raises(CheckpointError, match="full unpickling.*arbitrary code.*trust=True"):
        load_fastsurfer_checkpoint(path, "axial")
    _assert_same_model(load_fastsurfer_checkpoint(path, "axial", trust=True), source)


def test_layout_mismatch_names_keys_and_layout(tmp_path: Path) -> None:
    state = fastsurfer_vinn("axial").state_dict()
    del state["classifier.conv.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["encode1.conv0.weight"] = torch.zeros(71, 7, 3, 3)
    path = tmp_path / "bad.pkl"
    torch.save({"model_state": state}, path)
    with pytest.raises(CheckpointError) as info:
        load_fastsurfer_checkpoint(path, "axial")
    message = str(info.value)
    assert "\n" not in message
    for part in (
        "layout fastsurfer_vinn_v2_axial_coronal",
        "missing classifier.conv.bias",
        "unexpected extra.weight",
        "encode1.conv0.weight [71, 7, 3, 3] (expected [71, 32, 3, 3])",
    ):
        assert part in message


def test_small_model_is_not_a_published_layout(tmp_path: Path) -> None:
    path = _save_fastsurfer(_small_vinn(), tmp_path / "small.pkl")
    with pytest.raises(CheckpointError, match=r"wrong shape .*\(\+\d+ more\)"):
        load_fastsurfer_checkpoint(path, "axial")


def test_checkpoint_without_weights_entry(tmp_path: Path) -> None:
    torch.save({"state": {}}, tmp_path / "a.pkl")
    with pytest.raises(CheckpointError, match="no 'model_state' .v2. or 'model_state_dict'"):
        load_fastsurfer_checkpoint(tmp_path / "a.pkl", "axial")
    torch.save([torch.zeros(1)], tmp_path / "b.pkl")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_fastsurfer_checkpoint(tmp_path / "b.pkl", "axial")


def _tiny_checkpoints(tmp_path: Path) -> tuple[bytes, bytes]:
    """Bytes of a small torch.save file in the zip and in the legacy format."""
    out = []
    for zipped in (True, False):
        path = tmp_path / f"tiny_{zipped}.pkl"
        torch.save(
            {"model_state": {"w": torch.ones(64)}}, path, _use_new_zipfile_serialization=zipped
        )
        out.append(path.read_bytes())
    return out[0], out[1]


@pytest.mark.parametrize(
    ("make", "trust"),
    [
        (lambda zipped, legacy: zipped[: len(zipped) // 2], False),
        (lambda zipped, legacy: zipped[:-40], True),
        (lambda zipped, legacy: legacy[:-3], True),
        (lambda zipped, legacy: b"hello, this is not a checkpoint\n" * 4, False),
        (lambda zipped, legacy: b"hello, this is not a checkpoint\n" * 4, True),
        (lambda zipped, legacy: b"", False),
    ],
    ids=["truncated", "truncated-trusted", "truncated-legacy", "text", "text-trusted", "empty"],
)
def test_unreadable_file(
    tmp_path: Path, make: Callable[[bytes, bytes], bytes], trust: bool
) -> None:
    path = tmp_path / "broken.pkl"
    path.write_bytes(make(*_tiny_checkpoints(tmp_path)))
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as info:
        load_fastsurfer_checkpoint(path, "axial", trust=trust)
    assert "\n" not in str(info.value)


def test_missing_path_or_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_fastsurfer_checkpoint(tmp_path / "nope.pkl", "axial")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_fastsurfer_checkpoint(tmp_path, "axial")
