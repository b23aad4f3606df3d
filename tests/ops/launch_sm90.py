"""``launch_compiled`` against ``JITFunction.run``, compiled for sm_90 on a machine without a GPU.

    env -u TRITON_INTERPRET python tests/ops/launch_sm90.py

Every launch is recorded (nothing runs): the compiled kernel and the launcher's grid and arguments. Prints a JSON
object of checks, each true when it holds: the fast path launches the kernel Triton compiled for the same
specialisation with the same grid and arguments; a tensor off 16-byte alignment, an integer equal to 1, or other
compile options (``num_warps``) get their own kernel; with a launch hook set, Triton's own path runs. Keyed
launches (``launch(..., key=...)``): from the second of a key on, the kernel, grid and keyword arguments of the
first with the positional arguments of the call, past Triton's binder; a hook or another key goes through it.
"""

from __future__ import annotations

import json
import os

assert os.environ.get("TRITON_INTERPRET") != "1", "compiles real kernels: run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from compile_sm90 import Hopper  # noqa: E402
from triton.compiler.compiler import CompiledKernel  # noqa: E402
from triton.runtime import driver  # noqa: E402

from hadamard_attn.ops.triton import utils  # noqa: E402


@triton.jit
def scale_kernel(x, y, n, s, B: tl.constexpr):
    o = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(y + o, tl.load(x + o, mask=o < n) * s, mask=o < n)


def main() -> None:
    driver.set_active(Hopper())
    calls = []
    CompiledKernel._init_handles = lambda self: None
    CompiledKernel.run = property(lambda self: lambda *a: calls.append((self, a[:3], a[9:], a[7:9])))
    jit_runs = []
    jit_run = triton.runtime.JITFunction.run

    def counted(self, *args, **kwargs):
        jit_runs.append(1)
        return jit_run(self, *args, **kwargs)

    triton.runtime.JITFunction.run = counted
    x, y = torch.rand(100), torch.empty(100)
    grid = lambda meta: (triton.cdiv(100, meta["B"]),)  # noqa: E731

    def fast(*args):
        utils.launch(scale_kernel, grid, *args, B=32)
        return calls[-1]

    def slow(*args):
        scale_kernel[grid](*args, B=32)
        return calls[-1]

    first, again = fast(x, y, 100, 2.0), fast(x, y, 100, 2.0)
    compiles = len(jit_runs)
    ref = slow(x, y, 100, 2.0)
    checks = {
        "compiles through triton once": compiles == 1,
        "same kernel, grid and arguments": first[:3] == again[:3] == ref[:3] and again[0] is first[0],
        "no launch hooks passed": again[3] == (None, None),
    }
    n = len(jit_runs)
    other = fast(x, y, 100, 3.0)
    checks["a float's value is not specialised"] = other[0] is first[0] and len(jit_runs) == n
    xs = torch.rand(101)[1:]  # 4 bytes off 16-byte alignment
    odd = fast(xs, y, 100, 2.0)
    checks["a misaligned tensor gets its own kernel"] = odd[0] is not first[0] and odd[0] is slow(xs, y, 100, 2.0)[0]
    one = fast(x, y, 1, 2.0)
    checks["an integer 1 gets its own kernel"] = one[0] is not first[0] and one[0] is slow(x, y, 1, 2.0)[0]
    warps = len(jit_runs)
    utils.launch(scale_kernel, grid, x, y, 100, 2.0, B=32, num_warps=8)
    eight = calls[-1]
    checks["other compile options get their own kernel"] = eight[0] is not first[0] and len(jit_runs) == warps + 1
    hook = lambda metadata: None  # noqa: E731
    triton.knobs.runtime.launch_enter_hook.add(hook)
    before = len(jit_runs)
    hooked = fast(x, y, 100, 2.0)
    checks["a launch hook takes triton's path"] = len(jit_runs) == before + 1 and hooked[3][0] is not None
    triton.knobs.runtime.launch_enter_hook.remove(hook)

    device = driver.active.get_current_device()
    caches = scale_kernel.device_caches[device]
    binds = []
    scale_kernel.device_caches[device] = (*caches[:4], lambda *a, **k: binds.append(1) or caches[4](*a, **k))

    def keyed(*args, key):
        utils.launch(scale_kernel, grid, *args, key=key, B=32)
        return calls[-1]

    keyed(x, y, 100, 2.0, key="a")
    bound = len(binds)
    z = torch.empty(100)
    fast_keyed = keyed(x, z, 100, 3.0, key="a")
    checks["a key seen before skips the binder"] = len(binds) == bound
    checks["with the call's arguments"] = fast_keyed[:3] == slow(x, z, 100, 3.0)[:3] and fast_keyed[3] == (None, None)
    bound = len(binds)
    checks["another key binds"] = keyed(xs, y, 100, 2.0, key="b")[0] is odd[0] and len(binds) == bound + 1
    triton.knobs.runtime.launch_enter_hook.add(hook)
    before = len(jit_runs)
    hooked = keyed(x, y, 100, 2.0, key="a")
    checks["a hook takes triton's path past a key"] = len(jit_runs) == before + 1 and hooked[3][0] is not None
    triton.knobs.runtime.launch_enter_hook.remove(hook)
    print(json.dumps(checks))


if __name__ == "__main__":
    main()
