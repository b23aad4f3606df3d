"""Where a host-bound causal forward+backward spends its host time, on the GPU (benchmarks/RESULTS.md: the 4,096 bar).

    PYTHONPATH=src python benchmarks/host_threads.py [--n 4096] [--widths 16x16] [--pin 3]

The backward of a CUDA graph runs on autograd's device thread. For HLA (Python ``autograd.Function``), SDPA (flash
and torch's default backend, C++ backward) and a trivial Python ``autograd.Function`` (one elementwise op each way:
the hand-off's own cost), in both autograd modes (``torch.autograd.set_multithreading_enabled``): the ``do_bench``
median of a forward+backward, the host time per call (calls without synchronising), and for HLA the Python time
inside its ``forward`` and ``backward``. ``--pin CPU``: every thread of the process (and those it starts later) on
one core, to see whether moving between cores is part of the cost. HLA is checked against float64 first
(``triton_gpu.check_one``).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import time

import torch
import triton
from triton_gpu import DEV, bench_ms, check_one, make, sdpa_default_backend, sdpa_fns

from hadamard_attn.ops.triton import chunk as tc


class Doubling(torch.autograd.Function):
    """The smallest Python ``autograd.Function`` on the GPU: ``2 x``."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


@contextlib.contextmanager
def timed_function(cls, acc: dict):
    """``cls.forward`` and ``cls.backward`` adding their wall time to ``acc["fwd"]``, ``acc["bwd"]`` (seconds) and
    the backward's calls to ``acc["n"]``; the originals back on exit."""
    fwd, bwd = cls.forward, cls.backward

    def forward(ctx, *args):
        t = time.perf_counter()
        out = fwd(ctx, *args)
        acc["fwd"] += time.perf_counter() - t
        return out

    def backward(ctx, *grads):
        t = time.perf_counter()
        out = bwd(ctx, *grads)
        acc["bwd"] += time.perf_counter() - t
        acc["n"] += 1
        return out

    cls.forward, cls.backward = staticmethod(forward), staticmethod(backward)
    try:
        yield
    finally:
        cls.forward, cls.backward = staticmethod(fwd), staticmethod(bwd)


def host_ms(fn, calls: int = 60) -> float:
    """Host time per call of ``calls`` calls without synchronising (the GPU queue holds them all)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    ms = 1e3 * (time.perf_counter() - t) / calls
    torch.cuda.synchronize()
    return ms


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--dv", type=int, default=128)
    p.add_argument("--widths", default="16x16")
    p.add_argument("--pin", type=int, default=None, metavar="CPU", help="run the process on this core only")
    p.add_argument("--rounds", type=int, default=2, help="passes over both modes")
    p.add_argument("--profile", type=int, default=0, metavar="K", help="then cProfile HLA's calls: the top K")
    a = p.parse_args()
    if a.pin is not None:  # each thread has its own mask (import torch started some); later threads inherit it
        for task in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(task), {a.pin})
    widths = tuple(int(r) for r in a.widths.split("x"))
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}")
    print(f"causal {a.widths}, bf16, B=1, N={a.n}, H={a.heads}, Dv={a.dv}; cores {sorted(os.sched_getaffinity(0))}")
    print(f"SDPA's default backend here: {sdpa_default_backend(a.n, a.heads, a.dv, causal=True)}")
    if not check_one(widths, a.dv, torch.bfloat16, 1, 1000, 2, causal=True):
        raise SystemExit("HLA does not match the float64 reference")

    q, k, v, _, leaves = make(1, a.n, a.heads, widths, a.dv, torch.bfloat16)
    do = torch.randn_like(v)
    x = torch.randn(1024, device=DEV, requires_grad=True)
    fns = {
        "hla": lambda: torch.autograd.grad(tc.chunk_hadamard_attn_triton(tuple(q), tuple(k), v)[0], leaves, do),
        "sdpa-flash": sdpa_fns(a.n, a.heads, a.dv, causal=True)[1],
        "sdpa-default": sdpa_fns(a.n, a.heads, a.dv, causal=True, backend="default")[1],
        "doubling": lambda: torch.autograd.grad(Doubling.apply(x), [x], torch.ones_like(x)),
    }
    for fn in fns.values():
        for _ in range(20):  # compiles, tunes, warms the allocator
            fn()
    acc = {"fwd": 0.0, "bwd": 0.0, "n": 0}
    with timed_function(tc.ChunkHLATriton, acc):
        for _ in range(a.rounds):
            for threads in (True, False):
                torch.autograd.set_multithreading_enabled(threads)
                for name, fn in fns.items():
                    acc.update(fwd=0.0, bwd=0.0, n=0)
                    host = statistics.median(host_ms(fn) for _ in range(5))
                    inside = acc["n"] and (1e6 * acc["fwd"] / acc["n"], 1e6 * acc["bwd"] / acc["n"])
                    ms = statistics.median(bench_ms(fn, rep=100) for _ in range(3))
                    mode = "on " if threads else "off"
                    line = f"  device thread {mode} {name:12s} {ms:.3f} ms, host {host:.3f} ms a call"
                    if inside:
                        line += f"; inside forward {inside[0]:.0f} us, backward {inside[1]:.0f} us"
                    print(line)
    if a.profile:
        print_profile(fns["hla"], a.profile)
    torch.autograd.set_multithreading_enabled(True)


def print_profile(fn, top: int, calls: int = 200) -> None:
    """``cProfile`` of ``calls`` calls of ``fn`` on the main thread (autograd's device thread off, so that the
    backward is seen too): the ``top`` entries by own time, in us a call."""
    torch.autograd.set_multithreading_enabled(False)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, primitive calls, own s, cumulative s, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    total = sum(v[2] for v in stats.values())
    print(f"cProfile, {calls} calls, device thread off: {1e6 * total / calls:.0f} us a call (with the profiler's cost)")
    for (file, line, name), (n, _, own, cum, _) in rows:
        where = f"{os.path.basename(file)}:{line}" if line else file
        us = f"{1e6 * own / calls:7.1f} us own {1e6 * cum / calls:7.1f} us cum"
        print(f"  {us} {n / calls:5.1f} a call  {name} ({where})")


if __name__ == "__main__":
    main()
