"""Helpers shared by the HLA Triton kernels: Khatri-Rao tiles in registers, their gradient, sequence bounds.

A tile of the implicit feature ``phi = x_1 (x) ... (x) x_P`` (row-major, factor 1 slowest) is the product of
one block of each factor: ``B_1 x ... x B_P`` feature indices, ``BM = B_1 * ... * B_P``. Inner factors are
taken whole where the tile allows (``B_f = R_f``), then one factor in blocks, the outer ones one index at a
time: a tile is a contiguous range of features. Only factor 1 may be padded (``B_1 > R_1``, masked), to give
``tl.dot`` the 16 rows it needs when ``M < 16``.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _get_current_dispatch_mode


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ptxas before 13.3 schedules a Hopper wgmma whose first operand is in registers against the instructions that
# write those registers (triton-lang/triton#9433, fixed in ptxas 13.3); Triton 3.6 bundles ptxas 12.8
REGISTER_WGMMA_PTXAS = (13, 3)


def register_wgmma_hazard(device: torch.device) -> bool:
    """True on a Hopper GPU (sm_90) when Triton compiles with a ptxas older than 13.3 (``TRITON_PTXAS_PATH`` picks
    another one). The causal kernels then avoid wgmma (``safe_configs``). The non-causal kernels also feed
    ``tl.dot`` from registers but keep wgmma: whether ptxas mis-schedules is a property of each compiled kernel,
    and theirs passed every H100 check with ptxas 12.8 (benchmarks/RESULTS.md), where the causal backward failed
    every time; a kernel change there needs the GPU check again."""
    if device.type != "cuda" or interpreting() or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    return ptxas_version() < REGISTER_WGMMA_PTXAS


def ptxas_version() -> tuple[int, ...]:
    """Version of the ptxas Triton compiles with (``TRITON_PTXAS_PATH``, else the one it bundles)."""
    return tuple(int(x) for x in triton.knobs.nvidia.ptxas.version.split("."))


def safe_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """``early_config_prune`` of the causal kernels: with ``register_wgmma_hazard``, only their ``num_warps = 2``
    candidates (Triton emits wgmma for multiples of 4 warps only, mma.sync otherwise), else the others.

    H100, Triton 3.6 (ptxas 12.8), 2026-11-26: with wgmma the causal backward gave NaN or wrong factor gradients and
    once an illegal memory access; both ``num_warps = 2`` and ptxas 13.5 passed every case."""
    device = next(a.device for a in named_args.values() if isinstance(a, torch.Tensor))
    two = register_wgmma_hazard(device)
    kept = [c for c in configs if (c.num_warps == 2) == two]
    return kept or configs


def traced(op, fn):
    """The custom op ``op`` under any tracing (``torch.compile``, ``torch.jit.trace``, a dispatch mode such as
    ``FakeTensorMode`` or ``make_fx``: its fake implementation and schema are what they see), else its Python
    function ``fn``: in plain eager mode the dispatcher round trip costs about 0.1 ms a call on an H100 host."""
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    return op if tracing or _get_current_dispatch_mode() is not None else fn


def autotune_configs(*candidates: tuple[int, ...], keys: str) -> list[triton.Config]:
    """Autotuning candidates ``(*block sizes named by keys, num_warps, num_stages)``; the interpreter gets one
    config of 16s (``BV = 32``, so that tests see it capped at ``Dv = 16``)."""
    names = keys.split()
    if interpreting():
        return [triton.Config({k: 32 if k == "BV" else 16 for k in names}, num_warps=1, num_stages=1)]
    return [triton.Config(dict(zip(names, c[:-2])), num_warps=c[-2], num_stages=c[-1]) for c in candidates]


def autotuned(*candidates: tuple[int, ...], keys: str, key: list[str], **kwargs):
    """``triton.autotune`` over ``autotune_configs(*candidates, keys=keys)`` with the autotuning ``key``; the results
    are cached in Triton's cache directory (tuned once per machine, as fla does). ``kwargs``: more of its options.

    The ``key`` names plain (JSON) arguments only: the disk cache writes their values as JSON once the tuning is
    done, and a ``tl.dtype`` there raised on the first call of every key on the GPU. The tensors' dtypes, which the
    autotuner adds to its key itself, stand for the dot dtype (``DOT``) that follows from them."""
    return triton.autotune(configs=autotune_configs(*candidates, keys=keys), key=key, cache_results=True, **kwargs)


# keyed launches remembered per kernel; past this many (dense batches of ever new shapes) the memo starts over
KEYED_LAUNCHES = 1024


def launch(kernel, grid, *args, key=None, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` for a Triton kernel, ``triton.autotune``d or not, with less host time.

    Autotuned: the autotuner runs on the first call of each autotuning key (its ``key`` arguments, all passed by
    name here); later calls launch the config it chose directly: the autotuner's own work per call (dictionaries of
    every argument, each tensor's dtype as text) cost about 55 us of host time a launch on an H100 host. Assigning
    ``kernel.configs`` (tests pin configs) resets it. The memo holds the autotuner's choice only, per device, dtype
    of the first argument and dot dtype (a config chosen on one GPU is not one ``safe_configs`` kept for another;
    the autotuner's own key has the tensors' dtypes, not the dot dtype). Then ``launch_compiled``.

    ``key`` (hashable, optional): the caller's promise that launches with equal keys differ in the values of their
    positional arguments only, not in the grid, the keyword arguments or the specialisation of the positional
    arguments (each tensor's dtype and 16-byte alignment, see ``alignment``; each integer's value class: 1, a
    multiple of 16, its width). The second launch of a key on a device, and every later one, goes straight to the
    kernel compiled for it, with the grid and keyword arguments of the first: Triton's argument binder costs about
    0.5 us an argument (12 to 21 us a chunk kernel) on an H100 host.
    """
    configs = getattr(kernel, "configs", None)
    keyed = kernel.__dict__.get("_keyed")  # only a compiled (not interpreted) kernel has one
    if key is not None and keyed is not None:
        device = triton.runtime.driver.active.get_current_device()
        hit = keyed.get(_full_key(device, key))
        if hit is not None and hit[0] is configs and not launch_hooked():
            _, kern, g0, g1, g2, tail = hit
            stream = triton.runtime.driver.active.get_current_stream(device)
            kern.run(g0, g1, g2, stream, kern.function, kern.packed_metadata, None, None, None, *args, *tail)
            return
    if isinstance(kernel, triton.runtime.Autotuner):
        chosen = kernel.__dict__.setdefault("_chosen", {})
        tune_key = (args[0].device, args[0].dtype, kwargs.get("DOT"), *map(kwargs.__getitem__, kernel.keys))
        tuned = chosen.get(tune_key)
        if tuned is None or tuned[0] is not kernel.configs:
            kernel[grid](*args, **kwargs)
            chosen[tune_key] = (kernel.configs, kernel.best_config.all_kwargs())
            return
        fn, fn_kwargs = kernel.fn, {**kwargs, **tuned[1]}
    else:
        fn, fn_kwargs = kernel, kwargs
    launched = launch_compiled(fn, grid, args, fn_kwargs)
    if key is not None and launched is not None:
        keyed = kernel.__dict__.setdefault("_keyed", {})
        if len(keyed) >= KEYED_LAUNCHES:
            keyed.clear()
        device, kern, g, values = launched
        keyed[_full_key(device, key)] = (configs, kern, *g, tuple(values[len(args) :]))


