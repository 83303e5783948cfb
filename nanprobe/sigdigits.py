"""Significant-digit maps of an MCA run: how many bits of each captured value survive noise.

For every floating-point dataset of the capture files (``layers/<module>/<field>``, ``final``)
and every element, the N samples of a run are compared with a reference of the same shape,
the unperturbed reference run (default) or the sample mean, using the ``significantdigits``
package (Sohier et al. 2021): method CNH (centred normality hypothesis, default) or General,
relative error (absolute where the reference is 0). Layers are read and processed in blocks
of slices/channels, so peak memory stays well below one layer's sample stack.

Output ``RUN_DIR/sigdigits.h5`` (written to a temporary name, then renamed)::

    /<key>/bits    (S, ...) float32  significant bits, >= 0; NaN where ``nan``
    /<key>/exact   (S, ...) bool     every sample equals the reference (bits = the cap)
    /<key>/nan     (S, ...) bool     a sample or the reference is NaN (or the error is undefined)

Root attributes: method, error, reference, n, probability, confidence, keys (JSON, execution
order), nanprobe/significantdigits versions, the run's spec and manifest (JSON). Per-key
attributes: dtype, display_max_bits (24 for float32, 53 for float64), exact_bits (the finite
value the library gives when all samples equal the reference), counts (elements, nan, exact)
and ``hist``: hist[k] counts non-NaN elements with k-1 < bits <= k (hist[0]: bits == 0).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

import h5py
import numpy as np
import significantdigits

from . import __version__
from .run import Run

METHODS = ("cnh", "general")
ERRORS = ("relative", "absolute")
REFERENCES = ("reference", "mean")
OUTPUT = "sigdigits.h5"
FORMAT = "nanprobe-sigdigits/1"
DEFAULT_MAX_BLOCK_BYTES = 64 * 2**20
NOISE_BITS = 1.0  # at most this many significant bits: the value is pure noise


def display_max_bits(dtype: np.dtype) -> int:
    """Precision of ``dtype`` in bits (mantissa + implicit bit): 24 for float32, 53 for float64."""
    return int(np.finfo(dtype).nmant) + 1


def _sd(samples: np.ndarray, reference: np.ndarray, error: str, method: str,
        probability: float, confidence: float) -> np.ndarray:
    return significantdigits.significant_digits(
        samples, reference=reference, axis=0, error=error, method=method,
        probability=probability, confidence=confidence)


@lru_cache(maxsize=64)
def exact_bits(n: int, dtype: str, method: str = "cnh", probability: float = 0.95,
               confidence: float = 0.95) -> float:
    """What ``significantdigits`` returns when all ``n`` samples equal the reference (finite)."""
    zeros = np.zeros((n, 1), dtype=np.dtype(dtype))
    return float(_sd(zeros, zeros[0], "absolute", method, probability, confidence)[0])


def significant_bits(
    samples: np.ndarray,
    reference: np.ndarray,
    *,
    method: str = "cnh",
    error: str = "relative",
    probability: float = 0.95,
    confidence: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Significant bits of ``samples`` (N, ...) against ``reference`` (...), per element.

    Returns ``(bits, exact, nan)`` shaped like ``reference``: ``bits`` float32 from
    ``significantdigits`` (reference cast to the samples' dtype; ``error="relative"`` switches
    to absolute error where the reference is 0), negatives clipped to 0; ``exact`` (bool) where
    every sample equals the reference, bits there are :func:`exact_bits`; ``nan`` (bool) where
    a sample or the reference is NaN or the error is undefined (inf), bits there are NaN.
    """
    method, error = method.lower(), error.lower()
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if error not in ERRORS:
        raise ValueError(f"error must be one of {', '.join(ERRORS)}, got {error!r}")
    x = np.asarray(samples)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"samples must be floating point, got {x.dtype}")
    ref = np.asarray(reference).astype(x.dtype, copy=False)
    if x.ndim < 1 or ref.shape != x.shape[1:]:
        raise ValueError(f"reference shape {ref.shape} must be one sample of {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples, got {x.shape[0]}")
    opts = (method, probability, confidence)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # relative error vs. 0 and inf/NaN arithmetic
        zero = ref == 0 if error == "relative" else None
        if zero is None or not zero.any():
            bits = np.asarray(_sd(x, ref, error, *opts), dtype=np.float32)
        else:
            bits = np.empty(ref.shape, dtype=np.float32)
            nonzero = ~zero
            if nonzero.any():
                bits[nonzero] = _sd(x[:, nonzero], ref[nonzero], "relative", *opts)
            bits[zero] = _sd(x[:, zero], ref[zero], "absolute", *opts)
    np.maximum(bits, 0, out=bits)  # NaN propagates
    exact = (x == ref).all(axis=0)
    nan = np.isnan(ref) | np.isnan(x).any(axis=0) | np.isnan(bits)
    bits[exact] = exact_bits(x.shape[0], x.dtype.str, *opts)
    nan &= ~exact
    bits[nan] = np.nan
    return bits, exact, nan


