"""Thin ``nn.Module`` wrappers around the NaN ops; each counts what it skipped.

They subclass the matching ``torch.nn`` modules, so parameters, ``state_dict`` keys and
constructors are the same (plus the NaN options, keyword-only).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._args import IntPair, check_choice, check_fraction, check_nonnegative, check_tie_limit
from ._layout import nan_entries
from .conv import IMPLS, Fill, check_fill, nan_conv2d_with_stats
from .fusion import activation, batch_norm_key, fold_batch_norm, foldable
from .pool import nan_max_pool2d_with_count, nan_max_unpool2d


class SkipCounter:
    """Mixin holding per-call (``last_stats``) and cumulative (``total_stats``) counters."""

    kind = "op"

    def _init_counter(self) -> None:
        self.last_stats: dict[str, int] = {}
        self.total_stats: Counter[str] = Counter()

    def _record(self, **counts: int) -> None:
        self.last_stats = dict(counts, calls=1)
        self.total_stats.update(self.last_stats)

    def reset_skip_stats(self) -> None:
        """Forget everything counted so far."""
        self._init_counter()


class NanMaxPool2d(nn.MaxPool2d, SkipCounter):
    """``nn.MaxPool2d`` running :func:`~nanprobe.ops.nan_max_pool2d` (dilation 1, floor mode).

    Counts ``windows`` and ``nan_windows`` (ties or all-NaN) per call and in total.
    """

    kind = "pool"

    def __init__(
        self,
        kernel_size: IntPair,
        stride: IntPair | None = None,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
        *,
        tie_limit: int | None = 1,
        tie_eps: float = 1e-7,
        tie_rtol: float = 0.0,
    ) -> None:
        if dilation not in (1, (1, 1)) or ceil_mode:
            raise ValueError("NanMaxPool2d supports dilation=1 and ceil_mode=False only, got "
                             f"dilation={dilation!r}, ceil_mode={ceil_mode!r}")
        check_tie_limit(tie_limit)
        check_nonnegative(tie_eps, "tie_eps")
        check_nonnegative(tie_rtol, "tie_rtol")
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        self.tie_limit, self.tie_eps, self.tie_rtol = tie_limit, tie_eps, tie_rtol
        self._init_counter()

    def forward(self, x: torch.Tensor):  # noqa: D102 - see class docstring
        values, indices, nans = nan_max_pool2d_with_count(
            x, self.kernel_size, self.stride, self.padding, tie_limit=self.tie_limit,
            tie_eps=self.tie_eps, tie_rtol=self.tie_rtol,
        )
        self._record(windows=values.numel(), nan_windows=nans)
        return (values, indices) if self.return_indices else values

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, tie_limit={self.tie_limit}, tie_eps={self.tie_eps}, "
                f"tie_rtol={self.tie_rtol}")


class NanMaxUnpool2d(nn.MaxUnpool2d, SkipCounter):
    """``nn.MaxUnpool2d`` running :func:`~nanprobe.ops.nan_max_unpool2d` (NaN marks spread).

    Counts ``windows`` and ``nan_windows`` (NaN pooled values) per call and in total.
    """

    kind = "unpool"

    def __init__(
        self, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0
    ) -> None:
        super().__init__(kernel_size, stride, padding)
        self._init_counter()

    def forward(
        self,
        x: torch.Tensor,
        indices: torch.Tensor,
        output_size: list[int] | None = None,
        maxout: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unpool ``x``; with ``maxout``, ``torch.maximum(unpooled, maxout)`` in the same pass
        (what :func:`~nanprobe.ops.nanify` passes when it fuses a decoder's maxout)."""
        self._record(windows=x.numel(), nan_windows=nan_entries(x))
        return nan_max_unpool2d(x, indices, self.kernel_size, self.stride, self.padding,
                                output_size, maxout=maxout)


