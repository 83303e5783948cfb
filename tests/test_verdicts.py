"""The report's answers (issue 17): output stability, speed verdicts, busy machines, objective."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from nanprobe.calibrate import recommend, recommendation_line, summary_lines
from nanprobe.cli import app
from nanprobe.evaluate import machine_busy, ratio_spread, speed_verdict
from nanprobe.run import RunSpec, mca_run
from nanprobe.stability import output_stability, verdict_line


@pytest.mark.parametrize("low, high, verdict", [
    (1.02, 1.4, "faster"), (0.6, 0.99, "slower"), (0.95, 1.05, "no measurable difference"),
    (1.0, 1.3, "no measurable difference"), (0.7, 1.0, "no measurable difference")])
def test_speed_verdict_needs_the_whole_range_on_one_side(low, high, verdict):
    assert speed_verdict(low, high) == verdict


def test_ratio_spread_pairs_rounds():
    r = ratio_spread([1.0, 2.0, 1.5], [2.0, 1.0, 1.5])
    assert r["ratios"] == [0.5, 2.0, 1.0] and r["median"] == 1.0 and r["range"] == [0.5, 2.0]


def test_machine_busy_reasons():
    cores = os.cpu_count() or 1
    assert machine_busy(0.1, 0.2, [0.95, 1.05], 1.0) is None
    assert "load average" in machine_busy(cores + 1.5, 0.1, [0.95, 1.05], 1.0)
    assert "wider than +-15%" in machine_busy(0.1, 0.1, [0.8, 1.02], 1.0)
    assert "wider than +-15%" in machine_busy(0.1, 0.1, [0.99, 1.2], 1.0)


def test_own_timing_threads_alone_do_not_make_the_machine_busy():
    import torch

    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    torch.set_num_threads(cores)
    try:  # a quiet machine: the load is the timing's own threads (2.2 with 2 threads, 2 cores)
        assert machine_busy(cores + 0.2, cores + 0.2, [0.95, 1.05], 1.0) is None
        busy = machine_busy(cores + 1.0, 0.1, [0.95, 1.05], 1.0)  # one more core's worth
        assert f"load average {cores + 1.0:.1f} on {cores} cores" in busy
    finally:
        torch.set_num_threads(threads)


def _setting(threshold, macs, loss, speed, spread):
    return {"nan_threshold": threshold, "fill": "mean", "skip": {"positions": macs, "macs": macs},
            "loss": loss, "speedup": speed, "speedup_range": spread,
            "agreement": {"mean_dice": 1 - loss}}


def test_objectives_and_the_words_of_the_recommendation():
    settings = [_setting(1.0, 0.2, 0.0, 1.3, [1.2, 1.4]),
                _setting(0.5, 0.5, 0.0, 0.7, [0.68, 0.73]),
                _setting(0.25, 0.9, 0.5, 2.0, [1.9, 2.1])]
    assert recommend(settings, 0.001, "skip") == 1
    assert recommend(settings, 0.001, "speed") == 0
    with pytest.raises(ValueError, match="objective"):
        recommend(settings, 0.001, "fun")
    cal = {"metric": "mean_dice", "settings": settings, "recommended": 1, "tolerance": 0.001,
           "loss_against": "plain", "timing": {"busy": None}}
    line = recommendation_line(cal)
    assert "skips 50.0% of conv MACs" in line
    assert "0.70x (0.68-0.73x): slower than the plain model on this machine" in line
    cal["recommended"] = 0
    assert "1.30x (1.20-1.40x): faster than the plain model" in recommendation_line(cal)
    cal["timing"]["busy"] = "1-minute load average 5.0 on 2 cores"
    assert any(line.startswith("warning: the machine was busy while timing (1-minute load")
               for line in summary_lines(cal))


def test_output_stability_of_a_model_built_to_be_unstable(tmp_path):
    """Two identically computed class logits: MCA breaks every exact tie at random."""
    x = np.random.default_rng(0).standard_normal((3, 1, 12, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run = mca_run(RunSpec(model="run_files:tied_segmenter", input=str(tmp_path / "x.npy"),
                          samples=4), tmp_path / "run")
    st = output_stability(run)
    assert st["task"] == "segmentation" and st["samples"] == 4
    assert st["class_names"] == ["class 0", "class 1"]
    flips = np.asarray(st["label_flip_fraction"])
    assert (flips > 0.05).all() and (flips < 0.95).all()  # ties broken at random
    assert st["max_label_flip_fraction"] == flips.max() and not st["stable"]
    # the flip map counts, per pixel, the samples whose label differs from the reference
    ref = run.reference("final").argmax(1)
    expected = sum((run.sample(i, "final").argmax(1) != ref).astype(int) for i in range(4))
    np.testing.assert_array_equal(st["flip_map"], expected)
    assert flips.sum() == pytest.approx(expected.sum() / ref.size)
    assert min(st["per_class_dice_min"].values()) < 1.0
    line = verdict_line(st)
    assert line.startswith("output changes: 4 of 4 MCA samples flip labels (up to ")
    assert "lowest Dice against the reference" in line


def test_output_stability_of_a_stable_classifier(tmp_path):
    run = mca_run(RunSpec(model="mnist", input="mnist", slices="0:10", samples=2),
                  tmp_path / "run")
    st = output_stability(run)
    assert st["task"] == "classification" and st["stable"] is True
    assert st["label_flip_fraction"] == [0.0, 0.0]
    assert set(st["per_class_flip_fraction"]) == {str(d) for d in range(10)}
    assert verdict_line(st) == ("output stable: the predictions are identical to the "
                                "unperturbed reference in all 2 MCA samples")


def test_calibrate_reports_progress_and_speed_without_a_terminal(tmp_path):
    result = CliRunner().invoke(app, ["calibrate", "mnist", "mnist", "--slices", "0:8",
                                      "--threshold", "1", "--fill", "zero", "--repeats", "2",
                                      "--objective", "speed", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "calibrate: 3/3 steps" in out  # a quality pass, a timing, the baseline
    assert "speed-up vs plain (min-max)" in out and "recommended:" in out
    assert any(w in out for w in ("faster than", "slower than", "no measurable difference"))
    cal = json.loads((tmp_path / "calibration.json").read_text())
    command = cal["provenance"]["command"]
    assert cal["objective"] == "speed" and command.startswith("nanprobe calibrate mnist mnist ")
    for option in ("--slices 0:8", "--threshold 1.0", "--fill zero", "--objective speed"):
        assert option in command


@pytest.mark.parametrize(("loss", "words"), [
    (0.0004, "while the loss of mean Dice against the plain model stays 0.0004 <= 0.001."),
    (-0.0006, "its mean Dice against the plain model is 0.0006 higher than the plain model's"),
])
def test_what_to_set_never_reads_as_a_negative_loss(loss, words):
    from nanprobe.report import _settings_answer

    rec = {"thresholds": {"nan_threshold": 0.5}, "thresholds_file": None, "objective": "skip",
           "metric": "mean_dice", "loss_against": "plain", "loss": loss, "tolerance": 0.001}
    answer = _settings_answer({"recommendation": rec, "sweep": {}})
    assert words in answer and "-0." not in answer