def _full_key(device: int, key) -> tuple:
    """A ``launch`` key with what else sets the compiled kernel: the device and Triton's debug options."""
    return device, triton.knobs.runtime.debug, triton.knobs.compilation.instrumentation_mode, key


def launch_hooked() -> bool:
    """Whether a profiler (or anything else) set Triton's launch hooks: launches then take Triton's own path."""
    runtime = triton.knobs.runtime
    # a hook is None or a HookChain (Triton 3.6), empty unless a profiler added one
    return bool(
        getattr(runtime.launch_enter_hook, "calls", runtime.launch_enter_hook)
        or getattr(runtime.launch_exit_hook, "calls", runtime.launch_exit_hook)
    )


def launch_compiled(fn, grid, args: tuple, kwargs: dict) -> tuple | None:
    """``fn[grid](*args, **kwargs)`` for a ``triton.jit`` function: Triton's own binder specialises the arguments
    (dtypes, 16-byte alignment, integers equal to 1 or divisible by 16, constexpr values), and the kernel compiled
    for that specialisation (by Triton, on its first launch) is launched directly, past the rest of
    ``JITFunction.run`` (its cache key is a string of every compile option, built per launch). The memo's key has
    what Triton's has: the specialisation and the compile options (``num_warps``, ``num_stages``, ...). Launch hooks
    (profilers) and the interpreter take Triton's own path.

    Returns ``(device, compiled kernel, (grid_0, grid_1, grid_2), every argument's value in the kernel's order)``
    (for ``launch``'s keys), None where Triton's own path launched."""
    if not isinstance(fn, triton.runtime.JITFunction):  # the interpreter's function
        fn[grid](*args, **kwargs)
        return None
    runtime = triton.knobs.runtime
    device = triton.runtime.driver.active.get_current_device()
    bound, spec, options = fn.device_caches[device][4](*args, **kwargs)
    compiled = fn.__dict__.setdefault("_compiled", {})
    key = (device, runtime.debug, triton.knobs.compilation.instrumentation_mode, *spec, *options.items())
    if launch_hooked():
        fn.run(*args, grid=grid, warmup=False, **kwargs)
        return None
    kern = compiled.get(key)
    if kern is None:  # Triton compiles it (or finds it in its caches), without launching
        kern = fn.run(*args, grid=grid, warmup=True, **kwargs)
        if kern is None:  # a compile hook (``jit_cache_hook``) skipped it
            return None
        compiled[key] = kern = kern.result() if hasattr(kern, "result") else kern
    g = grid(bound) if callable(grid) else grid
    stream = triton.runtime.driver.active.get_current_stream(device)
    g = (*g, 1, 1)[:3]
    values = tuple(bound.values())
    kern.run(*g, stream, kern.function, kern.packed_metadata, None, None, None, *values)
    return device, kern, g, values


