"""Per-thread scratch buffers for temporaries that never leave a call.

Fresh multi-MB allocations cost page faults that take as long as the work itself on small
machines (the allocator hands large blocks back to the system on free). A temporary that dies
within the call therefore lives in a buffer reused across calls: one per thread and name, grown
on demand up to :data:`SCRATCH_MAX_BYTES`; larger requests (and non-CPU ones) get fresh memory.
"""

from __future__ import annotations

import math
import threading

import torch

#: largest scratch buffer kept per thread and name, in bytes
SCRATCH_MAX_BYTES = 256 << 20

_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape`` and ``dtype``, valid until the next call
    with the same ``name`` on this thread."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes > SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buf = buffers.get(name)
    if buf is None or buf.numel() < nbytes:
        buf = buffers[name] = torch.empty(nbytes, dtype=torch.uint8)
    return buf[:nbytes].view(dtype).view(shape)
