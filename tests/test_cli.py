"""The CLI: --help for every command, the demo end to end, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from nanprobe.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["demo"], ["mca-run"], ["sigdigits"], ["audit"],
                                     ["compare"], ["calibrate"], ["report"], ["analyze"]])
def test_help_explains_every_option(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("nanprobe ")


def test_demo_runs_offline_and_writes_provenance(tmp_path):
    out = tmp_path / "demo.json"
    result = runner.invoke(app, ["demo", "--slices", "3", "--repeats", "1", "--batch-size", "2",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "identical labels" in result.output and "the plain model" in result.output
    assert "batches of 2" in result.output and "speed-up" not in result.output
    res = json.loads(out.read_text())
    assert res["provenance"]["model"] == "default" and res["provenance"]["input_sha256"]
    assert res["settings"]["batch_size"] == 2  # 3 slices: a batch of 2 and one of 1
    assert res["skip"][-1]["layer"] == "all convs" and res["skip"][-1]["skipped"] > 0
    assert res["identical_labels"] > 0.99
    assert res["speedup_channels_last"] == pytest.approx(  # one round: its own ratio
        res["seconds_plain_channels_last"] / res["seconds_nanified"])
    lo, hi = res["speedup_range"]
    assert lo <= res["speedup"] <= hi
    assert res["verdict"] in ("faster", "slower", "no measurable difference")
    words = {"faster": "faster than", "slower": "slower than",
             "no measurable difference": "no measurable difference from"}[res["verdict"]]
    assert f"{words} the plain model" in " ".join(result.output.split())


def test_demo_rejects_bad_option():
    result = runner.invoke(app, ["demo", "--nan-threshold", "1.5"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_analysis_commands_on_a_real_run(tmp_path):
    from nanprobe.run import RunSpec, mca_run

    for name, seed in (("a", 0), ("b", 1)):
        mca_run(RunSpec(model="mnist", input="mnist", slices="0:2", samples=3, seed=seed),
                tmp_path / name)
    result = runner.invoke(app, ["sigdigits", str(tmp_path / "a"), "--layers", "layers.0/*"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "sigdigits.h5").is_file()
    assert list((tmp_path / "a" / "sigdigits").glob("*.png"))
    result = runner.invoke(app, ["audit", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a" / "audit.json").read_text())["calibrated_pooling"]
    result = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"),
                                 "--out", str(tmp_path / "cmp.json")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cmp.json").is_file()


def test_analysis_commands_reject_a_non_run(tmp_path):
    for command in (["sigdigits", str(tmp_path)], ["audit", str(tmp_path)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "run.json" in result.output, result.output


def test_analyze_runs_every_step_then_resumes(tmp_path):
    out = tmp_path / "analysis"
    args = ["analyze", "mnist", "default", "--out", str(out), "--samples", "2",
            "--slices", "0:2", "--calibration-slices", "0:16", "--threshold", "1",
            "--threshold", "0.5", "--fill", "mean", "--repeats", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("run.json", "sigdigits.h5", "audit.json", "calibration.json", "report.html",
                 "report.json"):
        assert (out / name).is_file(), name
    assert result.output.strip().endswith(f"report: {out / 'report.html'}")
    out_text = " ".join(result.output.split())
    for question in ("Does the noise change the output?", "Where is the noise?", "What to set?",
                     "What does it buy?"):
        assert question in out_text
    for step in ("mca-run", "sigdigits", "audit", "calibrate"):  # start lines and step times
        assert f"{step} ..." in out_text and f"{step}: done in" in out_text
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["lines"][0] in result.output.replace("\n", " ") or \
        report["summary"]["lines"][0].split(":")[0] in result.output
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["provenance"]["pooling_source"] == str(out / "audit.json")
    assert [s["nan_threshold"] for s in cal["settings"]] == [1.0, 0.5]
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".h5", ".json")
              and p.name not in ("report.json",)}

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count(": up to date") == 4  # mca-run, sigdigits, audit, calibrate
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}

    changed = runner.invoke(app, [*args[:-2], "--repeats", "2"])  # new option: recalibrate
    assert changed.exit_code == 0, changed.output
    assert changed.output.count(": up to date") == 3
    assert json.loads((out / "calibration.json").read_text())["provenance"]["repeats"] == 2


def test_calibrate_and_report_commands(tmp_path):
    result = runner.invoke(app, ["calibrate", "mnist", "default", "--out", str(tmp_path),
                                 "--slices", "0:8", "--threshold", "1", "--fill", "mean",
                                 "--repeats", "1", "--tolerance", "1"])
    assert result.exit_code == 2 and "tolerance" in result.output  # 1 is not < 1
    result = runner.invoke(app, ["calibrate", "default", "default", "--out", str(tmp_path),
                                 "--slices", "128", "--threshold", "1", "--fill", "mean",
                                 "--repeats", "1", "--tolerance", "0.01"])
    assert result.exit_code == 0, result.output
    assert "recommended: nan_threshold=1.0 fill=mean" in result.output
    config = json.loads((tmp_path / "thresholds.json").read_text())
    assert config["defaults"]["nan_threshold"] == 1.0
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a nanprobe run directory" in result.output


def test_mca_run_nanify_takes_a_thresholds_file(tmp_path):
    import h5py

    config = tmp_path / "thresholds.json"
    config.write_text(json.dumps({"format": "nanprobe-thresholds/1",
                                  "defaults": {"tie_limit": 1, "nan_threshold": 0.5},
                                  "provenance": {"source": "test"}}))
    args = ["mca-run", "mnist", "mnist", "--slices", "0:2", "--samples", "1", "--layers",
            "layers.2", "--out", str(tmp_path / "run")]
    assert runner.invoke(app, [*args, "--nanify", str(config)]).exit_code == 0
    with h5py.File(tmp_path / "run" / "reference.h5") as h5:
        assert h5.attrs["nanify"] == str(config)
        pooled = h5["layers/layers.2/output"][()]
    assert np.isnan(pooled).any()  # NaN pooling ran: tied ReLU zeros became NaN
    plain = runner.invoke(app, [*args[:-1], str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    with h5py.File(tmp_path / "plain" / "reference.h5") as h5:
        assert not np.isnan(h5["layers/layers.2/output"][()]).any()


def test_help_keeps_square_brackets():
    result = runner.invoke(app, ["mca-run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "nanprobe[dask]" in result.output
