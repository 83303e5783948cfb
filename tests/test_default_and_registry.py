"""The bundled default U-Net and brain, and the model registry (all offline, CPU, < 30 s)."""

from __future__ import annotations

import hashlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nanprobe.data.mri import is_conformed, to_view
from nanprobe.evaluate import dice_per_class, mean_foreground_dice
from nanprobe.models import (
    FastSurferCNN,
    FastSurferVINN,
    LoadedModel,
    MnistCNN,
    build_default_unet,
    load,
    load_default_brain,
    load_default_unet,
    state_dict_sha256,
)
from nanprobe.models.default import (
    CLASS_NAMES,
    default_unet_metadata,
    segment_slices,
)
from nanprobe.ops import nanify, skip_stats

ASSETS = Path(__file__).resolve().parents[1] / "nanprobe" / "assets"
# Held-out coronal slices (odd indices) through the middle of the brain (slices 39..219).
MIDDLE_SLICES = [113, 125, 137]
# Measured: the training run's held-out Dice (default_unet.json) is 0.835 CSF, 0.981 GM, 0.970 WM;
# on these three slices this test measures 0.857 / 0.975 / 0.972. The floors sit ~0.05 below for
# GM/WM and ~0.1 below for CSF (only ~550 CSF voxels on these slices, so a few argmax flips at
# class borders on another torch build or CPU move it most), and still fail a wrong or undertrained
# model (after 1 epoch: CSF 0.01, GM 0.41, WM 0.59; after 30 epochs: CSF 0.79).
DICE_FLOORS = {"CSF": 0.75, "grey matter": 0.93, "white matter": 0.92}
FACTORY_MODULE = "nanprobe_test_user_models"


@pytest.fixture(scope="module")
def brain() -> tuple[np.ndarray, np.ndarray]:
    t1, labels = load_default_brain()
    assert is_conformed(t1) and is_conformed(labels)
    assert np.array_equal(t1.affine, labels.affine)
    return np.asarray(t1.dataobj), np.asarray(labels.dataobj)


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    torch.set_num_threads(2)
    return load_default_unet()


def _coronal_labels(labels: np.ndarray, slices: list[int]) -> np.ndarray:
    return np.moveaxis(to_view(labels, "coronal")[..., slices], -1, 0)


def test_default_brain_is_template_with_tissue_labels(brain):
    t1, labels = brain
    assert t1.dtype == labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert np.array_equal(labels > 0, t1 > 0)  # the brain mask is the skull-stripped T1's
    assert 1.7e6 < np.count_nonzero(labels) < 2.1e6  # about 1.9 litres of brain at 1 mm


def test_default_unet_segments_middle_slices(unet, brain):
    t1, labels = brain
    assert not unet.training
    pred = segment_slices(unet, t1, MIDDLE_SLICES)
    assert pred.shape == (len(MIDDLE_SLICES), 256, 256)
    dice = dict(zip(CLASS_NAMES, dice_per_class(pred, _coronal_labels(labels, MIDDLE_SLICES), 4),
                    strict=True))
    print("Dice on coronal slices", MIDDLE_SLICES, {k: round(v, 4) for k, v in dice.items()})
    for name, floor in DICE_FLOORS.items():
        assert dice[name] >= floor, (name, dice[name])


def test_default_unet_record_matches_bundle():
    meta = default_unet_metadata()
    assert meta["sha256"]["default_unet.pt"] == hashlib.sha256(
        (ASSETS / "default_unet.pt").read_bytes()).hexdigest()
    assert meta["view"] == "coronal" and meta["classes"] == list(CLASS_NAMES)
    heldout = meta["heldout_dice"]
    assert heldout["mean_foreground"] == pytest.approx(
        mean_foreground_dice([heldout[name] for name in CLASS_NAMES]))
    assert (ASSETS / "default_unet.pt").stat().st_size < 1 << 20


def test_default_unet_runs_a_full_slice(unet):
    with torch.no_grad():
        out = unet(torch.rand(1, 7, 256, 256))
    assert out.shape == (1, 4, 256, 256) and torch.isfinite(out).all()


