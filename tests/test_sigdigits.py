"""Significant-digit maps: agreement with ``significantdigits``, edge cases, memory, figures."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import significantdigits as sd
from PIL import Image
from run_files import write_run

from nanprobe.plots import LAYER_FIGSIZE, grid_figsize, plot_layer, plot_sigdigits
from nanprobe.run import RunSpec, mca_run
from nanprobe.sigdigits import (
    compute_sigdigits,
    exact_bits,
    float_keys,
    significant_bits,
)

KEY = "layers/conv/output"


def make_run(path: Path, samples: np.ndarray, reference: np.ndarray,
             extra: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """A run directory in the capture layout: ``samples`` (N, S, ...) of ``KEY``, an int
    ``indices`` dataset, and ``extra`` keys -> (samples, reference)."""
    datasets = {KEY: (samples, reference), **(extra or {})}
    n = samples.shape[0]
    idx = np.arange(int(np.prod(reference.shape))).reshape(reference.shape).astype(np.int64)
    captures = [{**{key: (ref if i < 0 else stack[i]) for key, (stack, ref) in datasets.items()},
                 "layers/pool/indices": idx} for i in range(-1, n)]
    return write_run(path, captures, layers=["conv"], compress=True)


def noisy(rng: np.random.Generator, n: int, shape: tuple[int, ...],
          dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """A reference away from 0 and n samples with per-element relative noise 2^-20..2^-2."""
    ref = (rng.uniform(0.5, 2.0, shape) * rng.choice([-1, 1], shape)).astype(dtype)
    scale = np.exp2(-rng.uniform(2, 20, shape))
    samples = (ref * (1 + scale * rng.standard_normal((n, *shape)))).astype(dtype)
    return samples, ref


def library(samples: np.ndarray, ref: np.ndarray, method: str, error: str = "relative"):
    return np.maximum(sd.significant_digits(samples, reference=ref, axis=0, method=method,
                                            error=error), 0).astype(np.float32)


@pytest.mark.parametrize("method", ["cnh", "general"])
def test_significant_bits_match_library(method: str) -> None:
    samples, ref = noisy(np.random.default_rng(1), 8, (3, 5, 7))
    bits, exact, nan = significant_bits(samples, ref, method=method)
    np.testing.assert_allclose(bits, library(samples, ref, method), rtol=1e-6)
    assert bits.dtype == np.float32 and bits.shape == ref.shape
    assert not exact.any() and not nan.any()


@pytest.mark.parametrize("method", ["cnh", "general"])
@pytest.mark.parametrize("reference", ["reference", "mean"])
def test_compute_matches_library_on_whole_stack(tmp_path: Path, method: str,
                                                reference: str) -> None:
    samples, ref = noisy(np.random.default_rng(2), 5, (3, 4, 6, 7))
    run = make_run(tmp_path / "run", samples, ref)
    # tiny blocks: many blocks per slice, so block boundaries are exercised
    out = compute_sigdigits(run, method=method, reference=reference, max_block_bytes=500)
    assert out == run / "sigdigits.h5"
    expected_ref = ref if reference == "reference" else samples.mean(0, dtype=np.float64)
    expected = library(samples, expected_ref.astype(np.float32), method)
    with h5py.File(out, "r") as h5:
        np.testing.assert_allclose(h5[KEY]["bits"][()], expected, rtol=1e-6)
        assert h5[KEY]["bits"].dtype == np.float32
        assert json.loads(h5.attrs["keys"]) == [KEY]  # the int64 indices are skipped
        assert (h5.attrs["method"], h5.attrs["reference"], h5.attrs["n"]) == (method,
                                                                               reference, 5)
        assert json.loads(h5.attrs["spec"])["model"] == "synthetic"
        assert int(h5[KEY].attrs["elements"]) == ref.size
        assert int(np.sum(h5[KEY].attrs["hist"])) == ref.size
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("method", ["cnh", "general"])
def test_identical_samples_are_flagged_exact(method: str) -> None:
    samples, ref = noisy(np.random.default_rng(3), 6, (10,))
    samples[:, :4] = ref[:4]
    bits, exact, nan = significant_bits(samples, ref, method=method)
    assert exact.tolist() == [True] * 4 + [False] * 6
    cap = exact_bits(6, "<f4", method)
    assert np.all(bits[:4] == np.float32(cap)) and np.isfinite(cap) and cap <= 23
    np.testing.assert_allclose(bits[4:], library(samples[:, 4:], ref[4:], method), rtol=1e-6)
    # the library's own value for identical samples is that cap
    np.testing.assert_allclose(library(samples[:, :4], ref[:4], method), cap, rtol=1e-6)


def test_zero_reference_uses_absolute_error() -> None:
    rng = np.random.default_rng(4)
    samples, ref = noisy(rng, 6, (6,))
    ref[:3] = 0
    samples[:, :2] = (rng.standard_normal((6, 2)) * 1e-3).astype(np.float32)
    samples[:, 2] = 0  # zero reference, all samples exactly zero
    bits, exact, nan = significant_bits(samples, ref)
    np.testing.assert_allclose(bits[:2], library(samples[:, :2], ref[:2], "cnh", "absolute"),
                               rtol=1e-6)
    np.testing.assert_allclose(bits[3:], library(samples[:, 3:], ref[3:], "cnh"), rtol=1e-6)
    assert exact.tolist() == [False, False, True, False, False, False]
    assert np.isfinite(bits).all() and not nan.any()


@pytest.mark.parametrize("method", ["cnh", "general"])
def test_nan_sample_is_masked_not_zero(method: str) -> None:
    samples, ref = noisy(np.random.default_rng(5), 6, (2, 3))
    samples[4, 0, 1] = np.nan
    ref[1, 2] = np.nan
    bits, exact, nan = significant_bits(samples, ref, method=method)
    assert np.argwhere(nan).tolist() == [[0, 1], [1, 2]]
    assert np.isnan(bits[nan]).all() and np.isfinite(bits[~nan]).all()
    assert not exact.any()


def test_float64_reference_is_cast_to_sample_dtype() -> None:
    samples = np.ones((6, 4), dtype=np.float32)
    bits, exact, _ = significant_bits(samples, np.ones(4, dtype=np.float64))
    assert exact.all() and np.all(bits == np.float32(exact_bits(6, "<f4", "cnh")))
    assert bits.max() < 24  # a float64 reference would lift the library's cap to ~50 bits


def test_peak_memory_stays_within_twice_the_layer_stack(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    samples, ref = noisy(rng, 10, (1, 16, 64, 64))
    dead = rng.random(ref.shape) < 0.5  # ReLU-like zeros: the absolute-error path too
    ref[dead] = 0
    samples[:, dead] *= rng.random((10, int(dead.sum()))) < 0.5
    run = make_run(tmp_path / "run", samples, ref)
    stack_bytes = samples.nbytes
    del samples, ref, dead
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        compute_sigdigits(run)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 2 * stack_bytes, f"peak {peak / 1e6:.1f} MB > 2 x {stack_bytes / 1e6:.1f} MB"


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_figures_are_valid_pngs_of_the_expected_size(tmp_path: Path) -> None:
    samples, ref = noisy(np.random.default_rng(7), 4, (2, 3, 20, 24))
    samples[1, 0, :, 5:9, 5:9] = np.nan  # a NaN patch in every channel of slice 0
    small_samples, small_ref = noisy(np.random.default_rng(8), 4, (2, 3, 5, 6))
    run = make_run(tmp_path / "run", samples, ref,
                   extra={"final": (small_samples[:, :, 0, 0], small_ref[:, 0, 0])})
    out = compute_sigdigits(run)
    paths = plot_sigdigits(out, tmp_path / "figs", slice_index=0, aggregate="median",
                           dpi=50)
    names = [p.relative_to(tmp_path / "figs").as_posix() for p in paths]
    assert names == ["grid_slice0_median.png", "distribution.png",
                     "layers/conv__output_slice0_median.png"]  # final (S, K) has no map
    for p in paths:
        _png_size(p)
        with Image.open(p) as im:
            im.verify()
    for path, inches in [(paths[0], grid_figsize(1)), (paths[2], LAYER_FIGSIZE)]:
        size = np.array(_png_size(path))
        assert np.abs(size - np.array(inches) * 50).max() <= 1, (path, size)  # Agg truncates
    with Image.open(paths[2]) as im:  # the NaN patch is drawn in red
        rgb = np.asarray(im.convert("RGB")).astype(int)
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
    assert red.sum() > 20
    with h5py.File(out, "r") as h5, pytest.raises(ValueError, match="out of range"):
        plot_layer(h5, KEY, tmp_path / "x.png", slice_index=5)


def test_failed_computation_leaves_no_output(tmp_path: Path) -> None:
    samples, ref = noisy(np.random.default_rng(9), 3, (2, 2, 4, 4))
    run = make_run(tmp_path / "run", samples, ref)
    with h5py.File(run / "samples" / "sample-0002.h5", "a") as h5:
        del h5[KEY]  # a corrupt sample
    with pytest.raises(ValueError, match="sample-0002.h5: dataset layers/conv/output is missing"):
        compute_sigdigits(run)  # refused before any output is written
    assert sorted(p.name for p in run.iterdir()) == ["reference.h5", "run.json", "samples"]


def test_bad_options_and_incomplete_runs_are_refused(tmp_path: Path) -> None:
    samples, ref = noisy(np.random.default_rng(10), 3, (2, 2, 4, 4))
    run = make_run(tmp_path / "run", samples, ref)
    for kwargs, match in [({"method": "exact"}, "method"), ({"reference": "x"}, "reference"),
                          ({"probability": 1.0}, "probability"), ({"keys": ["nope*"]}, "nope")]:
        with pytest.raises(ValueError, match=match):
            compute_sigdigits(run, **kwargs)
    (run / "samples" / "sample-0002.h5").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        compute_sigdigits(run)
    out = compute_sigdigits(run, allow_incomplete=True, keys=["conv/*"])
    with h5py.File(out, "r") as h5:
        assert h5.attrs["n"] == 2


def test_mnist_run_end_to_end(tmp_path: Path) -> None:
    run = mca_run(RunSpec(model="mnist", input="mnist", slices="0:4", samples=4),
                  tmp_path / "run")
    with h5py.File(run.reference_path, "r") as h5:
        order = float_keys(h5)
    out = compute_sigdigits(run.path, method="general")
    with h5py.File(out, "r") as h5:
        keys = json.loads(h5.attrs["keys"])
        assert keys == order and keys[-1] == "final"
        assert not any(k.endswith("indices") for k in keys)
        for key in keys:
            bits = h5[key]["bits"][()]
            assert bits.shape == run.reference(key).shape
            assert np.nanmin(bits) >= 0 and np.nanmax(bits) <= 23
        assert h5.attrs["probability"] < 0.95  # General: set by n = 4 and the confidence
    paths = plot_sigdigits(out, tmp_path / "figs", per_layer=False)
    assert [p.name for p in paths] == ["grid_slice0_min.png", "distribution.png"]
