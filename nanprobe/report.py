"""``nanprobe report``: one self-contained HTML page (and its numbers as JSON) for a run.

Reads what the other steps left in a run directory — ``run.json`` (``nanprobe mca-run``),
``sigdigits.h5`` and ``sigdigits/*.png`` (``nanprobe sigdigits``), ``audit.json`` and its
figures (``nanprobe audit``), ``calibration.json`` (``nanprobe calibrate``) — and writes

- ``RUN_DIR/report.html``: plain HTML5 with an inline style sheet, no script, no external
  reference, every image embedded as a ``data:`` URI and every string from a file escaped.
  Sections (stable ids): ``summary`` (the recommendation first), ``sigdigits``, ``audit``,
  ``sweep``, ``layers``, ``slices``, ``speed``, ``provenance``;
- ``RUN_DIR/report.json`` (``nanprobe-report/1``): the same numbers for machines;
- ``RUN_DIR/report/*.png``: the sweep trade-off, skips per layer and per slice.

A step that was not run leaves its sections with a note naming the command that computes it.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shlex
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from . import __version__
from .audit import AUDIT_FILE, AUDIT_FORMAT
from .calibrate import CALIBRATION_FILE, CALIBRATION_FORMAT
from .evaluate import speed_verdict
from .integrity import recorded_digest
from .jsonio import write_json, write_text
from .plots import _safe, short_name
from .report_plots import (
    has_labels,
    plot_layer_skip,
    plot_noise_reach,
    plot_output_stability,
    plot_slices,
    plot_sweep,
)
from .run import Run
from .sigdigits import FORMAT as SIGDIGITS_FORMAT
from .sigdigits import OUTPUT as SIGDIGITS_FILE
from .stability import output_stability, verdict_line

REPORT_FORMAT = "nanprobe-report/1"
HTML_FILE = "report.html"
JSON_FILE = "report.json"
FIGURES_DIR = "report"
SIGDIGITS_FIGURES = "sigdigits"
SECTIONS = (("summary", "Summary"), ("stability", "Output stability"),
            ("sigdigits", "Significant digits"), ("audit", "Pooling audit"),
            ("sweep", "Threshold sweep"), ("layers", "Skips per layer"),
            ("slices", "Per slice / sample"), ("speed", "Speed"), ("provenance", "Provenance"))
#: the questions the summary answers, in order
QUESTIONS = (("stable", "Does the noise change the output?"),
             ("noise", "Where is the noise?"),
             ("settings", "What to set?"),
             ("gain", "What does it buy?"))
METRIC_NAMES = {"mean_dice": "mean Dice", "accuracy": "accuracy"}
ITEM_NAMES = {"mean_dice": "mean Dice", "accuracy": "correct (1/0)"}
#: the command computing each step's output, ``{run}``: the quoted run directory
STEP_COMMANDS = {"sigdigits": "nanprobe sigdigits {run}", "audit": "nanprobe audit {run}",
                 "calibrate": "nanprobe calibrate {model} {input} --out {run}"}
OPTION_ORDER = ("tie_limit", "tie_eps", "tie_rtol", "nan_threshold", "fill")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STYLE = """
body{font-family:system-ui,sans-serif;max-width:70rem;margin:1rem auto;padding:0 1rem;
color:#222;line-height:1.4}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #ccc;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}
th:first-child,td:first-child{text-align:left}
tr.recommended{background:#e6f4e6;font-weight:bold}tr.total{font-weight:bold}
.recommendation{background:#f2f8ff;border:1px solid #9ac;padding:.5rem 1rem}
.warn{background:#fff4e0;border:1px solid #e0a040;padding:.5rem 1rem}
.missing{color:#844;font-style:italic}
figure{margin:.5rem 0}img{max-width:100%;height:auto}figcaption{font-size:.85rem;color:#555}
code,pre{background:#f4f4f4;padding:0 .2rem}pre{padding:.5rem;overflow-x:auto}
nav a{margin-right:.8rem}
ul.verdicts{font-size:1.05rem}ul.verdicts li{margin:.35rem 0}
div.figures{display:flex;flex-wrap:wrap;gap:1rem}div.figures figure{flex:1 1 20rem}
details{margin:.5rem 0}summary{cursor:pointer;font-weight:bold}
""".strip()


class Html(str):
    """Markup built here from escaped parts: not escaped again."""


def write_report(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.html``, ``report.json`` and ``report/*.png`` into ``out`` (default:
    ``run_dir``; another folder lets a read-only run be reported).

    The steps' results (sigdigits, audit, calibration) are read from ``out``; a result computed
    from an earlier state of the run (its recorded run digest differs) is left out as stale,
    with the command that recomputes it. Returns ``(html_path, json_path)``. ValueError when
    ``run_dir`` is not a run directory or a step's output has an unexpected format.
    """
    run = Run(run_dir)
    out_dir = Path(out) if out is not None else run.path
    stability = output_stability(run) if run.sample_paths else None
    report = collect(run, out_dir, stability)
    report["figures"] = write_figures(report, out_dir, run, stability)
    html_path = write_text(out_dir / HTML_FILE, render_html(report, out_dir))
    json_path = write_json(out_dir / JSON_FILE, report)
    return html_path, json_path


# ---------------------------------------------------------------------------------------------
# numbers


def collect(run: Run, results_dir: str | Path | None = None,
            stability: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report's numbers (``report.json`` without ``figures``); the steps' results are read
    from ``results_dir`` (default: the run directory); ``stability``:
    :func:`~nanprobe.stability.output_stability` of the run (None: no samples)."""
    results_dir = Path(results_dir) if results_dir is not None else run.path
    paths = {step: results_dir / name for step, name in
             (("sigdigits", SIGDIGITS_FILE), ("audit", AUDIT_FILE),
              ("calibrate", CALIBRATION_FILE))}
    stale = _stale(run, paths)
    sig = None if "sigdigits" in stale else read_sigdigits(paths["sigdigits"], results_dir)
    audit = None if "audit" in stale else _read_json(paths["audit"], AUDIT_FORMAT)
    cal = None if "calibrate" in stale else _read_calibration(paths["calibrate"])
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "run": str(run.path.resolve()),
        "run_digest": run.digest,
        "provenance": _provenance(run, sig, audit, cal),
        "missing": {**_missing(run, sig, audit, cal), **stale},
        "output_stability": (None if stability is None else
                             {k: v for k, v in stability.items() if k != "flip_map"}),
        "sigdigits": sig,
        "audit": _audit_section(audit),
        "recommendation": _recommendation(cal) if cal is not None else None,
        **_calibration_sections(cal),
    }
    report["summary"] = _summary(report, run, cal)
    return report


def _stale(run: Run, paths: Mapping[str, Path]) -> dict[str, str]:
    """Per step whose result exists but was computed from another state of the run: why."""
    fields = {"run": shlex.quote(str(run.path)),
              "model": shlex.quote(str(run.spec.get("model", "default"))),
              "input": shlex.quote(str(run.spec.get("input", "default")))}
    stale = {}
    for step, path in paths.items():
        if not path.is_file():
            continue
        recorded = recorded_digest(path)
        if step == "calibrate":  # tied to the run through the audit it took its pooling from
            if recorded is None or recorded == run.digest:
                continue
        elif recorded == run.digest:
            continue
        stale[step] = (f"stale — {path.name} was computed from an earlier state of this run "
                       f"(its run digest differs); rerun `{STEP_COMMANDS[step].format(**fields)}`")
    return stale


#: entries a calibration.json must have for the report to read it
CALIBRATION_KEYS = ("settings", "metric", "tolerance", "plain", "recommended", "pooling")


def _read_calibration(path: Path) -> dict[str, Any] | None:
    cal = _read_json(path, CALIBRATION_FORMAT)
    if cal is None:
        return None
    lacking = [k for k in CALIBRATION_KEYS if k not in cal]
    if lacking or not isinstance(cal["settings"], list):
        raise ValueError(f"{path} is not a complete calibration (lacks "
                         f"{', '.join(lacking) or 'a list of settings'}); rerun `nanprobe "
                         "calibrate` into that folder")
    return cal


def _read_json(path: Path, fmt: str) -> dict[str, Any] | None:
    """The JSON file at ``path`` (None if absent); ValueError if its format is not ``fmt``."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} has format {found!r}, expected {fmt!r}")
    return data


def read_sigdigits(path: Path, run_dir: Path) -> dict[str, Any] | None:
    """Options and per-layer summary of a ``sigdigits.h5`` (None if absent), plus its PNGs."""
    if not path.is_file():
        return None
    with h5py.File(path, "r") as h5:
        a = h5.attrs
        if a.get("format") != SIGDIGITS_FORMAT:
            raise ValueError(f"{path} has format {a.get('format')!r}, "
                             f"expected {SIGDIGITS_FORMAT!r}")
        options = {k: a[k] for k in ("method", "error", "reference", "n", "probability",
                                     "confidence", "probability_requested") if k in a}
        versions = {k: a[k] for k in ("nanprobe_version", "significantdigits_version", "created")}
        keys = json.loads(a["keys"])
        layers = [_sigdigits_layer(key, h5[key].attrs) for key in keys]
    return {"options": options, "provenance": versions, "layers": layers,
            "noise_fraction": _ratio(sum(r["noise"] for r in layers),
                                     sum(r["elements"] for r in layers)),
            "figures": _sigdigits_figures(run_dir, keys)}


def _sigdigits_layer(key: str, a: h5py.AttributeManager) -> dict[str, Any]:
    elements = int(a["elements"])
    return {"key": key, "layer": short_name(key), "dtype": np.dtype(str(a["dtype"])).name,
            "shape": [int(v) for v in a["shape"]], "elements": elements,
            "mean_bits": float(a["mean_bits"]), "display_max_bits": int(a["display_max_bits"]),
            "noise": int(a["noise_count"]), "noise_fraction": _ratio(a["noise_count"], elements),
            "exact_fraction": _ratio(a["exact_count"], elements),
            "nan_fraction": _ratio(a["nan_count"], elements)}


def _sigdigits_figures(run_dir: Path, keys: Sequence[str]) -> dict[str, list[str]]:
    """PNGs of ``nanprobe sigdigits`` relative to ``run_dir``: overview, then per layer in
    execution order."""
    folder = run_dir / SIGDIGITS_FIGURES
    layer_files = sorted((folder / "layers").glob("*.png"))
    per_layer = [p for key in keys for p in layer_files
                 if p.name.startswith(_safe(key.removeprefix("layers/")) + "_")]
    return {"overview": [_rel(p, run_dir) for p in sorted(folder.glob("*.png"))],
            "layers": [_rel(p, run_dir) for p in per_layer]}


def _audit_section(audit: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if audit is None:
        return None
    layers = {name: {k: e.get(k) for k in ("windows", "unstable", "unstable_fraction",
                                           "unstable_per_slice", "mean_flip_rate_of_unstable",
                                           "geometry", "calibrated")}
              for name, e in audit["layers"].items()}
    figures = audit.get("figures", {})
    paths = [m["png"] for m in figures.get("maps", {}).values()]
    if "p_unstable_given_ties" in figures:
        paths.insert(0, figures["p_unstable_given_ties"])
    calibration = audit.get("calibration", {})
    return {"samples": audit["samples"], "summary": audit["summary"], "layers": layers,
            "verdict": audit.get("verdict"), "verdict_text": audit.get("verdict_text"),
            "calibrated_pooling": audit.get("calibrated_pooling", {}).get("defaults"),
            "best": calibration.get("best"), "selection": calibration.get("selection"),
            "definition": audit.get("definition"), "figures": paths}


def focus_index(cal: Mapping[str, Any]) -> int | None:
    """The setting shown per layer and slice: the recommended one, else the smallest loss
    (ties: more MACs skipped, like the recommendation; an undefined loss last). None without
    settings."""
    settings = cal["settings"]
    if cal.get("recommended") is not None:
        return int(cal["recommended"])
    if not settings:
        return None

    def rank(i: int) -> tuple[float, float, int]:
        loss = settings[i]["loss"]
        return (math.inf if loss is None else loss, -settings[i]["skip"]["macs"], i)

    return min(range(len(settings)), key=rank)


def _calibration_sections(cal: Mapping[str, Any] | None) -> dict[str, Any]:
    """``sweep``, ``layers``, ``slices`` and ``speed`` (all None without a calibration)."""
    if cal is None:
        return dict.fromkeys(("sweep", "layers", "slices", "speed"))
    rec, settings = cal.get("recommended"), cal["settings"]
    if rec is not None and not 0 <= rec < len(settings):
        raise ValueError(f"calibration.json: recommended={rec} is not an index of its "
                         f"{len(settings)} settings")
    sweep = {k: cal.get(k) for k in ("task", "metric", "tolerance", "loss_against", "pooling",
                                     "class_names",
                                     "recommended", "thresholds_file", "plain")}
    sweep["settings"] = settings
    speed = {"plain_seconds": cal["plain"]["seconds"],
             "plain_seconds_channels_last": cal["plain"].get("seconds_channels_last"),
             "threads": cal.get("provenance", {}).get("threads"),
             "allocator": cal.get("provenance", {}).get("allocator"),
             "batch_size": cal.get("provenance", {}).get("batch_size"),
             "timing": cal.get("timing"),
             "settings": [{**{k: s[k] for k in ("nan_threshold", "fill", "seconds", "speedup")},
                           **{k: s.get(k) for k in ("speedup_range", "seconds_plain",
                                                    "speedup_channels_last",
                                                    "speedup_channels_last_range")}}
                          for s in settings]}
    i = focus_index(cal)
    if i is None:
        return {"sweep": sweep, "layers": None, "slices": None, "speed": speed}
    s = settings[i]
    focus = {"setting": i, "recommended": i == rec, "nan_threshold": s["nan_threshold"],
             "fill": s["fill"]}
    return {"sweep": sweep, "layers": {**focus, "rows": s["layers"]},
            "slices": {**focus, "labels": has_labels(s["per_item"]), "rows": s["per_item"]},
            "speed": speed}


def _summary(report: Mapping[str, Any], run: Run, cal: Mapping[str, Any] | None) -> dict:
    sig, audit = report["sigdigits"], report["audit"]
    answers = {"stable": _stable_answer(report), "noise": _noise_answer(report),
               "settings": _settings_answer(report), "gain": _gain_answer(report)}
    return {
        "answers": answers,
        "lines": [f"{question} {answers[key]}" for key, question in QUESTIONS],
        "calibrated": cal is not None,
        "within_tolerance": None if cal is None else cal.get("recommended") is not None,
        "unstable_pooling": None if audit is None else {
            name: e["unstable_fraction"] for name, e in audit["layers"].items()},
        "unstable_pooling_overall": None if audit is None else audit["summary"].get(
            "unstable_fraction"),
        "sigdigits": None if sig is None else {
            r["layer"]: {k: r[k] for k in ("mean_bits", "noise_fraction", "exact_fraction",
                                           "nan_fraction")} for r in sig["layers"]},
        "noise_fraction": None if sig is None else sig["noise_fraction"],
        "mismatch": _mismatch(run, cal),
        "busy": ((cal or {}).get("timing") or {}).get("busy"),
    }


def _stable_answer(report: Mapping[str, Any]) -> str:
    stability = report["output_stability"]
    if stability is None:
        return "not measured: the run has no samples yet."
    return verdict_line(stability) + "."


def _noise_answer(report: Mapping[str, Any]) -> str:
    """Where the noise is, inside the network and at its output, in one sentence."""
    sig, audit, stability = report["sigdigits"], report["audit"], report["output_stability"]
    parts = []
    if audit is not None and audit["layers"]:
        name, e = max(audit["layers"].items(), key=lambda kv: kv[1]["unstable_fraction"])
        parts.append(f"{_pct(audit['summary'].get('unstable_fraction'))} of the max-pool "
                     f"windows flip their argmax across {audit['samples']} samples (most in "
                     f"{name}: {_pct(e['unstable_fraction'])})")
    if sig is not None and sig["layers"]:
        low = min(sig["layers"], key=lambda r: r["mean_bits"])
        parts.append(f"{_pct(sig['noise_fraction'])} of the captured values keep at most 1 "
                     f"significant bit (lowest mean: {low['layer']}, {low['mean_bits']:.1f} "
                     "bits)")
    if not parts:
        return "not measured: run `nanprobe sigdigits` and `nanprobe audit`."
    text = "inside the network, " + "; ".join(parts)
    if stability is not None:
        what = "labels" if stability["task"] == "segmentation" else "predictions"
        worst = stability["max_label_flip_fraction"]
        text += (f"; at the output, {_pct(worst)} of the {what} flip at most" if worst
                 else f"; at the output, no {what} flip")
    if audit is not None and audit.get("verdict_text"):
        text += f". {audit['verdict_text']}"
    return text.rstrip(".") + "."


def _settings_answer(report: Mapping[str, Any]) -> str:
    r = report["recommendation"]
    if report["sweep"] is None:
        return "not calibrated: " + report["missing"]["calibrate"].replace("`", "") + "."
    if r is None:
        sw = report["sweep"]
        return (f"nothing: every setting loses more than {sw['tolerance']:g} of "
                f"{_metric_name(sw['metric'])} against {_against(sw.get('loss_against'))}.")
    why = ("the most conv MACs skipped" if r["objective"] == "skip"
           else "the fastest measured setting")
    saved = f" ({r['thresholds_file']})" if r["thresholds_file"] else ""
    metric, against = _metric_name(r["metric"]), _against(r["loss_against"])
    if r["loss"] is not None and r["loss"] < 0:  # nanified scores higher: say so, not "loss -x"
        return (f"{_options(r['thresholds'])}{saved}: {why}; its {metric} against {against} is "
                f"{_num(-r['loss'])} higher than the plain model's (tolerance: a loss of at "
                f"most {r['tolerance']:g}).")
    return (f"{_options(r['thresholds'])}{saved}: {why} while the loss of {metric} against "
            f"{against} stays {_num(r['loss'])} <= {r['tolerance']:g}.")


def _gain_answer(report: Mapping[str, Any]) -> str:
    r = report["recommendation"]
    if r is None:
        return "nothing measured (no recommended setting)."
    text = (f"skips {_pct(r['skip']['macs'])} of the conv MACs; {_speed_words(r)} "
            f"({_timing_context(report)})")
    if r.get("speedup_channels_last_range"):
        text += (f"; {_ratio_text(r, 'speedup_channels_last')} against the plain model "
                 "converted to channels-last layout")
    busy = report["summary"]["busy"] if "summary" in report else r.get("busy")
    if busy:
        text += f". Warning: the machine was busy while timing ({busy})"
    return text + "."


def _ratio_text(r: Mapping[str, Any], key: str = "speedup") -> str:
    lo, hi = r[f"{key}_range"]
    return f"{r[key]:.2f}x ({lo:.2f}-{hi:.2f}x)"


def _speed_words(r: Mapping[str, Any]) -> str:
    """``0.70x (0.68-0.73x) — slower than the plain model on this machine``."""
    words = {"faster": "faster than the plain model",
             "slower": "slower than the plain model",
             "no measurable difference": "no measurable difference from the plain model"}
    return f"{_ratio_text(r)} — {words[r['verdict']]} on this machine"


def _timing_context(report: Mapping[str, Any]) -> str:
    sp = report["speed"] or {}
    parts = []
    if sp.get("batch_size"):
        parts.append(f"batches of {sp['batch_size']}")
    if sp.get("threads"):
        parts.append(f"{sp['threads']} threads")
    timing = sp.get("timing") or {}
    if timing.get("repeats"):
        parts.append(f"median and range of {timing['repeats']} alternating rounds")
    return ", ".join(parts) or "calibration inputs"


def _recommendation(cal: Mapping[str, Any]) -> dict[str, Any] | None:
    """The recommended setting's thresholds and measured gain and loss (None: none within)."""
    rec = cal.get("recommended")
    if rec is None:
        return None
    s = cal["settings"][rec]
    spread = s.get("speedup_range") or [s["speedup"], s["speedup"]]
    return {"index": rec,
            "thresholds": {**cal["pooling"], "nan_threshold": s["nan_threshold"],
                           "fill": s["fill"]},
            "thresholds_file": cal.get("thresholds_file"),
            "objective": cal.get("objective", "skip"),
            "skip": s["skip"], "speedup": s["speedup"], "speedup_range": spread,
            "verdict": speed_verdict(*spread),
            "speedup_channels_last": s.get("speedup_channels_last"),
            "speedup_channels_last_range": s.get("speedup_channels_last_range"),
            "seconds_plain": s.get("seconds_plain", cal["plain"]["seconds"]),
            "seconds_nanified": s["seconds"], "metric": cal["metric"],
            "agreement": s["agreement"], "loss": s["loss"], "tolerance": cal["tolerance"],
            "loss_against": cal.get("loss_against", "plain"),
            "vs_labels": s.get("vs_labels"), "plain_vs_labels": cal["plain"].get("vs_labels"),
            "busy": (cal.get("timing") or {}).get("busy")}


def _mismatch(run: Run, cal: Mapping[str, Any] | None) -> list[str]:
    """Differences in model or weights between the run and the calibration, as sentences."""
    if cal is None:
        return []
    prov = cal.get("provenance", {})
    pairs = [("model", run.spec.get("model"), prov.get("model")),
             ("weights sha256", run.manifest.get("weights_sha256"), prov.get("weights_sha256"))]
    return [f"the calibration's {what} ({b}) differs from the run's ({a})"
            for what, a, b in pairs if a is not None and b is not None and a != b]


def _missing(run: Run, sig: Any, audit: Any, cal: Any) -> dict[str, str]:
    """Per step not run: ``not computed — run `COMMAND```."""
    fields = {"run": shlex.quote(str(run.path)),
              "model": shlex.quote(str(run.spec.get("model", "default"))),
              "input": shlex.quote(str(run.spec.get("input", "default")))}
    steps = {"sigdigits": sig, "audit": audit, "calibrate": cal}
    return {step: f"not computed — run `{STEP_COMMANDS[step].format(**fields)}`"
            for step, found in steps.items() if found is None}


def _provenance(run: Run, sig: Mapping[str, Any] | None, audit: Mapping[str, Any] | None,
                cal: Mapping[str, Any] | None) -> dict[str, Any]:
    audit_prov = None
    if audit is not None:
        audit_prov = {k: v for k, v in audit.get("provenance", {}).items() if k != "run_manifest"}
        audit_prov["eps_values"] = audit.get("eps_values")
        audit_prov["rtol_values"] = audit.get("rtol_values")
    return {
        "report": {"nanprobe_version": __version__, "torch_version": str(torch.__version__),
                   "numpy_version": np.__version__,
                   "created": datetime.now(timezone.utc).isoformat()},
        "run": run.manifest,
        "sigdigits": None if sig is None else {**sig["options"], **sig["provenance"]},
        "audit": audit_prov,
        "calibration": None if cal is None else cal.get("provenance"),
        "commands": commands(run, sig, audit),
    }


def commands(run: Run, sig: Mapping[str, Any] | None,
             audit: Mapping[str, Any] | None) -> list[str]:
    """Command lines reproducing the run and the analyses found (options as recorded)."""
    spec, where = run.spec, str(run.path)
    backend = spec.get("backend") or {"name": "inprocess"}
    args: list[Any] = ["nanprobe", "mca-run", spec.get("model", "default"),
                       spec.get("input", "default"), "--samples", spec.get("samples"),
                       "--seed", spec.get("seed", 0), "--backend", backend["name"]]
    if backend["name"] == "inprocess":
        args += ["--mode", backend.get("mode", "rr"), "--precision", backend.get("precision", 24)]
    else:
        args += ["--rounding-mode", backend.get("rounding_mode", "random")]
    for option in ("slices", "view", "checkpoint", "nanify"):
        if spec.get(option) is not None:
            args += [f"--{option}", spec[option]]
    for pattern in spec.get("layers") or []:
        args += ["--layers", pattern]
    if spec.get("trust"):
        args.append("--trust")
    args += ["--batch-size", spec.get("batch_size", 4), "--out", where]
    lines = [shlex.join(str(a) for a in args)]
    if sig is not None:
        o = sig["options"]
        args = ["nanprobe", "sigdigits", where, "--method", o["method"], "--reference",
                o["reference"], "--error", o["error"], "--probability",
                o.get("probability_requested", o["probability"]), "--confidence",
                o["confidence"]]
        lines.append(shlex.join(str(a) for a in args))
    if audit is not None:
        eps = [a for e in audit.get("eps_values", []) for a in ("--eps", f"{e:g}")]
        lines.append(shlex.join(["nanprobe", "audit", where, *eps]))
    return lines


# ---------------------------------------------------------------------------------------------
# figures


def _module(key: str) -> str:
    """``layers/enc.pool/output_0`` -> ``enc.pool``: the module a capture key belongs to."""
    return key.removeprefix("layers/").rsplit("/", 1)[0]


def noise_reach_rows(layers: Sequence[Mapping[str, Any]], pooling: Mapping[str, float]
                     ) -> list[Mapping[str, Any]]:
    """The sigdigits rows of the noise-reach figure, in network order: every module's output,
    ``final``, and the pooled values of the layers in ``pooling`` (audit name -> unstable
    fraction), renamed to the audit's layer name so that their markers land on them."""
    rows = []
    for r in layers:
        if r["key"].endswith("/output") or r["key"] == "final":
            rows.append(r)
        elif r["key"].endswith("/output_0") and _module(r["key"]) in pooling:
            rows.append({**r, "layer": _module(r["key"])})
    return rows


def write_figures(report: Mapping[str, Any], run_dir: Path, run: Run | None = None,
                  stability: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Draw the report's own figures into ``run_dir/report``; paths relative to ``run_dir``.

    ``stability`` (with its ``flip_map``) and ``run`` (the reference labels) give the output
    stability figure.
    """
    folder = run_dir / FIGURES_DIR
    paths: dict[str, Path] = {}
    if stability is not None and run is not None:
        paths["stability"] = _stability_figure(stability, run, folder / "output_stability.png")
    sig = report["sigdigits"]
    if sig is not None:
        audit = report["audit"]
        pooling = (None if audit is None else
                   {name: e["unstable_fraction"] for name, e in audit["layers"].items()})
        rows = noise_reach_rows(sig["layers"], pooling or {})
        out = report["output_stability"]
        if rows:
            paths["noise_reach"] = plot_noise_reach(
                rows, folder / "noise_reach.png", pooling=pooling,
                output_flips=None if out is None else out["max_label_flip_fraction"],
                max_bits=max(int(r["display_max_bits"]) for r in rows))
    sweep, layers, slices = report["sweep"], report["layers"], report["slices"]
    if sweep is None or not sweep["settings"]:
        return {k: _rel(p, run_dir) for k, p in paths.items()}
    metric = str(sweep["metric"])
    paths["sweep"] = plot_sweep(sweep["settings"], folder / "sweep.png",
                                recommended=sweep["recommended"],
                                tolerance=float(sweep["tolerance"]),
                                metric=_metric_name(metric),
                                against=sweep.get("loss_against") or "plain")
    rows = [r for r in layers["rows"] if r["layer"] != "all convs"]
    if rows:
        paths["layers"] = plot_layer_skip(rows, folder / "layer_skip.png",
                                          title=f"Skips per conv layer, {_setting_name(layers)}")
    if slices["rows"]:
        paths["slices"] = plot_slices(slices["rows"], folder / "slices.png",
                                      title=f"Per slice / sample, {_setting_name(slices)}",
                                      quality_label=ITEM_NAMES.get(metric, metric))
    return {k: _rel(p, run_dir) for k, p in paths.items()}


def _stability_figure(stability: Mapping[str, Any], run: Run, path: Path) -> Path:
    """The item whose labels flip most (segmentation), or the per-class flips."""
    n = stability["samples"]
    if stability["task"] == "segmentation":
        fmap = stability["flip_map"]
        item = int(fmap.reshape(fmap.shape[0], -1).sum(1).argmax())
        reference = np.nan_to_num(run.reference("final", item), nan=-np.inf).argmax(0)
        index = run.manifest.get("input", {}).get("selection", [item])[item]
        return plot_output_stability(reference, fmap[item], path, samples=n,
                                     class_names=stability["class_names"],
                                     title=f"Reference labels of input {index}, pixels "
                                           "whose label flips in red")
    return plot_output_stability(None, None, path, samples=n,
                                 class_names=stability["class_names"],
                                 per_class_flips=stability["per_class_flip_fraction"],
                                 title=f"Predictions that flip per class, {n} samples")


def _setting_name(focus: Mapping[str, Any]) -> str:
    which = "recommended" if focus["recommended"] else "not recommended"
    return f"nan_threshold={focus['nan_threshold']:g}, fill={focus['fill']} ({which})"


# ---------------------------------------------------------------------------------------------
# HTML


def render_html(report: Mapping[str, Any], run_dir: Path) -> str:
    """The report page: every section in :data:`SECTIONS` order, images embedded."""
    model = report["provenance"]["run"]["spec"].get("model", "")
    bodies = {"summary": _summary_html, "stability": _stability_html,
              "sigdigits": _sigdigits_html, "audit": _audit_html,
              "sweep": _sweep_html, "layers": _layers_html, "slices": _slices_html,
              "speed": _speed_html, "provenance": _provenance_html}
    nav = " ".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS)
    sections = "\n".join(
        f'<section id="{sid}">\n<h2>{_e(title)}</h2>\n{bodies[sid](report, run_dir)}\n</section>'
        for sid, title in SECTIONS)
    from .validate import report_section  # `nanprobe validate` results, when present

    if (validation := report_section(run_dir)) is not None:
        sections += f'\n<section id="validation">\n<h2>Validation</h2>\n{validation}\n</section>'
    created = report["provenance"]["report"]["created"]
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>nanprobe report: {_e(model)}</title>\n<style>\n{STYLE}\n</style>\n"
            f"</head>\n<body>\n<header>\n<h1>nanprobe report</h1>\n"
            f"<p>Model {_code(model)}, run {_code(report['run'])}, created {_e(created)} by "
            f"nanprobe {_e(__version__)}.</p>\n<nav>{nav}</nav>\n</header>\n{sections}\n"
            "</body>\n</html>\n")


def _e(value: Any) -> str:
    """``value`` as HTML text: escaped unless it is :class:`Html`."""
    return value if isinstance(value, Html) else html.escape(str(value), quote=True)


def _code(value: Any) -> Html:
    return Html(f"<code>{_e(value)}</code>")


def _cat(*parts: Any) -> Html:
    """``parts`` escaped (but :class:`Html`) and joined."""
    return Html("".join(_e(p) for p in parts))


def _p(*parts: Any, cls: str | None = None) -> str:
    attr = f' class="{_e(cls)}"' if cls else ""
    return f"<p{attr}>{_cat(*parts)}</p>"


def _ul(items: Sequence[Any]) -> str:
    return "<ul>\n" + "\n".join(f"<li>{_e(i)}</li>" for i in items) + "\n</ul>"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
           row_classes: Sequence[str | None] | None = None) -> str:
    """A table; cells escaped unless :class:`Html`; ``row_classes``: a class per row."""
    classes = row_classes or [None] * len(rows)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "\n".join(
        (f'<tr class="{_e(c)}">' if c else "<tr>") + "".join(f"<td>{_e(v)}</td>" for v in row)
        + "</tr>" for row, c in zip(rows, classes, strict=True))
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _missing_note(report: Mapping[str, Any], step: str) -> Html:
    """``not computed — run <code>COMMAND</code>`` for a step that was not run."""
    before, command, _ = report["missing"][step].split("`")
    return _cat(before, _code(command))


def _missing_html(report: Mapping[str, Any], step: str) -> str:
    return _p(_missing_note(report, step), ".", cls="missing")


def _img(run_dir: Path, rel: str, caption: str) -> str:
    """``rel`` (a PNG inside ``run_dir``) as an embedded figure, or a note why it is not."""
    path = run_dir / rel
    inside = path.resolve().is_relative_to(run_dir.resolve())
    data = path.read_bytes() if inside and path.is_file() else b""
    if not data.startswith(PNG_MAGIC):
        return _p("figure ", _code(rel), " is missing or not a PNG inside the run directory",
                  cls="missing")
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{b64}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _pct(v: float | None) -> str:
    """A fraction as a percentage; non-zero values below 0.1 % as ``< 0.1 %``."""
    if v is None:
        return "n/a"
    return "< 0.1 %" if 0 < v < 5e-4 else f"{100 * v:.1f} %"


def _num(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{1e3 * v:.1f} ms"


def _metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


#: captions of the summary's pictures, in words
CAPTIONS = {
    "stability": "Where the output changes: the reference segmentation, with the pixels whose "
                 "label differs in some MCA sample in red (or, for a classifier, the share of "
                 "each class's predictions that flip).",
    "noise_reach": "How far the noise reaches: significant bits per layer in network order, "
                   "the share of values that are pure noise, the max-pool windows that flip, "
                   "and the output labels that flip.",
    "sweep": "The threshold sweep: conv work skipped against the agreement lost, one point per "
             "setting (labels: nan_threshold); the ringed point is the recommendation.",
    "layers": "Share of each conv layer's output positions and MACs that the setting skips.",
    "slices": "Skips and quality per input slice or sample.",
}


def _summary_html(report: Mapping[str, Any], run_dir: Path) -> str:
    s = report["summary"]
    parts = [_p("Warning: ", m, ".", cls="warn") for m in s["mismatch"]]
    if s["busy"]:
        parts.append(_p("Warning: the machine was busy while timing (", s["busy"], "); the "
                        "speed figures are unreliable — rerun the calibration on a quiet "
                        "machine.", cls="warn"))
    items = "\n".join(f"<li><strong>{_e(question)}</strong> {_e(s['answers'][key])}</li>"
                      for key, question in QUESTIONS)
    parts.append(f'<ul class="verdicts">\n{items}\n</ul>')
    figures = [_img(run_dir, report["figures"][key], CAPTIONS[key])
               for key in ("stability", "noise_reach", "sweep") if key in report["figures"]]
    if figures:
        parts.append('<div class="figures">\n' + "\n".join(figures) + "\n</div>")
    if report["recommendation"] is not None:
        parts.append(_recommendation_html(report["recommendation"]))
    return "\n".join(parts)


def _stability_html(report: Mapping[str, Any], run_dir: Path) -> str:
    st = report["output_stability"]
    if st is None:
        return _p("The run has no samples yet.", cls="missing")
    what = "labels" if st["task"] == "segmentation" else "predictions"
    parts = [_p(verdict_line(st), f". Each of the {st['samples']} MCA samples' final {what} "
                "(argmax over the classes) against the unperturbed reference's.")]
    rows = [[i, _pct(f)] for i, f in enumerate(st["label_flip_fraction"])]
    parts.append(_table(["sample", f"{what} that differ"], rows))
    if st.get("per_class_dice_min"):
        parts.append(_table(["class", "lowest Dice against the reference's labels"],
                            [[n, _num(v)] for n, v in st["per_class_dice_min"].items()]))
    if st.get("per_class_flip_fraction"):
        parts.append(_table(["class", "predictions that flip"],
                            [[n, _pct(v)] for n, v in st["per_class_flip_fraction"].items()]))
    return "\n".join(parts)


def _options(options: Mapping[str, Any]) -> str:
    """``k=v, ...`` in :data:`OPTION_ORDER` (then the rest), floats in the shortest form."""
    keys = sorted(options, key=lambda k: (OPTION_ORDER.index(k) if k in OPTION_ORDER
                                          else len(OPTION_ORDER), k))
    return ", ".join(f"{k}={options[k]:g}" if isinstance(options[k], float)
                     else f"{k}={options[k]}" for k in keys)


def _against(loss_against: str | None) -> str:
    """What a calibration's loss was measured against, in words."""
    return "the ground-truth labels" if loss_against == "labels" else "the plain model"


def _recommendation_html(r: Mapping[str, Any]) -> str:
    metric, key = _metric_name(r["metric"]), r["metric"]
    items = [
        _cat("Skips ", _pct(r["skip"]["positions"]), " of the conv output positions (",
             _pct(r["skip"]["macs"]), " of the conv MACs)."),
        _cat("Speed against the plain model as given: ", _speed_words(r), " (plain ",
             _ms(r["seconds_plain"]), ", nanified ", _ms(r["seconds_nanified"]), ", medians)."),
        _cat(f"Agreement with the plain model: {metric} ", _num(r["agreement"][key]), "."),
        _cat(f"Loss of {metric} against {_against(r['loss_against'])}: ", _num(r["loss"]),
             f" ≤ tolerance {r['tolerance']:g}."),
    ]
    if r.get("speedup_channels_last_range"):
        items.insert(2, _cat("Against the plain model converted to channels-last layout (the "
                             "layout the NaN convolutions compute in, so what the skipping "
                             "alone gains): ", _ratio_text(r, "speedup_channels_last"), "."))
    if r["vs_labels"] is not None and r["plain_vs_labels"] is not None:
        items.append(_cat(f"Against the ground-truth labels: {metric} plain ",
                          _num(r["plain_vs_labels"][key]), ", nanified ",
                          _num(r["vs_labels"][key]), "."))
    saved = (_cat(" (written to ", _code(r["thresholds_file"]), ")")
             if r["thresholds_file"] else "")
    objective = ("skips the most conv MACs" if r["objective"] == "skip"
                 else "runs fastest")
    use = _p("Use ", _code(_options(r["thresholds"])), saved,
             f": of the settings within tolerance, it {objective} (objective ",
             _code(r["objective"]), ").")
    return (f'<div class="recommendation">\n<h3>Recommendation</h3>\n{use}\n{_ul(items)}\n'
            "</div>")


def _sigdigits_html(report: Mapping[str, Any], run_dir: Path) -> str:
    sig = report["sigdigits"]
    if sig is None:
        return _missing_html(report, "sigdigits")
    o = sig["options"]
    against = "the unperturbed run" if o["reference"] == "reference" else "the sample mean"
    parts = [_p(f"{str(o['method']).upper()}, {o['error']} error against {against}, "
                f"{o['n']} samples, probability {float(o['probability']):.2f}, confidence "
                f"{float(o['confidence']):.2f}. Noise: at most 1 significant bit.")]
    rows = [[_code(r["layer"]), r["dtype"], "×".join(map(str, r["shape"])),
             f"{r['mean_bits']:.2f}", _pct(r["noise_fraction"]), _pct(r["exact_fraction"]),
             _pct(r["nan_fraction"])] for r in sig["layers"]]
    parts.append(_details(f"Per layer, in network order ({len(rows)} rows)", _table(
        ["layer", "dtype", "shape", "mean bits", "noise (≤ 1 bit)", "exact", "NaN"], rows)))
    figs = sig["figures"]
    parts += [_img(run_dir, rel, _sigdigits_caption(rel)) for rel in figs["overview"]]
    if figs["layers"]:
        inner = "\n".join(_img(run_dir, rel, _sigdigits_caption(rel)) for rel in figs["layers"])
        parts.append(_details(f"Per-layer maps ({len(figs['layers'])})", inner))
    if not figs["overview"] and not figs["layers"]:
        parts.append(_p("No figures in ", _code(SIGDIGITS_FIGURES + "/"), ".", cls="missing"))
    return "\n".join(parts)


def _details(summary: str, body: str) -> str:
    """A collapsed block (long tables, many figures): ``summary`` shown, ``body`` on click."""
    return f"<details>\n<summary>{_e(summary)}</summary>\n{body}\n</details>"


def _sigdigits_caption(rel: str) -> str:
    """A caption in words for a figure of ``nanprobe sigdigits``."""
    name = Path(rel).stem
    if name == "distribution":
        return "Share of each layer's values by number of significant bits, in network order."
    if name.startswith("grid_"):
        return ("Significant bits of every layer's output on one input slice (one panel per "
                "layer, network order; darker: fewer bits survive the noise).")
    return (f"Significant bits of {name.split('_slice')[0].replace('__', '/')} on one input "
            "slice, channels aggregated.")


def _geometry(g: Mapping[str, Any]) -> str:
    if "kernel" not in g:
        return f"unsupported: {g.get('unsupported')}"
    return (f"k={'x'.join(map(str, g['kernel']))} s={'x'.join(map(str, g['stride']))} "
            f"p={'x'.join(map(str, g['padding']))} ({g.get('source')})")


def _audit_html(report: Mapping[str, Any], run_dir: Path) -> str:
    a = report["audit"]
    if a is None:
        return _missing_html(report, "audit")
    parts = [_p("Definition: ", a["definition"] or "n/a", f" ({a['samples']} samples).")]
    if a.get("verdict_text"):
        parts.insert(0, _p(a["verdict_text"], cls="recommendation"))
    rows = []
    for name, e in a["layers"].items():
        cal = e.get("calibrated") or {}
        rows.append([_code(name), _geometry(e["geometry"]), e["windows"], e["unstable"],
                     _pct(e["unstable_fraction"]), _num(cal.get("precision"), 3),
                     _num(cal.get("recall"), 3), _num(cal.get("f1"), 3)])
    parts.append(_table(["layer", "geometry", "windows", "unstable", "unstable %",
                         "flag precision", "flag recall", "flag F1"], rows))
    best = a["best"]
    if best is not None:
        parts.append(_p("Best-scoring tie setting: ", _code(
            f"tie_limit={best['tie_limit']}, tie_eps={best['tie_eps']:g}, "
            f"tie_rtol={best['tie_rtol']:g}"),
            f" — precision {_num(best['precision'], 3)}, recall {_num(best['recall'], 3)}, "
            f"F1 {_num(best['f1'], 3)} over all pooling layers ({a['selection']})."))
    if a["calibrated_pooling"] is not None:
        parts.append(_p("Pooling setting passed on to the calibration: ",
                        _code(_options(a["calibrated_pooling"])),
                        " (tie_limit=None: no NaN pooling)."
                        if a["calibrated_pooling"].get("tie_limit") is None else "."))
    else:
        parts.append(_p("No pooling setting was calibrated.", cls="missing"))
    parts += [_img(run_dir, rel, _audit_caption(rel)) for rel in a["figures"]]
    return "\n".join(parts)


def _audit_caption(rel: str) -> str:
    name = Path(rel).stem
    if name == "p_unstable_given_ties":
        return ("How often a pooling window flips, by how many of its entries tie with the "
                "maximum (per tie tolerance).")
    return (f"Where the pooling windows of {name.removeprefix('unstable-')} flip, on the input "
            "slice with the most flips.")


def _sweep_html(report: Mapping[str, Any], run_dir: Path) -> str:
    sw = report["sweep"]
    if sw is None:
        return _missing_html(report, "calibrate")
    metric, rec = sw["metric"], sw["recommended"]
    labels = any(s.get("vs_labels") for s in sw["settings"])
    against = "labels" if sw.get("loss_against") == "labels" else "plain"
    headers = ["#", "nan_threshold", "fill", f"{_metric_name(metric)} vs plain",
               f"loss vs {against}", "within tolerance", "positions skipped", "MACs skipped",
               *([f"{_metric_name(metric)} vs labels"] if labels else []),
               "speed-up vs plain (range)"]
    rows = []
    for i, s in enumerate(sw["settings"]):
        row = [f"{i} (recommended)" if i == rec else i, f"{s['nan_threshold']:g}", s["fill"],
               _num(s["agreement"][metric]), _num(s["loss"]),
               "yes" if s["within_tolerance"] else "no", _pct(s["skip"]["positions"]),
               _pct(s["skip"]["macs"])]
        if labels:
            row.append(_num((s.get("vs_labels") or {}).get(metric)))
        rows.append([*row, _speed_cell(s)])
    plain = (sw["plain"] or {}).get("vs_labels")
    pool = _options(sw["pooling"] or {})
    if against == "labels":
        loss = (f"the loss is the drop of {_metric_name(metric)} against the ground-truth "
                "labels (plain minus nanified; negative: the nanified model matches the labels "
                "better)")
    else:
        loss = (f"the loss is 1 minus the {_metric_name(metric)} of the nanified model against "
                "the plain model's labels (no ground truth used)")
    parts = [_p(f"Task {sw['task']}; {loss}; tolerance {sw['tolerance']:g}; pooling ",
                _code(pool), "."),
             _table(headers, rows, ["recommended" if i == rec else None
                                    for i in range(len(rows))])]
    if plain is not None:
        parts.append(_p(f"Plain model against the labels: {_metric_name(metric)} "
                        f"{_num(plain.get(metric))}."))
    if sw["class_names"]:
        parts.append(_p("Classes: ", ", ".join(map(str, sw["class_names"])), "."))
    if "sweep" in report["figures"]:
        parts.append(_p("The sweep's figure (work skipped against agreement lost) is in the ",
                        Html('<a href="#summary">summary</a>'), "."))
    return "\n".join(parts)


def _focus_html(focus: Mapping[str, Any]) -> str:
    return _p("Setting ", _code(_setting_name(focus)), ".")


def _layers_html(report: Mapping[str, Any], run_dir: Path) -> str:
    lay = report["layers"]
    if lay is None:
        return (_missing_html(report, "calibrate") if report["sweep"] is None
                else _p("The calibration has no settings.", cls="missing"))
    rows = [[_code(r["layer"]), f"{r['positions']:,}", _pct(r["skipped"]),
             _pct(r["macs_skipped"])] for r in lay["rows"]]
    classes = ["total" if r["layer"] == "all convs" else None for r in lay["rows"]]
    parts = [_focus_html(lay),
             _details(f"Per conv layer, in network order ({len(rows) - 1} layers)",
                      _table(["layer", "output positions", "positions skipped", "MACs skipped"],
                             rows, classes))]
    if "layers" in report["figures"]:
        parts.append(_img(run_dir, report["figures"]["layers"], "Skips per conv layer"))
    return "\n".join(parts)


def _slices_html(report: Mapping[str, Any], run_dir: Path) -> str:
    sl = report["slices"]
    if sl is None:
        return (_missing_html(report, "calibrate") if report["sweep"] is None
                else _p("The calibration has no settings.", cls="missing"))
    name = ITEM_NAMES.get(report["sweep"]["metric"], report["sweep"]["metric"])
    headers = ["input index", "positions skipped", "MACs skipped", f"{name} vs plain"]
    if sl["labels"]:
        headers += [f"{name} plain vs labels", f"{name} nanified vs labels"]
    rows = []
    for r in sl["rows"]:
        row = [r["index"], _pct(r["skipped"]), _pct(r["macs_skipped"]), _num(r["agreement"])]
        if sl["labels"]:
            row += [_num(r["vs_labels_plain"]), _num(r["vs_labels_nanified"])]
        rows.append(row)
    parts = [_focus_html(sl)]
    if "slices" in report["figures"]:
        parts.append(_img(run_dir, report["figures"]["slices"], "Skips and quality per item"))
    parts.append(_details(f"Per item ({len(rows)})", _table(headers, rows)))
    return "\n".join(parts)


def _speed_cell(s: Mapping[str, Any], key: str = "speedup") -> str:
    """``0.94× (0.90–0.97×)``; older calibrations without a range: the median alone."""
    if s.get(key) is None:
        return "–"
    spread = s.get(f"{key}_range")
    return f"{s[key]:.2f}×" + (f" ({spread[0]:.2f}–{spread[1]:.2f}×)" if spread else "")


def _speed_html(report: Mapping[str, Any], run_dir: Path) -> str:
    sp = report["speed"]
    if sp is None:
        return _missing_html(report, "calibrate")
    rec = report["sweep"]["recommended"]
    rows = [[f"{i} (recommended)" if i == rec else i, f"{s['nan_threshold']:g}", s["fill"],
             _ms(s.get("seconds_plain") or sp["plain_seconds"]), _ms(s["seconds"]),
             _speed_cell(s), _speed_cell(s, "speedup_channels_last")]
            for i, s in enumerate(sp["settings"])]
    timing = sp.get("timing") or {}
    how = [f"{sp['batch_size']} items per forward call" if sp.get("batch_size") else None,
           f"{sp['threads']} threads" if sp.get("threads") else None, sp.get("allocator")]
    text = [_p("Wall-clock of one forward pass over the calibration inputs (",
               "; ".join(h for h in how if h), "). ",
               f"Each setting is timed in {timing.get('repeats', 'several')} rounds alternating "
               "with the plain model as given, so both see the same machine state; the "
               "speed-up is plain / nanified, its median and, in brackets, its range over the "
               "rounds. Faster only when the whole range is above 1×, slower when it is below. "
               "The last column times the recommended setting against the plain model "
               "converted to channels-last layout, the layout the NaN convolutions compute "
               "in: what the skipping alone gains.")]
    loads = timing.get("load_average_1min")
    if loads:
        text.append(_p(f"1-minute load average while timing: {loads[0]:.1f} → {loads[1]:.1f} "
                       f"on {timing.get('cores')} cores."))
    if timing.get("busy"):
        text.append(_p("Warning: the machine was busy while timing (", timing["busy"], "); "
                       "these figures are unreliable.", cls="warn"))
    return "\n".join([*text, _table(
        ["#", "nan_threshold", "fill", "plain", "nanified", "speed-up vs plain (range)",
         "vs plain channels-last (range)"], rows,
        ["recommended" if i == rec else None for i in range(len(rows))])])


def _kv_table(data: Mapping[str, Any]) -> str:
    """Key/value rows; nested values as compact JSON."""
    def show(v: Any) -> Any:
        if isinstance(v, dict | list):
            return _code(json.dumps(v, sort_keys=True))
        return "n/a" if v is None else v

    return _table(["field", "value"], [[k, show(v)] for k, v in sorted(data.items())])


def _provenance_html(report: Mapping[str, Any], run_dir: Path) -> str:
    prov = report["provenance"]
    manifest = prov["run"]
    spec = manifest.get("spec", {})
    inp = manifest.get("input", {})
    key = {"run directory": report["run"], "model": spec.get("model"),
           "checkpoint": spec.get("checkpoint"), "weights sha256": manifest.get("weights_sha256"),
           "input": inp.get("input", spec.get("input")), "input sha256": inp.get("input_sha256"),
           "selection": inp.get("selection"), "view": inp.get("view"),
           "backend": spec.get("backend"), "samples": spec.get("samples"),
           "seed": spec.get("seed"), "nanprobe (run)": manifest.get("nanprobe_version"),
           "torch (run)": manifest.get("torch_version"), "run created": manifest.get("created")}
    commands = list(prov["commands"])
    cal = prov["calibration"] or {}
    if cal.get("command"):
        commands.append(cal["command"])
    parts = ["<h3>Run</h3>", _kv_table(key),
             "<h3>Command lines</h3>",
             "<pre>" + "\n".join(_e(c) for c in commands) + "</pre>"]
    for title, step, data in (("Significant digits", "sigdigits", prov["sigdigits"]),
                              ("Pooling audit", "audit", prov["audit"]),
                              ("Calibration", "calibrate", prov["calibration"])):
        parts.append(f"<h3>{_e(title)}</h3>")
        parts.append(_missing_html(report, step) if data is None else _kv_table(data))
    parts += ["<h3>This report</h3>", _kv_table(prov["report"]),
              "<details>\n<summary>Full run manifest (run.json)</summary>\n"
              + _kv_table(manifest) + "\n</details>"]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# helpers


def _ratio(num: Any, den: Any) -> float | None:
    return float(num) / float(den) if den else None


def _rel(path: Path, run_dir: Path) -> str:
    return path.relative_to(run_dir).as_posix()