def alignment(*xs) -> tuple:
    """Part of a ``launch`` key: each tensor's dtype and whether its address is a multiple of 16 (Triton
    specialises a pointer argument on both); None for None."""
    return tuple(None if x is None else (x.dtype, x.data_ptr() % 16 == 0) for x in xs)


def length_class(tokens: int) -> int:
    """The autotuning key's length class (``LENGTH_CLASS`` argument, unused by the kernel body): the bit length of
    the token count, so that a config tuned at 4,096 tokens is not reused at 131,072 (H100, (32, 32), N = 32,760:
    2.31 ms forward+backward with the configs tuned at 4,096, 2.19 ms with its own)."""
    return max(tokens, 1).bit_length()


def keeps_residual(dtype: torch.dtype, normalize: bool, backward: bool) -> bool:
    """Whether a causal forward keeps its output's rounding residual (``store_output``): for a ``backward`` (some
    input needs a gradient) of a normalised 16-bit output. It costs one more output-sized tensor saved for the
    backward and its store (in the non-causal read-out, before its backward took ``w`` from its own pass over the
    state instead, that store cost about 0.07 ms of a 0.6 ms forward on the H100 at (32, 32), N = 32,760)."""
    return backward and normalize and dtype != torch.float32


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output the kernels write in full is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """The operand dtype of ``tl.dot`` for inputs of ``dtype``; fp32 under the interpreter (its bf16 dots are
    wrong)."""
    return torch.float32 if interpreting() else dtype


