"""Load a model by name, with a description of the inputs it takes.

Accepted specs of :func:`load`:

- ``"default"``: the bundled default U-Net (:mod:`nanprobe.models.default`), coronal thick slices;
- ``"mnist"``: the bundled MNIST classifier (:mod:`nanprobe.models.mnist`);
- ``"mnist-paper"``: the bundled MNIST classifier with the paper's conventions (normalised input,
  90-logit head whose column d is digit d; :class:`~nanprobe.models.mnist.MnistPaperCNN`);
- ``"fastsurfer-vinn"`` / ``"fastsurfer-cnn"``: FastSurfer v2 / v1 networks from a local checkpoint
  file (``checkpoint=`` is required; nanprobe never downloads);
- ``"package.module:callable"``: a user factory returning an ``nn.Module`` (or a
  :class:`LoadedModel`).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import pickle
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from nanprobe.data.mnist import SIDE as MNIST_SIDE
from nanprobe.data.mri import VIEWS
from nanprobe.models import default, mnist
from nanprobe.models.checkpoint import load_fastsurfer_checkpoint
from nanprobe.models.fastsurfer import FastSurferVINN, num_classes_for_view

InputKind = Literal["mri-thick-slices", "image"]
Task = Literal["segmentation", "classification"]

BUILTIN_SPECS: tuple[str, ...] = ("default", "mnist", "mnist-paper", "fastsurfer-vinn",
                                  "fastsurfer-cnn")
FASTSURFER_RELEASE_HINT = (
    "download FastSurfer's released checkpoints yourself (e.g. aparc_vinn_coronal_v2.0.0.pkl "
    "from the FastSurfer GitHub releases, or the checkpoints/ folder of a FastSurfer "
    "installation) and pass checkpoint=PATH; nanprobe never downloads"
)
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_CONFORMED_STACK = (2 * default.SLICE_THICKNESS + 1, 256, 256)


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode and what its inputs and outputs look like.

    ``input_shape`` is per sample (no batch axis): ``(7, 256, 256)`` thick slices of a conformed
    volume for ``input_kind="mri-thick-slices"`` (see :mod:`nanprobe.data.mri`), ``(1, 28, 28)``
    for the MNIST ``"image"``; ``None`` fields are unknown (user factories returning a plain
    module). ``view`` is the slicing view of MRI models. ``weights_sha256`` is the SHA-256 of the
    file the weights were read from (bundled asset or checkpoint), or, for a factory without
    checkpoint, of the state_dict's tensors (:func:`state_dict_sha256`).
    """

    model: nn.Module
    spec: str
    task: Task | None = None
    input_kind: InputKind | None = None
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    view: str | None = None
    weights_sha256: str | None = None


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 over the state_dict entries in order: name, dtype, shape and raw bytes of each."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def asset_sha256(name: str) -> str:
    """SHA-256 of a bundled file in ``nanprobe/assets``."""
    blob = resources.files("nanprobe").joinpath("assets", name).read_bytes()
    return hashlib.sha256(blob).hexdigest()


def _checkpoint_path(checkpoint: str | os.PathLike[str], spec: str) -> Path:
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"{spec}: checkpoint {path} is not a file")
    return path


def _unreadable(spec: str, path: Path, err: Exception) -> ValueError:
    reason = (str(err).strip().splitlines() or ["no details"])[0]
    return ValueError(
        f"{spec}: {path} is not a readable torch.save file ({type(err).__name__}: {reason})"
    )


