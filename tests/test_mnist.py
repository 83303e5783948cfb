"""Tests for the MNIST CNNs, their bundled weights and held-out digits, and the csv reader."""

from __future__ import annotations

import gzip
import hashlib
import io
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nanprobe.data.mnist import heldout_metadata, load_heldout, read_mnist_5k_csv
from nanprobe.models.mnist import (
    PAPER_LOGITS,
    PAPER_WEIGHTS_ASSET,
    MnistCNN,
    MnistPaperCNN,
    NanAsNegInf,
    load_mnist_cnn,
    load_mnist_paper_cnn,
    paper_training_record,
)
from nanprobe.models.registry import asset_sha256, load
from nanprobe.ops import nanify


def test_model_maps_images_to_log_probabilities() -> None:
    torch.manual_seed(0)
    out = MnistCNN()(torch.rand(5, 1, 28, 28))
    assert out.shape == (5, 10)
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(5))


def test_model_is_built_from_swappable_modules() -> None:
    kinds = [type(m) for m in MnistCNN().modules()]
    assert kinds.count(nn.Conv2d) == 4
    assert kinds.count(nn.ReLU) == 3
    assert kinds.count(nn.MaxPool2d) == 4


def test_heldout_set_is_balanced_and_scaled() -> None:
    images, labels = load_heldout()
    assert images.shape == (1000, 1, 28, 28) and images.dtype == np.float32
    assert labels.shape == (1000,) and labels.dtype == np.int64
    assert 0.0 <= images.min() and images.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 100))


def test_bundled_weights_reach_recorded_heldout_accuracy() -> None:
    model = load_mnist_cnn()
    assert not model.training
    images, labels = load_heldout()
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(dim=1).numpy()
    recorded = heldout_metadata()["heldout_accuracy"]
    assert recorded >= 0.97
    assert (predicted == labels).mean() >= recorded - 0.005


def test_paper_model_head_and_layers() -> None:
    torch.manual_seed(0)
    model = MnistPaperCNN().eval()
    out = model(torch.rand(5, 1, 28, 28))
    assert out.shape == (5, PAPER_LOGITS) == (5, 90)
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(5))
    kinds = [type(m) for m in model.modules()]
    assert (kinds.count(nn.Conv2d), kinds.count(nn.ReLU), kinds.count(nn.MaxPool2d)) == (4, 3, 4)
    assert sum(p.numel() for p in model.parameters()) == 104_202
    names = [n for n, _ in model.layers.named_children()]
    assert names[:4] == ["norm", "conv1", "relu1", "pool1"] and names[-3] == "nan_inf"
    # the head is the paper's: conv4's 10 x 3 x 3 map flattened channel-major, log-softmax
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        logits = model.layers[:11](x)  # up to conv4
    assert logits.shape == (2, 10, 3, 3)
    torch.testing.assert_close(model(x), torch.log_softmax(logits.reshape(2, 90), 1))
    # normalisation: the blank background enters conv1 as -0.1307 / 0.3081
    assert model.layers.norm(torch.zeros(1)).item() == pytest.approx(-0.1307 / 0.3081)


def test_nan_as_neg_inf_keeps_skipped_logits_out_of_the_softmax() -> None:
    x = torch.tensor([[1.0, float("nan"), -float("inf"), float("inf"), 2.0]])
    assert NanAsNegInf()(x).tolist() == [[1.0, -float("inf"), -float("inf"), float("inf"), 2.0]]
    # a nanified paper model whose conv4 skips some positions still scores the others
    model = nanify(load_mnist_paper_cnn(), nan_threshold=0.5, count_padding=True)
    images, _ = load_heldout()
    with torch.no_grad():
        out = model(torch.from_numpy(images[:64]))
    skipped = torch.isinf(out) & (out < 0)
    assert skipped.any() and not torch.isnan(out[~skipped.all(1)]).any()


def test_bundled_paper_weights_reach_recorded_accuracy_on_unseen_digits() -> None:
    record = paper_training_record()
    assert record["model"] == "MnistPaperCNN" and record["heldout_accuracy"] >= 0.97
    assert record["normalisation"] == [0.1307, 0.3081]
    blob = resources.files("nanprobe").joinpath("assets", "mnist_heldout.npz").read_bytes()
    with np.load(io.BytesIO(blob)) as npz:  # trained without the held-out digits
        rows = np.sort(npz["source_index"]).astype(np.int64)
    assert hashlib.sha256(rows.tobytes()).hexdigest() == record["heldout_source_index_sha256"]
    loaded = load("mnist-paper")
    assert loaded.weights_sha256 == asset_sha256(PAPER_WEIGHTS_ASSET)
    assert (loaded.task, loaded.input_kind, loaded.input_shape, loaded.num_classes) == (
        "classification", "image", (1, 28, 28), 10)
    images, labels = load_heldout()
    with torch.no_grad():
        predicted = loaded.model(torch.from_numpy(images)).argmax(dim=1).numpy()
    assert (predicted == labels).mean() == pytest.approx(record["heldout_accuracy"], abs=0.005)


def test_paper_checkpoint_loads_into_the_paper_model_only(tmp_path: Path) -> None:
    path = tmp_path / "paper.pt"
    torch.save(load_mnist_paper_cnn().state_dict(), path)
    assert isinstance(load("mnist-paper", checkpoint=path).model, MnistPaperCNN)
    with pytest.raises(ValueError, match="does not fit the model"):
        load("mnist", checkpoint=path)
    with pytest.raises(ValueError, match="mnist-paper: view must be None"):
        load("mnist-paper", view="coronal")


def _write_csv_gz(path: Path, text: str) -> Path:
    path.write_bytes(gzip.compress(text.encode("ascii")))
    return path


def test_read_mnist_5k_csv_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 784))
    labels = np.array([7, 0, 9])
    lines = [",".join(map(str, [*row, label])) for row, label in zip(pixels, labels, strict=True)]
    images, read_labels = read_mnist_5k_csv(_write_csv_gz(tmp_path / "m.csv.gz", "\n".join(lines)))
    assert images.dtype == np.uint8 and images.shape == (3, 28, 28)
    assert read_labels.dtype == np.int64
    np.testing.assert_array_equal(images.reshape(3, 784), pixels)
    np.testing.assert_array_equal(read_labels, labels)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no data rows"),
        (",".join(["0"] * 784), "785 columns"),
        (",".join(["0"] * 785) + "\n" + ",".join(["0"] * 784), "comma-separated integers"),
        (",".join(["0.5"] * 785), "comma-separated integers"),
        (",".join(["256"] * 784 + ["1"]), "pixel values"),
        (",".join(["0"] * 784 + ["10"]), "labels"),
    ],
)
def test_read_mnist_5k_csv_rejects_malformed(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_mnist_5k_csv(_write_csv_gz(tmp_path / "bad.csv.gz", text))


def test_read_mnist_5k_csv_rejects_uncompressed(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv.gz"
    path.write_text(",".join(["0"] * 785))
    with pytest.raises(ValueError, match="gzip"):
        read_mnist_5k_csv(path)
