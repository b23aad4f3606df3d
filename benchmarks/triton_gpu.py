"""GPU check and benchmark of the HLA Triton kernels (run on a CUDA machine).

    PYTHONPATH=src python3 benchmarks/triton_gpu.py [--skip-check] [--ns 4096,32760] [--widths 32x32,64x4]
    PYTHONPATH=src python3 benchmarks/triton_gpu.py --causal [--skip-check] [--ns 4096,32760] [--widths 16x16]
    (either with --every-config: the check runs every autotuning candidate; --graphs: CUDA-graph replays too;
    --rounds 9: then HLA and SDPA forward+backward in alternation, 9 times each, for bars at host-bound sizes;
    --compile reduce-overhead: those rounds with both torch.compile'd in that mode)

1. correctness at real sizes: forward and every gradient against float64 (the quadratic reference up to a few
   thousand tokens, the torch ``parallel`` path beyond), outputs poisoned with NaN; bf16 at T = 131072 finite;
2. timings (``triton.testing.do_bench`` medians, B=1, H=12, Dv=128, non-causal): SDPA (flash, bf16), the torch
   ``parallel`` path and the Triton kernels, forward and forward+backward, with peak memory.

FLOPs counted for HLA (matmul work only, per head): forward ``4 N M Dv`` (state build ``2 N M Dv`` + read-out
``2 N M Dv``), backward ``8 N M Dv`` (dq, dS, dk, dv: ``2 N M Dv`` each); SDPA forward ``4 N^2 D``, backward
``2.5x`` that. TFLOP/s on these counts; % of the bf16 matmul peak measured in the same run.

``--causal``: the same for causal HLA (the Triton chunked kernels, forward and backward), against
causal SDPA (flash, bf16), the torch ``chunk`` path and, when ``import fla`` works, fla's ``chunk_linear_attn``
(K = 128). Causal FLOPs: forward ``4 N M Dv + 2 N C (Dv + sum R_f)`` (state, read-out, the C x C blocks),
forward+backward 3x that; causal SDPA forward ``2 N^2 D``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time

import torch
import triton
import triton.testing

from hadamard_attn import hadamard_attn_step
from hadamard_attn.ops.chunk import chunk_hadamard_attn
from hadamard_attn.ops.naive import naive_hadamard_attn
from hadamard_attn.ops.parallel import parallel_hadamard_attn
from hadamard_attn.ops.triton import chunk as tc
from hadamard_attn.ops.triton import parallel as tp
from hadamard_attn.ops.triton import utils as tu

DEV = "cuda"
CHUNK = 64  # the causal kernels' chunk (tc.default_chunk_size() on the GPU), for the FLOP count
FLA_K = 128  # fla's feature size in the causal comparison (Wan2.1's head dim)
KERNELS = (tp.state_kernel, tp.readout_kernel, tp.token_bwd_kernel, *tc.KERNELS)
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def log(*args):
    print(*args, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(B, T, H, widths, Dv, dtype, init=False, N=None, grad=True, pad=0):
    """Non-negative factors (each row sums to about 1), random values, optional initial state; ``pad``: the
    first ``pad`` tokens of the last row are left padding: zero keys and values, as the transformers layers pass, and
    zero queries, whose denominator is 0 (fp16: ``do / eps`` beyond its range, clamped)."""
    q = [torch.rand(B, T, H, r, device=DEV).div(r / 2).to(dtype) for r in widths]
    k = [torch.rand(B, T, H, r, device=DEV).div(r / 2).to(dtype) for r in widths]
    v = torch.randn(B, T, H, Dv, device=DEV, dtype=dtype)
    if pad:
        for x in (*q, *k, v):
            x[-1, :pad] = 0
    M = math.prod(widths)
    st = None
    if init:
        N = N or B
        st = (torch.rand(N, H, M, Dv, device=DEV) * 10, torch.rand(N, H, M, device=DEV) * 10)
    leaves = [*q, *k, v] + (list(st) if st else [])
    for x in leaves:
        x.requires_grad_(grad)
    return q, k, v, st, leaves


def triton_attn(q, k, v, causal, *args):
    """The Triton kernels of the mode, called directly (past ``triton_hadamard_attn``'s input checks, which every
    case here passes); ``args``: ``normalize, eps, initial_state, output_final_state, cu_seqlens``."""
    fn = tc.chunk_hadamard_attn_triton if causal else tp.parallel_hadamard_attn_triton
    return fn(tuple(q), tuple(k), v, *args)


def worst(errs) -> float:
    """The largest error, NaN if any is (``max`` keeps its first argument against a NaN)."""
    errs = list(errs)
    return math.nan if any(map(math.isnan, errs)) else max(errs)


def poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def check_one(
    widths,
    Dv,
    dtype,
    B,
    T,
    H,
    normalize=True,
    init=False,
    cu=None,
    ref="naive",
    causal=False,
    pad=0,
    groups=None,
    final=True,
):
    """One case against float64; ``groups``: the causal backward forced into passes of that many heads
    (``backward_heads``, which otherwise splits only where the per-chunk states do not fit; ``backward_plan`` still
    picks the chunk size, 32 for wide factors, as a split backward at real sizes runs); without ``final``, no final
    state asked for (the output and the gradients through it)."""
    P = len(widths)
    cu_t = None if cu is None else torch.tensor(cu, device=DEV, dtype=torch.int32)
    N = B if cu is None else len(cu) - 1
    q, k, v, st, leaves = make(B, T, H, widths, Dv, dtype, init, N, pad=pad)
    saved = tp.empty, tc.empty
    fit = tc.backward_heads
    if groups:
        tc.backward_heads = lambda v, M, cu_seqlens, C: groups
    runs = []
    try:
        # three calls: the second records the launches' keys (a dense batch), the third launches by them
        for _ in range(3):
            tp.empty = tc.empty = poisoned  # an output element a kernel never writes stays NaN
            o, s = triton_attn(q, k, v, causal, normalize, 1e-6, st, final, cu_t)
            s = s or ()
            tp.empty = saved[0]  # the causal backward's outputs poisoned too (the non-causal one's as before: not)
            if not runs:
                go, *gs = torch.randn_like(o), *map(torch.randn_like, s)
            g1 = torch.autograd.grad(sum(((x * g).sum() for x, g in zip((o, *s), (go, *gs)))), leaves)
            torch.cuda.synchronize()  # a fault shows here, in this case
            runs.append((o, *s, *g1))
    finally:
        tp.empty, tc.empty = saved
        tc.backward_heads = fit
    d = [x.detach().double().requires_grad_(True) for x in leaves]
    n = 2 * P + 1
    args = (tuple(d[:P]), tuple(d[P : 2 * P]), d[2 * P])
    init_d = (d[n], d[n + 1]) if init else None
    if ref == "naive":
        o2, s2 = naive_hadamard_attn(*args, causal, normalize, 1e-6, init_d, final, cu_t)
    elif causal:
        o2, s2 = chunk_hadamard_attn(*args, normalize, 1e-6, init_d, final)
    else:
        o2, s2 = parallel_hadamard_attn(*args, normalize, 1e-6, init_d, final)
    s2 = s2 or ()
    g2 = torch.autograd.grad(sum(((x * g.double()).sum() for x, g in zip((o2, *s2), (go, *gs)))), d)
    errs = [worst(rel(run[i], b) for run in runs) for i, b in enumerate((o2, *s2, *g2))]
    errs[1:1] = [] if final else [0.0, 0.0]  # no final state to compare
    names = ["o", "S", "z"] + [f"d{n}" for n in [f"q{f}" for f in range(P)] + [f"k{f}" for f in range(P)] + ["v"]]
    names += ["dS0", "dz0"] if init else []
    run_names = names if final else names[:1] + names[3:]
    bad = sorted({n for run in runs for n, t in zip(run_names, run) if not torch.isfinite(t).all().item()})
    finite = not bad
    ok = finite and all(e < TOL[dtype] * 2 for e in errs)  # a NaN error fails (worst keeps it)
    name = f"{'x'.join(map(str, widths))} Dv={Dv} {str(dtype)[6:]} B={B} T={T} H={H} norm={normalize} init={init}"
    name = ("causal " if causal else "") + name
    name += f" cu={cu}" if cu else ""
    name += f" pad={pad}" if pad else ""
    name += f" backward in passes of {groups} heads" if groups else ""
    name += "" if final else " no final state"
    fwd = f"o/S/z {errs[0]:.1e}/{errs[1]:.1e}/{errs[2]:.1e}" if final else f"o {errs[0]:.1e}"
    grads = " ".join(f"{n} {e:.1e}" for n, e in zip(names[3:], errs[3:]))
    log(f"  {'ok ' if ok else 'BAD'} {name}: {fwd} grads {grads}" + (f" NOT FINITE: {bad}" if bad else ""))
    return ok


def pin_configs(i: int, device: str | torch.device = DEV) -> None:
    """Every kernel limited to its autotuning candidate ``i`` (the last one where it has fewer), in the form
    ``device`` runs."""
    for kern in KERNELS:
        if kern in tc.KERNELS:
            kern.configs = tc.gpu_configs(kern, min(i, len(tc.STATE_CONFIGS) - 1), torch.device(device))
        else:
            kern.configs = kern.configs[min(i, len(kern.configs) - 1) :][:1]
        kern.cache = {}


def max_configs(causal: bool) -> int:
    """Autotuning candidates of the mode's kernels (the most any of them has)."""
    if causal:
        return len(tc.STATE_CONFIGS)
    return max(len(kern.configs) for kern in KERNELS if kern not in tc.KERNELS)


