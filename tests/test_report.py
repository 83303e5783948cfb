"""``nanprobe report``: a self-contained, escaped HTML page and its JSON, on a real MNIST run."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from run_files import retag

from nanprobe.audit import audit_run
from nanprobe.calibrate import CALIBRATION_FORMAT, calibrate, recommend
from nanprobe.evaluate import allocator_note
from nanprobe.jsonio import write_json
from nanprobe.plots import plot_sigdigits
from nanprobe.report import SECTIONS, write_report
from nanprobe.run import RunSpec, mca_run
from nanprobe.sigdigits import compute_sigdigits

EVIL = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr"}
PNG_URI = "data:image/png;base64,"


class Page(HTMLParser):
    """Checks that tags nest and close; collects section ids, image sources and links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.sections: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id") or "")
        if tag == "img":
            self.images.append(a.get("src") or "")
        if "href" in a:
            self.links.append(a["href"] or "")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.errors.append(f"self-closing <{tag}/>")

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> tuple[str, Page]:
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    page.close()
    assert not page.errors and not page.stack, (page.errors, page.stack)
    return text, page


def check_self_contained(text: str, page: Page) -> None:
    lowered = text.lower()
    for bad in ("http://", "https://", "<script", "<link", "<iframe", "<object", "@import",
                "url("):
        assert bad not in lowered, bad
    assert not re.search(r"<(?![a-z/!])", text), "a raw '<' outside a tag"
    assert page.sections == [sid for sid, _ in SECTIONS]
    assert all(src.startswith(PNG_URI) for src in page.images)
    assert all(href.startswith("#") for href in page.links)


def strict_json(path: Path) -> dict:
    def refuse(name: str):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> Path:
    """A real MNIST run (2 digits, 2 samples) with sigdigits (+ PNGs) and the pooling audit."""
    run = mca_run(RunSpec(model="mnist", input="mnist", slices="0:2", samples=2),
                  tmp_path_factory.mktemp("report") / "run")
    plot_sigdigits(compute_sigdigits(run.path), run.path / "sigdigits")
    audit_run(run.path)
    return run.path


@pytest.fixture()
def run_copy(analysed, tmp_path) -> Path:
    return Path(shutil.copytree(analysed, tmp_path / "run"))


def test_real_calibration_report(run_copy):
    cal = calibrate("mnist", "mnist", run_copy, slices="0:4", thresholds=(1.0, 0.5),
                    fills=("mean",), pooling=run_copy, repeats=1, batch_size=4)
    html_path, json_path = write_report(run_copy)
    assert (html_path, json_path) == (run_copy / "report.html", run_copy / "report.json")
    text, page = parse(html_path)
    check_self_contained(text, page)
    report = strict_json(json_path)
    written = strict_json(run_copy / "calibration.json")
    assert written == cal
    assert report["sweep"]["settings"] == written["settings"]
    assert report["sweep"]["recommended"] == written["recommended"]
    assert report["speed"]["plain_seconds"] == written["plain"]["seconds"]
    assert [s["speedup"] for s in report["speed"]["settings"]] == [
        s["speedup"] for s in written["settings"]]
    # every setting is timed against the plain model in alternating rounds: median and range
    for s in report["speed"]["settings"]:
        lo, hi = s["speedup_range"]
        assert lo <= s["speedup"] <= hi
    # the recommended setting is also timed against the plain model in channels-last layout
    rec = written["recommended"]
    if rec is not None:
        plain_cl = written["plain"]["seconds_channels_last"]
        assert report["speed"]["plain_seconds_channels_last"] == plain_cl > 0
        lo, hi = written["settings"][rec]["speedup_channels_last_range"]
        assert lo <= written["settings"][rec]["speedup_channels_last"] <= hi
    assert [s["speedup_channels_last"] is not None for s in written["settings"]] == [
        i == rec for i in range(len(written["settings"]))]
    assert "vs plain channels-last" in text
    assert written["timing"]["repeats"] == 1 and len(written["timing"]["load_average_1min"]) == 2
    # the speed figures say which allocator mode they were measured in (page faults weigh)
    assert written["provenance"]["allocator"] == report["speed"]["allocator"] == allocator_note()
    assert allocator_note() in text
    # ... and at which batch size (it decides which activations reach the mmap threshold)
    assert report["speed"]["batch_size"] == written["provenance"]["batch_size"] == 4
    assert "calibration inputs (4 items per forward call" in text
    focus = report["layers"]["setting"]
    assert report["layers"]["rows"] == written["settings"][focus]["layers"]
    assert report["slices"]["rows"] == written["settings"][focus]["per_item"]
    assert report["missing"] == {}
    if written["recommended"] is None:
        assert report["recommendation"] is None
        assert "nothing: every setting loses more than" in text
    else:
        rec = report["recommendation"]
        assert rec["index"] == written["recommended"]
        assert rec["verdict"] in ("faster", "slower", "no measurable difference")
        assert rec["speedup_range"][0] <= rec["speedup"] <= rec["speedup_range"][1]
        assert 'class="recommendation"' in text
    # the summary answers the four questions, output stability first
    lines = report["summary"]["lines"]
    assert [line.split("?")[0] for line in lines] == [
        "Does the noise change the output", "Where is the noise", "What to set",
        "What does it buy"]
    stability = report["output_stability"]
    assert stability["task"] == "classification" and stability["samples"] == 2
    assert len(stability["label_flip_fraction"]) == 2
    assert lines[0].endswith(("in all 2 MCA samples.", ")."))

    # every embedded image: sigdigits and audit PNGs of the run, and the report's own
    sig, audit = report["sigdigits"]["figures"], report["audit"]["figures"]
    expected = [*sig["overview"], *sig["layers"], *audit, *report["figures"].values()]
    assert len(sig["layers"]) == 12 and len(audit) == 5
    assert set(report["figures"]) == {"stability", "noise_reach", "sweep", "layers", "slices"}
    assert len(page.images) == len(expected)
    for rel in expected:
        assert (run_copy / rel).read_bytes().startswith(b"\x89PNG")
    # summary numbers match the analyses
    unstable = strict_json(run_copy / "audit.json")["layers"]
    assert report["summary"]["unstable_pooling"] == {
        k: v["unstable_fraction"] for k, v in unstable.items()}
    assert set(report["summary"]["sigdigits"]) >= {"layers.0", "layers.10", "final"}
    # the noise-reach figure places every audited pooling layer among the layers
    from nanprobe.report import noise_reach_rows

    reach = [r["layer"] for r in noise_reach_rows(report["sigdigits"]["layers"], {
        k: v["unstable_fraction"] for k, v in unstable.items()})]
    assert set(unstable) <= set(reach) and reach[-1] == "final"
    assert report["provenance"]["run"]["spec"]["model"] == "mnist"
    assert report["provenance"]["commands"][0].startswith("nanprobe mca-run mnist mnist ")


