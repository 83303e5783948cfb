"""Figures of significant-digit maps (``sigdigits.h5``): heatmaps and per-layer distributions.

Matplotlib's object API on the Agg canvas (no pyplot state, no display). Colours: a
perceptually uniform colormap on a fixed range, 0 to the format's precision (24 bits for
float32, 53 for float64), so figures of different layers and runs compare directly; NaN (a
sample or the reference was NaN) is drawn in :data:`NAN_COLOUR`, named in the legend.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import h5py
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

AGGREGATES = ("min", "mean", "median")
CMAPS = ("viridis", "cividis")
NAN_COLOUR = "red"
UNIT = "significant bits"
_REDUCE = {"min": np.nanmin, "mean": np.nanmean, "median": np.nanmedian}
LAYER_FIGSIZE = (5.6, 5.2)  # inches; PNG pixels = inches * dpi
_REFERENCE_LABEL = {"reference": "unperturbed run", "mean": "sample mean"}


def short_name(key: str) -> str:
    """``layers/enc.conv0/output`` -> ``enc.conv0``; other fields stay (``enc.pool/input``)."""
    return key.removeprefix("layers/").removesuffix("/output")


def _colormap(name: str) -> Colormap:
    if name not in CMAPS:
        raise ValueError(f"cmap must be one of {', '.join(CMAPS)}, got {name!r}")
    return colormaps[name].with_extremes(bad=NAN_COLOUR)


def mappable(h5: h5py.File, key: str) -> bool:
    """Whether ``key`` has a spatial map: (S, C, H, W) or (S, H, W)."""
    return h5[key]["bits"].ndim in (3, 4)


def channel_map(h5: h5py.File, key: str, slice_index: int = 0,
                aggregate: str = "min") -> np.ndarray:
    """(H, W) float32 map of slice ``slice_index``: ``aggregate`` of the bits over channels.

    A pixel is NaN where any channel is NaN there (a NaN sample makes the aggregate undefined).
    (S, H, W) keys have no channel axis and are returned as they are.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    bits_ds = h5[key]["bits"]
    if bits_ds.ndim not in (3, 4):
        raise ValueError(f"{key} has shape {bits_ds.shape}; maps need (S, C, H, W) or (S, H, W)")
    if not -bits_ds.shape[0] <= slice_index < bits_ds.shape[0]:
        raise ValueError(f"slice {slice_index} out of range: {key} has {bits_ds.shape[0]} slices")
    bits = bits_ds[slice_index]
    if bits.ndim == 2:
        return bits
    nan = h5[key]["nan"][slice_index]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
        image = _REDUCE[aggregate](bits, axis=0).astype(np.float32)
    image[nan.any(axis=0)] = np.nan
    return image


def _view(h5: h5py.File) -> str | None:
    try:
        return json.loads(h5.attrs["run_manifest"])["input"].get("view")
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def orient(image: np.ndarray, view: str | None) -> np.ndarray:
    """Display orientation of an (H, W) map of an MRI view (conformed LIA input).

    Coronal and sagittal: transposed, superior up; axial: rows flipped, anterior up; left-right
    in radiological convention (subject's left on the right). Other inputs: unchanged.
    """
    if view in ("coronal", "sagittal"):
        return image.T
    if view == "axial":
        return image[::-1]
    return image


def _keys(h5: h5py.File) -> list[str]:
    return json.loads(h5.attrs["keys"])


def _display_max(h5: h5py.File, keys: list[str]) -> int:
    return max((int(h5[k].attrs["display_max_bits"]) for k in keys), default=24)


def _describe(h5: h5py.File) -> str:
    a = h5.attrs
    ref = _REFERENCE_LABEL.get(str(a["reference"]), str(a["reference"]))
    return (f"{str(a['method']).upper()}, {a['error']} error, p={float(a['probability']):.2f}, "
            f"c={float(a['confidence']):.2f}, n={int(a['n'])} samples, reference: {ref}")


def _slice_label(h5: h5py.File, slice_index: int) -> str:
    try:
        selection = json.loads(h5.attrs["run_manifest"])["input"]["selection"]
        return f"slice {slice_index} (input index {selection[slice_index]})"
    except (KeyError, IndexError, TypeError, ValueError):
        return f"slice {slice_index}"


def _legend_handles(cmap: Colormap, norm: Normalize, exact_bits: float | None) -> list[Patch]:
    handles = [Patch(facecolor=NAN_COLOUR, label="NaN (a sample or the reference is NaN)")]
    if exact_bits is not None:
        handles.append(Patch(facecolor=cmap(norm(exact_bits)),
                             label=f"all samples = reference (capped at {exact_bits:.1f} bits)"))
    return handles


