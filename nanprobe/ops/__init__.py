"""NaN operations: functional core plus thin ``nn.Module`` wrappers (as torchvision.ops does).

- :func:`nan_max_pool2d` marks pooling windows with a non-unique maximum (or only NaN) as NaN;
- :func:`nan_max_unpool2d` carries those marks over the whole window into the decoder;
- :func:`nan_conv2d` skips output positions whose input window is mostly NaN;
- :func:`nanify` swaps a model's modules for :class:`NanMaxPool2d`, :class:`NanMaxUnpool2d` and
  :class:`NanConv2d`; :func:`skip_stats` reads what they skipped.

They are inference ops: they run without autograd and their results carry no gradient. On CPU
(float32/float64) fused numba kernels do the NaN bookkeeping in one pass (``_kernels``); each
NaN op records how many NaN entries each pixel of its output holds, so that the next NaN
convolution reading that output unchanged need not scan it (``_layout``). ``nanify`` also fuses
what surrounds the NaN ops in a model's forward (activations, inference batch norm, FastSurfer's
maxout; ``fusion``, ``_graph_fusion``); :func:`fold_batch_norms` is the dense baseline's
equivalent (batch norm folded into plain convolutions).
"""

from ._graph_fusion import fold_batch_norms
from .conv import ConvSkipStats, nan_conv2d, nan_conv2d_with_stats
from .modules import NanConv2d, NanMaxPool2d, NanMaxUnpool2d
from .nanify import NanifyReport, NanifyWarning, load_config, nanify, skip_stats
from .pool import nan_max_pool2d, nan_max_unpool2d

__all__ = [
    "ConvSkipStats",
    "NanConv2d",
    "NanMaxPool2d",
    "NanMaxUnpool2d",
    "NanifyReport",
    "NanifyWarning",
    "fold_batch_norms",
    "load_config",
    "nan_conv2d",
    "nan_conv2d_with_stats",
    "nan_max_pool2d",
    "nan_max_unpool2d",
    "nanify",
    "skip_stats",
]
