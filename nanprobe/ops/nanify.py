"""Swap a model's pooling, unpooling and convolution modules for the NaN versions."""

from __future__ import annotations

import ast
import fnmatch
import inspect
import json
import textwrap
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._graph_fusion import FusedForward, calls_nan_ops, fuse_module
from .modules import NanConv2d, NanMaxPool2d, NanMaxUnpool2d, SkipCounter

POOL_OPTIONS = ("tie_limit", "tie_eps", "tie_rtol")
CONV_OPTIONS = ("nan_threshold", "fill", "sigma", "count_padding", "impl")
OPTIONS = POOL_OPTIONS + CONV_OPTIONS
FUNCTIONAL_NAMES = frozenset(
    {"max_pool2d", "max_pool2d_with_indices", "max_unpool2d", "conv2d", "_conv_forward"}
)


class NanifyWarning(UserWarning):
    """Some pooling/convolution in the model could not be converted."""


@dataclass
class NanifyReport:
    """What :func:`nanify` did: converted layer name -> NaN type, what it could not convert,
    what each NaN op absorbed (``fused``: op name -> absorbed layers) and the modules whose
    forward calls NaN ops but could not be fused (``not_fused``: module name -> reason)."""

    converted: dict[str, str] = field(default_factory=dict)
    not_convertible: dict[str, str] = field(default_factory=dict)
    fused: dict[str, str] = field(default_factory=dict)
    not_fused: dict[str, str] = field(default_factory=dict)


