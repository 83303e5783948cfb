"""In-process MCA against Verrou: unstable pooling windows per layer, and the cost per sample.

Fidelity (``--part fidelity``): for each in-process mode, G groups of N samples of coronal slice
128 of the bundled brain (seeds as ``nanprobe mca-run --seed S``: sample i gets
``sample_seed(S, i)``, i = 0 .. G*N - 1), each group's unstable windows per pooling layer
scored (precision / recall / F1) against the Verrou truth (``../shared/verrou-truth``: 6 samples
under ``--rounding-mode=random``), median (min-max) over the groups. Two ceilings beside them
tell what a perfect model would score with so few samples: Verrou against itself (its samples
split 3 vs 3) and each mode against itself (pairs of groups, N vs N: an in-process mode that
behaved exactly like Verrou would score against Verrou what it scores against itself). Then the
unstable fractions of each mode on other slices (``--check-slices``), where no truth exists:
the model must not drift there.

Model (``--part model``): on every convolution of the default U-Net (slice 128, its plain
float32 inputs), the spread the "flop" mode gives each output (its chunked variance estimate)
against the exact per-FMA one (``sum over the FMAs of ulp(partial sum)**2 / 4``, partial sums
in oneDNN's order: kernel taps outer, input channels inner, bias first), as quantiles of the
ratio of standard deviations over all outputs.

Cost (``--part cost``): the median (min-max) over interleaved repetitions of a plain forward of
one slice, and per mode of a perturbed forward and of a sample as mca-run makes it (pooling
layers captured into an in-memory HDF5 file), as ratios to the plain forward (``--filters N``:
the default architecture widened to N filters, seeded random weights); and how many
times faster than Verrou's 85.6 s per sample (pooling layers only, quiet machine; measured for
issue #20, not rerun here: Verrou is not installed).

    python benchmarks/bench_mca_fidelity.py --part fidelity [--samples 6] [--groups 4]
    python benchmarks/bench_mca_fidelity.py --part model
    flock -x /tmp/nanprobe-cpu.lock python benchmarks/bench_mca_fidelity.py --part cost
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from nanprobe import __version__, mca
from nanprobe.audit import scores
from nanprobe.capture import capture
from nanprobe.compare import truth_metadata, truth_unstable
from nanprobe.evaluate import allocator_note
from nanprobe.inputs import prepare_input
from nanprobe.mca import mca_mode
from nanprobe.models.fastsurfer import FastSurferVINN
from nanprobe.models.registry import load
from nanprobe.run import sample_seed

ROOT = Path(__file__).resolve().parents[1]
TRUTH = ROOT.parent / "shared" / "verrou-truth" / "default_coronal128_pool_indices.npz"
TRUTH_SLICE = 128
VERROU_SECONDS = 85.6  # per sample, pooling layers captured, quiet machine (issue #20)


def spread(values: list[float], fmt: str = ".3f") -> str:
    """``median (min-max)`` of ``values``."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


