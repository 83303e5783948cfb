"""Tests for the MNIST CNN, its bundled weights and held-out digits, and the csv reader."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nanprobe.data.mnist import heldout_metadata, load_heldout, read_mnist_5k_csv
from nanprobe.models.mnist import MnistCNN, load_mnist_cnn


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