def _read_weights(path: Path, spec: str, *, trust: bool) -> object:
    """``torch.load`` with ``weights_only=True``; full unpickling only if refused and ``trust``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise _unreadable(spec, path, err) from err
        if not trust:
            raise ValueError(
                f"{spec}: {path} holds Python objects beyond tensors and needs full unpickling, "
                "which can run code stored in the file; pass trust=True only if you trust its "
                "source"
            ) from err
    except Exception as err:  # torch.load reports corrupt files with many exception types
        raise _unreadable(spec, path, err) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # as above
        raise _unreadable(spec, path, err) from err


def _load_state_dict(model: nn.Module, path: Path, spec: str, *, trust: bool) -> None:
    """Load a ``torch.save(model.state_dict())`` file into ``model`` (strict keys and shapes)."""
    state = _read_weights(path, spec, trust=trust)
    if not isinstance(state, dict):
        raise ValueError(f"{spec}: {path} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ValueError(
            f"{spec}: {path} does not fit the model: {' '.join(first[1:3]) or first[0]}"
        ) from err


def _check_view(spec: str, view: str | None, allowed: tuple[str, ...]) -> None:
    if view is not None and view not in allowed:
        raise ValueError(f"{spec}: view must be {' or '.join(allowed) or 'None'}; got {view!r}")


def _view_from_path(path: Path) -> str:
    """The one view named in ``path`` (FastSurfer's files and folders name it), else ValueError."""
    named = {v for v in VIEWS if v in str(path).lower()}
    if len(named) != 1:
        raise ValueError(
            f"cannot tell the view of {path} from its path; pass view= one of {', '.join(VIEWS)}"
        )
    return named.pop()


def _load_default(checkpoint: Path | None, view: str | None, trust: bool) -> LoadedModel:
    if checkpoint is None:
        _check_view("default", view, (default.DEFAULT_VIEW,))
        return LoadedModel(
            default.load_default_unet(), "default", "segmentation", "mri-thick-slices",
            _CONFORMED_STACK, default.NUM_CLASSES, default.DEFAULT_VIEW,
            asset_sha256(default.WEIGHTS_ASSET),
        )
    _check_view("default", view, VIEWS)
    model = default.build_default_unet()
    _load_state_dict(model, checkpoint, "default", trust=trust)
    return LoadedModel(
        model.eval(), "default", "segmentation", "mri-thick-slices", _CONFORMED_STACK,
        default.NUM_CLASSES, view or default.DEFAULT_VIEW, file_sha256(checkpoint),
    )


def _load_mnist(
    spec: str, checkpoint: Path | None, view: str | None, trust: bool
) -> LoadedModel:
    """``mnist`` or ``mnist-paper``: both classify into 10 digits (``mnist-paper`` outputs 90
    columns; a prediction outside 0-9 is wrong)."""
    _check_view(spec, view, ())
    paper = spec == "mnist-paper"
    if checkpoint is None:
        model = mnist.load_mnist_paper_cnn() if paper else mnist.load_mnist_cnn()
        digest = asset_sha256(mnist.PAPER_WEIGHTS_ASSET if paper else mnist.WEIGHTS_ASSET)
    else:
        model = mnist.MnistPaperCNN() if paper else mnist.MnistCNN()
        _load_state_dict(model, checkpoint, spec, trust=trust)
        digest = file_sha256(checkpoint)
    return LoadedModel(
        model.eval(), spec, "classification", "image", (1, MNIST_SIDE, MNIST_SIDE), 10, None,
        digest,
    )


def _load_fastsurfer(
    spec: str, checkpoint: Path | None, view: str | None, trust: bool
) -> LoadedModel:
    if checkpoint is None:
        raise ValueError(f"{spec} needs checkpoint=: {FASTSURFER_RELEASE_HINT}")
    view = view or _view_from_path(checkpoint)
    model = load_fastsurfer_checkpoint(checkpoint, view, trust=trust)
    found = "fastsurfer-vinn" if isinstance(model, FastSurferVINN) else "fastsurfer-cnn"
    if found != spec:
        raise ValueError(f"{checkpoint} holds a {found} checkpoint; load it with spec {found!r}")
    return LoadedModel(
        model, spec, "segmentation", "mri-thick-slices", _CONFORMED_STACK,
        num_classes_for_view(view), view, file_sha256(checkpoint),
    )


def _load_factory(
    spec: str, checkpoint: Path | None, view: str | None, trust: bool
) -> LoadedModel:
    module_name, _, attr_path = spec.partition(":")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{spec}: cannot import module {module_name!r} ({err})") from err
    except Exception as err:  # module-level code of the user's module failed
        raise ValueError(f"{spec}: importing module {module_name!r} raised "
                         f"{type(err).__name__}: {err}") from err
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise ValueError(f"{spec}: module {module_name!r} has no attribute {attr_path!r}")
        target = getattr(target, attr)
    if not callable(target):
        raise ValueError(f"{spec}: {attr_path!r} is a {type(target).__name__}, not callable")
    kwargs = {} if view is None else {"view": view}
    try:
        inspect.signature(target).bind(**kwargs)
    except TypeError as err:
        raise ValueError(
            f"{spec}: the factory cannot be called with {kwargs or 'no arguments'} ({err})"
        ) from err
    except ValueError:  # no signature (some builtins): just call it
        pass
    try:
        made = target(**kwargs)
    except Exception as err:  # the user's code: say whose error it is, in one line
        raise ValueError(f"model factory {spec} raised {type(err).__name__}: {err}") from err
    if isinstance(made, LoadedModel):
        loaded = replace(made, spec=spec, view=made.view or view)
    elif isinstance(made, nn.Module):
        loaded = LoadedModel(made, spec, view=view)
    else:
        raise ValueError(
            f"{spec}: the factory returned a {type(made).__name__}, not an nn.Module"
        )
    if checkpoint is not None:
        _load_state_dict(loaded.model, checkpoint, spec, trust=trust)
        digest = file_sha256(checkpoint)
    else:
        digest = loaded.weights_sha256 or state_dict_sha256(loaded.model)
    return replace(loaded, model=loaded.model.eval(), weights_sha256=digest)


def load(
    spec: str,
    checkpoint: str | os.PathLike[str] | None = None,
    view: str | None = None,
    *,
    trust: bool = False,
) -> LoadedModel:
    """Load the model named by ``spec`` in eval mode, on CPU, with a description of its inputs.

    ``spec`` is one of :data:`BUILTIN_SPECS` or ``"package.module:callable"``.

    - ``checkpoint``: weights to load. For ``default`` / ``mnist`` / ``mnist-paper``: a
      state_dict file written by ``analyses/train_default_unet.py`` / ``analyses/train_mnist.py``
      (``--paper-head`` for ``mnist-paper``; default: the bundled weights). For
      ``fastsurfer-*``: FastSurfer's ``.pkl`` (required). For a factory: a state_dict file
      loaded strictly into the module it returns.
    - ``view``: ``default`` is coronal unless a checkpoint trained on another view is given;
      ``fastsurfer-*`` need the view the checkpoint was trained for (read from the path when it
      names exactly one, as FastSurfer's file names do); ``mnist`` and ``mnist-paper`` take
      none; a factory gets ``view=`` as a keyword argument when it is given.
    - ``trust``: files are read with ``torch.load(weights_only=True)``; only if that is refused and
      ``trust`` is True are they fully unpickled (which can run code stored in the file).

    Raises ValueError (one line: what is wrong, what to do) for an unknown spec, a missing
    FastSurfer checkpoint, an unimportable factory, a factory not returning an ``nn.Module``, a
    bad view, or weights that do not fit.
    """
    path = None if checkpoint is None else _checkpoint_path(checkpoint, spec)
    if spec == "default":
        return _load_default(path, view, trust)
    if spec in ("mnist", "mnist-paper"):
        return _load_mnist(spec, path, view, trust)
    if spec in ("fastsurfer-vinn", "fastsurfer-cnn"):
        return _load_fastsurfer(spec, path, view, trust)
    if isinstance(spec, str) and _FACTORY.match(spec):
        return _load_factory(spec, path, view, trust)
    raise ValueError(
        f"unknown model spec {spec!r}; expected one of {', '.join(map(repr, BUILTIN_SPECS))} "
        "or 'package.module:callable' (a factory returning an nn.Module)"
    )


def class_names(model: str, num_classes: int) -> list[str]:
    """Display names of the output classes of model spec ``model`` (``class k`` when the
    model is not a bundled one or has another number of classes)."""
    if model == "default" and num_classes == 4:
        from .default import CLASS_NAMES

        return list(CLASS_NAMES)
    if model == "mnist" and num_classes == 10:
        return [str(d) for d in range(10)]
    return [f"class {k}" for k in range(num_classes)]
