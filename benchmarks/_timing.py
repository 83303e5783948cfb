"""Shared by the op and end-to-end benchmarks: a competing CPU-bound process and ratio spreads.

``Competitor`` starts one separate process that keeps the CPU busy while the benchmark times
its "busy" rounds: ``matmul`` (a numpy float32 matrix-product loop; its BLAS uses every core)
or ``loop`` (a pure Python loop, one core). The process is paused (SIGSTOP) while the quiet
rounds are timed and resumed (SIGCONT) for the busy ones, so both see the same machine apart
from the competitor, row by row.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from nanprobe.evaluate import interleaved_rounds, ratio_spread

BUSY_KINDS = ("matmul", "loop")


def add_busy_option(parser, what: str) -> None:
    """``--busy [matmul|loop]`` on an argparse ``parser``: also time ``what`` while one
    :class:`Competitor` runs."""
    parser.add_argument("--busy", nargs="?", const="matmul", choices=BUSY_KINDS,
                        help=f"also time {what} while one competing CPU-bound process runs "
                        "(matmul: numpy on every core, the default; loop: one Python loop)")

_PROGRAMS = {
    "matmul": ("import numpy as np\n"
               "a = np.random.default_rng(0).random((768, 768), dtype=np.float32)\n"
               "print('ready', flush=True)\n"
               "while True:\n"
               "    b = a @ a\n"
               "    a = b / np.abs(b).max()\n"),
    "loop": ("print('ready', flush=True)\n"
             "x = 0\n"
             "while True:\n"
             "    x = (x + 1) % 1000003\n"),
}


class Competitor:
    """A separate CPU-bound process (``kind`` in :data:`BUSY_KINDS`), paused until
    :meth:`busy` is entered; a context manager that kills it on exit."""

    def __init__(self, kind: str) -> None:
        if kind not in _PROGRAMS:
            raise ValueError(f"busy kind must be one of {', '.join(BUSY_KINDS)}, got {kind!r}")
        self.kind = kind
        self.proc = subprocess.Popen([sys.executable, "-c", _PROGRAMS[kind]],
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the competing process did not start")
        os.kill(self.proc.pid, signal.SIGSTOP)

    def describe(self) -> str:
        what = ("numpy float32 768² matmul loop, BLAS on every core" if self.kind == "matmul"
                else "pure Python loop, one core")
        return f"one competing process ({what}), pid {self.proc.pid}"

    def run(self, fns: Sequence[Callable[[], Any]], repeats: int) -> list[list[float]]:
        """:func:`interleaved_rounds` of ``fns`` while the competitor runs."""
        os.kill(self.proc.pid, signal.SIGCONT)
        try:
            return interleaved_rounds(fns, repeats)
        finally:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def __enter__(self) -> Competitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round ratios num[r] / den[r] of interleaved samples."""
    return ratio_spread(num, den)["ratios"]


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """``median (min-max)`` of ``values``."""
    return (f"{fmt.format(statistics.median(values))} "
            f"({fmt.format(min(values))}–{fmt.format(max(values))})")


def median_ms(samples: Sequence[float], per: float = 1.0) -> str:
    """Median of seconds ``samples`` in ms (divided by ``per``)."""
    return f"{statistics.median(samples) / per * 1e3:.1f}"
