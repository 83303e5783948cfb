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
