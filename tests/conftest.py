"""Session-wide test settings: Triton's interpreter without CUDA, a share of the cores per xdist worker."""

import os

import torch

if not torch.cuda.is_available():
    # the Triton kernels run on CPU tensors under the interpreter; it must be set before triton.jit decorates them
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        # intra-op threads of several workers on the same cores slow every small op down
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
