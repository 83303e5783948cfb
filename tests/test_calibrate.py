"""Threshold calibration: the sweep's numbers, the recommendation and thresholds.json."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from nanprobe.calibrate import (
    CALIBRATION_FILE,
    THRESHOLDS_FILE,
    calibrate,
    load_pooling,
    recommend,
)
from nanprobe.evaluate import (
    RETAIN_FREED_MEMORY_ENV,
    classification_scores,
    forward_pass,
    labels_from_logits,
    mean_foreground_dice,
    split_batches,
)
from nanprobe.evaluate import dice_per_class as dice
from nanprobe.inputs import PreparedInput
from nanprobe.models.registry import LoadedModel
from nanprobe.ops import NanConv2d, NanMaxPool2d, nanify, skip_stats


class TinyUNet(nn.Module):
    """conv -> pool (indices) -> conv -> unpool -> conv + skip -> 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.unpool = nn.MaxUnpool2d(2)
        self.conv3 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        p, i = self.pool(y)
        u = self.unpool(torch.relu(self.conv2(p)), i, output_size=y.shape[-2:])
        return self.conv3(torch.cat([u, y], 1))


def tiny_case(labels: bool = False) -> tuple[LoadedModel, PreparedInput]:
    """Zero background (exact ties -> NaN pooling) around random foreground squares."""
    torch.manual_seed(0)
    model = TinyUNet().eval()
    x = torch.zeros(6, 1, 32, 32)
    gen = torch.Generator().manual_seed(1)
    for i in range(6):
        r, c = torch.randint(2, 14, (2,), generator=gen).tolist()
        x[i, 0, r:r + 14, c:c + 14] = torch.rand(14, 14, generator=gen) + 0.5
    loaded = LoadedModel(model, "tiny", task="segmentation", input_kind="image",
                         input_shape=(1, 32, 32), num_classes=3)
    truth = None
    if labels:
        with torch.no_grad():
            truth = labels_from_logits(model(x)).numpy()
        truth[:, :4] = 2  # the plain model is wrong there: Dice vs labels < 1
    return loaded, PreparedInput(x, "tiny", "0" * 64, list(range(6)), labels=truth)


def nanified_loss(loaded: LoadedModel, x: torch.Tensor, threshold: float) -> tuple[float, float]:
    """(1 - mean Dice vs the plain model, MACs skipped) computed directly with nanify."""
    with torch.no_grad():
        ref = labels_from_logits(loaded.model(x)).numpy()
        model = nanify(copy.deepcopy(loaded.model), nan_threshold=threshold)
        got = labels_from_logits(model(x)).numpy()
    stats = [s["total"] for s in skip_stats(model).values() if s["kind"] == "conv"]
    macs = sum(s["macs_skipped"] for s in stats) / sum(s["macs"] for s in stats)
    return 1.0 - mean_foreground_dice(dice(got, ref, 3)), macs


def test_sweep_recommends_the_most_aggressive_setting_within_tolerance(tmp_path):
    loaded, prepared = tiny_case()
    thresholds = (1.0, 0.75, 0.5, 0.25, 0.0)
    direct = [nanified_loss(loaded, prepared.tensor, t) for t in thresholds]
    losses = [loss for loss, _ in direct]
    # a tolerance between the losses: the most aggressive settings must be refused
    order = sorted(set(losses))
    assert len(order) >= 3, f"constructed case too easy: losses {losses}"
    tolerance = (order[1] + order[2]) / 2
    expected = max((i for i, loss in enumerate(losses) if loss <= tolerance),
                   key=lambda i: direct[i][1])
    assert direct[expected][1] < max(m for _, m in direct)  # skipping most is not allowed

    cal = calibrate(loaded, prepared, tmp_path, thresholds=thresholds, fills=("mean",),
                    tolerance=tolerance, repeats=1, batch_size=4)
    assert cal["loss_against"] == "plain"
    assert [s["loss"] for s in cal["settings"]] == pytest.approx(losses)
    assert [s["skip"]["macs"] for s in cal["settings"]] == pytest.approx([m for _, m in direct])
    assert cal["recommended"] == expected
    assert [s["within_tolerance"] for s in cal["settings"]] == [v <= tolerance for v in losses]
    assert json.loads((tmp_path / CALIBRATION_FILE).read_text())["recommended"] == expected


