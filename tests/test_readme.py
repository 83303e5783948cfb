"""README's set-up commands stay true: CI runs the same test command, the CLI has the job."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ci_test_command() -> str:
    lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
             if ln.startswith("python3 -m venv")]
    assert len(lines) == 1, "expected exactly one test command line in .ci/run"
    return lines[0]


def test_readme_gives_the_ci_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    assert _ci_test_command() in readme


def test_readme_main_job_command_installs_and_runs_analyze():
    from nanprobe.cli import app

    readme = (ROOT / "README.md").read_text()
    first = next(ln for ln in readme.splitlines() if ln.startswith("python3 -m venv"))
    assert "pip install -q torch==2.13.0" in first and first.rstrip().endswith("nanprobe analyze")
    assert "analyze" in {c.name or c.callback.__name__ for c in app.registered_commands}


def test_readme_stays_short_and_its_links_resolve():
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300, "README stays short: depth goes to docs/"
    targets = re.findall(r"\]\(([^)#\s]+)\)", readme)
    assert targets, "README links its docs"
    missing = [t for t in targets if not t.startswith("http") and not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
