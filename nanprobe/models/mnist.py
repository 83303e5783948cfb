"""The paper's MNIST classifier and its bundled trained weights.

Architecture of :class:`MnistCNN` (input ``(N, 1, 28, 28)``, output ``(N, 10)`` log-probabilities):

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
``nn.Module`` instances inside ``MnistCNN.layers`` (an ``nn.Sequential``), so tools can swap
``nn.Conv2d`` / ``nn.ReLU`` / ``nn.MaxPool2d`` modules by type. 104,202 parameters.

The bundled weights ``nanprobe/assets/mnist_cnn.pt`` were produced by
``analyses/train_mnist.py``; see ``nanprobe/assets/MNIST_LICENSE.txt``.
"""

from __future__ import annotations

import io
from importlib import resources

import torch
from torch import nn

WEIGHTS_ASSET = "mnist_cnn.pt"


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


def load_mnist_cnn() -> MnistCNN:
    """Return :class:`MnistCNN` with the bundled trained weights, on CPU, in eval mode."""
    blob = resources.files("nanprobe").joinpath("assets").joinpath(WEIGHTS_ASSET).read_bytes()
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    model = MnistCNN()
    model.load_state_dict(state)
    return model.eval()
