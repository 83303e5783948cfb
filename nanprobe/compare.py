"""How far two MCA runs of the same model and input agree (e.g. in-process backend vs Verrou).

:func:`compare_runs` takes run B as the truth and reports

- per max-pooling layer: precision / recall / F1 of run A's unstable windows against run B's
  (see :mod:`nanprobe.audit` for "unstable"), both unstable fractions, and how often the two
  references pick the same argmax;
- per capture key: Pearson correlation and mean absolute difference of the significant-bit maps,
  read from each run's ``sigdigits.h5`` (``<key>/bits``, written by ``nanprobe sigdigits``;
  elements NaN in either map are left out). When either run
  lacks it and both runs are small (``estimate_max_bytes`` on disk), a simple estimate
  ``clip(-log2(std / |mean|), 0, 24)`` over the samples is used instead (std 0: 24 bits);
  otherwise the entry is null with a note to run ``nanprobe sigdigits`` first.

Runs of different models (name, weights, nanify config), inputs (content digest, shape) or
selections (slices, view) are refused with a one-line ValueError.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from . import __version__
from .audit import pool_groups, scores, scores_from_counts, unstable_windows
from .jsonio import json_safe, write_json
from .run import Run

COMPARE_FORMAT = "nanprobe-compare/1"
SIGDIGITS_FILE = "sigdigits.h5"
MAX_BITS = 24.0  # float32 significand


def _file_digest(path: str | None) -> str | None:
    p = Path(path) if path else None
    return hashlib.sha256(p.read_bytes()).hexdigest() if p is not None and p.is_file() else None


def run_identity(run: Run) -> dict[str, Any]:
    """What must agree between two comparable runs: model, weights, nanify, input, selection."""
    spec, inp = run.spec, run.manifest.get("input", {})
    return {
        "model": spec.get("model"),
        "weights_sha256": run.manifest.get("weights_sha256"),
        "nanify": Path(spec["nanify"]).name if spec.get("nanify") else None,
        "nanify_sha256": _file_digest(spec.get("nanify")),
        "input_sha256": inp.get("input_sha256"),
        "input_shape": inp.get("input_shape"),
        "selection": inp.get("selection"),
        "view": inp.get("view"),
    }


def check_comparable(a: Run, b: Run) -> None:
    """ValueError (one line) naming the fields in which the two runs' identities differ."""
    ia, ib = run_identity(a), run_identity(b)
    # a nanify file missing on this machine cannot be hashed: then its name has to do
    diff = [f"{k} ({_short(ia[k])} vs {_short(ib[k])})" for k in ia if ia[k] != ib[k]
            and not (k == "nanify_sha256" and None in (ia[k], ib[k]))]
    if diff:
        raise ValueError(f"runs {a.path} and {b.path} are not of the same model and input: "
                         f"they differ in {', '.join(diff)}; compare runs of the same model, "
                         "input and --slices")


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 24 else s[:12] + "..."


def _datasets(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    found: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda k, o: found.__setitem__(k, (o.shape, o.dtype))
                      if isinstance(o, h5py.Dataset) else None)
    return found


def sigbits_estimate(run: Run, key: str) -> np.ndarray:
    """Per-element significant bits of ``key`` over the run's samples (float32, shape of key).

    ``clip(-log2(std / |mean|), 0, 24)`` with the sample std (ddof=1 when N > 1); elements whose
    samples all agree get 24; NaN where the samples hold NaN/inf. Samples are read one at a time.
    """
    n = len(run.sample_paths)
    if n == 0:
        raise ValueError(f"{run.path} has no complete samples")
    total = sq = None
    for i in range(n):
        x = run.sample(i, key).astype(np.float64)
        total = x if total is None else total + x
        sq = x * x if sq is None else sq + x * x
    mean = total / n
    var = np.maximum(sq / n - mean * mean, 0.0) * (n / max(n - 1, 1))
    std = np.sqrt(var)
    with np.errstate(divide="ignore", invalid="ignore"):
        bits = -np.log2(std / np.abs(mean))
    bits = np.where(std == 0, MAX_BITS, np.clip(bits, 0.0, MAX_BITS))
    bits[~np.isfinite(mean)] = np.nan
    return bits.astype(np.float32)