def dot_config(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """``(DOT, PREC)`` kernel arguments: the ``tl.dot`` operand dtype and its fp32 precision (one environment
    lookup: a few us of host time each on an H100 host)."""
    interp = interpreting()
    return _TL[torch.float32 if interp else dtype], "ieee" if interp else "tf32x3"


def factors3(x) -> tuple:
    """P <= 3 factor tensors padded to three with the first (the kernels never read the padding)."""
    return (tuple(x) + (x[0],) * (3 - len(x)))[:3]


def widths3(widths: tuple[int, ...]) -> tuple[int, int, int]:
    """P <= 3 factor widths padded with 1 to three: ``(R_1, R_2, R_3)``."""
    return tuple(widths) + (1,) * (3 - len(widths))


@triton.constexpr_function
def factor_blocks(R1: int, R2: int, R3: int, BM: int) -> tuple[int, int, int]:
    """Block of each factor in a Khatri-Rao tile of about ``BM`` features, at least 16, inner factors first."""
    B3 = min(R3, BM)
    B2 = min(R2, max(BM // B3, 1))
    B1 = min(R1, max(BM // (B2 * B3), 1))
    B1 = max(B1, 16 // (B2 * B3))  # pad factor 1 (masked) up to 16 features
    return B1, B2, B3


@triton.constexpr_function
def kr_tile_count(R1: int, R2: int, R3: int, BM: int) -> int:
    """Number of Khatri-Rao tiles over the ``M = R1 * R2 * R3`` features for tiles of about ``BM``."""
    B1, B2, B3 = factor_blocks(R1, R2, R3, BM)
    return -(-R1 // B1) * -(-R2 // B2) * -(-R3 // B3)


@functools.cache
def tile_count(R1: int, R2: int, R3: int, BM: int) -> int:
    """``kr_tile_count`` on the host (launch grids), memoised: a constexpr function's call costs several us."""
    return kr_tile_count(R1, R2, R3, BM)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on the host (launch grids): ``triton.cdiv`` is a constexpr function, several us a call."""
    return -(-a // b)


@functools.cache
def dummy(device: torch.device) -> torch.Tensor:
    """An int32 tensor for the pointer arguments a launch does not read (one per device, not one per call)."""
    return torch.empty(1, dtype=torch.int32, device=device)


# evaluated when a kernel compiles, also callable on the host (per-launch ``triton.heuristics`` cost about 20 us of
# host time a launch)


@triton.constexpr_function
def kr_block(f: int, R1: int, R2: int, R3: int, BM: int) -> int:
    """Block of factor ``f`` (1 to 3) in a Khatri-Rao tile (``factor_blocks``), inside a kernel."""
    return factor_blocks(R1, R2, R3, BM)[f - 1]


@triton.constexpr_function
def at_most(x: int, cap: int) -> int:
    return min(x, cap)


@triton.constexpr_function
def at_least(x: int, floor: int) -> int:
    return max(x, floor)


class Seqs(NamedTuple):
    """Where the sequences lie in the flat tokens ``[TT = B * T]``."""

    cu_seqlens: torch.Tensor  # int32 [N + 1] (varlen) or a dummy
    seq_ids: torch.Tensor  # int32 [TT]: sequence of each token (varlen) or a dummy
    N: int  # number of sequences (and of states)
    T_SEQ: int  # length of every sequence (dense batch) or 0
    IS_VARLEN: bool


def sequences(cu_seqlens: torch.Tensor | None, B: int, T: int, device) -> Seqs:
    """The B rows of a dense batch, or the ``cu_seqlens`` ranges of a packed one (``B == 1``)."""
    if cu_seqlens is None:
        return Seqs(dummy(device), dummy(device), B, T, False)
    cu = cu_seqlens.to(torch.int32).contiguous()  # the kernels read it contiguous (a strided one passes the API)
    seq_ids = torch.bucketize(torch.arange(T, device=device, dtype=torch.int32), cu[1:], right=True).to(torch.int32)
    return Seqs(cu, seq_ids, cu.numel() - 1, 0, True)


@triton.jit
def seq_of(seq_ids, t, T_SEQ, IS_VARLEN: tl.constexpr):
    """Index of the sequence that flat token ``t`` belongs to."""
    if IS_VARLEN:
        n = tl.load(seq_ids + t)
    else:
        n = t // T_SEQ
    return n


@triton.jit
def seq_bounds(cu_seqlens, n, T_SEQ, IS_VARLEN: tl.constexpr):
    """``[bos, eos)``: flat token range of sequence ``n``."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + n)
        eos = tl.load(cu_seqlens + n + 1)
    else:
        bos = n * T_SEQ
        eos = bos + T_SEQ
    return bos, eos


@triton.jit
def factor_block(x, rows, mask_t, i_f, R: tl.constexpr, B: tl.constexpr, PAD: tl.constexpr):
    """Block ``i_f`` of one factor ``[TT, H, R]`` (``rows = t * H + h``): ``[BT, B]`` fp32."""
    o = i_f * B + tl.arange(0, B)
    mask = mask_t[:, None]
    if PAD:
        mask = mask & (o < R)[None, :]
    a = tl.load(x + rows[:, None] * R + o[None, :], mask=mask, other=0)
    return a.to(tl.float32)


@triton.jit
def kr_tile(
    x1,
    x2,
    x3,
    rows,
    mask_t,
    i_m,
    BT: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    B1: tl.constexpr,
    B2: tl.constexpr,
    B3: tl.constexpr,
    P: tl.constexpr,
):
    """Khatri-Rao tile ``i_m`` of the rows, ``phi [BT, BM]`` fp32 (features ``i_m * BM + arange(BM)``, those
    ``>= M`` padding), and the factor blocks ``a_f [BT, B_f]`` with their block indices ``i_f`` (for the
    gradient)."""
    i3 = i_m % (R3 // B3)
    i2 = (i_m // (R3 // B3)) % (R2 // B2)
    i1 = i_m // ((R3 // B3) * (R2 // B2))
    a1 = factor_block(x1, rows, mask_t, i1, R1, B1, B1 > R1)
    phi = a1  # [BT, B1]
    a2, a3 = a1, a1
    if P >= 2:
        a2 = factor_block(x2, rows, mask_t, i2, R2, B2, False)
        phi = tl.reshape(phi[:, :, None] * a2[:, None, :], (BT, B1 * B2))
    if P == 3:
        a3 = factor_block(x3, rows, mask_t, i3, R3, B3, False)
        phi = tl.reshape(phi[:, :, None] * a3[:, None, :], (BT, B1 * B2 * B3))
    return phi, a1, a2, a3, i1, i2, i3


@triton.jit
def factor_block_t(x, rows, mask_t, i_f, R: tl.constexpr, B: tl.constexpr, PAD: tl.constexpr):
    """``factor_block`` transposed: ``[B, BT]`` fp32."""
    o = i_f * B + tl.arange(0, B)
    mask = mask_t[None, :]
    if PAD:
        mask = mask & (o < R)[:, None]
    return tl.load(x + rows[None, :] * R + o[:, None], mask=mask, other=0).to(tl.float32)


@triton.jit
def kr_tile_t(
    x1,
    x2,
    x3,
    rows,
    mask_t,
    i_m,
    BT: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    B1: tl.constexpr,
    B2: tl.constexpr,
    B3: tl.constexpr,
    P: tl.constexpr,
):
    """``kr_tile`` transposed, formed as such (no transpose through shared memory): ``phi^T [BM, BT]`` fp32."""
    i3 = i_m % (R3 // B3)
    i2 = (i_m // (R3 // B3)) % (R2 // B2)
    i1 = i_m // ((R3 // B3) * (R2 // B2))
    phi = factor_block_t(x1, rows, mask_t, i1, R1, B1, B1 > R1)  # [B1, BT]
    if P >= 2:
        a2 = factor_block_t(x2, rows, mask_t, i2, R2, B2, False)
        phi = tl.reshape(phi[:, None, :] * a2[None, :, :], (B1 * B2, BT))
    if P == 3:
        a3 = factor_block_t(x3, rows, mask_t, i3, R3, B3, False)
        phi = tl.reshape(phi[:, None, :] * a3[None, :, :], (B1 * B2 * B3, BT))
    return phi


@triton.jit
def kr_tile_grads(
    dphi, a1, a2, a3, BT: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, P: tl.constexpr
):
    """Gradient of a Khatri-Rao tile w.r.t. its factor blocks, given ``dphi [BT, BM]``: ``g_f [BT, B_f]`` fp32
    (``g_1`` in place of missing factors)."""
    g2, g3 = a1, a1
    if P == 3:
        d = tl.reshape(dphi, (BT, B1 * B2, B3))
        a12 = tl.reshape(a1[:, :, None] * a2[:, None, :], (BT, B1 * B2))
        g3 = tl.sum(d * a12[:, :, None], 1)  # [BT, B3]
        dphi = tl.sum(d * a3[:, None, :], 2)  # [BT, B1 * B2]
    if P >= 2:
        d = tl.reshape(dphi, (BT, B1, B2))
        g2 = tl.sum(d * a1[:, :, None], 1)  # [BT, B2]
        dphi = tl.sum(d * a2[:, None, :], 2)  # [BT, B1]
    return dphi, g2, g3


@triton.jit
def add_block(acc, g, i_f, W: tl.constexpr, B: tl.constexpr):
    """``acc [BT, W // B, B]`` plus ``g [BT, B]`` at block ``i_f`` (columns ``i_f * B + arange(B)``), in registers."""
    if W == B:
        acc += g[:, None, :]
    else:
        acc += tl.where((tl.arange(0, W // B) == i_f)[None, :, None], g[:, None, :], 0.0)
    return acc


@triton.jit
def store_output(o, res, offs, acc, mask, RES: tl.constexpr):
    """``o[offs] = acc`` (fp32) in ``o``'s dtype; with ``RES``, ``res[offs]`` = what that rounding dropped, in the same
    dtype (``load_output``: ``acc`` to about 16 bits). The backward's ``w = -sum(g * o)`` cancels against ``g S^T``
    and must see the output the dots saw: with the rounded ``o`` a P = 3 query gradient was off by 4.9e-2 (H100).
    (An int8 residual relative to the rounded output, half the bytes, made the non-causal read-out, which kept a
    residual then, slower, not faster: 0.44 against 0.30 ms on the H100 at (32, 32), N = 32,760.)"""
    b_o = acc.to(o.dtype.element_ty)
    tl.store(o + offs, b_o, mask=mask)
    if RES:
        tl.store(res + offs, (acc - b_o.to(tl.float32)).to(res.dtype.element_ty), mask=mask)


@triton.jit
def load_output(o, res, offs, mask, RES: tl.constexpr):
    """The fp32 output ``store_output`` wrote: ``o[offs]``, plus its residual ``res[offs]`` with ``RES``."""
    b_o = tl.load(o + offs, mask=mask, other=0).to(tl.float32)
    if RES:
        b_o += tl.load(res + offs, mask=mask, other=0).to(tl.float32)
    return b_o


@triton.jit
def kr_state_grads(
    x1, x2, x3, rows, mask_t, G, w, S, z, cS, cz,
    DV: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    W3: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr, WANT_DV: tl.constexpr,
    SPLIT_Z: tl.constexpr, CARRY: tl.constexpr,
):  # fmt: skip
    """Gradient through a state, over its Khatri-Rao tiles: ``dphi(x) = G S^T + w z^T`` -> the factor gradients
    ``g_f [BT, W_f]`` fp32 (``W_f >= R_f`` columns, a power of two; summed in registers, columns ``>= R_f``
    meaningless), and ``phi(x) S [BT, DV]`` fp32 if ``WANT_DV`` (else zeros).

    ``G [BT, DV]`` (cast to ``S``'s dtype for the dots), ``w [BT]`` fp32; ``S``, ``z``: pointers to one state
    ``[M, DV]`` and ``[M]``, plus ``cS, cz`` (fp32, same shapes) with ``CARRY`` (``load_carried``). With
    ``SPLIT_Z`` (``w`` not known yet, unused): ``g_f`` of ``G S^T`` alone, for the caller's ``g_f + w zg_f``
    (``den_factor_grads``; ``factor_dots`` gives the sums along ``phi(x)`` that ``w`` needs).
    Returns ``(g_1, g_2, g_3, phi(x) S)``.
    """
    B1: tl.constexpr = kr_block(1, R1, R2, R3, BM)
    B2: tl.constexpr = kr_block(2, R1, R2, R3, BM)
    B3: tl.constexpr = kr_block(3, R1, R2, R3, BM)
    NM: tl.constexpr = kr_tile_count(R1, R2, R3, BM)
    M: tl.constexpr = R1 * R2 * R3
    BMA: tl.constexpr = B1 * B2 * B3
    o_v = tl.arange(0, DV)
    G = G.to(S.dtype.element_ty)
    acc1 = tl.zeros([BT, W1 // B1, B1], dtype=tl.float32)
    acc2 = tl.zeros([BT, W2 // B2, B2], dtype=tl.float32)
    acc3 = tl.zeros([BT, W3 // B3, B3], dtype=tl.float32)
    dv = tl.zeros([BT, DV], dtype=tl.float32)
    for i_m in range(NM):
        phi, a1, a2, a3, i1, i2, i3 = kr_tile(x1, x2, x3, rows, mask_t, i_m, BT, R1, R2, R3, B1, B2, B3, P)
        o_m = i_m * BMA + tl.arange(0, BMA)
        mask_m = o_m < M
        b_s = load_carried(S, cS, o_m[:, None] * DV + o_v[None, :], mask_m[:, None], CARRY)  # [BMA, DV]
        # [BT, DV] @ [DV, BMA]
        dphi = tl.dot(G, tl.trans(b_s), input_precision=PREC)
        if not SPLIT_Z:
            dphi += w[:, None] * load_carried(z, cz, o_m, mask_m, CARRY)[None, :]
        g1, g2, g3 = kr_tile_grads(dphi, a1, a2, a3, BT, B1, B2, B3, P)
        acc1 = add_block(acc1, g1, i1, W1, B1)
        if P >= 2:
            acc2 = add_block(acc2, g2, i2, W2, B2)
        if P == 3:
            acc3 = add_block(acc3, g3, i3, W3, B3)
        if WANT_DV:
            dv += tl.dot(phi.to(b_s.dtype), b_s, input_precision=PREC)
    return tl.reshape(acc1, (BT, W1)), tl.reshape(acc2, (BT, W2)), tl.reshape(acc3, (BT, W3)), dv


@triton.jit
def load_carried(p, c, offs, mask, CARRY: tl.constexpr):
    """A piece of a state, ``p[offs]`` (0 where not ``mask``), plus with ``CARRY`` the fp32 ``c[offs]`` (the
    carry of a segmented state walk: the state entering the segment), in ``p``'s dtype."""
    b = tl.load(p + offs, mask=mask, other=0)
    if CARRY:
        b = (b.to(tl.float32) + tl.load(c + offs, mask=mask, other=0)).to(p.dtype.element_ty)
    return b


@triton.jit
def factor_dots(x1, rows, mask_t, g1, z1, R1: tl.constexpr, W1: tl.constexpr):
    """``(phi(x) . dphi, phi(x) . dphi_z)`` ``[BT]`` fp32 from ``g1, z1 [BT, W1]``, the first factor's gradients of
    ``dphi`` and ``dphi_z [BT, M]`` (one load of the factor): ``phi`` is linear in each factor, so
    ``sum_m phi_m dphi_m = sum_i a1_i g1_i``. Two ``[BT, M]`` products per state tile instead made the non-causal
    query pass 0.61 ms slower (H100, (32, 32), N = 32,760: ``token_bwd_kernel`` 1.616 against 1.002 ms a
    forward+backward). A ``w`` from these sums (against ``g_f`` and ``zg_f``) cancels exactly along ``a1`` in
    ``g1 + w zg1``."""
    o1 = tl.arange(0, W1)
    a1 = tl.load(x1 + rows[:, None] * R1 + o1[None, :], mask=mask_t[:, None] & (o1 < R1)[None, :], other=0)
    a1 = a1.to(tl.float32)
    return tl.sum(a1 * g1, 1), tl.sum(a1 * z1, 1)


@triton.jit
def den_factor_grads(
    x1, x2, x3, rows, mask_t, z, cz, inv_sc,
    R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, W3: tl.constexpr,
    P: tl.constexpr, BT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, CARRY: tl.constexpr,
):  # fmt: skip
    """The factor gradients ``zg_f [BT, W_f]`` fp32 of ``phi(x) . z * inv_sc`` (the rows ``z^T`` of ``dphi``),
    through the tensor cores: per index of the third factor, ``[BT, W2] @ [W2, W1]`` dots (widths padded with
    zeros) against the slice ``Z[:, :, i3]`` of ``z`` split in a ``DOT`` high and low part (one part for fp32 dots;
    the factors are ``DOT`` values: the sum is fp32 to about 16 bits, as ``w z^T``'s cancellation needs); P = 1 is
    ``z`` itself. A product of ``BT x M`` per factor, elementwise, cost the (32, 32) query pass 0.4 ms on the H100
    (N = 32,760). ``z``: one state's ``[M]``, plus ``cz`` with ``CARRY`` (``load_carried``)."""
    o1 = tl.arange(0, W1)
    o2 = tl.arange(0, W2)
    o3 = tl.arange(0, W3)
    m1 = o1 < R1
    m2 = o2 < R2
    zg1 = tl.zeros([BT, W1], dtype=tl.float32)
    zg2 = tl.zeros([BT, W2], dtype=tl.float32)
    zg3 = tl.zeros([BT, W3], dtype=tl.float32)
    if P == 1:
        zg1 += load_carried(z, cz, o1, m1, CARRY)[None, :] * inv_sc
    else:
        a1 = tl.load(x1 + rows[:, None] * R1 + o1[None, :], mask=mask_t[:, None] & m1[None, :], other=0).to(DOT)
        a2 = tl.load(x2 + rows[:, None] * R2 + o2[None, :], mask=mask_t[:, None] & m2[None, :], other=0).to(DOT)
        for i3 in range(R3):
            # Z[:, :, i3]  [W1, W2]
            b_z = load_carried(z, cz, (o1[:, None] * R2 + o2[None, :]) * R3 + i3, m1[:, None] & m2[None, :], CARRY)
            b_z = b_z * inv_sc
            z_hi = b_z.to(DOT)
            t1 = tl.dot(a2, tl.trans(z_hi), input_precision=PREC)
            t2 = tl.dot(a1, z_hi, input_precision=PREC)
            if DOT != tl.float32:  # fp32 dots (tf32x3) keep z whole
                z_lo = (b_z - z_hi.to(tl.float32)).to(DOT)
                t1 += tl.dot(a2, tl.trans(z_lo), input_precision=PREC)
                t2 += tl.dot(a1, z_lo, input_precision=PREC)
            if P == 3:
                c = tl.load(x3 + rows * R3 + i3, mask=mask_t, other=0).to(tl.float32)  # [BT]
                zg1 += c[:, None] * t1
                zg2 += c[:, None] * t2
                zg3 += tl.where(o3[None, :] == i3, tl.sum(a1.to(tl.float32) * t1, 1)[:, None], 0)
            else:
                zg1 += t1
                zg2 += t2
    return zg1, zg2, zg3


@triton.jit
def store_factor_grad(dx, rows, mask_t, g, R: tl.constexpr, W: tl.constexpr):
    """``dx[rows] = g`` in ``dx``'s dtype: one factor's gradient ``g [BT, W]`` fp32 (columns ``>= R`` dropped)."""
    o = tl.arange(0, W)
    mask = mask_t[:, None] & (o < R)[None, :]
    tl.store(dx + rows[:, None] * R + o[None, :], g.to(dx.dtype.element_ty), mask=mask)


def upstream_grads(o: torch.Tensor, do, dS, dz):
    """The gradients of ``o, S, z`` an autograd backward receives without materialised zeros (its forward set
    ``set_materialize_grads(False)``): ``do`` zeros where None, and ``dS, dz`` both None (an unused final state,
    which costs nothing) or both tensors (zeros for the one of the two that was not used); ``o``: the output, or
    any tensor of its shape and dtype."""
    do = torch.zeros_like(o) if do is None else do
    if (dS is None) != (dz is None):
        dS = dz.new_zeros(*dz.shape, o.shape[-1]) if dS is None else dS
        dz = dS.new_zeros(dS.shape[:-1]) if dz is None else dz
    return do, dS, dz


def fake_forward_outputs(q, v: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """What a forward custom op returns, as empty tensors (its ``register_fake``): ``o`` like ``v``, the fp32
    state ``S [N, H, M, Dv]``, ``z [N, H, M]`` and the fp32 denominators ``[B * T, H]``."""
    B, T, H, Dv = v.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    M = math.prod(x.shape[-1] for x in q)
    f32 = dict(dtype=torch.float32)
    return (
        torch.empty_like(v),
        v.new_empty(N, H, M, Dv, **f32),
        v.new_empty(N, H, M, **f32),
        v.new_empty(B * T, H, **f32),
    )