def _write_position(ds: h5py.Dataset) -> int:
    """File offset of the dataset's first data (chunk 0), else of its object header."""
    try:
        if ds.chunks is not None:
            offset = ds.id.get_chunk_info(0).byte_offset
        else:
            offset = ds.id.get_offset()
        if offset is not None:
            return int(offset)
    except (RuntimeError, ValueError, KeyError):  # nothing written yet
        pass
    return int(h5py.h5o.get_info(ds.id).addr)


def float_keys(h5: h5py.File) -> list[str]:
    """Floating-point dataset keys of a capture file, in execution order of the forward pass.

    The hooks write each dataset's first chunk as its module runs in the first batch, so file
    offsets of chunk 0 follow the forward pass (object-header addresses do not: HDF5 reuses
    freed space for them). Integer datasets (pool indices) and scalars are left out.
    """
    found: list[tuple[int, str]] = []

    def visit(key: str, obj) -> None:
        if (isinstance(obj, h5py.Dataset) and obj.ndim >= 1
                and np.issubdtype(obj.dtype, np.floating)):
            found.append((_write_position(obj), key))

    h5.visititems(visit)
    return [key for _, key in sorted(found)]


def select_keys(keys: list[str], patterns: list[str] | None) -> list[str]:
    """Keys matching any glob pattern (also tried without the ``layers/`` prefix), in order."""
    if patterns is None:
        return list(keys)
    chosen: set[str] = set()
    for pattern in patterns:
        hits = {k for k in keys
                if fnmatch.fnmatchcase(k, pattern)
                or fnmatch.fnmatchcase(k.removeprefix("layers/"), pattern)}
        if not hits:
            raise ValueError(f"key pattern {pattern!r} matches no floating-point dataset; "
                             f"available: {', '.join(keys)}")
        chosen |= hits
    return [k for k in keys if k in chosen]