class MapAgreement:
    """Streaming Pearson correlation and mean |a - b| of two maps, fed chunk by chunk.

    Elements NaN/inf in either map are left out; sums are float64 (exact enough for bit counts).
    """

    def __init__(self) -> None:
        self.n = 0
        self.sums = np.zeros(6)  # a, b, a*a, b*b, a*b, |a-b|

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        ok = np.isfinite(a64) & np.isfinite(b64)
        a64, b64 = a64[ok], b64[ok]
        self.n += a64.size
        self.sums += [a64.sum(), b64.sum(), a64 @ a64, b64 @ b64, a64 @ b64,
                      np.abs(a64 - b64).sum()]

    def result(self) -> dict[str, Any]:
        n = self.n
        sa, sb, saa, sbb, sab, sad = self.sums
        corr = None
        if n > 1:
            va, vb = n * saa - sa * sa, n * sbb - sb * sb
            if va > 1e-12 * n * n and vb > 1e-12 * n * n:
                corr = float(np.clip((n * sab - sa * sb) / np.sqrt(va * vb), -1.0, 1.0))
        return {"elements": n, "correlation": corr,
                "mean_abs_diff": float(sad / n) if n else None,
                "mean_a": float(sa / n) if n else None, "mean_b": float(sb / n) if n else None}