def check(large: bool, causal: bool = False, small: bool = True, config: int = 0) -> bool:
    """The test matrix at real sizes (causal or not; ``small``: the cases up to a few thousand tokens, ``large``:
    T = 16,384 to 131,072); each kernel with its autotuning candidate ``config`` (``pin_configs``). For a
    candidate other than the first, three cases of the matrix (P = 2 and 3, varlen, fp16 with a state)."""
    full = {kern: kern.configs for kern in KERNELS}
    pin_configs(config)
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    cases = [
        ((32, 32), 128, bf16, 2, 1531, 3, True, True, None),
        ((64, 4), 128, bf16, 1, 2048, 4, True, False, None),
        ((4, 64), 64, fp16, 2, 999, 2, True, True, None),
        ((16, 16, 16), 128, bf16, 1, 2000, 2, True, True, [0, 700, 701, 2000]),
        ((64, 64), 256, bf16, 1, 1200, 2, True, False, None),
        ((64,), 32, fp32, 2, 1001, 3, False, True, None),
        ((8,), 64, fp16, 3, 777, 2, True, False, None),
        ((8, 16, 4), 32, fp32, 1, 1500, 2, True, True, [0, 1, 1000, 1500]),
        ((32, 32), 128, fp32, 2, 1, 2, True, True, None),
        ((16, 16), 128, fp16, 1, 3000, 3, False, False, [0, 1200, 3000]),
    ]
    ok = True
    log("check: Triton vs float64 reference (rel. RMS error; forward o/S/z, then each gradient)")
    if causal:
        log(
            f"  ptxas {'.'.join(map(str, tu.ptxas_version()))}: chunk kernels with "
            f"{'num_warps = 2 (no wgmma)' if tu.register_wgmma_hazard(torch.device(DEV)) else 'wgmma'}"
        )
    if config:
        log(f"  autotuning candidate {config} of every kernel")
        cases = [cases[i] for i in (0, 2, 3)]
    for c in cases if small else ():
        ok &= check_one(*c, causal=causal)
    # a transformers prefill: B = 2, T = 4 chunks of 64 exactly, the last row left-padded (zero keys and values)
    for dtype in (fp32, bf16, fp16) if small and not config else ():
        ok &= check_one((16, 16), 64, dtype, 2, 256, 8, True, False, None, causal=causal, pad=100)
    # the causal backward in head groups (passes of 2, 2, 1 heads), dense with a state and packed
    groups = [
        ((64, 64), 128, torch.bfloat16, 2, 1200, 5, True, True, None),
        ((16, 16), 64, fp32, 1, 2000, 5, True, True, [0, 700, 2000]),
    ]
    for c in groups if causal and small and not config else ():
        ok &= check_one(*c, causal=True, groups=2)
    # no final state asked for (what a model calls): whole walks, a segmented dense batch (141 chunks of 64) and a
    # segmented packed one, from initial states
    unfinished = [
        ((32, 32), 128, bf16, 2, 1531, 3, True, True, None),
        ((16, 16), 128, bf16, 2, 9000, 2, True, True, None),
        ((64, 4), 64, fp32, 1, 9000, 2, True, True, [0, 100, 9000]),
    ]
    for c in unfinished if causal and small and not config else ():
        ok &= check_one(*c, causal=True, final=False)
    if large:
        big = "chunk" if causal else "parallel"  # the float64 torch path of the same mode
        ok &= check_one((32, 32), 128, torch.bfloat16, 1, 32760, 12, True, False, None, ref=big, causal=causal)
        ok &= check_one((16, 16, 16), 128, torch.bfloat16, 1, 16384, 4, True, True, None, ref=big, causal=causal)
        for widths in ((16, 16), (32, 32)) if causal else ((32, 32), (64, 64)):
            q, k, v, _, leaves = make(1, 131072, 12, widths, 128, torch.bfloat16)
            finite = True
            for _ in range(3):  # the third by launch keys
                o, s = triton_attn(q, k, v, causal, True, 1e-6, None, True, None)
                g = torch.autograd.grad(o, leaves, torch.randn_like(o))
                finite &= all(torch.isfinite(t).all().item() for t in (o, *s, *g))
                del o, s, g
            mode = "causal " if causal else ""
            log(f"  {'ok ' if finite else 'BAD'} {mode}bf16 T=131072 H=12 {widths}: outputs, gradients finite={finite}")
            ok &= finite
    for kern in KERNELS:
        kern.configs, kern.cache = full[kern], {}
    return ok


