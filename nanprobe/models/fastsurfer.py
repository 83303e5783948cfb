"""FastSurfer-compatible segmentation networks: FastSurferCNN (v1.x) and FastSurferVINN (v2.x).

Rebuilt from FastSurfer's published architecture (Henschel et al. 2020; 2022) so that
``state_dict()`` matches the published checkpoints key for key, shape for shape and in order.
Inputs are (N, C, H, W) stacks of ``C`` neighbouring slices (7 for the published models) with H and
W multiples of 16 (four 2x2 poolings); outputs are (N, num_classes, H, W) logits.

Other nanprobe tools rely on this structure: convolutions are ``nn.Conv2d``, pooling is
``nn.MaxPool2d(return_indices=True)``, unpooling ``nn.MaxUnpool2d``, all looked up by attribute
name at call time (so they may be swapped in place), and every maxout is the NaN-propagating
``torch.maximum``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
_NUM_CLASSES = {"axial": 79, "coronal": 79, "sagittal": 51}
_DEPTH = 4  # encoder stages, each halving H and W
_MULTIPLE = 2**_DEPTH

ScaleFactor = float | Sequence[float] | np.ndarray | Tensor


def num_classes_for_view(view: str) -> int:
    """Class count of FastSurfer's model for ``view``: 79 axial/coronal, 51 sagittal."""
    if view not in _NUM_CLASSES:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}; got {view!r}")
    return _NUM_CLASSES[view]


def _check_unit_scale(scale: ScaleFactor, what: str) -> None:
    """Raise ValueError unless every entry of ``scale`` is exactly 1 (1 mm data)."""
    if not bool((torch.as_tensor(scale, dtype=torch.float64) == 1).all()):
        raise ValueError(f"only 1 mm inputs are supported ({what} must be 1); got {scale!r}")


