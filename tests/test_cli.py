"""The CLI: --help for every command, the demo end to end, one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from nanprobe.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["demo"], ["mca-run"]])
def test_help_explains_every_option(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("nanprobe ")


def test_demo_runs_offline_and_writes_provenance(tmp_path):
    out = tmp_path / "demo.json"
    result = runner.invoke(app, ["demo", "--slices", "2", "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "identical labels" in result.output and "speed-up" in result.output
    res = json.loads(out.read_text())
    assert res["provenance"]["model"] == "default" and res["provenance"]["input_sha256"]
    assert res["skip"][-1]["layer"] == "all convs" and res["skip"][-1]["skipped"] > 0
    assert res["identical_labels"] > 0.99


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