def test_nanified_default_unet_skips_in_middle_layers(brain):
    t1, _ = brain
    model = nanify(load_default_unet())
    segment_slices(model, t1, [MIDDLE_SLICES[1]])
    stats = skip_stats(model)
    # conv: output positions and skipped ones; pool/unpool: windows (x channels) and NaN ones
    print(f"\n{'layer':18s} {'kind':6s} {'of':>8s} {'skipped':>8s} {'ratio':>6s}")
    for name, s in stats.items():
        last = s["last"]
        total = last.get("positions", last.get("windows"))
        skipped = last.get("skipped", last.get("nan_windows"))
        print(f"{name:18s} {s['kind']:6s} {total:8d} {skipped:8d} {skipped / total:6.3f}")
    for layer in ("encode3.maxpool", "encode4.maxpool"):
        assert stats[layer]["last"]["nan_windows"] > 0, layer
    for layer in ("encode4.conv0", "bottleneck.conv0", "decode4.conv0", "decode3.conv0"):
        assert stats[layer]["last"]["skipped"] > 0, layer


# --- registry -------------------------------------------------------------------------------


def test_load_default_describes_inputs():
    loaded = load("default")
    assert isinstance(loaded, LoadedModel) and not loaded.model.training
    assert (loaded.spec, loaded.task, loaded.input_kind) == (
        "default", "segmentation", "mri-thick-slices")
    assert (loaded.input_shape, loaded.num_classes, loaded.view) == ((7, 256, 256), 4, "coronal")
    assert loaded.weights_sha256 == default_unet_metadata()["sha256"]["default_unet.pt"]


def test_load_default_from_checkpoint_of_another_view(tmp_path):
    model = build_default_unet()
    path = tmp_path / "axial_unet.pt"
    torch.save(model.state_dict(), path)
    loaded = load("default", checkpoint=path, view="axial")
    assert loaded.view == "axial"
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert state_dict_sha256(loaded.model) == state_dict_sha256(model)
    with pytest.raises(ValueError, match="view must be coronal"):
        load("default", view="axial")


def test_load_mnist_classifies_images():
    loaded = load("mnist")
    assert isinstance(loaded.model, MnistCNN)
    assert (loaded.task, loaded.input_kind, loaded.input_shape, loaded.num_classes) == (
        "classification", "image", (1, 28, 28), 10)
    assert loaded.view is None and len(loaded.weights_sha256) == 64
    with torch.no_grad():
        assert loaded.model(torch.zeros(2, *loaded.input_shape)).shape == (2, 10)
    with pytest.raises(ValueError, match="view must be None"):
        load("mnist", view="coronal")