def map_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Pearson correlation and mean |a - b| over the elements finite in both maps."""
    acc = MapAgreement()
    acc.add(a, b)
    return acc.result()


def _run_bytes(run: Run) -> int:
    return sum(p.stat().st_size for p in [run.reference_path, *run.sample_paths])


def sigdigits_maps(path: Path) -> dict[str, str]:
    """Capture key -> dataset of its significant-bit map in a ``sigdigits.h5`` file.

    Reads the layout of :mod:`nanprobe.sigdigits` (``<key>/bits``) and, as a fallback, one
    float dataset per capture key (``<key>``).
    """
    found: dict[str, str] = {}
    for name, (_, dtype) in _datasets(path).items():
        if not np.issubdtype(dtype, np.floating):
            continue
        key = name.removesuffix("/bits") if name.endswith("/bits") else name
        if name.endswith("/bits") or key not in found:
            found[key] = name
    return found


def _sigbit_agreement(a: Run, b: Run, estimate_max_bytes: float) -> tuple[
        str | None, str | None, Iterator[tuple[str, dict[str, Any]]] | None]:
    """(source, note, iterator of (key, :meth:`MapAgreement.result`)) for the bit maps."""
    fa, fb = a.path / SIGDIGITS_FILE, b.path / SIGDIGITS_FILE
    usable = {run.path: f.is_file() and run.derived_from_this(f) for run, f in ((a, fa), (b, fb))}
    if all(usable.values()):
        ma, mb = sigdigits_maps(fa), sigdigits_maps(fb)

        def read() -> Iterator[tuple[str, dict[str, Any]]]:
            with h5py.File(fa, "r") as ha, h5py.File(fb, "r") as hb:
                for key in (k for k in ma if k in mb):
                    da, db = ha[ma[key]], hb[mb[key]]
                    if da.shape != db.shape:
                        continue
                    acc = MapAgreement()
                    for i in range(da.shape[0] if da.ndim else 1):  # one slice at a time
                        sel = i if da.ndim else ()
                        acc.add(da[sel], db[sel])
                    yield key, acc.result()

        return SIGDIGITS_FILE, None, read()
    lacking = [run for run, f in ((a, fa), (b, fb)) if not usable[run.path]]
    why = "; ".join(f"{run.path} has {'a stale' if (run.path / SIGDIGITS_FILE).is_file() else 'no'}"
                    f" {SIGDIGITS_FILE}" for run in lacking)
    fix = " && ".join(f"nanprobe sigdigits {shlex.quote(str(run.path))}" for run in lacking)
    size = _run_bytes(a) + _run_bytes(b)
    if size > estimate_max_bytes:
        return None, (f"{why}, and the runs are too large ({size / 1e6:.0f} MB) for a quick "
                      f"estimate; run `{fix}` first"), None
    da, db = _datasets(a.reference_path), _datasets(b.reference_path)
    keys = [k for k in da if k in db and da[k][0] == db[k][0]
            and np.issubdtype(da[k][1], np.floating)]

    def estimate() -> Iterator[tuple[str, dict[str, Any]]]:
        for k in keys:
            yield k, map_agreement(sigbits_estimate(a, k), sigbits_estimate(b, k))

    note = (f"{why}: simple estimate clip(-log2(std/|mean|), 0, 24) over the samples; for "
            f"the real maps run `{fix}` first")
    return "estimate", note, estimate()


def compare_runs(
    run_a: str | Path,
    run_b: str | Path,
    *,
    sigdigits: bool = True,
    estimate_max_bytes: float = 256e6,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Agreement of run A with run B (the truth) on unstable pooling and significant bits.

    ``sigdigits=False`` skips the significant-bit maps. ``out``: also write the result as JSON
    there (atomically). Returns a JSON-safe dict: ``pooling`` (per layer and ``"all"``),
    ``sigbits`` (per capture key, or null with a ``sigbits_note``), ``samples``, ``provenance``.
    """
    a, b = Run(run_a), Run(run_b)
    check_comparable(a, b)
    groups_b = set(pool_groups(b))
    common = [g for g in pool_groups(a) if g in groups_b]
    pooling: dict[str, Any] = {}
    tp = fp = fn = 0
    for g in common:
        ua, _ = unstable_windows(a, g)
        ub, _ = unstable_windows(b, g)
        if ua.shape != ub.shape:
            raise ValueError(f"layer {g}: indices shaped {ua.shape} in {a.path} but {ub.shape} "
                             f"in {b.path}")
        key = f"layers/{g}/indices"
        ref_agree = float(np.mean(a.reference(key) == b.reference(key)))
        sc = scores(torch.from_numpy(ua), torch.from_numpy(ub))
        tp, fp, fn = tp + sc["tp"], fp + sc["fp"], fn + sc["fn"]
        pooling[g] = {**sc, "windows": int(ua.size),
                      "unstable_fraction_a": float(ua.mean()),
                      "unstable_fraction_b": float(ub.mean()),
                      "reference_index_agreement": ref_agree}
    if common:
        pooling["all"] = scores_from_counts(tp, fp, fn)
    result: dict[str, Any] = {
        "format": COMPARE_FORMAT,
        "run_a": str(a.path.resolve()), "run_b": str(b.path.resolve()),
        "truth": "run_b",
        "samples": {"a": len(a.sample_paths), "b": len(b.sample_paths)},
        "backends": {"a": a.spec.get("backend"), "b": b.spec.get("backend")},
        "pooling": pooling,
        "pooling_note": None if common else "the runs share no captured max-pooling layer",
        "sigbits": None, "sigbits_source": None, "sigbits_note": None,
        "provenance": {
            "nanprobe_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(),
            "identity": run_identity(a),
            "manifest_a": {k: v for k, v in a.manifest.items() if k != "layers"},
            "manifest_b": {k: v for k, v in b.manifest.items() if k != "layers"},
        },
    }
    if sigdigits:
        source, note, agreements = _sigbit_agreement(a, b, estimate_max_bytes)
        result["sigbits_source"], result["sigbits_note"] = source, note
        if agreements is not None:
            result["sigbits"] = dict(agreements)
    if out is not None:
        write_json(out, result)
    return json_safe(result)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Plain-text lines summarising a :func:`compare_runs` result (for the CLI)."""
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lines = [f"run A: {result['run_a']} ({result['samples']['a']} samples), run B (truth): "
             f"{result['run_b']} ({result['samples']['b']} samples)"]
    for name, e in result["pooling"].items():
        lines.append(f"pooling {name}: unstable windows P={fmt(e['precision'])} "
                     f"R={fmt(e['recall'])} F1={fmt(e['f1'])}")
    if result.get("pooling_note"):
        lines.append(result["pooling_note"])
    for key, e in (result.get("sigbits") or {}).items():
        lines.append(f"sigbits {key}: corr={fmt(e['correlation'])} "
                     f"mean|diff|={fmt(e['mean_abs_diff'])} bits")
    if result.get("sigbits_note"):
        lines.append(result["sigbits_note"])
    return lines