class _DenseBlock(nn.Module):
    """Shared layers of FastSurfer's dense blocks.

    ``conv0..conv{n-1}`` (the last with ``last_kernel_size``), an optional input norm ``bn0``,
    norms ``{norm_name}1..{norm_name}n`` (all BatchNorm2d) and one PReLU shared by every
    activation. Attribute names and registration order reproduce FastSurfer's state_dict.
    """

    def __init__(
        self,
        in_channels: int,
        num_filters: int,
        kernel_size: int,
        num_convs: int,
        last_kernel_size: int,
        *,
        norm_name: str = "bn",
        input_norm: bool = False,
    ) -> None:
        super().__init__()
        if (
            kernel_size < 1
            or kernel_size % 2 == 0
            or last_kernel_size < 1
            or last_kernel_size % 2 == 0
        ):
            raise ValueError(
                f"kernel sizes must be odd and positive; got {kernel_size} and {last_kernel_size}"
            )
        if num_convs < 2:
            raise ValueError(f"a dense block needs at least 2 convolutions; got {num_convs}")
        self.num_convs = num_convs
        self.norm_name = norm_name
        for i in range(num_convs):
            k = last_kernel_size if i == num_convs - 1 else kernel_size
            conv = nn.Conv2d(in_channels if i == 0 else num_filters, num_filters, k, padding=k // 2)
            self.add_module(f"conv{i}", conv)
        if input_norm:
            self.bn0 = nn.BatchNorm2d(in_channels)
        for i in range(1, num_convs + 1):
            self.add_module(f"{norm_name}{i}", nn.BatchNorm2d(num_filters))
        self.prelu = nn.PReLU()

    def _conv_norm(self, i: int, x: Tensor) -> Tensor:
        """``norm{i+1}(conv{i}(x))``."""
        return getattr(self, f"{self.norm_name}{i + 1}")(getattr(self, f"conv{i}")(x))

    def _compete(self, m: Tensor, start: int) -> Tensor:
        """From layer ``start``: ``m = max(norm(conv(prelu(m))), m)``; no maxout after the last."""
        for i in range(start, self.num_convs - 1):
            m = torch.maximum(self._conv_norm(i, self.prelu(m)), m)
        return self._conv_norm(self.num_convs - 1, self.prelu(m))


class CompetitiveDenseBlock(_DenseBlock):
    """Dense block with maxout against its own input: (N, F, H, W) -> (N, F, H, W)."""

    def __init__(
        self, num_filters: int, kernel_size: int, num_convs: int, last_kernel_size: int
    ) -> None:
        super().__init__(num_filters, num_filters, kernel_size, num_convs, last_kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self._compete(x, 0)


class CompetitiveDenseBlockInput(_DenseBlock):
    """Input dense block, BatchNorm first, no maxout with the input: (N, C, H, W) -> (N, F, H, W).

    ``norm_name="gn"`` gives VINN's input block (FastSurfer's ``InputDenseBlock``), which names its
    BatchNorms ``gn1..gnN``.
    """

    def __init__(
        self,
        in_channels: int,
        num_filters: int,
        kernel_size: int,
        num_convs: int,
        last_kernel_size: int,
        *,
        norm_name: str = "bn",
    ) -> None:
        super().__init__(
            in_channels,
            num_filters,
            kernel_size,
            num_convs,
            last_kernel_size,
            norm_name=norm_name,
            input_norm=True,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self._compete(self._conv_norm(0, self.bn0(x)), 1)


class CompetitiveEncoderBlock(CompetitiveDenseBlock):
    """Dense block, then 2x2 max-pool: (N, F, H, W) -> (pooled (N, F, H/2, W/2), skip, indices)."""

    def __init__(
        self, num_filters: int, kernel_size: int, num_convs: int, last_kernel_size: int
    ) -> None:
        super().__init__(num_filters, kernel_size, num_convs, last_kernel_size)
        self.maxpool = nn.MaxPool2d(2, 2, return_indices=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        skip = super().forward(x)
        pooled, indices = self.maxpool(skip)
        return pooled, skip, indices


class CompetitiveEncoderBlockInput(CompetitiveDenseBlockInput):
    """Input dense block then 2x2 max-pooling: (N, C, H, W) -> (pooled, skip, indices)."""

    def __init__(
        self,
        in_channels: int,
        num_filters: int,
        kernel_size: int,
        num_convs: int,
        last_kernel_size: int,
    ) -> None:
        super().__init__(in_channels, num_filters, kernel_size, num_convs, last_kernel_size)
        self.maxpool = nn.MaxPool2d(2, 2, return_indices=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        skip = super().forward(x)
        pooled, indices = self.maxpool(skip)
        return pooled, skip, indices


class CompetitiveDecoderBlock(CompetitiveDenseBlock):
    """Max-unpool with the encoder's indices, maxout with its skip map, then a dense block.

    ``(x (N, F, H/2, W/2), skip (N, F, H, W), indices) -> (N, F, H, W)``.
    """

    def __init__(
        self, num_filters: int, kernel_size: int, num_convs: int, last_kernel_size: int
    ) -> None:
        super().__init__(num_filters, kernel_size, num_convs, last_kernel_size)
        self.unpool = nn.MaxUnpool2d(2, 2)

    def forward(self, x: Tensor, skip: Tensor, indices: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(torch.maximum(self.unpool(x, indices), skip))


class OutputDenseBlock(_DenseBlock):
    """VINN output block on ``concat(decoder, input block)``: -> (N, F, H, W).

    PReLU of the concatenation, then convolutions with maxout from the second layer on; its
    BatchNorms are named ``gn1..gnN`` as in FastSurfer.
    """

    def __init__(
        self, in_channels: int, num_filters: int, kernel_size: int, num_convs: int
    ) -> None:
        super().__init__(
            in_channels, num_filters, kernel_size, num_convs, kernel_size, norm_name="gn"
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self._compete(self._conv_norm(0, self.prelu(torch.cat((x, skip), dim=1))), 1)


class ClassifierBlock(nn.Module):
    """1x1 convolution to logits: (N, F, H, W) -> (N, num_classes, H, W)."""

    def __init__(self, num_filters: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(num_filters, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Zoom1mm(nn.Module):
    """VINN's resampling layer for 1 mm data only, where FastSurfer's ``Zoom2d`` is the identity.

    ``forward(x, scale_factor)`` returns ``x`` unchanged and raises ValueError for any scale factor
    other than 1; it has no parameters.
    """

    def forward(self, x: Tensor, scale_factor: ScaleFactor = 1.0) -> Tensor:
        _check_unit_scale(scale_factor, "scale_factor")
        return x


class _FastSurferUNet(nn.Module):
    """Encoder (4 pooling stages), bottleneck and decoder shared by FastSurferCNN and VINN."""

    def __init__(
        self,
        in_channels: int,
        num_filters: int,
        kernel_size: int,
        num_convs: int,
        last_kernel_size: int,
    ) -> None:
        super().__init__()
        shape = (num_filters, kernel_size, num_convs, last_kernel_size)
        self.encode1 = CompetitiveEncoderBlockInput(in_channels, *shape)
        self.encode2 = CompetitiveEncoderBlock(*shape)
        self.encode3 = CompetitiveEncoderBlock(*shape)
        self.encode4 = CompetitiveEncoderBlock(*shape)
        self.bottleneck = CompetitiveDenseBlock(*shape)
        self.decode4 = CompetitiveDecoderBlock(*shape)
        self.decode3 = CompetitiveDecoderBlock(*shape)
        self.decode2 = CompetitiveDecoderBlock(*shape)
        self.decode1 = CompetitiveDecoderBlock(*shape)

    def _init_weights(self) -> None:
        """FastSurfer's initialisation: Kaiming-normal (fan_out) convolutions, unit BatchNorms."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _unet(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, F, H, W); H and W must be multiples of 16."""
        if x.dim() != 4 or x.shape[-2] % _MULTIPLE or x.shape[-1] % _MULTIPLE:
            raise ValueError(
                f"expected an (N, C, H, W) input with H and W multiples of {_MULTIPLE}; "
                f"got shape {tuple(x.shape)}"
            )
        out1, skip1, idx1 = self.encode1(x)
        out2, skip2, idx2 = self.encode2(out1)
        out3, skip3, idx3 = self.encode3(out2)
        out4, skip4, idx4 = self.encode4(out3)
        dec = self.bottleneck(out4)
        dec = self.decode4(dec, skip4, idx4)
        dec = self.decode3(dec, skip3, idx3)
        dec = self.decode2(dec, skip2, idx2)
        return self.decode1(dec, skip1, idx1)


class FastSurferCNN(_FastSurferUNet):
    """FastSurferCNN as in FastSurfer v1.x: (N, num_channels, H, W) -> (N, num_classes, H, W).

    Dense blocks of three convolutions (``kernel_size`` x ``kernel_size``, ``kernel_size``, 1x1)
    with ``num_filters`` channels. Published: 7 channels, 64 filters, 5x5 kernels, 79 classes
    (axial/coronal) or 51 (sagittal).
    """

    def __init__(
        self,
        num_classes: int = 79,
        *,
        num_channels: int = 7,
        num_filters: int = 64,
        kernel_size: int = 5,
    ) -> None:
        super().__init__(num_channels, num_filters, kernel_size, num_convs=3, last_kernel_size=1)
        self.classifier = ClassifierBlock(num_filters, num_classes)
        self._init_weights()

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self._unet(x))


class FastSurferVINN(_FastSurferUNet):
    """FastSurferVINN (FastSurfer v2.x) at 1 mm: (N, num_channels, H, W) -> (N, num_classes, H, W).

    An input block (``num_channels`` -> ``num_filters_interpol``), the U-Net on
    ``num_filters`` channels, an output block on ``concat(decoder, input block)``
    (``num_filters + num_filters_interpol`` channels) and a 1x1 classifier; every dense block has
    four ``kernel_size`` x ``kernel_size`` convolutions. The two resampling layers (``interpol1``
    after the input block, ``interpol2`` before the output block) are the identity at 1 mm, the only
    resolution supported. Published: 7 channels, 71 filters, 32 interpolation filters, 3x3, 79
    classes (axial/coronal) or 51 (sagittal).
    """

    def __init__(
        self,
        num_classes: int = 79,
        *,
        num_channels: int = 7,
        num_filters: int = 71,
        num_filters_interpol: int = 32,
        kernel_size: int = 3,
        voxel_size: ScaleFactor = 1.0,
    ) -> None:
        _check_unit_scale(voxel_size, "voxel_size in mm")
        super().__init__(num_filters_interpol, num_filters, kernel_size, 4, kernel_size)
        self.inp_block = CompetitiveDenseBlockInput(
            num_channels, num_filters_interpol, kernel_size, 4, kernel_size, norm_name="gn"
        )
        self.outp_block = OutputDenseBlock(
            num_filters + num_filters_interpol, num_filters, kernel_size, 4
        )
        self.interpol1 = Zoom1mm()
        self.interpol2 = Zoom1mm()
        self.classifier = ClassifierBlock(num_filters, num_classes)
        self._init_weights()

    def forward(
        self,
        x: Tensor,
        scale_factor: ScaleFactor = 1.0,
        scale_factor_out: ScaleFactor = 1.0,
    ) -> Tensor:
        """Logits for ``x``; both scale factors must be 1 (1 mm in, 1 mm out)."""
        skip0 = self.inp_block(x)
        dec = self._unet(self.interpol1(skip0, scale_factor))
        return self.classifier(self.outp_block(self.interpol2(dec, scale_factor_out), skip0))


def fastsurfer_cnn(view: str) -> FastSurferCNN:
    """Published FastSurferCNN (v1.x) for ``view`` in ``VIEWS``, randomly initialised."""
    return FastSurferCNN(num_classes_for_view(view))


def fastsurfer_vinn(view: str) -> FastSurferVINN:
    """Published FastSurferVINN (v2.x) for ``view`` in ``VIEWS``, randomly initialised."""
    return FastSurferVINN(num_classes_for_view(view))