@pytest.fixture
def vinn_checkpoint(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A v2 FastSurfer checkpoint (``{"model_state": ...}``) of a randomly initialised VINN."""
    torch.manual_seed(0)
    state = FastSurferVINN(79).state_dict()
    path = tmp_path / "aparc_vinn_coronal_v2.0.0.pkl"
    torch.save({"model_state": state}, path)
    return path, state


def test_load_fastsurfer_vinn_checkpoint(vinn_checkpoint):
    path, state = vinn_checkpoint
    loaded = load("fastsurfer-vinn", checkpoint=path)  # view read from the file name
    assert isinstance(loaded.model, FastSurferVINN) and not loaded.model.training
    assert (loaded.view, loaded.num_classes, loaded.input_shape) == ("coronal", 79, (7, 256, 256))
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert load("fastsurfer-vinn", checkpoint=path, view="axial").view == "axial"


def test_load_fastsurfer_errors(vinn_checkpoint, tmp_path):
    path, state = vinn_checkpoint
    with pytest.raises(ValueError, match="fastsurfer-vinn needs checkpoint=.*never downloads"):
        load("fastsurfer-vinn")
    with pytest.raises(ValueError, match="load it with spec 'fastsurfer-vinn'"):
        load("fastsurfer-cnn", checkpoint=path)
    unnamed = tmp_path / "weights.pkl"
    torch.save({"model_state": state}, unnamed)
    with pytest.raises(ValueError, match="pass view="):
        load("fastsurfer-vinn", checkpoint=unnamed)
    with pytest.raises(ValueError, match="is not a file"):
        load("fastsurfer-cnn", checkpoint=tmp_path / "missing.pkl")
    v1 = tmp_path / "sagittal" / "Epoch_30_training_state.pkl"
    v1.parent.mkdir()
    torch.save({"model_state_dict": FastSurferCNN(51).state_dict()}, v1)
    cnn = load("fastsurfer-cnn", checkpoint=v1)
    assert (cnn.view, cnn.num_classes) == ("sagittal", 51)


@pytest.fixture
def factories(tmp_path, monkeypatch) -> Iterator[str]:
    """A user module of model factories on ``sys.path``; returns its name."""
    (tmp_path / f"{FACTORY_MODULE}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        from nanprobe.models import LoadedModel

        NOT_CALLABLE = 3


        def tiny(view=None):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
            model.view_given = view
            return model


        def described():
            return LoadedModel(tiny(), "ignored", "segmentation", "image", (1, 8, 8), 2)


        def not_a_module():
            return 42


        class Zoo:
            @staticmethod
            def tiny():
                return tiny()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(FACTORY_MODULE, None)
    yield FACTORY_MODULE
    sys.modules.pop(FACTORY_MODULE, None)


def test_load_user_factory(factories, tmp_path):
    loaded = load(f"{factories}:tiny")
    assert loaded.spec == f"{factories}:tiny" and not loaded.model.training
    assert (loaded.task, loaded.input_kind, loaded.input_shape, loaded.num_classes) == (
        None, None, None, None)
    assert loaded.weights_sha256 == state_dict_sha256(loaded.model)
    assert load(f"{factories}:Zoo.tiny").weights_sha256 == loaded.weights_sha256

    with_view = load(f"{factories}:tiny", view="axial")
    assert with_view.view == "axial" and with_view.model.view_given == "axial"

    described = load(f"{factories}:described")
    assert described.spec == f"{factories}:described"
    assert (described.input_kind, described.input_shape, described.num_classes) == (
        "image", (1, 8, 8), 2)

    weights = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1)).state_dict()
    path = tmp_path / "tiny.pt"
    torch.save(weights, path)
    from_file = load(f"{factories}:tiny", checkpoint=path)
    assert torch.equal(from_file.model[0].weight, weights["0.weight"])
    assert from_file.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("missing", "has no attribute 'missing'"),
        ("NOT_CALLABLE", "is a int, not callable"),
        ("not_a_module", "returned a int, not an nn.Module"),
    ],
)
def test_user_factory_errors(factories, attr, message):
    with pytest.raises(ValueError, match=message):
        load(f"{factories}:{attr}")


def test_user_factory_argument_and_weight_errors(factories, tmp_path):
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load("no_such_module_xyz:make")
    with pytest.raises(ValueError, match="cannot be called with"):
        load(f"{factories}:described", view="coronal")
    wrong = tmp_path / "wrong.pt"
    torch.save(nn.Linear(2, 2).state_dict(), wrong)
    with pytest.raises(ValueError, match="does not fit the model"):
        load(f"{factories}:tiny", checkpoint=wrong)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch.save file"):
        load("mnist", checkpoint=garbage)
    pickled = tmp_path / "objects.pt"
    torch.save({"0.weight": Path("x")}, pickled)
    with pytest.raises(ValueError, match="trust=True"):
        load(f"{factories}:tiny", checkpoint=pickled)


@pytest.mark.parametrize("spec", ["", "resnet50", "fastsurfer", "module:", ":callable", "a:b:c"])
def test_unknown_spec_lists_accepted_forms(spec):
    with pytest.raises(ValueError, match="'default', 'mnist', 'mnist-paper', 'fastsurfer-vinn', "
                                         "'fastsurfer-cnn' or 'package.module:callable'"):
        load(spec)