def check_step() -> bool:
    """Decode step: the Triton kernel against the torch step in float64, then both timed (H=32, Dv=128, from a
    state); bandwidth on the state bytes read and written (fp32, 2 x B x H x M x Dv x 4)."""
    ok, H, Dv = True, 32, 128
    log("step: Triton decode kernel vs the torch step (float64 reference; then do_bench medians)")
    for B, widths, dtype in ((1, (16, 16), torch.bfloat16), (8, (16, 16), torch.bfloat16),
                             (1, (32, 32), torch.bfloat16), (4, (64, 4), torch.float32)):  # fmt: skip
        M = math.prod(widths)
        q = [torch.rand(B, H, r, device=DEV).div(r / 2).to(dtype) for r in widths]
        k = [torch.rand(B, H, r, device=DEV).div(r / 2).to(dtype) for r in widths]
        v = torch.randn(B, H, Dv, device=DEV, dtype=dtype)
        st = (torch.randn(B, H, M, Dv, device=DEV), torch.rand(B, H, M, device=DEV) + 1)
        with torch.no_grad():
            d = [x.double() for x in (*q, *k, v)]
            o2, (S2, z2) = hadamard_attn_step(d[: len(q)], d[len(q) : -1], d[-1], tuple(x.double() for x in st))
            good, errs = True, [0.0] * 3
            for _ in range(3):  # the third by launch keys
                o, (S, z) = hadamard_attn_step(q, k, v, st, backend="triton")
                good &= all(torch.isfinite(t).all().item() for t in (o, S, z))
                errs = [worst((e, rel(a, b))) for e, a, b in zip(errs, (o, S, z), (o2, S2, z2))]
            good &= all(e < TOL[dtype] * 2 for e in errs)
            ms, ms_torch = (
                bench_ms(lambda b=backend, a=(q, k, v, st): hadamard_attn_step(*a, backend=b))
                for backend in ("triton", "recurrent")
            )
        gbs = 2 * B * H * M * Dv * 4 / ms / 1e6
        log(
            f"  {'ok ' if good else 'BAD'} B={B} {'x'.join(map(str, widths))} {str(dtype)[6:]}: o/S/z "
            f"{errs[0]:.1e}/{errs[1]:.1e}/{errs[2]:.1e}; triton {ms * 1e3:.1f} us ({gbs:.0f} GB/s), "
            f"torch {ms_torch * 1e3:.1f} us"
        )
        ok &= good
    return ok


