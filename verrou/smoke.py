"""Float sums whose last bits expose the rounding mode; run under Verrou by ``smoke.sh``.

Prints ``python_sum HEX`` (scalar double additions in the interpreter) and ``torch_sum HEX``
(float32 vectorised additions in libtorch; ``absent`` without torch). Under
``--rounding-mode=nearest`` both are the same run after run; under ``random`` they change.
Standalone on purpose: it checks the Verrou install, not nanprobe.
"""

from __future__ import annotations

N = 100_000


def python_sum(n: int = N) -> float:
    s = 0.0
    for _ in range(n):
        s += 0.1
    return s


def torch_sum(n: int = N) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    return float(torch.full((n,), 0.1, dtype=torch.float32).sum())


def main() -> None:
    t = torch_sum()
    print("python_sum", python_sum().hex())
    print("torch_sum", "absent" if t is None else t.hex())


if __name__ == "__main__":
    main()
