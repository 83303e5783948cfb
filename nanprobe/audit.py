"""Audit of unstable max-pooling windows in an MCA run, and calibration of the NaN pooling.

A pooling *window* is one output position ``(slice, channel, row, col)`` of a max-pooling layer.
It is **unstable** when its argmax index in some MCA sample differs from the unperturbed
reference (a difference between two samples implies one of them differs from the reference).

For every pooling layer of a run (a capture group with ``input`` and ``indices`` datasets),
:func:`audit_run` reports

- the fraction of unstable windows (overall and per slice);
- ``P(unstable | ties)``: windows binned by how many entries of the reference's pooled input lie
  within ``eps`` of the window max (the rule of :func:`~nanprobe.ops.nan_max_pool2d`:
  ``w == m`` or ``m - w < eps``; the max itself counts, so an isolated max counts 1);
- a PNG map per layer of where the unstable windows are (fraction of channels per position, one
  slice), next to where the calibrated NaN pooling flags windows;

and calibrates ``tie_limit`` / ``tie_eps`` / ``tie_rtol`` on a grid: for each setting,
``nan_max_pool2d`` runs on the reference's pooled input and its NaN windows (the flags) are
scored against the measured unstable windows (precision, recall, F1, micro-averaged over all
pooling layers). The best setting (max F1; ties: fewer flags, then grid order) is the
calibration's ``best``.

**Verdict.** Ties explain the instability only if some setting's flags agree with the unstable
windows: ``"explained"`` when the best F1 reaches :data:`VERDICT_MIN_F1`, ``"not_explained"``
when it does not (or no layer could be scored), ``"no_unstable_windows"`` when no window is
unstable. Only ``"explained"`` recommends NaN pooling with the best setting; otherwise the
recommendation is ``tie_limit=None`` (no NaN pooling): flags on stable windows would only turn
exact results into NaN (on the MNIST CNN, ReLU's exact zeros tie in 4-way windows that MCA
never changes). The recommendation is written as a :func:`~nanprobe.ops.load_config`
compatible ``{"defaults": {...}}`` under ``"calibrated_pooling"`` in ``RUN_DIR/audit.json``
(what ``calibrate --pooling`` reads), with ``verdict`` and a one-sentence ``verdict_text``.

Pooling geometry (kernel, stride, padding) is not stored in a run. It comes, per layer, from
(1) the ``geometry`` argument, else (2) the run's model (loaded from the run spec), else
(3) the shapes, assuming a non-overlapping unpadded pooling (kernel = stride = H // Ho, the
common 2x2/stride-2 case); ``audit.json`` records which source each layer used.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .jsonio import json_safe, write_json
from .ops import nan_max_pool2d
from .ops.pool import _tie_count
from .run import Run

AUDIT_FORMAT = "nanprobe-audit/1"
AUDIT_FILE = "audit.json"
FIGURES_DIR = "audit"
DEFAULT_EPS: tuple[float, ...] = (0.0, 1e-7, 1e-6, 1e-5, 1e-4)
DEFAULT_RTOL: tuple[float, ...] = (0.0, 1e-6, 1e-5, 1e-4)
#: ties explain the unstable windows when the best setting's F1 reaches this. Measured
#: (``analyses/audit_verdict.py``, docs/reproducing-the-paper.md): default U-Net 0.998, a tied
#: constant background (tests) 0.96; MNIST CNN 0.027, the paper-like MNIST CNN 0.491 (its flags
#: are 3 times its unstable windows: ReLU's exact zeros)
VERDICT_MIN_F1 = 0.7
VERDICTS = ("explained", "not_explained", "no_unstable_windows")

Pair = tuple[int, int]
Geometry = tuple[Pair, Pair, Pair]  # kernel, stride, padding as (h, w) pairs
GeometrySpec = int | Sequence[int] | Sequence[Sequence[int]]


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def scores(flags: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """Counts and precision/recall/F1 of boolean ``flags`` against boolean ``truth`` (same shape).

    ``precision`` is None without flags, ``recall`` None without truth; ``f1 = 2tp/(2tp+fp+fn)``
    is 1.0 when both are empty (perfect agreement on "nothing").
    """
    f = torch.as_tensor(flags).bool()
    t = torch.as_tensor(truth).bool()
    tp = int((f & t).sum())
    fp = int((f & ~t).sum())
    fn = int((~f & t).sum())
    return scores_from_counts(tp, fp, fn)


def scores_from_counts(tp: int, fp: int, fn: int) -> dict[str, Any]:
    den = 2 * tp + fp + fn
    return {"tp": tp, "fp": fp, "fn": fn, "flagged": tp + fp, "truth": tp + fn,
            "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
            "f1": 2 * tp / den if den else 1.0}


# ---------------------------------------------------------------------------------------------
# pooling layers and their geometry


def pool_groups(run: Run) -> list[str]:
    """Capture groups (``layers/<group>``) of max-pool modules: those with input and indices.

    In model order (the run's layer list), repeated calls (``name@2``) after the first.
    """
    keys = set(run.keys())
    groups = [k.removeprefix("layers/").removesuffix("/indices") for k in keys
              if k.startswith("layers/") and k.endswith("/indices")]
    order = {name: i for i, name in enumerate(run.layers)}

    def rank(g: str) -> tuple[int, int, str]:
        call = int(g.split("@", 1)[1]) if "@" in g and g.split("@", 1)[1].isdigit() else 1
        return (order.get(module_name(g), len(order)), call, g)

    return sorted((g for g in groups if f"layers/{g}/input" in keys), key=rank)


def module_name(group: str) -> str:
    """The module name of a capture group (``enc.pool@2`` -> ``enc.pool``)."""
    return group.split("@", 1)[0]


def _as_pair(v: int | Sequence[int], what: str) -> Pair:
    if isinstance(v, int | np.integer) and not isinstance(v, bool):
        return (int(v), int(v))
    vals = tuple(int(x) for x in v)
    if len(vals) != 2:
        raise ValueError(f"{what} must be an int or a pair of ints, got {v!r}")
    return vals  # type: ignore[return-value]


def parse_geometry(value: GeometrySpec) -> Geometry:
    """``k``, ``(k, s)``, ``(k, s, p)`` (ints or (h, w) pairs) -> ((kh, kw), (sh, sw), (ph, pw))."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        items: list[Any] = [value]
    else:
        items = list(value)  # type: ignore[arg-type]
    if not 1 <= len(items) <= 3:
        raise ValueError(f"pooling geometry must be k, (k, s) or (k, s, p), got {value!r}")
    k = _as_pair(items[0], "kernel")
    s = _as_pair(items[1], "stride") if len(items) > 1 else k
    p = _as_pair(items[2], "padding") if len(items) > 2 else (0, 0)
    return k, s, p


def infer_geometry(in_shape: Sequence[int], out_shape: Sequence[int]) -> Geometry:
    """Non-overlapping, unpadded pooling (kernel = stride) mapping (..., H, W) to (..., Ho, Wo).

    Floor mode: ``s = H // Ho`` must give ``(H - s) // s + 1 == Ho`` (same for W), else
    ValueError (pass the geometry explicitly).
    """
    pairs = []
    for size, out in zip(in_shape[-2:], out_shape[-2:], strict=True):
        s = size // out if out else 0
        if s < 1 or (size - s) // s + 1 != out:
            raise ValueError(f"cannot infer the pooling geometry from {tuple(in_shape[-2:])} -> "
                             f"{tuple(out_shape[-2:])}; pass geometry={{layer: (k, s, p)}}")
        pairs.append(s)
    ks = (pairs[0], pairs[1])
    return ks, ks, (0, 0)


def _model_geometry(run: Run, modules: Iterable[str]) -> tuple[dict[str, Any], str | None]:
    """Geometry (or the reason there is none) per module from the run's model, or an error."""
    from torch import nn

    from .worker import model_and_input

    try:
        loaded, _ = model_and_input(run.spec)
    except Exception as err:  # noqa: BLE001 - any failure to rebuild the model means "infer"
        return {}, " ".join(f"{type(err).__name__}: {err}".split())[:300]
    found: dict[str, Any] = {}
    for name in modules:
        try:
            mod = loaded.model.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(mod, nn.MaxPool2d):
            continue
        if mod.dilation not in (1, (1, 1)) or mod.ceil_mode:
            found[name] = "dilation != 1 or ceil_mode=True (not supported by nan_max_pool2d)"
            continue
        stride = mod.stride if mod.stride is not None else mod.kernel_size
        found[name] = parse_geometry((mod.kernel_size, stride, mod.padding))
    return found, None


def resolve_geometry(
    run: Run,
    groups: Sequence[str],
    geometry: Mapping[str, GeometrySpec] | None = None,
    *,
    load_model: bool = True,
) -> dict[str, dict[str, Any]]:
    """Per group: ``{"kernel", "stride", "padding", "source"}`` or ``{"unsupported": reason}``.

    ``geometry`` maps a group or module name to ``k | (k, s) | (k, s, p)``; other layers take
    the run's model (``load_model``) and, failing that, :func:`infer_geometry` from the shapes.
    """
    geometry = dict(geometry or {})
    out: dict[str, dict[str, Any]] = {}
    todo = []
    for g in groups:
        spec = geometry.get(g, geometry.get(module_name(g)))
        if spec is not None:
            k, s, p = parse_geometry(spec)
            out[g] = {"kernel": k, "stride": s, "padding": p, "source": "argument"}
        else:
            todo.append(g)
    from_model: dict[str, Any] = {}
    model_error = "not loaded (load_model=False)"
    if todo and load_model:
        from_model, model_error = _model_geometry(run, sorted({module_name(g) for g in todo}))
    for g in todo:
        found = from_model.get(module_name(g))
        if isinstance(found, str):
            out[g] = {"unsupported": found, "source": "model"}
        elif found is not None:
            k, s, p = found
            out[g] = {"kernel": k, "stride": s, "padding": p, "source": "model"}
        else:
            with h5py.File(run.reference_path, "r") as h5:
                in_shape, out_shape = h5[f"layers/{g}/input"].shape, h5[f"layers/{g}/indices"].shape
            k, s, p = infer_geometry(in_shape, out_shape)
            why = model_error or "module not found in the model"
            out[g] = {"kernel": k, "stride": s, "padding": p,
                      "source": f"inferred from shapes (model: {why})"}
    return out


# ---------------------------------------------------------------------------------------------
# measurements


def unstable_windows(run: Run, group: str) -> tuple[np.ndarray, np.ndarray]:
    """``(unstable, flips)`` of one pooling group, both (S, C, Ho, Wo).

    ``flips``: number of samples whose argmax index differs from the reference's (int32);
    ``unstable = flips > 0``. Samples are read one at a time.
    """
    key = f"layers/{group}/indices"
    ref = run.reference(key)
    if not run.sample_paths:
        raise ValueError(f"{run.path} has no complete samples; finish it with `nanprobe mca-run`")
    flips = np.zeros(ref.shape, dtype=np.int32)
    for i in range(len(run.sample_paths)):
        idx = run.sample(i, key)
        if idx.shape != ref.shape:
            raise ValueError(f"{run.sample_paths[i].name}: {key} is shaped {idx.shape}, "
                             f"the reference {ref.shape}")
        flips += idx != ref
    return flips > 0, flips


def _window_max(x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    k, s, p = geom
    clean = torch.nan_to_num(x, nan=-math.inf) if bool(torch.isnan(x).any()) else x
    return F.max_pool2d(clean, k, s, p)


def tie_counts(x: torch.Tensor, geom: Geometry, eps: float, rtol: float = 0.0) -> torch.Tensor:
    """Per window of ``x`` (S, C, H, W): entries with ``w == m`` or ``m - w < eps + rtol*|m|``.

    ``m`` is the window max (NaN ignored), padding never counts: the count
    :func:`~nanprobe.ops.nan_max_pool2d` compares with ``tie_limit``. (S, C, Ho, Wo) int64.
    """
    k, s, p = geom
    return _tie_count(x, _window_max(x, geom), k, s, p, float(eps), float(rtol)).long()


def tie_table(counts: torch.Tensor, unstable: torch.Tensor, max_count: int) -> list[dict]:
    """Rows ``{"ties", "windows", "unstable", "p_unstable"}`` for ``ties`` = 1..max_count.

    A row for ``ties = 0`` (windows without numbers) is added only when such windows exist.
    """
    c = counts.flatten().clamp(0, max_count)
    u = unstable.flatten().long()
    n = torch.bincount(c, minlength=max_count + 1)
    nu = torch.bincount(c, weights=u.double(), minlength=max_count + 1).long()
    start = 0 if int(n[0]) else 1
    return [{"ties": t, "windows": int(n[t]), "unstable": int(nu[t]),
             "p_unstable": _ratio(int(nu[t]), int(n[t]))} for t in range(start, max_count + 1)]


def limit_counts(counts: torch.Tensor, unstable: torch.Tensor,
                 limits: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """``{tie_limit: (tp, fp, fn)}``: flags ``count > tie_limit or count == 0`` vs ``unstable``.

    These are exactly the windows :func:`~nanprobe.ops.nan_max_pool2d` marks NaN for the
    ``counts`` of :func:`tie_counts` (0: a window without numbers), from one histogram.
    """
    top = max([*limits, 0]) + 1
    c = counts.flatten().clamp(0, top)
    n = torch.bincount(c, minlength=top + 1)
    nu = torch.bincount(c, weights=unstable.flatten().double(), minlength=top + 1).long()
    truth = int(nu.sum())
    out = {}
    for lim in limits:
        flagged = int(n[0]) + int(n[lim + 1 :].sum())
        tp = int(nu[0]) + int(nu[lim + 1 :].sum())
        out[int(lim)] = (tp, flagged - tp, truth - tp)
    return out


def nan_flags(x: torch.Tensor, geom: Geometry, tie_limit: int, tie_eps: float,
              tie_rtol: float) -> torch.Tensor:
    """Windows that :func:`~nanprobe.ops.nan_max_pool2d` marks NaN for this setting (S,C,Ho,Wo)."""
    k, s, p = geom
    values = nan_max_pool2d(x, k, s, p, tie_limit=tie_limit, tie_eps=tie_eps, tie_rtol=tie_rtol,
                            return_indices=False)
    return torch.isnan(values)


def _setting_key(limit: int, eps: float, rtol: float) -> tuple[int, float, float]:
    return (int(limit), float(eps), float(rtol))


def _safe_name(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", group)


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Max F1; ties: fewer flags, then the first in grid order (smaller limit, eps, rtol)."""
    return min(rows, key=lambda r: (-r["f1"], r["flagged"], r["tie_limit"], r["tie_eps"],
                                    r["tie_rtol"]))


def audit_run(
    run_dir: str | Path,
    *,
    eps_values: Sequence[float] = DEFAULT_EPS,
    rtol_values: Sequence[float] = DEFAULT_RTOL,
    tie_limits: Sequence[int] | None = None,
    geometry: Mapping[str, GeometrySpec] | None = None,
    load_model: bool = True,
    map_slice: int | None = None,
    out: str | Path | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Audit the max-pooling layers of the run in ``run_dir``; write ``audit.json`` and figures.

    - ``eps_values``: absolute tolerances of the ``P(unstable | ties)`` tables and of the
      calibration grid (``tie_eps``); ``rtol_values``: the grid's ``tie_rtol``;
      ``tie_limits``: the grid's ``tie_limit`` (default ``1 .. largest kernel area - 1``);
    - ``geometry``: ``{layer: (k, s, p)}`` overriding the model / shape-inferred geometry
      (see the module docstring); ``load_model=False`` skips rebuilding the model;
    - ``map_slice``: slice shown in the maps (default: per layer, the most unstable slice);
    - ``out``: output folder (default ``run_dir``): ``out/audit.json`` and ``out/audit/*.png``.

    Returns the audit dict (as written, JSON-safe). ValueError when the run has no pooling
    layer with captured input and indices, or no samples.
    """
    run = Run(run_dir)
    out_dir = Path(out) if out is not None else run.path
    eps_values = sorted({float(e) for e in eps_values})
    rtol_values = sorted({float(r) for r in rtol_values})
    if not eps_values or min(eps_values) < 0 or not rtol_values or min(rtol_values) < 0:
        raise ValueError("eps_values and rtol_values must be non-empty lists of numbers >= 0")
    groups = pool_groups(run)
    if not groups:
        raise ValueError(f"{run.path} has no max-pooling layer with captured input and indices; "
                         "rerun `nanprobe mca-run` with the pooling layers in --layers")
    geoms = resolve_geometry(run, groups, geometry, load_model=load_model)
    areas = [g["kernel"][0] * g["kernel"][1] for g in geoms.values() if "kernel" in g]
    limits = sorted({int(v) for v in tie_limits}) if tie_limits is not None else list(
        range(1, max([*areas, 2])))  # the same grid for every layer (micro-averaged)
    if not limits or limits[0] < 1:
        raise ValueError(f"tie_limits must be ints >= 1, got {tie_limits!r}")

    layers: dict[str, dict[str, Any]] = {}
    grid: dict[tuple[int, float, float], list[int]] = {}  # setting -> [tp, fp, fn]
    kept: dict[str, tuple[Geometry, np.ndarray, int]] = {}  # geometry, unstable, map slice
    total_windows = total_unstable = 0
    for g in groups:
        unstable_np, flips = unstable_windows(run, g)
        n_unstable = int(unstable_np.sum())
        per_slice = unstable_np.reshape(unstable_np.shape[0], -1).mean(1)
        entry: dict[str, Any] = {
            "windows": int(unstable_np.size), "unstable": n_unstable,
            "unstable_fraction": n_unstable / max(unstable_np.size, 1),
            "unstable_per_slice": per_slice,
            "mean_flip_rate_of_unstable": (float(flips[unstable_np].mean()) / len(run.sample_paths)
                                           if n_unstable else None),
            "geometry": geoms[g],
        }
        total_windows += unstable_np.size
        total_unstable += n_unstable
        layers[g] = entry
        if "unsupported" in geoms[g]:
            continue
        geom: Geometry = (geoms[g]["kernel"], geoms[g]["stride"], geoms[g]["padding"])
        x = torch.from_numpy(run.reference(f"layers/{g}/input"))
        if x.ndim != 4 or tuple(_window_max(x[:1, :1], geom).shape[-2:]) != unstable_np.shape[-2:]:
            raise ValueError(f"layer {g}: pooled input {tuple(x.shape)} with kernel/stride/padding "
                             f"{geom} does not give the captured indices {unstable_np.shape}; "
                             "pass the right geometry={layer: (k, s, p)}")
        unstable = torch.from_numpy(unstable_np)
        area = geom[0][0] * geom[0][1]
        entry["ties"] = []
        # exact ties at a max of exactly 0 (e.g. ReLU): MCA leaves zeros exact, so these stay
        # stable however tied; the tie rule still flags them
        at_zero = (_window_max(x, geom) == 0) & (tie_counts(x, geom, 0.0) >= 2)
        entry["exact_ties_at_zero"] = {"windows": int(at_zero.sum()),
                                       "unstable": int((at_zero & unstable).sum())}
        layer_rows = []
        for r in sorted({0.0, *rtol_values}):  # the tables need rtol 0 even outside the grid
            for e in eps_values:
                counts = tie_counts(x, geom, e, r)
                if r == 0.0:
                    entry["ties"].append({"eps": e, "rows": tie_table(counts, unstable, area)})
                if r not in rtol_values:
                    continue
                for lim, (tp, fp, fn) in limit_counts(counts, unstable, limits).items():
                    acc = grid.setdefault(_setting_key(lim, e, r), [0, 0, 0])
                    acc[0], acc[1], acc[2] = acc[0] + tp, acc[1] + fp, acc[2] + fn
                    layer_rows.append({"tie_limit": lim, "tie_eps": e, "tie_rtol": r,
                                       **scores_from_counts(tp, fp, fn)})
        entry["grid"] = layer_rows
        entry["best_setting"] = _best(layer_rows)
        s = map_slice if map_slice is not None else int(np.argmax(per_slice))
        if not 0 <= s < unstable_np.shape[0]:
            raise ValueError(f"map_slice {s} is out of range for {unstable_np.shape[0]} slices")
        kept[g] = (geom, unstable_np, s)
        del x

    grid_rows = [{"tie_limit": k[0], "tie_eps": k[1], "tie_rtol": k[2],
                  **scores_from_counts(*v)} for k, v in grid.items()]
    audit: dict[str, Any] = {
        "format": AUDIT_FORMAT,
        "run": str(run.path.resolve()),
        "run_digest": run.digest,
        "samples": len(run.sample_paths),
        "run_complete": run.complete,
        "eps_values": eps_values,
        "rtol_values": rtol_values,
        "definition": ("a window is unstable when its argmax index in any sample differs from the "
                       "reference; ties = entries w of the reference's pooled input with w == max "
                       "or max - w < eps (the max counts)"),
        "layers": layers,
        "summary": {"pool_layers": len(groups), "windows": total_windows,
                    "unstable": total_unstable,
                    "unstable_fraction": _ratio(total_unstable, total_windows)},
        "provenance": _provenance(run),
    }
    best = _best(grid_rows) if grid_rows else None
    if best is not None:
        audit["calibration"] = {
            "scored_against": "measured unstable windows, all pooling layers (micro-average)",
            "selection": "max F1; ties: fewer flags, then smaller tie_limit, tie_eps, tie_rtol",
            "grid": grid_rows, "best": best,
        }
        _check_best(run, audit, kept, best)
    zero_ties = [sum(e["exact_ties_at_zero"][k] for e in layers.values()
                     if "exact_ties_at_zero" in e) for k in ("windows", "unstable")]
    name, text = verdict(audit["summary"], len(run.sample_paths), best, zero_ties)
    audit["verdict"] = name
    audit["verdict_text"] = text
    audit["verdict_criterion"] = (f"explained when the best setting's F1 >= {VERDICT_MIN_F1:g}; "
                                  "otherwise (or without unstable windows) tie_limit=None")
    recommended = ({"tie_limit": best["tie_limit"], "tie_eps": best["tie_eps"],
                    "tie_rtol": best["tie_rtol"]} if name == "explained" else
                   {"tie_limit": None, "tie_eps": 0.0, "tie_rtol": 0.0})
    audit["calibrated_pooling"] = {
        "format": "nanprobe-thresholds/1",
        "defaults": recommended,
        "provenance": {"source": "nanprobe audit", "run": str(run.path.resolve()),
                       "run_digest": run.digest, "verdict": name, "verdict_text": text,
                       "precision": None if best is None else best["precision"],
                       "recall": None if best is None else best["recall"],
                       "f1": None if best is None else best["f1"],
                       "nanprobe_version": __version__},
    }
    if plots:
        audit["figures"] = _figures(run, audit, kept, out_dir)
    write_json(out_dir / AUDIT_FILE, audit)
    return json_safe(audit)


def verdict(summary: Mapping[str, Any], samples: int, best: Mapping[str, Any] | None,
            zero_ties: Sequence[int] = (0, 0)) -> tuple[str, str]:
    """The audit's verdict (one of :data:`VERDICTS`) and its one-sentence explanation.

    ``summary``: the audit's ``{"windows", "unstable", ...}``; ``best``: the calibration's best
    grid row (None when no layer could be scored); ``zero_ties``: (windows that are exact ties
    at a max of 0, how many of them are unstable), quoted when ties are not the explanation.
    """
    windows, unstable = summary["windows"], summary["unstable"]
    none = "so NaN pooling is not recommended (tie_limit=None)"
    if not unstable:
        return "no_unstable_windows", (
            f"No pooling window is unstable over {samples} MCA samples ({windows:,} windows), so "
            f"NaN pooling has nothing to mark and is not recommended (tie_limit=None).")
    share = f"{unstable:,} unstable windows ({unstable / windows:.2%} of {windows:,})"
    if best is None:
        return "not_explained", (f"The {share} could not be scored against any tie setting (no "
                                 f"pooling layer has a supported geometry), {none}.")
    setting = (f"tie_limit={best['tie_limit']}, tie_eps={best['tie_eps']:g}, "
               f"tie_rtol={best['tie_rtol']:g}")
    if best["f1"] >= VERDICT_MIN_F1:
        return "explained", (
            f"Near ties explain the {share}: {setting} flags them with precision "
            f"{_fmt(best['precision'])} and recall {_fmt(best['recall'])} (F1 "
            f"{_fmt(best['f1'])} >= {VERDICT_MIN_F1:g}), so NaN pooling with that setting is "
            "recommended.")
    zeros = (f"; {zero_ties[0]:,} windows are exact ties at 0, {zero_ties[1]:,} of them unstable"
             if zero_ties[0] else "")
    return "not_explained", (
        f"No tie setting explains the {share}: the best, {setting}, reaches F1 "
        f"{_fmt(best['f1'])} < {VERDICT_MIN_F1:g} (precision {_fmt(best['precision'])}: "
        f"{best['fp']:,} of its {best['flagged']:,} flags are stable windows{zeros}), {none}.")


def _provenance(run: Run) -> dict[str, Any]:
    manifest = {k: v for k, v in run.manifest.items() if k != "layers"}
    return {"nanprobe_version": __version__, "torch_version": str(torch.__version__),
            "numpy_version": np.__version__,
            "created": datetime.now(timezone.utc).isoformat(), "run_manifest": manifest,
            "sample_files": [p.name for p in run.sample_paths]}


def _check_best(run: Run, audit: dict[str, Any],
                kept: dict[str, tuple[Geometry, np.ndarray, int]], best: dict[str, Any]) -> None:
    """Score the calibrated setting per layer with ``nan_max_pool2d`` itself (``"calibrated"``).

    The grid is computed from tie counts; this reruns the op on the reference's pooled input and
    raises RuntimeError if its flags disagree with the count-based numbers (a bug).
    """
    for g, (geom, unstable, _) in kept.items():
        x = torch.from_numpy(run.reference(f"layers/{g}/input"))
        flags = nan_flags(x, geom, best["tie_limit"], best["tie_eps"], best["tie_rtol"])
        sc = scores(flags, torch.from_numpy(unstable))
        row = next(r for r in audit["layers"][g]["grid"] if all(
            r[k] == best[k] for k in ("tie_limit", "tie_eps", "tie_rtol")))
        if (sc["tp"], sc["fp"], sc["fn"]) != (row["tp"], row["fp"], row["fn"]):
            raise RuntimeError(f"layer {g}: nan_max_pool2d flags disagree with the tie counts "
                               f"({sc} vs {row})")
        audit["layers"][g]["calibrated"] = sc


def _figures(run: Run, audit: dict[str, Any], kept: dict[str, tuple[Geometry, np.ndarray, int]],
             out_dir: Path) -> dict[str, Any]:
    """Write the per-layer maps and the P(unstable | ties) figure; paths relative to out_dir."""
    from .audit_plots import plot_tie_tables, plot_unstable_map

    fig_dir = out_dir / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {"maps": {}}
    best = audit.get("calibration", {}).get("best")
    shown = "flagged by nan_max_pool2d" if audit["verdict"] == "explained" else (
        "flagged by the best tie setting (not recommended)")
    n = audit["samples"]
    for g, (geom, unstable, s) in kept.items():
        flagged = label = None
        if best is not None:
            x = torch.from_numpy(run.reference(f"layers/{g}/input", s))[None]
            flagged = nan_flags(x, geom, best["tie_limit"], best["tie_eps"],
                                best["tie_rtol"])[0].numpy()
            label = (f"{shown} (tie_limit={best['tie_limit']}, "
                     f"tie_eps={best['tie_eps']:g}, tie_rtol={best['tie_rtol']:g})")
        path = fig_dir / f"unstable-{_safe_name(g)}.png"
        plot_unstable_map(unstable[s], path, title=f"{g}: slice {s}, {n} MCA samples",
                          flagged=flagged, flagged_label=label)
        figures["maps"][g] = {"png": str(path.relative_to(out_dir)), "slice": s}
        audit["layers"][g]["map"] = figures["maps"][g]
    tables = {g: e["ties"] for g, e in audit["layers"].items() if "ties" in e}
    if tables:
        path = fig_dir / "p_unstable_given_ties.png"
        plot_tie_tables(tables, path)
        figures["p_unstable_given_ties"] = str(path.relative_to(out_dir))
    return figures


def summary_lines(audit: Mapping[str, Any]) -> list[str]:
    """Plain-text lines summarising an audit dict (for the CLI): per layer, the best tie
    setting, the verdict (name and sentence) and the recommended pooling."""
    lines = [f"{audit['samples']} samples; a window is unstable when its argmax differs from the "
             "reference in some sample"]
    for name, e in audit["layers"].items():
        line = f"{name}: {e['unstable']}/{e['windows']} unstable ({e['unstable_fraction']:.1%})"
        cal = e.get("calibrated")
        if cal is not None:
            line += (f"; best setting's flags P={_fmt(cal['precision'])} R={_fmt(cal['recall'])} "
                     f"F1={_fmt(cal['f1'])}")
        lines.append(line)
    best = audit.get("calibration", {}).get("best")
    if best is not None:
        lines.append(f"best tie setting: tie_limit={best['tie_limit']} tie_eps={best['tie_eps']:g} "
                     f"tie_rtol={best['tie_rtol']:g} (P={_fmt(best['precision'])} "
                     f"R={_fmt(best['recall'])} F1={_fmt(best['f1'])}, all pooling layers)")
    lines.append(f"verdict: {audit['verdict']}: {audit['verdict_text']}")
    rec = audit["calibrated_pooling"]["defaults"]
    lines.append("calibrated pooling: tie_limit=None (no NaN pooling)" if rec["tie_limit"] is None
                 else f"calibrated pooling: tie_limit={rec['tie_limit']} "
                      f"tie_eps={rec['tie_eps']:g} tie_rtol={rec['tie_rtol']:g}")
    return lines


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
