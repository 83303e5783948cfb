"""The kernels' row pool: every chunk exactly once, sums, errors, concurrent passes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from nanprobe.ops import _threads


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 7, 16, 97, 1000])
def test_every_row_once_and_results_summed(monkeypatch, threads, rows):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    seen = np.zeros(rows, np.int64)
    lock = threading.Lock()
    workers = set()

    def chunk(lo, hi):
        with lock:
            seen[lo:hi] += 1
            workers.add(threading.get_ident())
        return hi - lo

    assert _threads.run_rows(chunk, rows) == rows
    assert (seen == 1).all()
    assert len(workers) <= threads


def test_errors_reach_the_caller(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)

    def chunk(lo, hi):
        if lo > 0:
            raise ZeroDivisionError(f"rows {lo}-{hi}")
        return 1

    with pytest.raises(ZeroDivisionError, match="rows"):
        _threads.run_rows(chunk, 100)
    assert _threads.run_rows(lambda lo, hi: hi - lo, 100) == 100  # the pool still works


def test_concurrent_callers(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    results = []

    def caller(k):
        results.append(_threads.run_rows(lambda lo, hi: (hi - lo) * k, 500))

    callers = [threading.Thread(target=caller, args=(k,)) for k in range(1, 6)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=60)
    assert sorted(results) == [500 * k for k in range(1, 6)]