def _segmentation_calibration(selection: list[int], layer: str) -> dict:
    """A calibration.json of the documented schema: segmentation with labels, 4 settings.

    The second item has no foreground in the labels (Dice vs labels None); the last setting's
    Dice is undefined (loss None).
    """
    def setting(threshold: float, fill: str, skip: float, loss: float | None,
                seconds: float) -> dict:
        dice = None if loss is None else 1 - loss
        rows = [{"layer": "layers.0", "positions": 1000, "skipped": skip / 2,
                 "macs_skipped": skip / 2},
                {"layer": layer, "positions": 500, "skipped": skip * 2, "macs_skipped": skip * 2},
                {"layer": "all convs", "positions": 1500, "skipped": skip,
                 "macs_skipped": skip * 1.2}]
        items = [{"index": idx, "skipped": skip * (0.9 + 0.1 * k), "macs_skipped": skip,
                  "agreement": dice, "vs_labels_plain": None if k == 1 else 0.9,
                  "vs_labels_nanified": None if k == 1 or dice is None else dice - 0.1}
                 for k, idx in enumerate(selection)]
        return {"nan_threshold": threshold, "fill": fill,
                "skip": {"positions": skip, "macs": skip * 1.2}, "layers": rows,
                "per_item": items,
                "agreement": {"mean_dice": dice, "dice_per_class": [1.0, dice, None],
                              "identical": 0.99},
                "vs_labels": {"mean_dice": None if dice is None else dice - 0.1,
                              "dice_per_class": [1.0, 0.8, None], "identical": 0.95},
                "loss": loss, "within_tolerance": loss is not None and loss <= 0.01,
                "seconds": seconds,
                "speedup": 0.2 / seconds}

    settings = [setting(1.0, "mean", 0.2, 0.0005, 0.16), setting(0.5, "mean", 0.5, 0.02, 0.1),
                setting(1.0, "noisy_max", 0.21, 0.004, 0.15),
                setting(0.25, "mean", 0.7, None, 0.08)]
    return {"format": CALIBRATION_FORMAT,
            "provenance": {"model": "default", "weights_sha256": None,
                           "input": {"input": "mnist-heldout", "input_sha256": "abc",
                                     "selection": selection, "view": None},
                           "nanprobe_version": "0", "torch_version": "0", "threads": 2,
                           "created": "2024-01-01T00:00:00+00:00", "pooling_source": layer},
            "task": "segmentation",
            "pooling": {"tie_limit": 1, "tie_eps": 1e-7, "tie_rtol": 0.0},
            "metric": "mean_dice", "tolerance": 0.01,
            "class_names": ["background", layer, "white matter"],
            "plain": {"seconds": 0.2, "vs_labels": {"mean_dice": 0.9,
                                                    "dice_per_class": [1.0, 0.8, None],
                                                    "identical": 0.95}},
            "settings": settings, "recommended": recommend(settings, 0.01),
            "thresholds_file": "thresholds.json"}


