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
import os
import statistics
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
    interleaved_rounds,
    labels_from_logits,
    machine_busy,
    mean_foreground_dice,
    ratio_spread,
    skip_table,
    speed_verdict,
    split_batches,
)
from .inputs import PreparedInput, prepare_input
from .integrity import recorded_digest
from .jsonio import json_safe, write_json
from .models.registry import LoadedModel, class_names, load
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
        if not isinstance(data, dict) or not isinstance(data.get("calibrated_pooling", {}), dict):
            raise ValueError(f"{path} is not an audit.json or thresholds file (expected a JSON "
                             f"object, found {type(data).__name__}); pass the audit.json of "
                             "`nanprobe audit` or omit --pooling")
        if "calibrated_pooling" in data:
            data = data["calibrated_pooling"]
        elif "layers" in data and "defaults" not in data:
            raise ValueError(f"{path} has no calibrated pooling setting (the audit found no "
                             "unstable windows to calibrate on); omit --pooling")
        where = str(path)
    if not isinstance(data.get("defaults", {}), dict):
        raise ValueError(f"pooling settings from {where}: 'defaults' must be a JSON object")
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
    return [mean_foreground_dice(dice_per_class(p, t, num_classes))
            for p, t in zip(pred, target, strict=True)]


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


#: what the recommendation maximises among the settings within tolerance
OBJECTIVES = ("skip", "speed")


