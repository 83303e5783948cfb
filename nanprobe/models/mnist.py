"""The paper's MNIST classifiers and their bundled trained weights.

Both have the paper's four 3x3 convolutions (1 -> 32 -> 64 -> 128 -> 10, padding 1, no batch
norm) and were trained by ``analyses/train_mnist.py`` on the same 4,000 digits; both take pixels
in [0, 1], ``(N, 1, 28, 28)``. They differ in input scaling and head:

- :class:`MnistCNN` (spec ``mnist``): a global 3x3 max-pool of the logits, 10 log-probabilities;
- :class:`MnistPaperCNN` (spec ``mnist-paper``): the conventions of the paper's public code
  (``mnist_usecase/nan_mnist_test_kfold.py`` of InesGP/UNET-nan-operations): normalised input,
  a 1x1 max "pool" and a log-softmax over 90 logits.

Architecture of :class:`MnistCNN` (output ``(N, 10)`` log-probabilities):

=====  ======================================  =============
stage  layers                                  output shape
=====  ======================================  =============
1      Conv2d(1, 32, 3, padding=1), ReLU       32 x 28 x 28
       MaxPool2d(2)                            32 x 14 x 14
2      Conv2d(32, 64, 3, padding=1), ReLU      64 x 14 x 14
       MaxPool2d(2)                            64 x 7 x 7
3      Conv2d(64, 128, 3, padding=1), ReLU     128 x 7 x 7
       MaxPool2d(2)  (floor: the last row      128 x 3 x 3
       and column of the 7 x 7 map are dropped)
4      Conv2d(128, 10, 3, padding=1)           10 x 3 x 3
       MaxPool2d(3)  (global max-pool)         10 x 1 x 1
head   Flatten, LogSoftmax(dim=1)              10
=====  ======================================  =============

The final convolution has no ReLU: its outputs are the class logits. All layers are
``nn.Module`` instances inside ``.layers`` (an ``nn.Sequential``), so tools can swap
``nn.Conv2d`` / ``nn.ReLU`` / ``nn.MaxPool2d`` modules by type. 104,202 parameters each.

The bundled weights ``nanprobe/assets/mnist_cnn.pt`` and ``mnist_paper_cnn.pt`` (with its
training record ``mnist_paper_cnn.json``) were produced by ``analyses/train_mnist.py``; see
``nanprobe/assets/MNIST_LICENSE.txt``.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from importlib import resources
from typing import Any

import torch
from torch import nn

WEIGHTS_ASSET = "mnist_cnn.pt"
PAPER_WEIGHTS_ASSET = "mnist_paper_cnn.pt"
PAPER_TRAINING_ASSET = "mnist_paper_cnn.json"
#: MNIST's pixel mean and standard deviation, the paper's ``transforms.Normalize`` arguments
PAPER_NORMALISATION = (0.1307, 0.3081)
#: logits of the paper's head: 10 channels x 3 x 3 positions; digit d is column d
PAPER_LOGITS = 90


class MnistCNN(nn.Module):
    """Four-conv MNIST classifier: ``(N, 1, 28, 28)`` pixels in [0, 1] -> ``(N, 10)`` log-probs."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(128, 10, kernel_size=3, padding=1),
            nn.MaxPool2d(3),
            nn.Flatten(),
            nn.LogSoftmax(dim=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(N, 1, 28, 28)`` to log-probabilities ``(N, 10)`` over digits 0-9."""
        return self.layers(x)


class Normalize(nn.Module):
    """``(x - mean) / std`` with fixed scalars (MNIST's: the blank background becomes -0.4242)."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = float(mean), float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


class NanAsNegInf(nn.Module):
    """NaN -> -inf, everything else unchanged (the identity on a NaN-free tensor).

    The paper's NaN pooling replaces NaN by -inf before taking a window's max, so its final 1x1
    "pool" turns a logit that a NaN convolution skipped into -inf: log-softmax then scores that
    position as impossible instead of making the whole row NaN. nanprobe's ``NanMaxPool2d``
    keeps NaN; this module, right after the 1x1 pool, does the paper's step.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.masked_fill(torch.isnan(x), float("-inf"))


class MnistPaperCNN(nn.Module):
    """The paper's MNIST CNN with its head: ``(N, 1, 28, 28)`` pixels in [0, 1] -> ``(N, 90)``.

    ============  ====================================  ==========
    name          layer                                 output
    ============  ====================================  ==========
    ``norm``      (x - 0.1307) / 0.3081                 1 x 28 x 28
    ``conv1``     Conv2d(1, 32, 3, padding=1), ReLU     32 x 28 x 28
    ``pool1``     MaxPool2d(2)                          32 x 14 x 14
    ``conv2``     Conv2d(32, 64, 3, padding=1), ReLU    64 x 14 x 14
    ``pool2``     MaxPool2d(2)                          64 x 7 x 7
    ``conv3``     Conv2d(64, 128, 3, padding=1), ReLU   128 x 7 x 7
    ``pool3``     MaxPool2d(2)                          128 x 3 x 3
    ``conv4``     Conv2d(128, 10, 3, padding=1)         10 x 3 x 3
    ``pool4``     MaxPool2d(1) (the identity)           10 x 3 x 3
    ``nan_inf``   :class:`NanAsNegInf`                  10 x 3 x 3
    head          Flatten, LogSoftmax(dim=1)            90
    ============  ====================================  ==========

    Output: log-probabilities over the 90 flattened logits (channel-major: column
    ``c*9 + 3*row + col``); digit ``d`` is column ``d`` (channel 0's nine positions for digits
    0-8, channel 1's top-left one for 9), as in the paper's ``nll_loss(output, target)`` on
    ``x.view(N, -1)``. The predicted digit is the arg-max over all 90 columns; one of 10..89 is
    a wrong prediction. Normalisation is the first layer, so the zero padding of ``conv1`` pads
    with the normalised 0 (pixel value 0.1307), as in the paper.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(OrderedDict([
            ("norm", Normalize(*PAPER_NORMALISATION)),
            ("conv1", nn.Conv2d(1, 32, kernel_size=3, padding=1)),
            ("relu1", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(32, 64, kernel_size=3, padding=1)),
            ("relu2", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2)),
            ("conv3", nn.Conv2d(64, 128, kernel_size=3, padding=1)),
            ("relu3", nn.ReLU()),
            ("pool3", nn.MaxPool2d(2)),
            ("conv4", nn.Conv2d(128, 10, kernel_size=3, padding=1)),
            ("pool4", nn.MaxPool2d(1)),
            ("nan_inf", NanAsNegInf()),
            ("flatten", nn.Flatten()),
            ("log_softmax", nn.LogSoftmax(dim=1)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(N, 1, 28, 28)`` to log-probabilities ``(N, 90)`` (digit d: column d)."""
        return self.layers(x)


def _asset_bytes(name: str) -> bytes:
    return resources.files("nanprobe").joinpath("assets").joinpath(name).read_bytes()


def _with_bundled_weights(model: nn.Module, asset: str) -> nn.Module:
    state = torch.load(io.BytesIO(_asset_bytes(asset)), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_mnist_cnn() -> MnistCNN:
    """Return :class:`MnistCNN` with the bundled trained weights, on CPU, in eval mode."""
    return _with_bundled_weights(MnistCNN(), WEIGHTS_ASSET)


def load_mnist_paper_cnn() -> MnistPaperCNN:
    """Return :class:`MnistPaperCNN` with the bundled trained weights, on CPU, in eval mode."""
    return _with_bundled_weights(MnistPaperCNN(), PAPER_WEIGHTS_ASSET)


def paper_training_record() -> dict[str, Any]:
    """The training run's record of the bundled :class:`MnistPaperCNN` (accuracy, seed, ...)."""
    return json.loads(_asset_bytes(PAPER_TRAINING_ASSET))