def test_user_strings_are_escaped_and_recommendation_first(run_copy):
    retag(run_copy, model=EVIL, input=EVIL)
    cal = _segmentation_calibration([3, 4, 5], EVIL)
    write_json(run_copy / "calibration.json", cal)
    audit = json.loads((run_copy / "audit.json").read_text())
    audit["layers"][EVIL] = audit["layers"].pop("layers.2")
    audit["figures"]["p_unstable_given_ties"] = "../../outside.png"  # not embedded
    (run_copy / "audit.json").write_text(json.dumps(audit))

    html_path, json_path = write_report(run_copy)
    text, page = parse(html_path)
    check_self_contained(text, page)
    assert ESCAPED in text and text.count(ESCAPED) >= 6
    assert EVIL in "".join(page.text)  # shown to the reader as text
    assert "outside.png</code> is missing or not a PNG" in text

    report = strict_json(json_path)
    assert cal["recommended"] == 2
    rec = report["recommendation"]
    best = cal["settings"][2]
    assert rec["index"] == 2 and rec["skip"] == best["skip"]
    assert (rec["speedup"], rec["loss"], rec["agreement"]) == (
        best["speedup"], best["loss"], best["agreement"])
    assert rec["thresholds"] == {**cal["pooling"], "nan_threshold": 1.0, "fill": "noisy_max"}
    assert report["sweep"]["settings"] == cal["settings"]
    assert report["slices"]["labels"] is True and report["slices"]["rows"] == best["per_item"]
    assert len(report["summary"]["mismatch"]) == 1  # the calibration's model is not the run's

    summary = text[text.index('<section id="summary">'):text.index('<section id="stability">')]
    assert summary.index('class="verdicts"') < summary.index('class="recommendation"')
    assert "1.33x (1.33-1.33x) — faster than the plain model on this machine" in summary
    assert "tie_limit=1" in summary
    rows = re.findall(r'<tr class="recommended">(.*?)</tr>', text)
    assert len(rows) == 2 and all(r.startswith("<td>2 (recommended)</td>") for r in rows)
    slices = text[text.index('<section id="slices">'):text.index('<section id="speed">')]
    assert "mean Dice plain vs labels" in slices and "mean Dice nanified vs labels" in slices


def test_missing_steps_are_named(run_copy):
    for name in ("sigdigits.h5", "audit.json"):
        (run_copy / name).unlink()
    shutil.rmtree(run_copy / "sigdigits")
    html_path, json_path = write_report(run_copy)
    text, page = parse(html_path)
    check_self_contained(text, page)
    assert len(page.images) == 1  # the output stability figure: the run has samples
    report = strict_json(json_path)
    commands = {"sigdigits": f"nanprobe sigdigits {run_copy}",
                "audit": f"nanprobe audit {run_copy}",
                "calibrate": f"nanprobe calibrate mnist mnist --out {run_copy}"}
    for step, command in commands.items():
        assert f"not computed — run <code>{command}</code>" in text, step
        assert report["missing"][step] == f"not computed — run `{command}`"
    for key in ("sigdigits", "audit", "sweep", "layers", "slices", "speed"):
        assert report[key] is None
    assert set(report["figures"]) == {"stability"} and report["recommendation"] is None
    assert len(report["provenance"]["commands"]) == 1


def test_wrong_formats_are_refused(run_copy, tmp_path):
    (run_copy / "calibration.json").write_text(json.dumps({"format": "something/2"}))
    with pytest.raises(ValueError, match="expected 'nanprobe-calibration/1'"):
        write_report(run_copy)
    with pytest.raises(ValueError, match="not a nanprobe run directory"):
        write_report(tmp_path / "nothing")


def test_no_recommendation_shows_the_closest_setting(run_copy):
    cal = _segmentation_calibration([0, 1], "enc.conv1")
    cal["recommended"] = None
    cal["thresholds_file"] = None
    write_json(run_copy / "calibration.json", cal)
    text, page = parse(write_report(run_copy)[0])
    check_self_contained(text, page)
    report = strict_json(run_copy / "report.json")
    assert report["recommendation"] is None
    assert report["summary"]["within_tolerance"] is False
    assert report["layers"]["setting"] == 0 and report["layers"]["recommended"] is False
    assert "nothing: every setting loses more than" in text
    assert 'class="recommended"' not in text
    assert "fill=mean (not recommended)" in text
