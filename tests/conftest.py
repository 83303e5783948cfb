import sys
from pathlib import Path

# make the test oracles in tests/ importable as plain modules
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="module", params=["numba", "torch"])
def kernels(request):
    """Run a test with the fused numba CPU kernels and with the device-agnostic torch path."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANPROBE_KERNELS", request.param)
        yield request.param


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: faster on small tensors, immune to oversubscribed
    cores (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