def load_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Read a thresholds config (dict or JSON file): ``{"defaults": {...}, "layers": {...}}``.

    ``defaults`` holds options for every layer; ``layers`` maps a layer name or glob pattern to
    options overriding them. Option names: ``tie_limit``, ``tie_eps``, ``tie_rtol`` (pooling),
    ``nan_threshold``, ``fill``, ``sigma``, ``count_padding``, ``impl`` (convolution).
    """
    if isinstance(config, str | Path):
        path = Path(config)
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
    if not isinstance(config, Mapping):
        raise ValueError("config must be a mapping or a JSON file path, "
                         f"got {type(config).__name__}")
    unknown = set(config) - {"defaults", "layers", "provenance", "format"}
    if unknown:
        raise ValueError(f"config has unknown keys {sorted(unknown)}; "
                         "expected 'defaults', 'layers', 'provenance', 'format'")
    defaults = dict(config.get("defaults", {}))
    layers = {str(k): dict(v) for k, v in dict(config.get("layers", {})).items()}
    for where, opts in [("defaults", defaults), *layers.items()]:
        bad = set(opts) - set(OPTIONS)
        if bad:
            raise ValueError(f"config entry {where!r} has unknown options {sorted(bad)}; "
                             f"accepted: {', '.join(OPTIONS)}")
    return {"defaults": defaults, "layers": layers}


def _functional_calls(model: nn.Module) -> dict[str, str]:
    """Modules whose own ``forward`` calls pooling/convolution functionally (not convertible)."""
    found: dict[str, str] = {}
    seen: dict[type, list[str]] = {}
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__module__.startswith(("torch.", "nanprobe.ops")):
            continue
        if cls not in seen:
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
            except (OSError, TypeError, SyntaxError):
                seen[cls] = []
            else:
                called = (
                    getattr(node.func, "attr", None) or getattr(node.func, "id", None)
                    for node in ast.walk(tree) if isinstance(node, ast.Call)
                )
                seen[cls] = sorted({c for c in called if c in FUNCTIONAL_NAMES})
        if seen[cls]:
            found[name or "<root>"] = (f"{cls.__name__}.forward calls {', '.join(seen[cls])} "
                                       "functionally; use nn modules to make it convertible")
    return found


def _conv_padding(module: nn.Conv2d) -> tuple[int, int] | str:
    """Numeric padding of a conv, or the reason it has none."""
    if not isinstance(module.padding, str):
        return tuple(module.padding)
    if module.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
    if any(t % 2 for t in total):
        return "padding='same' with an even receptive field is asymmetric"
    return (total[0] // 2, total[1] // 2)


def _convert(module: nn.Module, opts: dict[str, Any]) -> nn.Module | str:
    """The NaN twin of ``module`` sharing its parameters, or the reason it cannot be made."""
    if isinstance(module, nn.MaxPool2d):
        if module.dilation not in (1, (1, 1)) or module.ceil_mode:
            return "MaxPool2d with dilation != 1 or ceil_mode=True is not supported"
        return NanMaxPool2d(module.kernel_size, module.stride, module.padding,
                            return_indices=module.return_indices,
                            **{k: opts[k] for k in POOL_OPTIONS if k in opts})
    if isinstance(module, nn.MaxUnpool2d):
        return NanMaxUnpool2d(module.kernel_size, module.stride, module.padding)
    if type(module) is not nn.Conv2d:
        return f"{type(module).__name__} is a Conv2d subclass; only plain nn.Conv2d is converted"
    if module.groups != 1 or module.padding_mode != "zeros":
        return "Conv2d with groups != 1 or padding_mode != 'zeros' is not supported"
    padding = _conv_padding(module)
    if isinstance(padding, str):
        return padding
    new = NanConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                    padding, module.dilation, bias=module.bias is not None, device="meta",
                    dtype=module.weight.dtype, **{k: opts[k] for k in CONV_OPTIONS if k in opts})
    new.weight = module.weight
    new.bias = module.bias
    return new


def _wanted(name: str, patterns: Iterable[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def nanify(
    model: nn.Module,
    tie_limit: int | None = 1,
    nan_threshold: float = 1.0,
    fill: str = "mean",
    layers: Iterable[str] | Mapping[str, Mapping[str, Any]] | None = None,
    *,
    tie_eps: float = 1e-7,
    tie_rtol: float = 0.0,
    sigma: float = 1e-3,
    count_padding: bool = False,
    impl: str = "auto",
    config: str | Path | Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    fuse: bool = True,
) -> nn.Module:
    """Replace ``nn.MaxPool2d``, ``nn.MaxUnpool2d`` and ``nn.Conv2d`` modules by NaN versions.

    Modifies ``model`` in place (the new modules share the trained parameters) and returns it.
    ``layers``: ``None`` (all), glob patterns of module names to convert, or a mapping
    pattern -> per-layer options. ``config``: a thresholds dict / JSON file (see
    :func:`load_config`); its ``defaults`` override the keyword arguments and its ``layers``
    entries override both. What was converted and what was not (e.g. functional ``F.max_pool2d``
    calls, grouped convs) is in ``model.nanify_report``; a :class:`NanifyWarning` names the rest.
    The NaN modules compute no gradients, and on CPU the convolutions may return channels-last
    tensors (same shapes and values): code after them must use ``reshape``, not ``view``.

    ``fuse`` (default True): in each module whose forward calls the NaN ops, traced with
    torch.fx, the NaN convolutions absorb an activation before them, an inference batch norm
    (folded into the weights), an activation and a ``torch.maximum`` (FastSurfer's maxout)
    after them, and NaN unpoolings a ``torch.maximum`` after them, wherever the intermediate
    results have no other use (see :mod:`nanprobe.ops._graph_fusion`): skipped positions then
    cost nothing after the convolution, and the outputs are those of the unfused model up to
    float rounding (batch norm folding). Modules, parameters and ``state_dict`` are unchanged;
    a module's forward is replaced per instance and falls back to the original in training
    mode, under hooks on the modules involved and under torch dispatch modes. What was fused
    and what could not be is in ``model.nanify_report``.
    """
    base = {"tie_limit": tie_limit, "tie_eps": tie_eps, "tie_rtol": tie_rtol,
            "nan_threshold": nan_threshold, "fill": fill, "sigma": sigma,
            "count_padding": count_padding, "impl": impl}
    per_layer: dict[str, dict[str, Any]] = {}
    patterns: list[str] | None = None
    if isinstance(layers, Mapping):
        per_layer.update({str(k): dict(v) for k, v in layers.items()})
        patterns = list(per_layer)
    elif layers is not None:
        if isinstance(layers, str):
            raise ValueError("layers must be a list of name patterns or a mapping, not a string")
        patterns = list(layers)
    if config is not None:
        cfg = load_config(config)
        base.update(cfg["defaults"])
        per_layer.update(cfg["layers"])

    targets = (nn.MaxPool2d, nn.MaxUnpool2d, nn.Conv2d)
    names = [n for n, m in model.named_modules() if isinstance(m, targets)]
    for pattern in per_layer:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"layer pattern {pattern!r} matches no pooling/conv layer; "
                             f"available: {', '.join(names) or '(none)'}")

    report = NanifyReport(not_convertible=_functional_calls(model))
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, SkipCounter) or not _wanted(name, patterns):
            continue
        if not name:
            report.not_convertible["<root>"] = "the root module cannot be replaced in place"
            continue
        opts = dict(base)
        for pattern, override in per_layer.items():
            if fnmatch.fnmatchcase(name, pattern):
                opts.update(override)
        new = _convert(module, opts)
        if isinstance(new, str):
            report.not_convertible[name] = new
            continue
        if isinstance(new, NanConv2d):
            new.generator = generator
        new.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        report.converted[name] = type(new).__name__
    if fuse:
        _fuse(model, report)
    model.nanify_report = report
    if report.not_convertible:
        listed = "; ".join(f"{k}: {v}" for k, v in report.not_convertible.items())
        warnings.warn(f"nanify could not convert: {listed}", NanifyWarning, stacklevel=2)
    return model


def _fuse(model: nn.Module, report: NanifyReport) -> None:
    """Fuse every module whose forward calls NaN convs or unpools; record it in ``report``."""
    for name, module in model.named_modules():
        if isinstance(module, SkipCounter) or not calls_nan_ops(module):
            continue
        result = fuse_module(module)
        prefix = f"{name}." if name else ""
        if isinstance(result, FusedForward):
            report.fused.update({prefix + site.op: site.absorbed for site in result.sites})
        elif isinstance(result, str):
            report.not_fused[name or "<root>"] = result


def skip_stats(model: nn.Module, reset: bool = False) -> dict[str, dict[str, Any]]:
    """Per NaN layer: ``{"kind", "last", "total"}`` counters; ``reset=True`` zeroes them after."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, SkipCounter):
            out[name] = {"kind": module.kind, "last": dict(module.last_stats),
                         "total": dict(module.total_stats)}
            if reset:
                module.reset_skip_stats()
    return out