def test_per_item_skips_add_up_to_the_layer_totals(tmp_path):
    loaded, prepared = tiny_case()
    cal = calibrate(loaded, prepared, tmp_path, thresholds=(0.5,), fills=("mean",),
                    repeats=1, batch_size=4)
    s = cal["settings"][0]
    total = s["layers"][-1]
    assert total["layer"] == "all convs"
    per_item = np.array([item["skipped"] for item in s["per_item"]])
    assert per_item.mean() == pytest.approx(total["skipped"])  # same positions per item
    assert per_item.mean() == pytest.approx(s["skip"]["positions"])
    assert 0 < s["skip"]["positions"] < 1
    assert [item["index"] for item in s["per_item"]] == prepared.indices


def test_thresholds_json_round_trips_through_nanify(tmp_path):
    loaded, prepared = tiny_case()
    cal = calibrate(loaded, prepared, tmp_path, thresholds=(1.0, 0.5), fills=("mean",),
                    pooling={"tie_limit": 2, "tie_eps": 1e-5, "tie_rtol": 0.0},
                    tolerance=0.5, repeats=1, batch_size=4)
    best = cal["settings"][cal["recommended"]]
    config = json.loads((tmp_path / THRESHOLDS_FILE).read_text())
    assert config["format"] == "nanprobe-thresholds/1"
    assert config["defaults"]["nan_threshold"] == best["nan_threshold"]
    model = nanify(copy.deepcopy(loaded.model), config=tmp_path / THRESHOLDS_FILE)
    pool = model.pool
    assert isinstance(pool, NanMaxPool2d)
    assert (pool.tie_limit, pool.tie_eps) == (2, 1e-5)
    assert isinstance(model.conv3, NanConv2d)
    assert model.conv3.nan_threshold == best["nan_threshold"]
    with torch.no_grad():
        got = labels_from_logits(model(prepared.tensor)).numpy()
        ref = labels_from_logits(loaded.model(prepared.tensor)).numpy()
    assert 1.0 - mean_foreground_dice(dice(got, ref, 3)) == pytest.approx(best["loss"])


def test_loss_against_labels_and_no_recommendation(tmp_path):
    loaded, prepared = tiny_case(labels=True)
    (tmp_path / THRESHOLDS_FILE).write_text(json.dumps(
        {"defaults": {}, "provenance": {"source": "nanprobe calibrate"}}))
    cal = calibrate(loaded, prepared, tmp_path, thresholds=(0.0,), fills=("mean",),
                    tolerance=0.0, repeats=1)
    assert cal["loss_against"] == "labels"
    s = cal["settings"][0]
    assert s["loss"] == pytest.approx(cal["plain"]["vs_labels"]["mean_dice"]
                                      - s["vs_labels"]["mean_dice"])
    assert s["loss"] > 0 and cal["recommended"] is None and cal["thresholds_file"] is None
    assert not (tmp_path / THRESHOLDS_FILE).exists()  # the stale recommendation is gone


def test_timing_batches_cover_the_input_in_order():
    x = torch.randn(5, 3, 4, 4)
    parts = split_batches(x, 2)
    assert [len(b) for b in parts] == [2, 2, 1] and torch.equal(torch.cat(parts), x)
    assert parts[0].data_ptr() == x.data_ptr()  # views, no copies
    cl = split_batches(x, 2, channels_last=True)
    assert all(b.is_contiguous(memory_format=torch.channels_last) for b in cl)
    assert torch.equal(torch.cat(cl), x)
    flat = torch.randn(5, 7)  # not an image batch: left as it is
    assert split_batches(flat, 4, channels_last=True)[0].data_ptr() == flat.data_ptr()
    seen = []
    forward_pass(lambda b: seen.append((len(b), torch.is_grad_enabled())), parts)()
    assert seen == [(2, False), (2, False), (1, False)]


def test_recommend_ties_and_none():
    def setting(t, macs, loss):
        return {"nan_threshold": t, "skip": {"macs": macs}, "loss": loss}

    rows = [setting(1.0, 0.2, 0.0), setting(0.9, 0.2, 0.0), setting(0.5, 0.6, 0.01),
            setting(0.7, 0.4, None)]
    assert recommend(rows, 0.001) == 0  # equal skip: the more conservative threshold
    assert recommend(rows, 0.01) == 2
    assert recommend([setting(0.5, 0.6, 0.2)], 0.1) is None