def recommend(settings: Sequence[Mapping[str, Any]], tolerance: float,
              objective: str = "skip") -> int | None:
    """Index of the best setting with ``loss <= tolerance`` (None: none).

    ``objective="skip"`` (the paper's choice): the most MACs skipped; ties go to the higher
    ``nan_threshold`` (the more conservative setting), then sweep order. ``"speed"``: the
    highest median measured speed-up (needs ``speedup``); ties go to more MACs skipped.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    ok = [i for i, s in enumerate(settings) if s["loss"] is not None and s["loss"] <= tolerance]
    if not ok:
        return None
    if objective == "speed":
        return max(ok, key=lambda i: (settings[i]["speedup"], settings[i]["skip"]["macs"], -i))
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
    objective: str = "skip",
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
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
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
    # the run the pooling settings were calibrated on: the calibration is stale with it
    pooling_digest = (recorded_digest(pool_source) if isinstance(pooling, str | Path)
                      else None)
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
    total = 2 * len(grid) + 1  # quality per setting, timing per setting, then the baseline
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

    # speed: each setting timed in rounds alternating with the plain model, so that both see
    # the same machine state; the ratio's spread over the rounds is reported with its median
    batches = split_batches(x, batch_size)
    run_plain = forward_pass(plain, batches)
    load_before = os.getloadavg()[0]
    plain_seconds: list[float] = []
    for done, (setting, nan_model) in enumerate(zip(settings, models, strict=True)):
        t_plain, t_nan = interleaved_rounds([run_plain, forward_pass(nan_model, batches)],
                                            repeats, warmup=False)
        plain_seconds += t_plain
        ratio = ratio_spread(t_plain, t_nan)
        setting.update(seconds=statistics.median(t_nan), seconds_plain=statistics.median(t_plain),
                       speedup=ratio["median"], speedup_range=ratio["range"],
                       speedup_channels_last=None, speedup_channels_last_range=None)
        if on_progress:
            on_progress(len(grid) + done + 1, total)
    best = recommend(settings, tolerance, objective)
    if best is not None:
        # the plain model in channels-last layout: nanified convolutions compute in that
        # layout, so this baseline separates what the skipping gains from what the layout gains
        plain_cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
        batches_cl = split_batches(x, batch_size, channels_last=True)
        forward_pass(plain_cl, batches_cl)()  # warm-up
        t_cl, t_nan = interleaved_rounds([forward_pass(plain_cl, batches_cl),
                                          forward_pass(models[best], batches)], repeats,
                                         warmup=False)
        ratio = ratio_spread(t_cl, t_nan)
        settings[best].update(speedup_channels_last=ratio["median"],
                              speedup_channels_last_range=ratio["range"],
                              seconds_plain_channels_last=statistics.median(t_cl))
    load_after = os.getloadavg()[0]
    if on_progress:
        on_progress(total, total)
    rec = settings[best] if best is not None else None
    timing = {
        "repeats": repeats, "batch_size": batch_size, "threads": torch.get_num_threads(),
        "cores": os.cpu_count(), "load_average_1min": [load_before, load_after],
        "compared_against": "the plain model as given (every setting) and the plain model in "
                            "channels-last layout (the recommended setting), in alternating "
                            "rounds",
        "busy": None if rec is None else machine_busy(load_before, load_after,
                                                      rec["speedup_range"], rec["speedup"]),
    }
    out_dir = Path(out_dir)
    provenance = {
        "model": loaded.spec, "weights_sha256": loaded.weights_sha256,
        "input": prepared.provenance(), "nanprobe_version": __version__,
        "torch_version": str(torch.__version__), "threads": torch.get_num_threads(),
        "allocator": allocator_note(),
        "created": datetime.now(timezone.utc).isoformat(), "pooling_source": pool_source,
        "run_digest": pooling_digest,
        "seed": seed, "sigma": sigma, "repeats": repeats, "batch_size": batch_size,
        **(provenance_extra or {}),
    }
    result = {
        "format": CALIBRATION_FORMAT, "provenance": provenance, "task": task,
        "pooling": pool_opts, "metric": METRIC[task], "tolerance": tolerance,
        "loss_against": against,
        "class_names": class_names(loaded.spec, num_classes),
        "plain": {"seconds": statistics.median(plain_seconds),
                  "seconds_channels_last": None if rec is None
                  else rec["seconds_plain_channels_last"], "vs_labels": plain_vs_labels},
        "settings": settings, "recommended": best, "objective": objective, "timing": timing,
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
                       "run_digest": prov.get("run_digest"),
                       "metric": calibration["metric"], "loss": s["loss"],
                       "tolerance": calibration["tolerance"], "skip": s["skip"],
                       "speedup": s["speedup"], "speedup_range": s.get("speedup_range"),
                       "verdict": speed_verdict(*s["speedup_range"]),
                       "speedup_channels_last": s.get("speedup_channels_last"),
                       "speedup_channels_last_range": s.get("speedup_channels_last_range"),
                       "objective": calibration.get("objective", "skip"),
                       "allocator": prov.get("allocator"),
                       "nanprobe_version": prov["nanprobe_version"],
                       "torch_version": prov["torch_version"], "created": prov["created"]},
    }


def _written_by_calibrate(path: Path) -> bool:
    try:
        return json.loads(path.read_text())["provenance"]["source"] == "nanprobe calibrate"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def summary_lines(calibration: Mapping[str, Any]) -> list[str]:
    """Human-readable lines: the sweep table and the recommendation (with the speed's spread
    over the timed rounds, and a warning when the machine was busy while timing)."""
    metric = calibration["metric"]
    lines = [f"{'threshold':>9} {'fill':>9} {'skip pos':>8} {'skip MACs':>9} "
             f"{metric:>10} {'speed-up vs plain (min-max)':>27}"]
    for i, s in enumerate(calibration["settings"]):
        mark = "  <- recommended" if i == calibration["recommended"] else ""
        lines.append(f"{s['nan_threshold']:>9.2f} {s['fill']!s:>9} "
                     f"{s['skip']['positions']:>8.1%} {s['skip']['macs']:>9.1%} "
                     f"{_num(s['agreement'][metric]):>10} {_speed(s):>27}{mark}")
    busy = (calibration.get("timing") or {}).get("busy")
    if busy:
        lines.append(f"warning: the machine was busy while timing ({busy}); the speed figures "
                     "are unreliable, rerun on a quiet machine")
    return [*lines, recommendation_line(calibration)]


def _num(value: float | None) -> str:
    """``value`` with 4 decimals, "n/a" when undefined (e.g. Dice without any foreground)."""
    return "n/a" if value is None else f"{value:.4f}"


def _speed(setting: Mapping[str, Any], key: str = "speedup") -> str:
    """``0.94x (0.90-0.97x)``: the median speed-up and its range over the timed rounds."""
    value, spread = setting.get(key), setting.get(f"{key}_range")
    if value is None:
        return "-"
    return f"{value:.2f}x" + (f" ({spread[0]:.2f}-{spread[1]:.2f}x)" if spread else "")


def speed_words(setting: Mapping[str, Any], key: str = "speedup") -> str:
    """"0.70x (0.68-0.73x), slower than the plain model on this machine" and the like."""
    lo, hi = setting[f"{key}_range"]
    verdict = speed_verdict(lo, hi)
    against = "the plain model" + (" in channels-last layout" if key != "speedup" else "")
    words = {"faster": f"faster than {against}", "slower": f"slower than {against}",
             "no measurable difference": f"no measurable difference from {against}"}[verdict]
    return f"{_speed(setting, key)}: {words} on this machine"


def recommendation_line(calibration: Mapping[str, Any]) -> str:
    """One line: the recommended setting and what it gains and loses, or why there is none."""
    metric, best = calibration["metric"], calibration["recommended"]
    if best is None:
        if all(s["loss"] is None for s in calibration["settings"]):
            return (f"the {metric} loss is undefined for every setting (the calibration input "
                    "has no foreground to compare?); choose other --slices; no thresholds.json "
                    "written")
        return (f"no setting keeps the {metric} loss (vs {calibration['loss_against']}) "
                f"within {calibration['tolerance']}; no thresholds.json written")
    s = calibration["settings"][best]
    line = (f"recommended: nan_threshold={s['nan_threshold']} fill={s['fill']}: skips "
            f"{s['skip']['macs']:.1%} of conv MACs, {metric} loss vs "
            f"{calibration['loss_against']} {s['loss']:.4f} <= {calibration['tolerance']}; "
            f"{speed_words(s)}")
    if s.get("speedup_channels_last_range"):
        line += f" ({_speed(s, 'speedup_channels_last')} against it in channels-last layout)"
    return line
