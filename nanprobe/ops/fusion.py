"""What a NaN op can absorb from the layers around it: activations and inference batch norm.

A NaN convolution may apply an activation to its input (in the pass that copies the input
anyway), fold an inference ``BatchNorm2d`` into its weights and bias, and apply an activation
and FastSurfer's maxout (``torch.maximum`` with another map) while writing its output, so that
skipped positions cost nothing after the convolution either. :func:`activation` describes the
activations that can be absorbed; :func:`fold_batch_norm` folds a batch norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: activation kinds understood by the kernels
RELU, SLOPE = 1, 2


@dataclass(frozen=True, eq=False)
class Activation:
    """ReLU (``kind=RELU``) or ``x if x > 0 else slope * x`` (``kind=SLOPE``: PReLU with one or
    C slopes, LeakyReLU with one). NaN stays NaN; ReLU(-inf) is 0, as in torch."""

    kind: int
    slope: torch.Tensor | float = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The activation by torch ops (the reference for the kernels)."""
        if self.kind == RELU:
            return F.relu(x)
        if isinstance(self.slope, torch.Tensor):
            return F.prelu(x, self.slope.to(x.dtype))
        return F.leaky_relu(x, self.slope)

    def slopes(self, channels: int, dtype: torch.dtype) -> torch.Tensor:
        """One slope per channel, (channels,) of ``dtype`` (zeros for ReLU)."""
        if self.kind == RELU:
            return torch.zeros(channels, dtype=dtype)
        if isinstance(self.slope, torch.Tensor):
            s = self.slope.detach().to("cpu", dtype).reshape(-1)
        else:
            s = torch.tensor([self.slope], dtype=dtype)
        return s.expand(channels).contiguous() if s.numel() == 1 else s

    def keeps_numbers(self) -> bool:
        """Whether every number stays a number (no slope turns -inf into NaN): then the input's
        NaN layout is that of the activated input."""
        if self.kind == RELU:
            return True
        s = torch.as_tensor(self.slope).detach().double()
        return bool((torch.isfinite(s) & (s != 0)).all())


def activation(module: nn.Module | str | None) -> Activation | None:
    """The :class:`Activation` of an ``nn.ReLU``, ``nn.LeakyReLU`` or ``nn.PReLU`` module (exact
    types) or of ``"relu"`` (``torch.relu``), else None (not absorbable)."""
    if type(module) is nn.ReLU or (isinstance(module, str) and module == "relu"):
        return Activation(RELU)
    if type(module) is nn.LeakyReLU:
        return Activation(SLOPE, float(module.negative_slope))
    if type(module) is nn.PReLU:
        return Activation(SLOPE, module.weight)
    return None


def foldable(bn: nn.Module) -> bool:
    """Whether ``bn`` is an ``nn.BatchNorm2d`` in inference mode with running statistics (then
    it is an affine map per channel that can be folded into the preceding convolution)."""
    return (type(bn) is nn.BatchNorm2d and not bn.training and bn.track_running_stats
            and bn.running_mean is not None and bn.running_var is not None)


@torch.no_grad()
def fold_batch_norm(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x, weight, bias))`` as one convolution: with
    s = gamma / sqrt(var + eps), w' = w * s and b' = (b - mean) * s + beta (per output channel).
    Equal to the two steps up to float rounding."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bias is not None:
        shift = shift + bias.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    w = (weight.double() * scale[:, None, None, None]).to(weight.dtype)
    return w, shift.to(weight.dtype)


def batch_norm_key(bn: nn.BatchNorm2d | None) -> tuple:
    """A key that changes whenever ``bn``'s folded form would (identity and versions)."""
    if bn is None:
        return ()
    tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return (id(bn), bn.eps, *((None if t is None else (t.data_ptr(), t._version))
                              for t in tensors))