class NanConv2d(nn.Conv2d, SkipCounter):
    """``nn.Conv2d`` running :func:`~nanprobe.ops.nan_conv2d` (groups=1, zero padding).

    Counts per call and in total: ``positions`` (output positions), ``skipped`` (set to NaN
    without computing), ``partial`` (computed, window partly NaN), ``positions_executed``
    (positions - skipped: given a value), ``positions_computed`` (what the dense convolutions
    computed, band rectangles included), ``macs`` and ``macs_skipped``. ``generator`` seeds the
    ``noisy_max`` fill.

    ``forward(x, maxout=None, *, pre_activation=None, batch_norm=None, post_activation=None)``
    computes ``torch.maximum(post_activation(batch_norm(conv(pre_activation(x)))), maxout)``
    (each part only when given; the modules are the model's own, passed by a forward that
    :func:`~nanprobe.ops.nanify` fused). In inference the batch norm is folded into the weights
    and the rest runs inside the NaN convolution's passes; otherwise (a module in training
    mode, an activation the kernels do not know, a torch dispatch mode such as MCA's active)
    the parts run one after another, as the unfused model would.
    """

    kind = "conv"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        nan_threshold: float = 1.0,
        fill: Fill = "mean",
        sigma: float = 1e-3,
        count_padding: bool = False,
        impl: str = "auto",
        generator: torch.Generator | None = None,
    ) -> None:
        if groups != 1 or padding_mode != "zeros" or isinstance(padding, str):
            raise ValueError("NanConv2d supports groups=1, padding_mode='zeros' and numeric "
                             f"padding only, got groups={groups!r}, padding_mode={padding_mode!r}, "
                             f"padding={padding!r}")
        fill = check_fill(fill)
        check_choice(impl, "impl", IMPLS)
        check_fraction(nan_threshold, "nan_threshold")
        check_nonnegative(sigma, "sigma")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        self.nan_threshold, self.fill, self.sigma = nan_threshold, fill, sigma
        self.count_padding, self.impl, self.generator = count_padding, impl, generator
        self._init_counter()

    def forward(
        self,
        x: torch.Tensor,
        maxout: torch.Tensor | None = None,
        *,
        pre_activation: nn.Module | str | None = None,
        batch_norm: nn.Module | None = None,
        post_activation: nn.Module | str | None = None,
    ) -> torch.Tensor:  # noqa: D102 - see class docstring
        for name, act in (("pre_activation", pre_activation), ("post_activation", post_activation)):
            if isinstance(act, str) and act != "relu":
                raise ValueError(f"{name} must be a module or 'relu', got {act!r}")
        pre, post = activation(pre_activation), activation(post_activation)
        parts = (pre_activation, batch_norm, post_activation)
        if (any(isinstance(m, nn.Module) and m.training for m in parts)
                or (pre_activation is not None and pre is None)
                or (post_activation is not None and post is None)
                or (batch_norm is not None and not foldable(batch_norm))
                or _get_current_dispatch_mode() is not None):
            return self._one_by_one(x, maxout, *parts)
        weight, bias = self._folded(batch_norm)
        return self._nan_conv(x, weight, bias, pre_activation=pre, post_activation=post,
                              maxout=maxout)

    def _nan_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  **fused) -> torch.Tensor:
        y, stats = nan_conv2d_with_stats(
            x, weight, bias, self.stride, self.padding, self.dilation,
            nan_threshold=self.nan_threshold, fill=self.fill, sigma=self.sigma,
            generator=self.generator, count_padding=self.count_padding, impl=self.impl, **fused,
        )
        self._record(positions=stats.positions, skipped=stats.skipped, partial=stats.partial,
                     positions_executed=stats.positions_executed,
                     positions_computed=stats.positions_computed, macs=stats.macs,
                     macs_skipped=stats.macs_skipped)
        return y

    def _one_by_one(self, x, maxout, pre_activation, batch_norm, post_activation) -> torch.Tensor:
        """The fused operations as separate modules, as the model wrote them."""
        if pre_activation is not None:
            x = torch.relu(x) if isinstance(pre_activation, str) else pre_activation(x)
        y = self._nan_conv(x, self.weight, self.bias)
        if batch_norm is not None:
            y = batch_norm(y)
        if post_activation is not None:
            y = torch.relu(y) if isinstance(post_activation, str) else post_activation(y)
        return y if maxout is None else torch.maximum(y, maxout)

    def _folded(self, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias with ``bn`` folded in, cached until a parameter changes."""
        if bn is None:
            return self.weight, self.bias
        key = (self.weight.data_ptr(), self.weight._version,
               None if self.bias is None else (self.bias.data_ptr(), self.bias._version),
               batch_norm_key(bn))
        cached = getattr(self, "_fold_cache", None)
        if cached is None or cached[0] != key:
            cached = self._fold_cache = (key, *fold_batch_norm(self.weight, self.bias, bn))
        return cached[1], cached[2]

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, nan_threshold={self.nan_threshold}, fill={self.fill!r}, "
                f"count_padding={self.count_padding}, impl={self.impl!r}")
