"""Does the noise change the model's output? Each MCA sample's labels against the reference's.

The first question a researcher asks of an MCA run, before any layer's significant bits: are
the final labels the same? From the run's ``final`` outputs (logits or log-probabilities,
class axis 1):

- segmentation ``(S, K, H, W)``: per sample, the fraction of labels that differ from the
  reference's, Dice per class against the reference's labels, and a map counting in how many
  samples each pixel's label flips;
- classification ``(S, K)``: per sample, the fraction of predictions that flip, overall and
  per reference class.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .evaluate import dice_per_class
from .models.registry import class_names
from .run import Run


def _labels(final: np.ndarray) -> np.ndarray:
    """Argmax over the class axis; NaN counts as -inf (a skipped position is all-NaN)."""
    return np.nan_to_num(final, nan=-np.inf).argmax(1)


def output_stability(run: Run) -> dict[str, Any]:
    """Label flips of every sample against the reference (JSON-safe, plus ``flip_map``).

    Returns ``task`` (``segmentation`` or ``classification``), ``samples``, ``class_names``,
    ``label_flip_fraction`` (per sample), ``max_label_flip_fraction``, ``stable`` (no label
    flips in any sample) and, for segmentation, ``per_class_dice_min`` (class name -> lowest
    Dice against the reference's labels over the samples; classes absent from both omitted)
    and ``flip_map`` (S_items, H, W) int array (not JSON: for the figure); for classification
    ``per_class_flip_fraction`` (reference class -> fraction of its items whose prediction
    flipped, over all samples).
    """
    ref_final = run.reference("final")
    if ref_final.ndim not in (2, 4):
        raise ValueError(f"{run.path}: the model's output is shaped {ref_final.shape}; output "
                         "stability needs (items, classes) or (items, classes, H, W)")
    ref = _labels(ref_final)
    k = ref_final.shape[1]
    names = class_names(str(run.spec.get("model")), k)
    flips: list[float] = []
    flip_map = np.zeros(ref.shape, np.int32)
    dice: list[list[float]] = []
    for i in range(len(run.sample_paths)):
        labels = _labels(run.sample(i, "final"))
        changed = labels != ref
        flips.append(float(changed.mean()))
        flip_map += changed
        if ref.ndim > 1:
            dice.append(dice_per_class(labels, ref, k))
    result: dict[str, Any] = {
        "task": "segmentation" if ref.ndim > 1 else "classification",
        "samples": len(flips), "class_names": names,
        "label_flip_fraction": flips,
        "max_label_flip_fraction": max(flips) if flips else None,
        "stable": bool(flips) and max(flips) == 0.0,
    }
    if ref.ndim > 1:
        per_class = np.nanmin(np.asarray(dice, float), axis=0) if dice else np.full(k, np.nan)
        result["per_class_dice_min"] = {n: float(v) for n, v in zip(names, per_class,
                                                                     strict=True)
                                        if not np.isnan(v)}
        result["flip_map"] = flip_map
    else:
        counts = np.bincount(ref, minlength=k)
        result["per_class_flip_fraction"] = {
            names[c]: float(flip_map[ref == c].sum() / (counts[c] * len(flips)))
            for c in range(k) if counts[c] and flips}
    return result


def verdict_line(stability: dict[str, Any]) -> str:
    """One sentence answering "does the noise change the output?"."""
    n = stability["samples"]
    worst = stability["max_label_flip_fraction"]
    what = "labels" if stability["task"] == "segmentation" else "predictions"
    if not n:
        return "output stability: no samples yet"
    if stability["stable"]:
        return (f"output stable: the {what} are identical to the unperturbed reference in all "
                f"{n} MCA samples")
    flipped = sum(1 for f in stability["label_flip_fraction"] if f > 0)
    line = (f"output changes: {flipped} of {n} MCA samples flip {what} (up to {_pct(worst)} of "
            f"them)")
    dice = stability.get("per_class_dice_min")
    if dice:
        name, low = min(dice.items(), key=lambda kv: kv[1])
        line += f"; lowest Dice against the reference: {low:.4f} ({name})"
    return line


def _pct(v: float | None) -> str:
    if v is None:
        return "n/a"
    return "< 0.01 %" if 0 < v < 1e-4 else f"{100 * v:.2f} %"
