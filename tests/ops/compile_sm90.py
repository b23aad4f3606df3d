"""Compile the causal kernels for Hopper (sm_90) on a machine without a GPU and count their wgmma ops.

    env -u TRITON_INTERPRET python tests/ops/compile_sm90.py WARPS

Runs one causal forward and backward ((64, 4), bf16), whole and in segments (dense and packed), on CPU tensors
with every Triton launch replaced by a compile for sm_90 (the kernels do not run; their outputs are garbage), the
chunk kernels limited to their first GPU config with ``num_warps = WARPS``. Prints a JSON object: kernel name ->
[wgmma ops with the first operand in registers, wgmma ops with both operands in shared memory] (summed over that
kernel's compiles).
"""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "compiles real kernels: run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402
from triton.compiler.compiler import CompiledKernel  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class Hopper(CudaDriver):
    """The CUDA driver's compile side for an sm_90 target, with no device behind it."""

    def __init__(self):  # no CUDA library to load
        pass

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def main(warps: int) -> None:
    driver.set_active(Hopper())
    counts: dict[str, list[int]] = {}
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        ttgir = kernel.asm["ttgir"]
        dots = [line.split(" * ")[0] for line in ttgir.splitlines() if "ttng.warp_group_dot " in line]
        rs = sum("#ttg.dot_op<{opIdx = 0" in d for d in dots)
        c = counts.setdefault(self.fn.__name__, [0, 0])
        c[0], c[1] = c[0] + rs, c[1] + len(dots) - rs
        return kernel

    JITFunction.run = compile_only
    # the launches past Triton's (launch_compiled) do nothing
    CompiledKernel._init_handles = lambda self: None
    CompiledKernel.run = property(lambda self: lambda *a: None)
    from hadamard_attn.ops.triton import chunk

    for kern in chunk.KERNELS:
        (c,) = chunk.gpu_configs(kern, 0)
        kern.configs = [triton.Config(c.kwargs, num_warps=warps, num_stages=c.num_stages)]
    B, T, H, Dv, widths = 1, 100, 2, 64, (64, 4)
    q = [torch.rand(B, T, H, r, dtype=torch.bfloat16) for r in widths]
    k = [torch.rand(B, T, H, r, dtype=torch.bfloat16) for r in widths]
    v = torch.randn(B, T, H, Dv, dtype=torch.bfloat16)
    packed = torch.tensor([0, 30, 100], dtype=torch.int32)
    # whole walks, then segments of one chunk (the carries, the readers adding them), dense and packed
    for segment, cu in ((64, None), (1, None), (1, packed)):
        chunk.segment_chunks = lambda segment=segment: segment
        o, S, z, den, res = chunk.chunk_fwd(q, k, v, None, None, cu, True, 1e-6, 64, True, True)
        do, dS, dz = torch.randn_like(v), torch.zeros_like(S), torch.zeros_like(z)
        chunk.chunk_bwd(q, k, v, o, res, den, None, None, cu, do, dS, dz, True, 1e-6, 64, H)
    print(json.dumps(counts))


if __name__ == "__main__":
    main(int(sys.argv[1]))