def test_classification_scores_by_hand():
    pred = np.array([0, 0, 1, -1, 2])
    truth = np.array([0, 1, 1, 2, 2])
    s = classification_scores(pred, truth, 3)
    assert s["accuracy"] == pytest.approx(3 / 5)
    # precision per class 1/2, 1/1, 1/1; recall 1/1, 1/2, 1/2; F1 2/3 each
    assert s["precision"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert s["recall"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert s["f1"] == pytest.approx((2 / 3 + 2 / 3 + 2 / 3) / 3)


def test_mnist_classification_sweep_reports_accuracy(tmp_path):
    cal = calibrate("mnist", "default", tmp_path, slices="0:20", thresholds=(1.0,),
                    fills=("noisy_max",), repeats=1)
    assert cal["task"] == "classification" and cal["metric"] == "accuracy"
    assert cal["plain"]["vs_labels"]["accuracy"] >= 0.9
    s = cal["settings"][0]
    assert set(s["agreement"]) == {"accuracy", "precision", "recall", "f1"}
    assert all(item["agreement"] in (0.0, 1.0) for item in s["per_item"])
    assert cal["class_names"] == [str(d) for d in range(10)]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"thresholds": ()}, "at least one"),
    ({"thresholds": (1.5,)}, r"\[0, 1\]"),
    ({"fills": ("median",)}, "fill must be"),
    ({"tolerance": 1.0}, "tolerance"),
    ({"against": "labels"}, "needs ground-truth labels"),
    ({"against": "both"}, "against must be"),
    ({"pooling": "/nonexistent/audit.json"}, "does not exist"),
])
def test_bad_options_are_clear_errors(tmp_path, kwargs, match):
    loaded, prepared = tiny_case()
    with pytest.raises(ValueError, match=match):
        calibrate(loaded, prepared, tmp_path, **{"repeats": 1, **kwargs})


def test_load_pooling_sources(tmp_path):
    assert load_pooling(None)[0] == {"tie_limit": 1, "tie_eps": 1e-7, "tie_rtol": 0.0}
    audit = tmp_path / "audit.json"
    audit.write_text(json.dumps({"calibrated_pooling": {"defaults": {
        "tie_limit": 1, "tie_eps": 1e-6, "tie_rtol": 0.0}}}))
    assert load_pooling(tmp_path) == ({"tie_limit": 1, "tie_eps": 1e-6, "tie_rtol": 0.0},
                                      str(audit))
    audit.write_text(json.dumps({"layers": {}}))
    with pytest.raises(ValueError, match="no calibrated pooling"):
        load_pooling(audit)


_FAULTS_SCRIPT = """
import os, resource, sys
import torch
from nanprobe.evaluate import allocator_note, rerun_retaining_freed_memory
if sys.argv[1] == "retain":
    rerun_retaining_freed_memory()

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.ones(1 << 24)  # 64 MB, freed at once (NumPy would ask for huge pages)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

for _ in range(4):  # warm-up: the heap grows to its peak (glibc takes a few rounds)
    faults()
print(faults(), sys.argv[1:], allocator_note())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
def test_rerun_retaining_freed_memory_removes_page_faults(tmp_path):
    """The benchmarks' --retain-freed-memory re-executes the program (same arguments) with glibc
    keeping freed memory: reused 64 MB blocks then fault (almost) no pages, where by default
    each of them faults in all of its 16,384 pages."""
    script = tmp_path / "faults.py"
    script.write_text(_FAULTS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in RETAIN_FREED_MEMORY_ENV}
    runs = {}
    for how in ("default", "retain"):
        out = subprocess.run([sys.executable, str(script), how], env=env, check=True,
                             capture_output=True, text=True).stdout.split(maxsplit=1)
        runs[how] = int(out[0]), out[1]
    assert runs["default"][0] > 3 * 16_000
    assert runs["retain"][0] < 1_000
    assert "['retain'] allocator: glibc keeps freed memory" in runs["retain"][1]
    assert "allocator: default" in runs["default"][1]
