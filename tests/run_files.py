"""Run directories in ``mca-run``'s exact format for tests that plant their own data (models that
cannot be loaded), and for rewriting a real run's identity consistently in all its files."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from nanprobe import __version__
from nanprobe.run import Run, sample_path, sample_seed

BACKEND = {"name": "inprocess", "mode": "rr", "precision": 24}


def write_run(path: Path, captures: Sequence[Mapping[str, np.ndarray]], *, layers: list[str],
              input_sha256: str = "abc", weights_sha256: str = "w0", seed: int = 0,
              compress: bool = False) -> Path:
    """A run directory holding ``captures[0]`` as the reference and the rest as samples (each a
    mapping capture key -> array (S, ...)), with ``run.json`` and the files' provenance
    attributes exactly as ``mca_run`` writes them, so that the run verifies."""
    (path / "samples").mkdir(parents=True)
    first = captures[0]
    items = next(iter(first.values())).shape[0]
    spec = {"model": "synthetic", "input": "synthetic", "samples": len(captures) - 1,
            "seed": seed, "backend": BACKEND, "checkpoint": None, "view": None,
            "slices": None, "layers": None, "nanify": None, "trust": False, "batch_size": 4}
    inp = {"input": "synthetic", "input_sha256": input_sha256,
           "input_shape": [items, 1, 1, 1], "selection": list(range(items)), "view": None}
    manifest = {"format": "nanprobe-run/1", "spec": spec, "layers": layers, "input": inp,
                "weights_sha256": weights_sha256, "precision": "float32",
                "datasets": {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                             for k, v in first.items()},
                "nanprobe_version": __version__, "torch_version": str(torch.__version__),
                "created": datetime.now(timezone.utc).isoformat()}
    (path / "run.json").write_text(json.dumps(manifest))
    for i, data in enumerate(captures):
        sample = i - 1
        with h5py.File(sample_path(path, sample), "w") as h5:
            for key, arr in data.items():
                opts = (dict(chunks=(1, *arr.shape[1:]), compression="gzip",
                             compression_opts=1, shuffle=True)
                        if compress and arr.ndim > 1 else {})
                h5.create_dataset(key, data=arr, **opts)
            h5.attrs.update(attributes(manifest, sample))
    return path


def attributes(manifest: Mapping[str, Any], sample: int) -> dict[str, Any]:
    """The provenance attributes ``mca_run`` gives sample ``sample`` (-1: reference)."""
    spec = manifest["spec"]
    now = datetime.now(timezone.utc).isoformat()
    return {"nanprobe_version": manifest["nanprobe_version"],
            "torch_version": str(manifest["torch_version"]), "model": spec["model"],
            "checkpoint": "", "weights_sha256": manifest["weights_sha256"], "nanify": "",
            "sample": sample, "kind": "reference" if sample < 0 else "sample",
            "seed": sample_seed(spec["seed"], sample),
            "backend": json.dumps(spec["backend"], sort_keys=True), "backend_provenance": "{}",
            "input_provenance": json.dumps(manifest["input"], sort_keys=True),
            "layers": json.dumps(manifest["layers"]), "precision": manifest["precision"],
            "started": now, "finished": now}


def retag(run_dir: Path, **spec_changes: Any) -> None:
    """Change spec entries (``model``, ``input``) of a real run in ``run.json`` and in every
    capture file alike, as if the run had been made that way; its sigdigits.h5 and audit.json
    are re-stamped with the new run digest (as if computed from it)."""
    manifest = json.loads((run_dir / "run.json").read_text())
    manifest["spec"].update(spec_changes)
    if "input" in spec_changes:
        manifest["input"]["input"] = spec_changes["input"]
    (run_dir / "run.json").write_text(json.dumps(manifest))
    for path in [run_dir / "reference.h5", *sorted((run_dir / "samples").glob("*.h5"))]:
        with h5py.File(path, "r+") as h5:
            if "model" in spec_changes:
                h5.attrs["model"] = spec_changes["model"]
            if "input" in spec_changes:
                prov = json.loads(h5.attrs["input_provenance"])
                prov["input"] = spec_changes["input"]
                h5.attrs["input_provenance"] = json.dumps(prov, sort_keys=True)
    digest = Run(run_dir).digest
    if (run_dir / "sigdigits.h5").exists():
        with h5py.File(run_dir / "sigdigits.h5", "r+") as h5:
            h5.attrs["run_digest"] = digest
    if (run_dir / "audit.json").exists():
        audit = json.loads((run_dir / "audit.json").read_text())
        audit["run_digest"] = digest
        if "calibrated_pooling" in audit:
            audit["calibrated_pooling"]["provenance"]["run_digest"] = digest
        (run_dir / "audit.json").write_text(json.dumps(audit))


def tied_segmenter():
    """A two-class "segmenter" whose class logits are computed identically: every label is an
    exact tie that MCA's independent rounding of the two channels breaks at random (a model
    built to be unstable, for output-stability tests)."""
    from torch import nn

    conv = nn.Conv2d(1, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight[1] = conv.weight[0] = torch.linspace(-1.0, 1.0, 9).reshape(1, 3, 3) / 3
        conv.bias.fill_(0.1)
    return nn.Sequential(conv)