def _save_png(fig: Figure, path: Path, dpi: int) -> Path:
    """Render ``fig`` with Agg and write it as a 256-colour palette PNG (about 40% smaller)."""
    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    rgb = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    return path


def plot_layer(h5: h5py.File, key: str, path: str | Path, *, slice_index: int = 0,
               aggregate: str = "min", cmap: str = "viridis", dpi: int = 100) -> Path:
    """Heatmap of one layer's channel-aggregated bits for one slice, written to ``path``."""
    image = channel_map(h5, key, slice_index, aggregate)
    vmax = int(h5[key].attrs["display_max_bits"])
    cm, norm = _colormap(cmap), Normalize(0, vmax)
    fig = Figure(figsize=LAYER_FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(orient(image, _view(h5))), cmap=cm, norm=norm,
                   interpolation="nearest")
    ax.set_axis_off()
    shape = h5[key]["bits"].shape
    how = f"{aggregate} over {shape[1]} channels" if len(shape) == 4 else "single channel"
    ax.set_title(f"{short_name(key)}\n{how}, {_slice_label(h5, slice_index)}", fontsize=10)
    cbar = fig.colorbar(im, ax=ax, shrink=0.85)
    cbar.set_label(UNIT)
    fig.legend(handles=_legend_handles(cm, norm, float(h5[key].attrs["exact_bits"])),
               loc="outside lower center", fontsize=8, frameon=False)
    fig.suptitle(_describe(h5), fontsize=7)
    return _save_png(fig, Path(path), dpi)


