"""Neural network models used by nanprobe; :func:`load` picks one by name.

- :mod:`~nanprobe.models.default`: the bundled default tissue-segmentation U-Net and its brain;
- :mod:`~nanprobe.models.mnist`: the bundled MNIST classifier;
- :mod:`~nanprobe.models.fastsurfer` / :mod:`~nanprobe.models.checkpoint`: FastSurfer networks
  and their published checkpoints;
- :mod:`~nanprobe.models.registry`: :func:`load` and :class:`LoadedModel`.
"""

from nanprobe.models.checkpoint import CheckpointError, load_fastsurfer_checkpoint
from nanprobe.models.default import build_default_unet, load_default_brain, load_default_unet
from nanprobe.models.fastsurfer import FastSurferCNN, FastSurferVINN
from nanprobe.models.mnist import MnistCNN, load_mnist_cnn
from nanprobe.models.registry import BUILTIN_SPECS, LoadedModel, load, state_dict_sha256

__all__ = [
    "BUILTIN_SPECS",
    "CheckpointError",
    "FastSurferCNN",
    "FastSurferVINN",
    "LoadedModel",
    "MnistCNN",
    "build_default_unet",
    "load",
    "load_default_brain",
    "load_default_unet",
    "load_fastsurfer_checkpoint",
    "load_mnist_cnn",
    "state_dict_sha256",
]