class Sampler:
    """Pooling indices of the default U-Net on one coronal slice, plain or perturbed."""

    def __init__(self, slice_index: int, hooks: bool = True) -> None:
        self.loaded = load("default")
        self.model = self.loaded.model
        self.prepared = prepare_input("default", self.loaded,
                                      slices=f"{slice_index}:{slice_index + 1}")
        self.x = self.prepared.tensor
        self.pools = [n for n, m in self.model.named_modules()
                      if isinstance(m, torch.nn.MaxPool2d)]
        self._got: dict[str, np.ndarray] = {}
        for name in self.pools if hooks else ():
            self.model.get_submodule(name).register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module, inputs, output) -> None:
            self._got[name] = output[1].numpy().copy()
        return hook

    def indices(self, mode: str | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Pooling indices per layer of one forward (``mode`` None: unperturbed)."""
        with torch.no_grad():
            if mode is None:
                self.model(self.x)
            else:
                with mca_mode(mode, seed=seed):
                    self.model(self.x)
        return dict(self._got)

    def flips(self, mode: str, seeds: list[int]) -> dict[str, np.ndarray]:
        """Per layer, the bool (len(seeds), N, C, Ho, Wo) windows whose index left the
        reference's in each sample."""
        ref = self.indices()
        got = [self.indices(mode, s) for s in seeds]
        return {k: np.stack([g[k] != ref[k] for g in got]) for k in self.pools}


def fidelity(args: argparse.Namespace) -> dict:
    truth = truth_unstable(args.truth)
    meta = truth_metadata(args.truth)
    with np.load(args.truth) as npz:
        raw = {k.replace("__", "."): npz[k] for k in npz.files if k != "final_labels"}
    sampler = Sampler(TRUTH_SLICE)
    if meta is not None and meta.get("weights_sha256") != sampler.loaded.weights_sha256:
        raise SystemExit(f"{args.truth}: other weights than the bundled default model")
    layers = [k for k in sampler.pools if k in truth]
    n, groups = args.samples, args.groups
    seeds = [sample_seed(args.seed, i) for i in range(n * groups)]
    result: dict = {"layers": layers, "modes": {}, "ceilings": {}, "slices": {}}

    # Verrou against itself: samples 1-3 vs 4-6 (and the reverse: P and R swap)
    half = (raw[layers[0]].shape[0] - 1) // 2
    v_a = {k: (raw[k][1:1 + half] != raw[k][0]).any(0) for k in layers}
    v_b = {k: (raw[k][1 + half:] != raw[k][0]).any(0) for k in layers}
    result["ceilings"][f"verrou {half} vs {half}"] = {
        k: [scores(v_a[k], v_b[k])["f1"]] for k in layers}

    print(f"# fidelity: {n} samples x {groups} groups per mode, slice {TRUTH_SLICE}, truth "
          f"{args.truth} ({raw[layers[0]].shape[0] - 1} Verrou samples)")
    for mode in args.modes:
        t0 = time.perf_counter()
        flips = sampler.flips(mode, seeds)
        print(f"# {mode}: {len(seeds)} samples in {time.perf_counter() - t0:.0f} s")
        sets = [{k: flips[k][g * n:(g + 1) * n].any(0) for k in layers} for g in range(groups)]
        entry = {}
        for k in layers:
            sc = [scores(s[k], truth[k]) for s in sets]
            entry[k] = {m: [c[m] for c in sc] for m in ("precision", "recall", "f1")}
            entry[k]["fraction"] = [float(s[k].mean()) for s in sets]
        entry["f1_by_samples"] = {
            str(size): {k: [scores(flips[k][j:j + size].any(0), truth[k])["f1"]
                            for j in range(0, len(seeds) - size + 1, size)] for k in layers}
            for size in sorted({1, 3, n, 2 * n, len(seeds)}) if size <= len(seeds)}
        result["modes"][mode] = entry
        pairs = list(itertools.combinations(range(groups), 2))
        result["ceilings"][f"{mode} {n} vs {n}"] = {
            k: [scores(sets[i][k], sets[j][k])["f1"] for i, j in pairs] for k in layers}
        if n >= 2 * half:  # the same split as Verrou's: first half vs second half of a group
            result["ceilings"][f"{mode} {half} vs {half}"] = {
                k: [scores(flips[k][g * n:g * n + half].any(0),
                           flips[k][g * n + half:g * n + 2 * half].any(0))["f1"]
                    for g in range(groups)] for k in layers}

    print(f"\n| mode (N={n}) | layer | unstable | P | R | F1 |")
    print("|---|---|---|---|---|---|")
    for k in layers:
        print(f"| verrou (truth, {raw[k].shape[0] - 1} samples) | {k} | {truth[k].mean():.4f} "
              "| | | |")
    for mode, entry in result["modes"].items():
        for k in layers:
            e = entry[k]
            print(f"| {mode} | {k} | {spread(e['fraction'], '.4f')} | {spread(e['precision'])} "
                  f"| {spread(e['recall'])} | {spread(e['f1'])} |")
    print("\nF1 against the truth by in-process sample count (disjoint groups of the samples "
          "above):\n")
    print("| mode | samples | " + " | ".join(layers) + " |")
    print("|---|---|" + "---|" * len(layers))
    for mode, entry in result["modes"].items():
        for size, per in entry["f1_by_samples"].items():
            print(f"| {mode} | {size} | " + " | ".join(spread(per[k]) for k in layers) + " |")
    print("\nF1 ceilings (the same kind of run against itself, independent samples):\n")
    print("| ceiling | " + " | ".join(layers) + " |")
    print("|---|" + "---|" * len(layers))
    for name, per in result["ceilings"].items():
        print(f"| {name} | " + " | ".join(spread(per[k]) for k in layers) + " |")

    if args.check_slices:
        print(f"\nUnstable fraction per layer on other slices ({n} samples each, no truth):\n")
        print("| slice | mode | " + " | ".join(layers) + " |")
        print("|---|---|" + "---|" * len(layers))
        for sl in args.check_slices:
            other = Sampler(sl)
            for mode in args.modes:
                flips = other.flips(mode, seeds[:n])
                fr = {k: float(flips[k].any(0).mean()) for k in layers}
                result["slices"].setdefault(str(sl), {})[mode] = fr
                print(f"| {sl} | {mode} | " + " | ".join(f"{fr[k]:.4f}" for k in layers) + " |")
    return result


@njit(parallel=True, cache=True)
def exact_fma_variance(x, w, b, ph, pw, out):
    """out (N, O, Ho, Wo) = sum over the FMAs of a stride-1 convolution of ulp(S)**2 / 4, S
    the exact partial sum after each product with a nonzero input (taps outer, channels inner,
    bias first): the variance Verrou's random rounding gives each output."""
    n_, c_, h, wd = x.shape
    o_, _, kh, kw = w.shape
    ho, wo = out.shape[2], out.shape[3]
    for q in prange(n_ * o_ * ho):
        r, o, n = q % ho, (q // ho) % o_, q // (ho * o_)
        for col in range(wo):
            s, v = np.float64(b[o]), 0.0
            for t in range(kh * kw):
                row, cc = r + t // kw - ph, col + t % kw - pw
                if 0 <= row < h and 0 <= cc < wd:
                    for c in range(c_):
                        xv = np.float64(x[n, c, row, cc])
                        s += np.float64(w[o, c, t // kw, t % kw]) * xv
                        if xv != 0.0 and s != 0.0:
                            e = min(max(math.frexp(s)[1], -125), 128)
                            v += math.ldexp(1.0, 2 * e - 48) / 4
            out[n, o, r, col] = v


def model_check(args: argparse.Namespace) -> dict:
    sampler = Sampler(TRUTH_SLICE, hooks=False)
    inputs: dict[str, tuple[torch.Tensor, torch.nn.Conv2d]] = {}
    for name, m in sampler.model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(
                lambda mod, i, o, name=name: inputs.__setitem__(name, (i[0].clone(), mod)))
    with torch.no_grad():
        sampler.model(sampler.x)
    quantiles = (0.01, 0.1, 0.5, 0.9, 0.99)
    print(f"\n# model: sigma(flop estimate) / sigma(exact per-FMA), all outputs of each "
          f"convolution; quantiles {quantiles}\n")
    print("| convolution | K | " + " | ".join(f"q{q:g}" for q in quantiles) + " |")
    print("|---|---|" + "---|" * len(quantiles))
    ratios, result = [], {}
    for name, (x, conv) in inputs.items():
        w, b = conv.weight.detach(), conv.bias.detach()
        exact = np.empty(tuple(F.conv2d(x, w, b, padding=conv.padding).shape))
        exact_fma_variance(x.numpy(), w.numpy(), b.numpy(), *conv.padding, exact)
        chunks = mca._conv_chunks(x.double(), w.double(), [1, 1], list(conv.padding), [1, 1],
                                  False, [0, 0], 1)
        _, v = mca._accumulate(b.double().view(1, -1, 1, 1), chunks)
        keep = exact > 0
        ratio = np.sqrt(v.numpy()[keep] / exact[keep])
        ratios.append(ratio)
        result[name] = np.quantile(ratio, quantiles).tolist()
        k = w.shape[1] * w.shape[2] * w.shape[3]
        print(f"| {name} | {k} | " + " | ".join(f"{r:.2f}" for r in result[name]) + " |")
    result["all"] = np.quantile(np.concatenate(ratios), quantiles).tolist()
    print("| all | | " + " | ".join(f"{r:.2f}" for r in result["all"]) + " |")
    return result


def cost(args: argparse.Namespace) -> dict:
    sampler = Sampler(TRUTH_SLICE, hooks=False)
    model, x = sampler.model, sampler.x
    name = "default U-Net"
    if args.filters is not None:
        torch.manual_seed(0)
        model = FastSurferVINN(sampler.loaded.num_classes, num_filters=args.filters,
                               num_filters_interpol=args.filters // 2).eval()
        name = f"default architecture at {args.filters} filters, random weights"

    def plain() -> None:
        with torch.no_grad():
            model(x)

    def forward(mode: str):
        def fn() -> None:
            with torch.no_grad(), mca_mode(mode, seed=1):
                model(x)
        return fn

    def sample(mode: str):
        def fn() -> None:
            with h5py.File(f"mem-{mode}.h5", "w", driver="core", backing_store=False) as h5:
                capture(model, x, h5, pools, context=lambda: mca_mode(mode, seed=1))
        return fn

    pools = [n for n, m in model.named_modules() if isinstance(m, torch.nn.MaxPool2d)]
    fns = [plain] + [f(m) for m in args.modes for f in (forward, sample)]
    for fn in fns:  # warm up: numba compilation, caches, scratch buffers
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(args.reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    base = times[0]
    print(f"\n# cost: {name}, slice {TRUTH_SLICE}, {args.reps} interleaved repetitions, "
          f"median (min-max); ratios per repetition to that repetition's plain forward")
    print("\n| run | seconds | ratio to plain forward | faster than Verrou (85.6 s/sample, "
          "default U-Net) |")
    print("|---|---|---|---|")
    print(f"| plain forward | {spread(base, '.3f')} | 1.00x | |")
    result: dict = {"plain": base, "modes": {}}
    for j, mode in enumerate(args.modes):
        fwd, smp = times[1 + 2 * j], times[2 + 2 * j]
        rf = [t / b for t, b in zip(fwd, base, strict=True)]
        rs = [t / b for t, b in zip(smp, base, strict=True)]
        vs = "" if args.filters else f"{spread([VERROU_SECONDS / t for t in smp], '.0f')}x"
        print(f"| {mode} forward | {spread(fwd)} | {spread(rf, '.2f')}x | |")
        print(f"| {mode} sample (pooling captured) | {spread(smp)} | {spread(rs, '.2f')}x "
              f"| {vs} |")
        result["modes"][mode] = {"forward": fwd, "sample": smp}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("fidelity", "model", "cost", "all"), default="all")
    parser.add_argument("--truth", type=Path, default=TRUTH, help="Verrou truth (.npz)")
    parser.add_argument("--modes", nargs="+", default=["rr", "flop"])
    parser.add_argument("--samples", type=int, default=6, help="samples per group N")
    parser.add_argument("--groups", type=int, default=4, help="groups of N samples")
    parser.add_argument("--seed", type=int, default=0, help="run seed (as mca-run --seed)")
    parser.add_argument("--check-slices", type=int, nargs="*", default=[100, 128, 156])
    parser.add_argument("--reps", type=int, default=5, help="interleaved timing repetitions")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--filters", type=int, default=None,
                        help="cost: the default architecture widened to this many filters "
                        "(N // 2 interpolation filters, seeded random weights)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load1, load5, _ = os.getloadavg()
    print(f"# nanprobe {__version__}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {platform.processor() or platform.machine()}, load {load1:.2f}/{load5:.2f}"
          f", {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {allocator_note()}")
    out: dict = {"provenance": {
        "script": "benchmarks/bench_mca_fidelity.py", "args": {k: str(v) for k, v in
                                                               vars(args).items()},
        "nanprobe_version": __version__, "torch_version": torch.__version__,
        "threads": torch.get_num_threads(), "load": [load1, load5],
        "created": datetime.now(timezone.utc).isoformat()}}
    if args.part in ("fidelity", "all"):
        out["fidelity"] = fidelity(args)
    if args.part in ("model", "all"):
        out["model"] = model_check(args)
    if args.part in ("cost", "all"):
        out["cost"] = cost(args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
