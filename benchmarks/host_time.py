"""Host (Python) time of the Triton paths per call, on a machine without a GPU.

    env -u TRITON_INTERPRET PYTHONPATH=src python benchmarks/host_time.py

Below about 1 ms of GPU work a call is bound by its host time (benchmarks/RESULTS.md). This measures that part alone:
every Triton launch compiles for sm_90 (as ``tests/ops/compile_sm90.py`` does) and then launches nothing, and the
tensors are tiny CPU tensors, so what is timed is the wrappers, the autotuner, the launch path and the dispatch of the
torch ops; the ``hadamard_attn`` rows add the public API's input checks and dispatch. A GPU host runs the same Python
several times slower (causal forward+backward: 257 us here, 0.86 ms on the H100's host, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "ops"))

import torch  # noqa: E402
from compile_sm90 import Hopper  # noqa: E402
from triton.compiler.compiler import CompiledKernel  # noqa: E402
from triton.runtime import driver  # noqa: E402


def stub_launches() -> None:
    """Compiled kernels load nothing and launch nothing."""
    driver.set_active(Hopper())
    CompiledKernel._init_handles = lambda self: None
    CompiledKernel.run = property(lambda self: lambda *args, **kwargs: None)
    CompiledKernel.launch_metadata = lambda self, *args: None


def per_call_us(fn, n: int = 300) -> float:
    fn()  # compiles
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e6 * (time.perf_counter() - t0) / n


def main() -> None:
    stub_launches()
    from hadamard_attn import hadamard_attn
    from hadamard_attn.ops.triton import chunk, parallel, step, utils
    from hadamard_attn.ops.triton.utils import sequences

    for kern in (parallel.state_kernel, parallel.readout_kernel, parallel.token_bwd_kernel):
        kern.configs = kern.configs[:1]
    for kern in chunk.KERNELS:
        kern.configs = chunk.gpu_configs(kern, 0)
    step.step_kernel.configs = step.step_kernel.configs[:1]
    B, T, H, Dv, widths = 1, 64, 2, 16, (16, 16)
    q = [torch.rand(B, T, H, r, dtype=torch.bfloat16, requires_grad=True) for r in widths]
    k = [torch.rand(B, T, H, r, dtype=torch.bfloat16, requires_grad=True) for r in widths]
    v = torch.randn(B, T, H, Dv, dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(v)
    S, z = torch.zeros(B, H, 256, Dv), torch.zeros(B, H, 256)
    seqs = sequences(None, B, T, v.device)
    calls = {
        "one launch (parallel state build)": lambda: parallel._build_state(tuple(k), v, S, z, seqs, w_mode=1),
    }
    paths = {"non-causal": parallel.parallel_hadamard_attn_triton, "causal": chunk.chunk_hadamard_attn_triton}
    for name, fn in paths.items():

        def fwd(fn=fn):
            return fn(tuple(q), tuple(k), v, True, 1e-6, None, False, None)[0]

        calls[f"{name} forward"] = fwd
        calls[f"{name} forward+backward"] = lambda fwd=fwd: torch.autograd.grad(fwd(), [*q, *k, v], do)

    def public():  # what a model calls: validation, then the same kernels
        return hadamard_attn(q, k, v, causal=True, backend="triton")[0]

    calls["causal forward, hadamard_attn"] = public
    calls["causal forward+backward, hadamard_attn"] = lambda: torch.autograd.grad(public(), [*q, *k, v], do)
    with torch.no_grad():
        x = [t[:, 0] for t in q], [t[:, 0] for t in k], v[:, 0]
        calls["decode step"] = lambda: step.step_hadamard_attn_triton(*x, (S, z))
    # hadamard_attn's unsupported_reason takes CPU tensors under TRITON_INTERPRET=1 only: set once the kernels are
    # defined (compiled), with the wrappers' own interpreter checks kept off
    os.environ["TRITON_INTERPRET"] = "1"
    for module in (utils, chunk, parallel):  # the modules that ask it
        module.interpreting = lambda: False
    print(f"torch {torch.__version__}; B={B} T={T} H={H} Dv={Dv} widths={widths}, bf16; launches stubbed")
    for name, fn in calls.items():
        print(f"  {name:40s} {per_call_us(fn):8.1f} us")


if __name__ == "__main__":
    main()