def blocks(shape: tuple[int, ...], n: int, itemsize: int,
           budget: int) -> Iterator[tuple[slice, ...]]:
    """Hyperslabs covering ``shape``, each with an N-sample stack of at most ``budget`` bytes.

    Splits along the first axis whose unit (one index, all later axes) fits, with the
    earlier axes taken one index at a time: whole slices, else channels of one slice, ...
    Blocks along the split axis start at multiples of the block length (chunk aligned).
    """
    if not shape:
        yield ()
        return
    for axis in range(len(shape)):
        unit = n * itemsize * int(np.prod(shape[axis + 1:], dtype=np.int64))
        if unit <= budget or axis == len(shape) - 1:
            break
    step = max(1, budget // max(unit, 1))
    for prefix in np.ndindex(*shape[:axis]):
        head = tuple(slice(i, i + 1) for i in prefix)
        for start in range(0, shape[axis], step):
            yield (*head, slice(start, min(start + step, shape[axis])))


def _block_shape(shape: tuple[int, ...], sel: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in sel) + tuple(shape[len(sel):])


class _Stats:
    """Running per-key counts and histogram of significant bits."""

    def __init__(self, max_bits: int) -> None:
        self.max_bits = max_bits
        self.hist = np.zeros(max_bits + 1, dtype=np.int64)
        self.elements = self.nan = self.exact = 0
        self.total = 0.0

    def add(self, bits: np.ndarray, exact: np.ndarray, nan: np.ndarray) -> None:
        finite = bits[~nan]
        self.elements += bits.size
        self.nan += int(nan.sum())
        self.exact += int(exact.sum())
        self.total += float(finite.sum(dtype=np.float64))
        bins = np.ceil(finite).astype(np.int64).clip(0, self.max_bits)
        self.hist += np.bincount(bins, minlength=self.max_bits + 1)

    def attrs(self) -> dict:
        valid = self.elements - self.nan
        return {"elements": self.elements, "nan_count": self.nan, "exact_count": self.exact,
                "noise_count": int(self.hist[: int(NOISE_BITS) + 1].sum()),
                "mean_bits": self.total / valid if valid else np.nan, "hist": self.hist}


def compute_sigdigits(
    run_dir: str | Path,
    *,
    method: str = "cnh",
    reference: str = "reference",
    error: str = "relative",
    probability: float = 0.95,
    confidence: float = 0.95,
    keys: list[str] | None = None,
    out: str | Path | None = None,
    allow_incomplete: bool = False,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write significant-bit maps of the run in ``run_dir`` and return the output path.

    ``reference``: ``"reference"`` (the unperturbed run) or ``"mean"`` (the sample mean);
    ``keys``: glob patterns of dataset keys (default: every floating-point dataset);
    ``out``: output file (default ``RUN_DIR/sigdigits.h5``). Each layer is processed in
    blocks whose sample stack is at most half the layer's stack (and ``max_block_bytes``),
    computed in eighths: peak memory is about 0.8x the layer's stack (``significantdigits`` on
    the whole stack: 4.5x).
    ``on_progress(done, total)`` counts blocks.
    ValueError for bad options or a run that is incomplete (unless ``allow_incomplete``).
    """
    method, error, reference = method.lower(), error.lower(), reference.lower()
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if error not in ERRORS:
        raise ValueError(f"error must be one of {', '.join(ERRORS)}, got {error!r}")
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    for name, value in (("probability", probability), ("confidence", confidence)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    run = Run(run_dir)
    sample_paths = run.sample_paths
    if not run.complete and not allow_incomplete:
        raise ValueError(f"{run.path} is incomplete ({len(sample_paths)} of "
                         f"{run.spec['samples']} samples, reference "
                         f"{'present' if run.reference_path.exists() else 'missing'}); finish "
                         "it by rerunning `nanprobe mca-run` with the same arguments")
    if len(sample_paths) < 2:
        raise ValueError(f"{run.path} has {len(sample_paths)} sample(s); need at least 2")
    if reference == "reference" and not run.reference_path.exists():
        raise ValueError(f"{run.path} has no reference.h5; use reference='mean'")
    n = len(sample_paths)
    out = Path(out) if out is not None else run.path / OUTPUT
    out.parent.mkdir(parents=True, exist_ok=True)

    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(h5py.File(p, "r")) for p in sample_paths]
        ref_file = (stack.enter_context(h5py.File(run.reference_path, "r"))
                    if reference == "reference" else None)
        chosen = select_keys(float_keys(ref_file or files[0]), keys)
        plans = []
        for key in chosen:
            ds = files[0][key]
            stack_bytes = n * ds.size * ds.dtype.itemsize
            budget = max(1, min(max_block_bytes, stack_bytes // 2))
            sub_elements = max(1, budget // 8 // (n * ds.dtype.itemsize))
            plans.append((key, list(blocks(ds.shape, n, ds.dtype.itemsize, budget)),
                          sub_elements))
        total = sum(len(b) for _, b, _ in plans)
        done = 0
        if on_progress:
            on_progress(done, total)

        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with h5py.File(tmp, "w") as dst:
                dst.attrs.update({
                    "format": FORMAT, "method": method, "error": error, "reference": reference,
                    "n": n, "probability": probability, "confidence": confidence,
                    "keys": json.dumps(chosen), "run_dir": str(run.path.resolve()),
                    "samples_used": json.dumps([p.name for p in sample_paths]),
                    "nanprobe_version": __version__,
                    "significantdigits_version": version("significantdigits"),
                    "spec": json.dumps(run.spec, sort_keys=True),
                    "run_manifest": json.dumps(run.manifest, sort_keys=True),
                    "run_digest": run.digest,
                    "created": datetime.now(timezone.utc).isoformat(),
                })
                if method == "general":  # the probability is set by n and the confidence
                    dst.attrs["probability"] = significantdigits.probability_estimation_bernoulli(
                        n, n, confidence)
                    dst.attrs["probability_requested"] = probability
                for key, sels, sub_elements in plans:
                    for _ in _compute_key(key, sels, sub_elements, files, ref_file, dst,
                                          method=method,
                                          error=error, probability=probability,
                                          confidence=confidence):
                        done += 1
                        if on_progress:
                            on_progress(done, total)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return out


def _significant_bits_in_parts(samples: np.ndarray, reference: np.ndarray, elements: int,
                               **opts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`significant_bits` over runs of at most ``elements`` flattened elements."""
    x = samples.reshape(samples.shape[0], -1)
    ref = reference.reshape(-1)
    bits = np.empty(ref.shape, dtype=np.float32)
    exact = np.empty(ref.shape, dtype=bool)
    nan = np.empty(ref.shape, dtype=bool)
    for start in range(0, ref.size, max(1, elements)):
        part = slice(start, start + max(1, elements))
        bits[part], exact[part], nan[part] = significant_bits(x[:, part], ref[part], **opts)
    return bits.reshape(reference.shape), exact.reshape(reference.shape), nan.reshape(
        reference.shape)


def _compute_key(key: str, sels: list[tuple[slice, ...]], sub_elements: int,
                 files: list[h5py.File], ref_file: h5py.File | None, dst: h5py.File,
                 **opts) -> Iterator[None]:
    """Fill ``dst[key]/{bits,exact,nan}`` block by block; yields after each block.

    A block's N-sample stack is read whole (a block of whole slices decompresses each HDF5
    chunk once; channel blocks of one slice decompress it once per block), then
    ``significantdigits`` (about 3.5x its input in temporaries) runs on parts of at most
    ``sub_elements`` elements.
    """
    src = files[0][key]
    shape, dtype, n = src.shape, src.dtype, len(files)
    chunks = _block_shape(shape, sels[0]) if shape else None
    group = dst.create_group(key)
    kw = dict(chunks=chunks, compression="gzip", compression_opts=1, shuffle=True) \
        if chunks and all(chunks) else {}
    out_bits = group.create_dataset("bits", shape=shape, dtype=np.float32, **kw)
    out_exact = group.create_dataset("exact", shape=shape, dtype=bool, **kw)
    out_nan = group.create_dataset("nan", shape=shape, dtype=bool, **kw)
    stats = _Stats(display_max_bits(dtype))
    for sel in sels:
        bshape = _block_shape(shape, sel)
        buf = np.empty((n, *bshape), dtype=dtype)
        for i, f in enumerate(files):
            f[key].read_direct(buf[i], source_sel=sel)
        if ref_file is None:
            ref = buf.mean(axis=0, dtype=np.float64).astype(dtype)
        else:
            ref = np.empty(bshape, dtype=dtype)
            ref_file[key].read_direct(ref, source_sel=sel)
        bits, exact, nan = _significant_bits_in_parts(buf, ref, sub_elements, **opts)
        del buf, ref
        out_bits[sel], out_exact[sel], out_nan[sel] = bits, exact, nan
        stats.add(bits, exact, nan)
        yield
    group.attrs.update({
        "dtype": dtype.str, "shape": shape, "display_max_bits": display_max_bits(dtype),
        "exact_bits": exact_bits(n, dtype.str, opts["method"], opts["probability"],
                                 opts["confidence"]),
        **stats.attrs(),
    })