def grid_figsize(panels: int, ncols: int = 8, panel_inches: float = 1.45) -> tuple[float, float]:
    """Figure size (inches) of :func:`plot_grid` for ``panels`` maps."""
    ncols = max(1, min(ncols, panels))
    nrows = -(-panels // ncols)
    return ncols * panel_inches + 1.0, nrows * (panel_inches + 0.18) + 1.1


def plot_grid(h5: h5py.File, path: str | Path, *, keys: list[str] | None = None,
              slice_index: int = 0, aggregate: str = "min", cmap: str = "viridis",
              ncols: int = 8, panel_inches: float = 1.45, dpi: int = 100,
              interpolation: str = "nearest") -> Path:
    """Grid of channel-aggregated maps of one slice, one panel per layer in execution order.

    ``keys``: the layers to show (default: every mappable key but max-pool inputs, which
    repeat the previous layer's output). ``interpolation``: matplotlib's; ``"nearest"`` keeps
    single elements visible, ``"antialiased"`` averages maps larger than their panel.
    """
    if keys is None:
        keys = [k for k in _keys(h5) if mappable(h5, k) and not k.endswith("/input")]
    if not keys:
        raise ValueError("no layer with a spatial map (S, C, H, W) to draw")
    vmax = _display_max(h5, keys)
    cm, norm = _colormap(cmap), Normalize(0, vmax)
    ncols = max(1, min(ncols, len(keys)))
    nrows = -(-len(keys) // ncols)
    fig = Figure(figsize=grid_figsize(len(keys), ncols, panel_inches), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    im, view = None, _view(h5)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, key in zip(axes.flat, keys, strict=False):
        image = orient(channel_map(h5, key, slice_index, aggregate), view)
        im = ax.imshow(np.ma.masked_invalid(image), cmap=cm, norm=norm,
                       interpolation=interpolation)
        ax.set_title(short_name(key), fontsize=6.5, pad=2)
    cbar = fig.colorbar(im, ax=axes, shrink=min(0.9, 0.2 + 2.4 / nrows), aspect=30)
    cbar.set_label(UNIT)
    exact = float(h5[keys[0]].attrs["exact_bits"])
    fig.legend(handles=_legend_handles(cm, norm, exact), loc="outside lower center", ncols=2,
               fontsize=8, frameon=False)
    fig.suptitle(f"Significant bits per layer, {aggregate} over channels, "
                 f"{_slice_label(h5, slice_index)}\n{_describe(h5)}", fontsize=9)
    return _save_png(fig, Path(path), dpi)


def _categories(h5: h5py.File, key: str, vmax: int) -> tuple[list[str], np.ndarray]:
    """Labels and element fractions: NaN, <= 1 bit, 3 bit ranges, exact (sum to 1)."""
    a = h5[key].attrs
    hist = np.asarray(a["hist"], dtype=np.int64).copy()
    exact = int(a["exact_count"])
    if exact:
        hist[min(int(np.ceil(float(a["exact_bits"]))), len(hist) - 1)] -= exact
    lo, hi = round(vmax / 3), round(2 * vmax / 3)
    labels = ["NaN", "≤ 1 bit (noise)", f"1–{lo} bits", f"{lo}–{hi} bits", f"> {hi} bits",
              "exact (= reference)"]
    counts = np.array([int(a["nan_count"]), hist[:2].sum(), hist[2:lo + 1].sum(),
                       hist[lo + 1:hi + 1].sum(), hist[hi + 1:].sum(), exact], dtype=np.float64)
    return labels, counts / max(int(a["elements"]), 1)


def plot_distribution(h5: h5py.File, path: str | Path, *, keys: list[str] | None = None,
                      cmap: str = "viridis", dpi: int = 100) -> Path:
    """Stacked bar per layer (execution order, top to bottom) of the share of elements by
    significant bits, all slices; the share of pure noise (≤ 1 bit) is printed at the right.
    """
    keys = keys or _keys(h5)
    vmax = _display_max(h5, keys)
    cm, norm = _colormap(cmap), Normalize(0, vmax)
    rows = [_categories(h5, k, vmax) for k in keys]
    labels = rows[0][0]
    fractions = np.array([f for _, f in rows])
    lo, hi = round(vmax / 3), round(2 * vmax / 3)
    colours = [NAN_COLOUR, cm(norm(0.5)), cm(norm((1 + lo) / 2)), cm(norm((lo + hi) / 2)),
               cm(norm((hi + vmax) / 2)), "#d9d9d9"]
    fig = Figure(figsize=(8.0, 1.6 + 0.19 * len(keys)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(keys))
    left = np.zeros(len(keys))
    for j, (label, colour) in enumerate(zip(labels, colours, strict=True)):
        ax.barh(y, fractions[:, j], left=left, color=colour, label=label, height=0.8,
                edgecolor="none")
        left += fractions[:, j]
    for yi, noise in zip(y, fractions[:, 1], strict=True):
        ax.text(1.01, yi, f"{noise:.1%}", va="center", fontsize=6.5)
    ax.set_yticks(y, [short_name(k) for k in keys], fontsize=6.5)
    ax.set_ylim(len(keys) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of elements (all slices and channels)")
    ax.text(1.01, 1.002, "≤ 1 bit", fontsize=6.5, va="bottom", transform=ax.transAxes)
    fig.legend(loc="outside lower center", ncols=3, fontsize=7, frameon=False)
    fig.suptitle(f"Significant bits per layer — {_describe(h5)}", fontsize=8)
    return _save_png(fig, Path(path), dpi)


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "__", key)


def plot_sigdigits(sigdigits_h5: str | Path, out_dir: str | Path, *, slice_index: int = 0,
                   aggregate: str = "min", cmap: str = "viridis", keys: list[str] | None = None,
                   per_layer: bool = True, dpi: int = 100) -> list[Path]:
    """All figures of a ``sigdigits.h5`` into ``out_dir``; returns the PNG paths.

    ``grid_slice{S}_{aggregate}.png`` (layer grid), ``distribution.png`` (per-layer shares
    of bits) and, with ``per_layer``, ``layers/<module>__<field>_slice{S}_{aggregate}.png``
    for every key with a spatial map. ``keys``:
    exact keys to draw (default: all; the grid leaves out max-pool inputs).
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    _colormap(cmap)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with h5py.File(sigdigits_h5, "r") as h5:
        all_keys = _keys(h5)
        if keys is not None:
            missing = [k for k in keys if k not in all_keys]
            if missing:
                raise ValueError(f"not in {sigdigits_h5}: {', '.join(missing)}")
        chosen = keys or all_keys
        maps = [k for k in chosen if mappable(h5, k)]
        grid_keys = maps if keys is not None else [k for k in maps if not k.endswith("/input")]
        tag = f"slice{slice_index}_{aggregate}"
        paths = []
        if grid_keys:
            paths.append(plot_grid(h5, out_dir / f"grid_{tag}.png", keys=grid_keys,
                                   slice_index=slice_index, aggregate=aggregate, cmap=cmap,
                                   dpi=dpi))
        paths.append(plot_distribution(h5, out_dir / "distribution.png", keys=chosen, cmap=cmap,
                                       dpi=dpi))
        if per_layer:
            for key in maps:
                name = _safe(key.removeprefix("layers/"))
                paths.append(plot_layer(h5, key, out_dir / "layers" / f"{name}_{tag}.png",
                                        slice_index=slice_index, aggregate=aggregate,
                                        cmap=cmap, dpi=dpi))
    return paths
