"""Run a serial (``nogil``) numba kernel over chunks of rows on a few threads that never spin.

numba's parallel backend is an OpenMP runtime of its own beside torch's; the idle threads of
each spin for milliseconds after every parallel region and take the cores from the other's
busy threads (docs/performance.md). The NaN ops' kernels are therefore serial functions of a
row range ``[lo, hi)``, and this module splits a pass into a few chunks that the calling
thread and ``torch.get_num_threads() - 1`` helper threads take one at a time: helpers sleep
on a condition variable between passes (no spinning), and a thread that is slow because the
machine is busy simply takes fewer chunks.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import torch

#: chunks per thread of one pass (more chunks: better balance under load, more call overhead)
CHUNKS_PER_THREAD = 3
#: passes over fewer rows than this (times the threads) run on the calling thread only
MIN_ROWS_PER_THREAD = 8


class _Pass:
    """One kernel pass: chunks to take, results to sum, and who is still working."""

    def __init__(self, fn: Callable[[int, int], int], bounds: list[tuple[int, int]],
                 helpers: int) -> None:
        self.fn, self.bounds, self.seats = fn, bounds, helpers
        self.next = 0
        self.total = 0
        self.running = 0
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)

    def work(self) -> None:
        """Take chunks until none is left."""
        while True:
            with self.lock:
                if self.next >= len(self.bounds) or self.error is not None:
                    self.running -= 1
                    self.done.notify_all()
                    return
                lo, hi = self.bounds[self.next]
                self.next += 1
            try:
                result = self.fn(lo, hi)
            except BaseException as err:  # noqa: BLE001 - re-raised by the caller
                with self.lock:
                    self.error = err
                continue
            with self.lock:
                self.total += int(result or 0)


class _Pool:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.queue: deque[_Pass] = deque()
        self.threads: list[threading.Thread] = []

    def _worker(self) -> None:
        while True:
            with self.lock:
                while not self.queue:
                    self.wake.wait()
                job = self.queue[0]
                with job.lock:
                    full = (job.next >= len(job.bounds) or job.error is not None
                            or job.seats == 0)
                    if not full:
                        job.running += 1
                        job.seats -= 1
                if full:
                    self.queue.popleft()
                    continue
            job.work()

    def run(self, fn: Callable[[int, int], int], rows: int, threads: int) -> int:
        helpers = min(threads, max(1, rows // MIN_ROWS_PER_THREAD)) - 1
        if helpers <= 0:
            return int(fn(0, rows) or 0)
        chunks = min(rows, (helpers + 1) * CHUNKS_PER_THREAD)
        bounds = [(rows * i // chunks, rows * (i + 1) // chunks) for i in range(chunks)]
        job = _Pass(fn, bounds, helpers)
        job.running = 1  # the calling thread
        with self.lock:
            while len(self.threads) < helpers:
                thread = threading.Thread(target=self._worker, daemon=True,
                                          name=f"nanprobe-kernels-{len(self.threads)}")
                thread.start()
                self.threads.append(thread)
            self.queue.append(job)
            self.wake.notify(helpers)
        job.work()
        with job.lock:
            while job.running:
                job.done.wait()
        with self.lock:
            if job in self.queue:
                self.queue.remove(job)
        if job.error is not None:
            raise job.error
        return job.total


_pool = _Pool()


def run_rows(fn: Callable[[int, int], int], rows: int) -> int:
    """``sum(fn(lo, hi))`` over chunks ``[lo, hi)`` covering ``range(rows)``, on the calling
    thread and up to ``torch.get_num_threads() - 1`` helpers; ``fn`` must release the GIL (a
    ``nogil`` numba kernel) and write disjoint rows."""
    return _pool.run(fn, rows, torch.get_num_threads())