GRAPHS = False  # --graphs: each timing also as a CUDA-graph replay


def bench_ms(fn, rep=200) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def log_graph_replay(name: str, fwd, fwd_bwd) -> None:
    """With ``--graphs``: forward and forward+backward timed as CUDA-graph replays (``do_bench_cudagraph``
    medians), i.e. the GPU work without the host's launch gaps."""
    if not GRAPHS:
        return
    ms = [triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") for fn in (fwd, fwd_bwd)]
    log(f"      {name} as CUDA-graph replays: fwd {ms[0]:.3f} ms, f+b {ms[1]:.3f} ms")


def peak_mem(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def compiled(fwd, mode: str | None):
    """``fwd`` ``torch.compile``d in ``mode`` (its backward with it; ``reduce-overhead``: CUDA graphs, so no host
    time per launch), or ``fwd`` itself for None."""
    return fwd if mode is None else torch.compile(fwd, mode=mode, fullgraph=True)


def hla_fns(impl, q, k, v, leaves, causal=False, compile_mode=None):
    """Forward and forward+backward closures of one implementation: ``triton``, or the torch path of the mode;
    ``compile_mode``: see ``compiled``."""
    if impl == "triton":

        def fwd():
            return triton_attn(q, k, v, causal, True, 1e-6, None, False, None)[0]
    else:
        torch_path = chunk_hadamard_attn if causal else parallel_hadamard_attn

        def fwd():
            return torch_path(tuple(q), tuple(k), v, True, 1e-6, None, False)[0]

    fwd = compiled(fwd, compile_mode)
    do = torch.randn_like(v)

    def fwd_bwd():
        return torch.autograd.grad(fwd(), leaves, do)

    return fwd, fwd_bwd


def profile(fn):
    """CUDA time per kernel over 3 calls (to see where a forward+backward goes)."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
        log(f"      {e.device_time_total / 3e3:8.3f} ms/call  {e.count // 3:3d}x  {e.key[:90]}")


SDPA_BACKENDS = {
    "flash": [torch.nn.attention.SDPBackend.FLASH_ATTENTION],
    "cudnn": [torch.nn.attention.SDPBackend.CUDNN_ATTENTION],
    "efficient": [torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION],
    "default": None,  # torch's own choice
}


def sdpa_fns(N, H, Dv, causal=False, compile_mode=None, backend="flash"):
    """SDPA (bf16, ``backend`` of ``SDPA_BACKENDS``: flash unless named) forward and forward+backward closures;
    ``compile_mode``: see ``compiled``."""
    q, k, v = (torch.randn(1, H, N, Dv, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    chosen = SDPA_BACKENDS[backend]

    def fwd():
        with contextlib.nullcontext() if chosen is None else torch.nn.attention.sdpa_kernel(chosen):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    fwd = compiled(fwd, compile_mode)

    def fwd_bwd():
        return torch.autograd.grad(fwd(), (q, k, v), do)

    return fwd, fwd_bwd


def bench_sdpa(N, H, Dv, causal=False):
    """SDPA (flash, bf16): forward ms, forward+backward ms, peak MiB."""
    fwd, fwd_bwd = sdpa_fns(N, H, Dv, causal)
    r = bench_ms(fwd, rep=100), bench_ms(fwd_bwd, rep=100), peak_mem(fwd_bwd)
    log_graph_replay("SDPA", fwd, fwd_bwd)
    return r


def sdpa_default_backend(N, H, Dv, causal) -> str:
    """The backend torch's default SDPA picks for these inputs (bf16, ``[1, H, N, Dv]``; a private torch function)."""
    q = torch.empty(1, H, N, Dv, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    return torch.nn.attention.SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=causal)).name


def sdpa_backends(ns, H, Dv, causal):
    """SDPA's forward and forward+backward ms for each backend of ``SDPA_BACKENDS`` (the tables compare with flash,
    as the bars name it; torch's default may pick another, faster one)."""
    log(f"SDPA backends ({'causal' if causal else 'non-causal'}, bf16, B=1, H={H}, Dv={Dv}; ms fwd / f+b)")
    for N in ns:
        cells = []
        for name in SDPA_BACKENDS:
            try:
                fwd, fwd_bwd = sdpa_fns(N, H, Dv, causal, backend=name)
                cells.append(f"{name} {bench_ms(fwd, rep=100):.3f} / {bench_ms(fwd_bwd, rep=100):.3f}")
            except RuntimeError as e:  # a backend that does not take these inputs
                cells.append(f"{name} unavailable ({str(e).splitlines()[0][:60]})")
        log(f"  N={N}: " + ", ".join(cells) + f" (default: {sdpa_default_backend(N, H, Dv, causal)})")


def bar_rounds(ns, widths_list, causal, rounds, compile_mode=None):
    """HLA Triton and SDPA forward+backward timed in alternation, ``rounds`` times each (``do_bench`` medians), at
    B=1, H=12, Dv=128, bf16: where a call is bound by host time, one timing swings with the host, so a bar there
    is read from the rounds (median, range, and how many rounds HLA was faster). ``compile_mode``: both
    ``torch.compile``d in that mode (``compiled``)."""
    H, Dv = 12, 128
    for N in ns:
        sdpa_fb = sdpa_fns(N, H, Dv, causal, compile_mode)[1]
        for widths in widths_list:
            q, k, v, _, leaves = make(1, N, H, widths, Dv, torch.bfloat16)
            hla_fb = hla_fns("triton", q, k, v, leaves, causal, compile_mode)[1]
            hla, sdpa = [], []
            for _ in range(rounds):
                hla.append(bench_ms(hla_fb))
                sdpa.append(bench_ms(sdpa_fb))
            wins = sum(h < t for h, t in zip(hla, sdpa))
            tag = f"compiled ({compile_mode}) " if compile_mode else ""
            log(
                f"  rounds {'causal ' if causal else ''}{tag}N={N} {'x'.join(map(str, widths))} f+b: HLA median "
                f"{statistics.median(hla):.3f} ms ({min(hla):.3f} to {max(hla):.3f}), SDPA median "
                f"{statistics.median(sdpa):.3f} ms ({min(sdpa):.3f} to {max(sdpa):.3f}); HLA faster in {wins}/{rounds}"
            )


def bench_fla(N, H, Dv, K=FLA_K):
    """fla's ``chunk_linear_attn`` (bf16, normalized, K features): forward ms, forward+backward ms, peak MiB; None
    where fla does not import or run."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError as e:
        log(f"  (fla not available: {e})")
        return None
    q, k = (torch.rand(1, N, H, K, device=DEV).div(K / 2).bfloat16().requires_grad_(True) for _ in range(2))
    v = torch.randn(1, N, H, Dv, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(v)

    def fwd():
        return chunk_linear_attn(q=q, k=k, v=v, normalize=True)[0]

    def fwd_bwd():
        return torch.autograd.grad(fwd(), (q, k, v), do)

    try:
        r = bench_ms(fwd, rep=100), bench_ms(fwd_bwd, rep=100), peak_mem(fwd_bwd)
        log_graph_replay("fla", fwd, fwd_bwd)
        return r
    except Exception as e:  # an fla version with another signature: skip it, keep the run
        log(f"  (fla chunk_linear_attn failed: {type(e).__name__}: {e})")
        return None


def hla_flops(N, H, widths, Dv, causal):
    """HLA forward FLOPs (see the module docstring)."""
    flops = 4 * N * math.prod(widths) * Dv
    if causal:
        flops += 2 * N * CHUNK * (Dv + sum(widths))
    return flops * H


def bench(ns, widths_list, peak, impls, rows, torch_max_n, causal=False):
    H, Dv = 12, 128
    for N in ns:
        f, fb, mem = bench_sdpa(N, H, Dv, causal)
        flops = (2 if causal else 4) * N * N * Dv * H
        rows.append(
            (N, "sdpa-causal" if causal else "sdpa-flash", "-", f, fb, flops / f / 1e9, 3.5 * flops / fb / 1e9, mem)
        )
        log(fmt(rows[-1], peak))
        sdpa_f, sdpa_fb = f, fb
        if causal and (r := bench_fla(N, H, Dv)) is not None:
            flops = (4 * N * FLA_K * Dv + 2 * N * CHUNK * (Dv + FLA_K)) * H
            rows.append((N, "fla-linear", f"K={FLA_K}", r[0], r[1], flops / r[0] / 1e9, 3 * flops / r[1] / 1e9, r[2]))
            log(fmt(rows[-1], peak))
        for widths in widths_list:
            q, k, v, _, leaves = make(1, N, H, widths, Dv, torch.bfloat16)
            for impl in impls:
                if impl != "triton" and N > torch_max_n:
                    continue
                fwd, fwd_bwd = hla_fns(impl, q, k, v, leaves, causal)
                rep = 200 if impl == "triton" else 50
                f, fb = bench_ms(fwd, rep), bench_ms(fwd_bwd, rep)
                mem = peak_mem(fwd_bwd)
                flops = hla_flops(N, H, widths, Dv, causal)
                rows.append((N, impl, "x".join(map(str, widths)), f, fb, flops / f / 1e9, 3 * flops / fb / 1e9, mem))
                vs = f"  ({sdpa_f / f:.0f}x SDPA fwd, {sdpa_fb / fb:.1f}x f+b)"
                log(fmt(rows[-1], peak) + (vs if impl == "triton" else ""))
                if impl == "triton":
                    log_graph_replay("HLA Triton", fwd, fwd_bwd)
                if impl == "triton" and N == ns[0]:
                    profile(fwd_bwd)
            del q, k, v, leaves
            torch.cuda.empty_cache()


HEADER = (
    f"{'N':>7} {'impl':>10} {'widths':>9} {'fwd ms':>9} {'f+b ms':>9} {'fwd TF/s':>9} {'%pk':>4} "
    f"{'f+b TF/s':>9} {'%pk':>4} {'peak MiB':>9}"
)


def fmt(r, peak) -> str:
    N, impl, w, f, fb, tf, tfb, mem = r
    return (
        f"{N:>7} {impl:>10} {w:>9} {f:>9.3f} {fb:>9.3f} {tf:>9.1f} {100 * tf / peak:>4.0f} "
        f"{tfb:>9.1f} {100 * tfb / peak:>4.0f} {mem:>9.0f}"
    )


def record_tuning(log_lines):
    """Log every autotuning measurement: (kernel, config, ms)."""
    for kern in KERNELS:
        bench_fn, name = kern._bench, kern.fn.fn.__name__

        def logged(*args, config, _bench=bench_fn, _name=name, **meta):
            t = _bench(*args, config=config, **meta)
            log_lines.append(f"  tune {_name} {config}: {t[0]:.4f} ms")
            log(log_lines[-1])
            return t

        kern._bench = logged


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--no-large", action="store_true")
    p.add_argument("--large-only", action="store_true", help="only the large cases of the check")
    p.add_argument("--no-bench", action="store_true", help="the check only")
    p.add_argument("--every-config", action="store_true", help="check every autotuning candidate, not the first only")
    p.add_argument("--step", action="store_true", help="only the decode step: check and timings")
    p.add_argument("--ns", default="4096,16384,32760,75600,131072")
    p.add_argument("--widths", default="16x16,32x32,64x4,64x64,16x16x16")
    p.add_argument("--graphs", action="store_true", help="also time SDPA, fla and HLA Triton as CUDA-graph replays")
    p.add_argument("--causal", action="store_true", help="causal HLA: chunked kernels vs causal SDPA, torch chunk, fla")
    p.add_argument("--impls", default=None, help="default: parallel,triton (chunk,triton with --causal)")
    p.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="then time HLA Triton and SDPA forward+backward in alternation this many times at each N and width",
    )
    p.add_argument("--sdpa-backends", action="store_true", help="only SDPA, each of its backends, at --ns")
    p.add_argument(
        "--compile",
        default=None,
        metavar="MODE",
        help="--rounds with both forwards torch.compile'd in this mode (e.g. reduce-overhead: CUDA graphs)",
    )
    p.add_argument(
        "--parallel-max-n",
        type=int,
        default=1 << 30,
        help="skip the (slow) torch path (parallel, or chunk with --causal) above this N",
    )
    a = p.parse_args()
    global GRAPHS
    GRAPHS = a.graphs
    impls = (a.impls or ("chunk,triton" if a.causal else "parallel,triton")).split(",")
    mode = "causal" if a.causal else "non-causal"
    props = torch.cuda.get_device_properties(0)
    log(f"device {props.name}, {props.multi_processor_count} SMs")
    log(f"torch {torch.__version__}; triton {triton.__version__}; python {sys.version.split()[0]}")
    log(f"date {time.strftime('%Y-%m-%d')}")
    if a.step:
        sys.exit(0 if check_step() else 1)
    if a.sdpa_backends:
        sdpa_backends([int(n) for n in a.ns.split(",")], 12, 128, a.causal)
        sys.exit(0)
    ok = True
    if not a.skip_check:
        t0 = time.time()
        ok = check(not a.no_large, a.causal, small=not a.large_only)
        for i in range(1, max_configs(a.causal) if a.every_config else 1):
            ok &= check(False, a.causal, config=i)
        log(f"check {'PASSED' if ok else 'FAILED'} in {time.time() - t0:.0f} s")
    if a.no_bench:
        sys.exit(0 if ok else 1)
    peak = matmul_peak()
    log(f"bf16 matmul 8192^3: {peak:.0f} TFLOP/s (the peak used for %pk)")
    rows, tuning = [], []
    record_tuning(tuning)
    log(HEADER)
    widths = [tuple(int(r) for r in w.split("x")) for w in a.widths.split(",")]
    t0 = time.time()
    bench([int(n) for n in a.ns.split(",")], widths, peak, impls, rows, a.parallel_max_n, a.causal)
    log(f"bench took {time.time() - t0:.0f} s")
    log(f"\nsummary (bf16, B=1, H=12, Dv=128, {mode})")
    log(HEADER)
    for r in rows:
        log(fmt(r, peak))
    if a.rounds:
        bar_rounds([int(n) for n in a.ns.split(",")], widths, a.causal, a.rounds, a.compile)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
