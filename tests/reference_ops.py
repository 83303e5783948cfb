"""Slow, obviously-correct per-window loops for the NaN ops (test oracles only)."""

from __future__ import annotations

import math

import torch


def _tensor(v: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(v, dtype=like.dtype)


def loop_max_pool2d(x, k, s, p, tie_limit=1, tie_eps=1e-7, tie_rtol=0.0):
    """(values, indices) by visiting every window; arithmetic in the input's dtype."""
    n_, c_, h, w = x.shape
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    values = torch.empty(n_, c_, ho, wo, dtype=x.dtype)
    indices = torch.empty(n_, c_, ho, wo, dtype=torch.int64)
    for n in range(n_):
        for c in range(c_):
            for oh in range(ho):
                for ow in range(wo):
                    entries = [(x[n, c, i, j], i * w + j)
                               for i in range(oh * s - p, oh * s - p + k)
                               for j in range(ow * s - p, ow * s - p + k)
                               if 0 <= i < h and 0 <= j < w and not math.isnan(x[n, c, i, j])]
                    if not entries:
                        values[n, c, oh, ow], indices[n, c, oh, ow] = math.nan, 0
                        continue
                    m = max(v for v, _ in entries)
                    tol = _tensor(tie_eps, x) + _tensor(tie_rtol, x) * m.abs()
                    ties = sum(1 for v, _ in entries if v == m or (m - v) < tol)
                    if tie_limit is not None and ties > tie_limit:
                        values[n, c, oh, ow], indices[n, c, oh, ow] = math.nan, 0
                    else:
                        values[n, c, oh, ow] = m
                        indices[n, c, oh, ow] = next(i for v, i in entries if v == m)
    return values, indices


def loop_max_unpool2d(values, indices, k, s, p, h, w):
    """Scatter finite values to their index; NaN values paint their whole in-bounds window."""
    n_, c_, ho, wo = values.shape
    out = torch.zeros(n_, c_, h, w, dtype=values.dtype)
    nan_cells = []
    for n in range(n_):
        for c in range(c_):
            for oh in range(ho):
                for ow in range(wo):
                    v = values[n, c, oh, ow]
                    if math.isnan(v):
                        nan_cells += [(n, c, i, j) for i in range(oh * s - p, oh * s - p + k)
                                      for j in range(ow * s - p, ow * s - p + k)
                                      if 0 <= i < h and 0 <= j < w]
                    else:
                        idx = int(indices[n, c, oh, ow])
                        out[n, c, idx // w, idx % w] = v
    for cell in nan_cells:
        out[cell] = math.nan
    return out


def loop_conv2d_mean(x, weight, bias, s, p, d, nan_threshold, count_padding):
    """NaN convolution with the mean fill, one output position at a time (float64 sums)."""
    n_, c_, h, w = x.shape
    co, _, kh, kw = weight.shape
    ho = (h + 2 * p - d * (kh - 1) - 1) // s + 1
    wo = (w + 2 * p - d * (kw - 1) - 1) // s + 1
    out = torch.empty(n_, co, ho, wo, dtype=torch.float64)
    xd, wd = x.double(), weight.double()
    for n in range(n_):
        for oh in range(ho):
            for ow in range(wo):
                entries = []  # (c, a, b, value or None for padding)
                for c in range(c_):
                    for a in range(kh):
                        for b in range(kw):
                            i, j = oh * s - p + a * d, ow * s - p + b * d
                            inside = 0 <= i < h and 0 <= j < w
                            entries.append((c, a, b, float(xd[n, c, i, j]) if inside else None))
                counted = [e for e in entries if e[3] is not None or count_padding]
                nans = [e for e in counted if e[3] is not None and math.isnan(e[3])]
                ratio = len(nans) / len(counted) if counted else 0.0
                if ratio >= nan_threshold:
                    out[n, :, oh, ow] = math.nan
                    continue
                data = [0.0 if e[3] is None else e[3] for e in counted
                        if e[3] is None or not math.isnan(e[3])]
                mean = sum(data) / len(data) if data else 0.0
                acc = torch.zeros(co, dtype=torch.float64)
                for c, a, b, v in entries:
                    if v is None:
                        continue
                    acc += wd[:, c, a, b] * (mean if math.isnan(v) else v)
                out[n, :, oh, ow] = acc + (0.0 if bias is None else bias.double())
    return out.to(x.dtype)
