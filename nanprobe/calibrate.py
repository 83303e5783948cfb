"""Calibrate NaN thresholds: sweep ``nan_threshold`` x fill, measure gain and loss, recommend.

For each setting the model is nanified (with the pooling settings calibrated by
``nanprobe audit``, or nanify's defaults) and compared with the unmodified model on the same
inputs: skipped work per layer, per slice/sample and overall (positions and MACs), agreement
with the plain model (segmentation: Dice per class, mean foreground Dice, identical labels;
classification: accuracy, macro precision/recall/F1), the same against ground-truth labels when
the input has them, and wall-clock against the plain model (interleaved repetitions).

The recommendation is the setting that skips the most MACs while its loss stays within the
tolerance. The loss is measured on the task's metric (mean foreground Dice, or accuracy):
against ground-truth labels when the input has them (``metric(plain) - metric(nanified)``, what
the user loses; may be negative), else against the plain model (``1 - metric(nanified vs
plain)``); ``against=`` forces either. The recommendation is
written as ``thresholds.json``, a config for ``nanify(model, config=...)`` and
``nanprobe mca-run --nanify``. Everything goes to ``calibration.json`` (schema
``nanprobe-calibration/1``, documented in :func:`calibrate`).
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .evaluate import (
    allocator_note,
    classification_scores,
    dice_per_class,
    forward_pass,
    interleaved_times,
    labels_from_logits,
    mean_foreground_dice,
    skip_table,
    split_batches,
)
from .inputs import PreparedInput, prepare_input
from .jsonio import json_safe, write_json
from .models.registry import LoadedModel, load
from .ops import NanConv2d, nanify, skip_stats
from .ops.conv import FILLS, Fill, check_fill

CALIBRATION_FILE = "calibration.json"
THRESHOLDS_FILE = "thresholds.json"
CALIBRATION_FORMAT = "nanprobe-calibration/1"
THRESHOLDS_FORMAT = "nanprobe-thresholds/1"
DEFAULT_THRESHOLDS = (1.0, 0.9, 0.85, 0.75, 0.65, 0.5)
#: allowed loss of mean foreground Dice (segmentation) or of accuracy (classification)
DEFAULT_TOLERANCE = {"segmentation": 0.001, "classification": 0.005}
METRIC = {"segmentation": "mean_dice", "classification": "accuracy"}
#: nanify's pooling defaults, used when no audit calibrated them
DEFAULT_POOLING = {"tie_limit": 1, "tie_eps": 1e-7, "tie_rtol": 0.0}
#: calibration inputs when none are selected: 8 coronal slices across the brain / 1000 digits
DEFAULT_MRI_SLICES = "100:156:7"
DEFAULT_IMAGE_SAMPLES = "0:1000"


def load_pooling(source: str | Path | Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """Pooling settings (``tie_limit``, ``tie_eps``, ``tie_rtol``) and where they came from.

    ``source``: None (nanify's defaults), a mapping of those options, an ``audit.json`` (its
    ``calibrated_pooling``), a thresholds JSON, or a run directory holding ``audit.json``.
    """
    if source is None:
        return dict(DEFAULT_POOLING), "nanify defaults (no audit given)"
    if isinstance(source, Mapping):
        data, where = {"defaults": dict(source)}, "given settings"
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "audit.json"
        if not path.is_file():
            raise ValueError(f"pooling settings file {path} does not exist; run `nanprobe audit "
                             "RUN_DIR` first or omit --pooling to use the defaults")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if "calibrated_pooling" in data:
            data = data["calibrated_pooling"]
        elif "layers" in data and "defaults" not in data:
            raise ValueError(f"{path} has no calibrated pooling setting (the audit found no "
                             "unstable windows to calibrate on); omit --pooling")
        where = str(path)
    defaults = dict(data.get("defaults", {}))
    bad = set(defaults) - set(DEFAULT_POOLING) - {"nan_threshold", "fill", "sigma",
                                                   "count_padding", "impl"}
    if bad:
        raise ValueError(f"pooling settings from {where} have unknown options {sorted(bad)}")
    return {k: defaults.get(k, v) for k, v in DEFAULT_POOLING.items()}, where


class _PerItemSkips:
    """Forward hooks counting, per batch item, the output positions each NaN conv skipped.

    A skipped position is NaN in every output channel (nan_conv2d's contract).
    """

    def __init__(self, model: nn.Module) -> None:
        self.skipped: list[torch.Tensor] = []
        self.positions: list[int] = []
        self.macs: list[int] = []
        self._handles = [m.register_forward_hook(self._hook) for m in model.modules()
                         if isinstance(m, NanConv2d)]

    def _hook(self, module: NanConv2d, args: tuple, out: torch.Tensor) -> None:
        skipped = torch.isnan(out).all(1).flatten(1).sum(1)
        positions = out.shape[-2] * out.shape[-1]
        self.skipped.append(skipped)
        self.positions.append(positions)
        self.macs.append(positions * module.weight[0].numel() * module.out_channels)

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """Per item skipped fraction of positions and of MACs over all convs (one forward)."""
        skipped = torch.stack(self.skipped).double()                     # (layers, items)
        positions = torch.tensor(self.positions, dtype=torch.float64)[:, None]
        macs = torch.tensor(self.macs, dtype=torch.float64)[:, None]
        by_pos = skipped.sum(0) / positions.sum()
        by_macs = (skipped / positions * macs).sum(0) / macs.sum()
        self.skipped, self.positions, self.macs = [], [], []
        return by_pos.numpy(), by_macs.numpy()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int, nan_label: int,
             probe: _PerItemSkips | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels (items first) and, with a probe, per-item skip fractions (positions, MACs)."""
    labels, pos, macs = [], [], []
    with torch.no_grad():
        for batch in split_batches(x, batch_size):
            labels.append(labels_from_logits(model(batch), nan_label))
            if probe is not None:
                p, m = probe.take()
                pos.append(p)
                macs.append(m)
    cat = np.concatenate
    return (torch.cat(labels).numpy(), cat(pos) if pos else np.zeros(0),
            cat(macs) if macs else np.zeros(0))


def _agreement(task: str, pred: np.ndarray, target: np.ndarray,
               num_classes: int) -> dict[str, Any]:
    if task == "classification":
        return classification_scores(pred, target, num_classes)
    dice = dice_per_class(pred, target, num_classes)
    return {"mean_dice": mean_foreground_dice(dice), "dice_per_class": dice,
            "identical": float((pred == target).mean())}


def _item_agreement(task: str, pred: np.ndarray, target: np.ndarray,
                    num_classes: int) -> list[float | None]:
    """Per slice mean foreground Dice, or per sample 1.0/0.0 (correct or not)."""
    if task == "classification":
        return [float(p == t) for p, t in zip(pred, target, strict=True)]
    out = []
    for p, t in zip(pred, target, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # slice without foreground
            out.append(mean_foreground_dice(dice_per_class(p, t, num_classes)))
    return out


def _loss_reference(against: str, has_labels: bool) -> str:
    """``"labels"`` or ``"plain"``: what the agreement loss is measured against."""
    if against not in ("auto", "labels", "plain"):
        raise ValueError(f"against must be auto, labels or plain, got {against!r}")
    if against == "labels" and not has_labels:
        raise ValueError("against='labels' needs ground-truth labels, but the input has none; "
                         "use 'plain' (agreement with the unmodified model) or 'auto'")
    if against == "auto":
        return "labels" if has_labels else "plain"
    return against


def recommend(settings: Sequence[Mapping[str, Any]], tolerance: float) -> int | None:
    """Index of the setting skipping the most MACs with ``loss <= tolerance`` (None: none).

    Ties go to the higher ``nan_threshold`` (the more conservative setting), then sweep order.
    """
    ok = [i for i, s in enumerate(settings) if s["loss"] is not None and s["loss"] <= tolerance]
    if not ok:
        return None
    return max(ok, key=lambda i: (round(settings[i]["skip"]["macs"], 12),
                                  settings[i]["nan_threshold"], -i))


def _check_sweep(thresholds: Sequence[float], fills: Sequence[Fill], tolerance: float | None,
                 repeats: int, batch_size: int) -> None:
    if not thresholds:
        raise ValueError("give at least one nan_threshold to sweep")
    bad = [t for t in thresholds if not 0.0 <= t <= 1.0]
    if bad:
        raise ValueError(f"nan_threshold values must be in [0, 1], got {bad}")
    if not fills:
        raise ValueError(f"give at least one fill to sweep ({', '.join(FILLS)} or a number)")
    for fill in fills:
        check_fill(fill)
    if tolerance is not None and not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    if repeats < 1 or batch_size < 1:
        raise ValueError(f"repeats and batch_size must be >= 1, got {repeats}, {batch_size}")


def calibrate(
    model: str | LoadedModel = "default",
    input: str | PreparedInput = "default",
    out_dir: str | Path = ".",
    *,
    slices: str | None = None,
    view: str | None = None,
    checkpoint: str | Path | None = None,
    trust: bool = False,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    fills: Sequence[Fill] = FILLS,
    pooling: str | Path | Mapping[str, Any] | None = None,
    tolerance: float | None = None,
    against: str = "auto",
    sigma: float = 1e-3,
    repeats: int = 3,
    batch_size: int = 4,
    seed: int = 0,
    provenance_extra: Mapping[str, Any] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Sweep ``thresholds`` x ``fills``; write ``calibration.json`` (+ ``thresholds.json``).

    ``model``/``input`` are registry specs (or already loaded objects); ``slices`` selects MRI
    slices / array samples (default: :data:`DEFAULT_MRI_SLICES` or :data:`DEFAULT_IMAGE_SAMPLES`).
    ``pooling``: see :func:`load_pooling`. ``tolerance``: allowed loss (default
    :data:`DEFAULT_TOLERANCE` of the task); ``against``: ``"auto"`` (labels when the input has
    them, else the plain model), ``"labels"`` or ``"plain"``. ``seed`` seeds ``noisy_max``.
    ``batch_size``: items per forward call. The timings depend on it: at 8 slices a 16-channel
    256² activation reaches glibc's 32 MiB mmap ceiling and page-faults in on every call
    (``benchmarks/bench_e2e.py`` times several batch sizes).
    ``provenance_extra`` is added to the provenance (e.g. the calling command's options).
    ``on_progress(done, total)`` follows the sweep. Returns the calibration dict:

    ``task``, ``metric``, ``tolerance``, ``loss_against``, ``pooling``, ``plain`` (seconds,
    ``seconds_channels_last``, ``vs_labels``), ``settings`` (per setting: ``nan_threshold``,
    ``fill``, ``skip`` {positions, macs}, ``layers`` (skip table, last row "all convs"),
    ``per_item`` (index, skipped, macs_skipped, agreement, vs_labels_plain,
    vs_labels_nanified), ``agreement``,
    ``vs_labels``, ``loss``, ``within_tolerance``, ``seconds``, ``speedup`` (plain / nanified)
    and ``speedup_channels_last`` (plain in channels-last layout / nanified)), ``recommended``
    (index or None), ``thresholds_file`` and ``provenance``.
    """
    _check_sweep(thresholds, fills, tolerance, repeats, batch_size)
    loaded = model if isinstance(model, LoadedModel) else load(
        model, checkpoint=checkpoint, view=view, trust=trust)
    task = loaded.task or "segmentation"
    if isinstance(input, PreparedInput):
        prepared = input
    else:
        default_sel = (DEFAULT_IMAGE_SAMPLES if loaded.input_kind == "image"
                       else DEFAULT_MRI_SLICES)
        is_bundled = input in ("default", "mnist")
        prepared = prepare_input(input, loaded, slices=slices or (default_sel if is_bundled
                                                                   else None), view=view)
    tolerance = DEFAULT_TOLERANCE[task] if tolerance is None else tolerance
    against = _loss_reference(against, prepared.labels is not None)
    pool_opts, pool_source = load_pooling(pooling)
    x = prepared.tensor
    nan_label = -1 if task == "classification" else 0
    plain = loaded.model.eval()
    plain_labels, _, _ = _predict(plain, x, batch_size, nan_label)
    num_classes = loaded.num_classes or int(plain_labels.max()) + 1
    truth = prepared.labels
    plain_vs_labels = (_agreement(task, plain_labels, truth, num_classes)
                       if truth is not None else None)
    no_truth = [None] * len(prepared.indices)
    plain_items_vs_labels = (_item_agreement(task, plain_labels, truth, num_classes)
                             if truth is not None else no_truth)

    grid = [(float(t), f) for t in thresholds for f in fills]
    total = len(grid) + 1
    settings: list[dict[str, Any]] = []
    models: list[nn.Module] = []
    for done, (threshold, fill) in enumerate(grid):
        generator = torch.Generator().manual_seed(seed)
        nan_model = nanify(copy.deepcopy(plain), nan_threshold=threshold, fill=fill,
                           sigma=sigma, generator=generator, **pool_opts)
        probe = _PerItemSkips(nan_model)
        labels, item_pos, item_macs = _predict(nan_model, x, batch_size, nan_label, probe)
        probe.remove()
        layers = skip_table(skip_stats(nan_model, reset=True))
        agreement = _agreement(task, labels, plain_labels, num_classes)
        item_agree = _item_agreement(task, labels, plain_labels, num_classes)
        item_truth = (_item_agreement(task, labels, truth, num_classes)
                      if truth is not None else no_truth)
        vs_labels = _agreement(task, labels, truth, num_classes) if truth is not None else None
        loss = (plain_vs_labels[METRIC[task]] - vs_labels[METRIC[task]] if against == "labels"
                else 1.0 - agreement[METRIC[task]])
        overall = layers[-1] if layers else {"skipped": 0.0, "macs_skipped": 0.0}
        settings.append({
            "nan_threshold": threshold, "fill": fill,
            "skip": {"positions": overall["skipped"], "macs": overall["macs_skipped"]},
            "layers": layers,
            "per_item": [{"index": idx, "skipped": float(p), "macs_skipped": float(m),
                          "agreement": a, "vs_labels_plain": tp, "vs_labels_nanified": tn}
                         for idx, p, m, a, tp, tn in zip(
                             prepared.indices, item_pos, item_macs, item_agree,
                             plain_items_vs_labels, item_truth, strict=True)],
            "agreement": agreement,
            "vs_labels": vs_labels,
            "loss": loss, "within_tolerance": bool(loss <= tolerance),
        })
        models.append(nan_model)
        if on_progress:
            on_progress(done + 1, total)

    batches = split_batches(x, batch_size)
    # the plain model in channels-last layout: nanified convolutions compute in that layout, so
    # this baseline separates what the skipping gains from what the layout gains
    plain_cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    batches_cl = split_batches(x, batch_size, channels_last=True)
    forward_pass(plain_cl, batches_cl)()  # warm-up; every other model just ran on x
    seconds = interleaved_times(
        [forward_pass(plain, batches), forward_pass(plain_cl, batches_cl),
         *(forward_pass(m, batches) for m in models)], repeats, warmup=False)
    for setting, t in zip(settings, seconds[2:], strict=True):
        setting["seconds"] = t
        setting["speedup"] = seconds[0] / t
        setting["speedup_channels_last"] = seconds[1] / t
    if on_progress:
        on_progress(total, total)

    best = recommend(settings, tolerance)
    out_dir = Path(out_dir)
    provenance = {
        "model": loaded.spec, "weights_sha256": loaded.weights_sha256,
        "input": prepared.provenance(), "nanprobe_version": __version__,
        "torch_version": str(torch.__version__), "threads": torch.get_num_threads(),
        "allocator": allocator_note(),
        "created": datetime.now(timezone.utc).isoformat(), "pooling_source": pool_source,
        "seed": seed, "sigma": sigma, "repeats": repeats, "batch_size": batch_size,
        **(provenance_extra or {}),
    }
    result = {
        "format": CALIBRATION_FORMAT, "provenance": provenance, "task": task,
        "pooling": pool_opts, "metric": METRIC[task], "tolerance": tolerance,
        "loss_against": against,
        "class_names": _class_names(loaded, num_classes),
        "plain": {"seconds": seconds[0], "seconds_channels_last": seconds[1],
                  "vs_labels": plain_vs_labels},
        "settings": settings, "recommended": best,
        "thresholds_file": THRESHOLDS_FILE if best is not None else None,
    }
    thresholds_path = out_dir / THRESHOLDS_FILE
    if best is not None:
        write_json(thresholds_path, thresholds_config(result))
    elif _written_by_calibrate(thresholds_path):
        thresholds_path.unlink()  # stale: an earlier calibration's recommendation
    write_json(out_dir / CALIBRATION_FILE, result)
    return json_safe(result)


def thresholds_config(calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The recommended setting of ``calibration`` as a ``nanify(config=...)`` thresholds dict."""
    best = calibration["recommended"]
    if best is None:
        raise ValueError("no setting was within tolerance; nothing to recommend")
    s = calibration["settings"][best]
    prov = calibration["provenance"]
    return {
        "format": THRESHOLDS_FORMAT,
        "defaults": {**calibration["pooling"], "nan_threshold": s["nan_threshold"],
                     "fill": s["fill"], "sigma": prov["sigma"]},
        "layers": {},
        "provenance": {"source": "nanprobe calibrate", "model": prov["model"],
                       "weights_sha256": prov["weights_sha256"],
                       "input_sha256": prov["input"]["input_sha256"],
                       "selection": prov["input"]["selection"],
                       "pooling_source": prov["pooling_source"],
                       "metric": calibration["metric"], "loss": s["loss"],
                       "tolerance": calibration["tolerance"], "skip": s["skip"],
                       "speedup": s["speedup"],
                       "speedup_channels_last": s.get("speedup_channels_last"),
                       "allocator": prov.get("allocator"),
                       "nanprobe_version": prov["nanprobe_version"],
                       "torch_version": prov["torch_version"], "created": prov["created"]},
    }


def _written_by_calibrate(path: Path) -> bool:
    try:
        return json.loads(path.read_text())["provenance"]["source"] == "nanprobe calibrate"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _class_names(loaded: LoadedModel, num_classes: int) -> list[str] | None:
    if loaded.spec == "default":
        from .models.default import CLASS_NAMES

        return list(CLASS_NAMES)
    if loaded.spec == "mnist":
        return [str(d) for d in range(num_classes)]
    return None


def summary_lines(calibration: Mapping[str, Any]) -> list[str]:
    """Human-readable lines: the sweep table and the recommendation."""
    metric = calibration["metric"]
    lines = [f"{'threshold':>9} {'fill':>9} {'skip pos':>8} {'skip MACs':>9} "
             f"{metric:>10} {'speed-up':>8} {'vs plain channels-last':>22}"]
    for i, s in enumerate(calibration["settings"]):
        mark = "  <- recommended" if i == calibration["recommended"] else ""
        lines.append(f"{s['nan_threshold']:>9.2f} {s['fill']:>9} {s['skip']['positions']:>8.1%} "
                     f"{s['skip']['macs']:>9.1%} {s['agreement'][metric]:>10.4f} "
                     f"{s['speedup']:>7.2f}x {_speedup_cl(s):>22}{mark}")
    return [*lines, recommendation_line(calibration)]


def _speedup_cl(setting: Mapping[str, Any]) -> str:
    """The speed-up against the plain model in channels-last layout ("-" in older files)."""
    value = setting.get("speedup_channels_last")
    return "-" if value is None else f"{value:.2f}x"


def recommendation_line(calibration: Mapping[str, Any]) -> str:
    """One line: the recommended setting and what it gains and loses, or why there is none."""
    metric, best = calibration["metric"], calibration["recommended"]
    if best is None:
        return (f"no setting keeps the {metric} loss (vs {calibration['loss_against']}) "
                f"within {calibration['tolerance']}; no thresholds.json written")
    s = calibration["settings"][best]
    return (f"recommended: nan_threshold={s['nan_threshold']} fill={s['fill']} "
            f"({s['skip']['macs']:.1%} of conv MACs skipped, {metric} loss vs "
            f"{calibration['loss_against']} {s['loss']:.4f} <= {calibration['tolerance']}, "
            f"measured speed-up {s['speedup']:.2f}x, {_speedup_cl(s)} against the plain model "
            "in channels-last layout)")
