"""Causal HLA in Triton, chunked: a state kernel that walks the chunks in order, an output kernel and a
gradient kernel parallel over chunks.

Per sequence and head, chunks of ``C`` tokens (a chunk never crosses a sequence boundary; the last chunk of a
sequence may be short and is masked). ``phi`` = row-major Khatri-Rao product of the factors, formed tile by tile
in registers (``kr_tile``), never in memory:

    S_c = S_0 + sum_{c' < c} phi(K_c')^T V_c'    [M, Dv]    z_c = z_0 + sum_{c' < c} phi(K_c')^T 1   [M]
                                                                             (``chunk_state_kernel``)
    A_c = tril(prod_f Q_{c,f} K_{c,f}^T)          [C, C]    (P small dots, P - 1 element-wise products)
    o_c = (A_c V_c + phi(Q_c) S_c) / (rowsum(A_c) + phi(Q_c) z_c + eps)    (``chunk_output_kernel``)

Design (fla's chunk mode): one program per (M tile, Dv tile, head, sequence) keeps its ``[BM, BV]`` tile of the
state in fp32 registers, stores it as it enters each chunk, then adds the chunk's increment. The output kernel
then runs in parallel over all chunks. A fully fused kernel (state in registers, outputs as it goes) does not fit:
the state, up to ``4096 x 256``, must be split over M tiles, and every output would become a sum over tiles
(fp32 atomics of ``[T, Dv]`` per tile and a separate normalisation pass), more traffic than the states.

A walk is sequential over its sequence's chunks. Where it would have too few programs to fill the GPU (long
sequences, few of them, few heads, a small state: ``segment_count``), each sequence is walked in segments of
``segment_chunks()`` chunks in parallel, each from a zero state; ``chunk_carry_kernel`` turns the segments'
totals into their starting states (a prefix sum over the segments, the final state with it), and the readers
add the start of a chunk's segment to the state they read (``load_carried``).

Cost of the per-chunk states ``hs [NT, H, M, Dv]`` (``NT`` chunks in all): ``M * Dv / C`` numbers per token and
head, linear in T. Stored in bf16 for bf16 inputs (the dtype the tensor cores read anyway), in fp32 for fp16
(the state outgrows fp16's range at long lengths) and fp32 inputs. B=1, H=12, Dv=128, C=64, N=32,760 in bf16:
0.4 GB for widths (16, 16), 1.6 GB for (32, 32). ``hz [NT, H, M]`` is fp32.

Numerics: the denominator never goes through a low-precision dot: ``rowsum(A_c)`` and ``phi(Q_c) z_c`` are fp32
element-wise reductions. ``A_c`` can exceed fp16's range (``R^P``), so each row is divided by its largest
magnitude before the ``A_c V_c`` dot and multiplied back after it.

Backward, with ``g = do / (den + eps)`` (rounded to bf16 for bf16 inputs, as the dots read it) and
``w = -sum(g * o)`` per token, ``o`` unrounded (plus the residual ``store_output`` keeps; ``do`` and 0 without
``normalize``): the states entering the chunks are recomputed and the gradients of the states leaving them
come from the same walk in reverse over ``phi(Q)^T [g | w]`` (``dhs [NT, H, M, Dv]``, same cost as ``hs``), both
in one launch (``chunk_state_bwd_kernel``); then ``chunk_bwd_kernel`` (parallel over chunks, both sides in one
launch) forms, for the queries and for the keys:

    dA_c = tril(g_c V_c^T + w_c 1^T)  -> dq_f through the P similarities,  dphi(Q_c) = g_c S_c^T + w_c z_c^T
    dA_c^T (formed as such)  -> dk_f,  dv_c = A_c^T g_c,  dphi(K_c) = V_c dS_c^T + 1 dz_c^T,  dv_c += phi(K_c) dS_c

(``dS_c, dz_c``: the gradient of the state leaving chunk ``c``); a program owns its chunk's rows and stores
their gradients once. The queries' ``w`` there is recomputed as ``-(sum(phi(Q_c) * g_c S_c^T) +
rowsum(A_c * g_c V_c^T)) / (phi(Q_c) . z_c + rowsum(A_c) + eps)``, from the same rounded operands as the two terms
of ``dphi(Q_c)`` it cancels against (the walk's and the keys' ``w`` is the prep kernel's).

Hopper: these kernels feed ``tl.dot`` from registers (the Khatri-Rao tiles, the masked blocks), which Triton
compiles to wgmma with a register operand; ptxas before 13.3 can read those registers before they are written
(triton-lang/triton#9433). On an H100 with Triton 3.6's ptxas 12.8 the backward then gave NaN or wrong factor
gradients and once an illegal memory access. Where that ptxas is in use (``register_wgmma_hazard``) the kernels
autotune over ``num_warps = 2`` configs, which Triton compiles to mma.sync (``safe_configs``); with
``TRITON_PTXAS_PATH`` pointing at ptxas >= 13.3 they use their wgmma configs.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .utils import (
    Seqs,
    alignment,
    at_least,
    at_most,
    autotuned,
    cdiv,
    den_factor_grads,
    dot_config,
    dummy,
    empty,
    factor_block,
    factor_dots,
    factors3,
    fake_forward_outputs,
    interpreting,
    keeps_residual,
    kr_block,
    kr_state_grads,
    kr_tile,
    kr_tile_count,
    kr_tile_t,
    launch,
    length_class,
    load_carried,
    load_output,
    register_wgmma_hazard,
    safe_configs,
    seq_bounds,
    sequences,
    store_factor_grad,
    store_output,
    tile_count,
    traced,
    upstream_grads,
    widths3,
)

State = tuple[torch.Tensor, torch.Tensor]


# autotuning candidates (block sizes, num_warps, num_stages); each also runs with num_warps = 2 where wgmma is
# unsafe (``safe_configs``). The first one is what a check with ``gpu_configs(kern)`` runs, and what the
# interpreter tests also run.
STATE_CONFIGS = ((64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2), (32, 32, 4, 3))  # BM BV
OUTPUT_CONFIGS = ((64, 64, 4, 2), (64, 128, 4, 2), (128, 128, 8, 2), (32, 64, 4, 3))  # BM BV
# chunk_bwd_kernel at BM = 128 spilled (H100, (16, 16), N = 4096: 2.87 ms against 0.18 ms at BM = 32)
BWD_CONFIGS = ((32, 4, 3), (64, 4, 2), (16, 4, 2), (32, 4, 1))  # BM


def _with_two_warps(table: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """The candidates, then each of them with num_warps = 2 (mma.sync instead of wgmma)."""
    return table + tuple(c[:-2] + (2, c[-1]) for c in table)


def causal_autotuned(table: tuple[tuple[int, ...], ...], keys: str, key: list[str]):
    """``autotuned`` over the candidates of ``table`` and their 2-warp forms, pruned by ``safe_configs``."""
    return autotuned(*_with_two_warps(table), keys=keys, key=key, prune_configs_by={"early_config_prune": safe_configs})


def gpu_configs(kern, i: int = 0, device: torch.device | None = None) -> list[triton.Config]:
    """``[config i]`` of a chunk kernel's GPU candidates, as a ``configs`` list (also under the interpreter); on
    ``device``, in the form ``safe_configs`` keeps there."""
    table, keys = {
        "chunk_state_kernel": (STATE_CONFIGS, "BM BV"),
        "chunk_state_bwd_kernel": (STATE_CONFIGS, "BM BV"),
        "chunk_output_kernel": (OUTPUT_CONFIGS, "BM BV"),
        "chunk_bwd_kernel": (BWD_CONFIGS, "BM"),
    }[kern.base_fn.__name__]
    c = table[i]
    if device is not None and register_wgmma_hazard(device):
        c = c[:-2] + (2, c[-1])
    return [triton.Config(dict(zip(keys.split(), c[:-2])), num_warps=c[-2], num_stages=c[-1])]


def default_chunk_size() -> int:
    """Tokens per chunk: 64 on the GPU; 16 under the interpreter (tiny tests still span several chunks)."""
    return 16 if interpreting() else 64


def backward_plan(C: int, widths: tuple[int, ...], v: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[int, int]:
    """The backward's ``(chunk size, heads per pass)`` for a forward in chunks of ``C``.

    Chunk size: 32 where ``C`` is larger and P = 3 or a factor is wider than 16 and the states of at least one head
    fit at 32, else ``C`` (the backward's own state walk recomputes the states at its own size).
    ``chunk_bwd_kernel`` holds ``[C, C]`` blocks and ``[C, R_f]`` factor gradients in the registers of two warps
    (``safe_configs``) and spilled at 64 (H100, N = 4,096, bf16, H = 12, Dv = 128, ms at C = 64 / 32: (32, 32)
    7.8 / 0.44, (64, 64) 30.1 / 1.8, (16, 16, 16) 36.7 / 2.5, its first autotuning candidate; the state walk
    0.9 / 1.1, 2.9 / 4.4, 2.6 / 3.0). The forward keeps 64, where its state walk takes half the steps.

    Heads per pass: all of them where the backward's two per-chunk state tensors (``hs`` and ``dhs``,
    ``[NT, H, M, Dv]``) fit (``backward_heads``), else as many as fit, one pass per group of heads (each head's
    backward is independent); narrow factors too, at ``C``. Before, a wide backward whose states did not fit at 32
    fell back to chunks of 64 for all heads at once: (64, 64) at 131,072 tokens (2 x 48 GiB at 32) took 1,040 ms
    forward+backward on the H100, against 47 ms for (32, 32). Where not even one head fits at ``C``: ``(C, 1)`` (the
    allocator will say so); under ``torch.compile``'s tracing, where the device is not asked: ``(C, H)``.
    """
    H = v.shape[2]
    M = math.prod(widths)
    wide = C > 32 and (len(widths) > 2 or max(widths) > 16)
    for size in (32, C) if wide else (C,):
        heads = backward_heads(v, M, cu_seqlens, size)
        if heads:
            return size, heads
    # not even one head fits (the allocator will say so), or large states under torch.compile's tracing
    return C, H if torch.compiler.is_compiling() else 1


# per-chunk states this small (all heads, at the backward's chunk size) are taken without asking the device
SMALL_STATES = 2**30


def _free_memory(device: torch.device) -> int:
    """Bytes the device can still give: free, plus what PyTorch's caching allocator holds unused."""
    if device.type != "cuda":
        return 2**62
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def backward_heads(v: torch.Tensor, M: int, cu_seqlens: torch.Tensor | None, C: int) -> int:
    """How many heads one backward pass at chunk size ``C`` takes: all ``H`` where their two per-chunk state
    tensors (``hs`` and ``dhs``, ``[NT, heads, M, Dv]``) are under ``SMALL_STATES``, else as many as take at most half
    of the device's free memory now (0 where not even one does). Under ``torch.compile``'s tracing, which does not
    query the device: all heads where the states are small, else 0."""
    B, T, H, Dv = v.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    chunks = B * cdiv(T, C) + N - B  # a packed batch: at most one partial chunk per sequence
    size = 2 if v.dtype == torch.bfloat16 else 4  # _chunk_states
    per_head = 2 * chunks * M * Dv * size
    if per_head * H <= SMALL_STATES:
        return H
    if torch.compiler.is_compiling():
        return 0
    return min(H, _free_memory(v.device) // 2 // max(per_head, 1))


def segment_chunks() -> int:
    """Chunks per segment of a segmented state walk (``segment_count``)."""
    return 64


@functools.lru_cache
def _walk_programs_wanted(device: torch.device) -> int:
    """Programs below which a state walk is segmented: two per SM on a GPU; on the CPU (the interpreter, tests)
    any walk long enough is."""
    if device.type != "cuda":
        return 2**62
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def segment_count(seqs: Seqs, chunks: int, M: int, Dv: int, H: int, device: torch.device) -> int:
    """Segments of the state walks for sequences of at most ``chunks`` chunks: ``cdiv(chunks, segment_chunks())``
    where a walk would have fewer programs than ``_walk_programs_wanted`` (counted at 64 x 64 state tiles), else 1.

    A walk is sequential over the chunks of its sequence, one program per state tile, sequence and head. Each
    segment is walked from a zero state in parallel (``walk_chunks`` with ``SEG``) and ``chunk_carry_kernel``
    turns the segments' totals into their starts, which the readers add (``load_carried``). That costs the
    readers a load (H100, bf16, H = 12, Dv = 128, ms a forward+backward, segmented / not): (16, 16) at 131,072
    14.37 / 16.84 (96 programs a forward walk; the walks 3.7 against 8.6 ms, the readers 1.9 ms more), at
    32,760 3.88 / 4.33, at 16,384 2.10 / 2.16; but (32, 32) at 32,760 (384 programs) 11.97 / 11.49.
    Up to ``segment_chunks()`` chunks (4,096 tokens at chunk 64) a walk stays whole: there the carries' launch
    would cost more host time than the walk saves."""
    programs = cdiv(M, 64) * cdiv(Dv, 64) * seqs.N * H
    if programs >= _walk_programs_wanted(device):
        return 1
    return max(cdiv(chunks, segment_chunks()), 1)  # T = 0: one (empty) walk, which stores S0


STATE_KEY = ["R1", "R2", "R3", "DV", "P", "C", "SEG", "HAS_INIT", "LENGTH_CLASS"]


@triton.jit
def walk_chunks(
    x1, x2, x3, v, w, den, eps, S0, z0, hs, hz, S, z, cu_seqlens, chunk_offsets, seg_offsets, T_SEQ, i_mv, i_nh, i_s,
    H: tl.constexpr, DV: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, P: tl.constexpr,
    C: tl.constexpr, SEG: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, NORMALIZE: tl.constexpr,
    STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
    BV: tl.constexpr,
):  # fmt: skip
    """One state tile (``i_mv``: M tile * Dv tiles + Dv tile) of one sequence and head (``i_nh``) through its
    chunks: ``hs[c], hz[c]`` = the state entering chunk ``c``, then ``S, z`` = the final state (fp32
    ``[N, H, M, DV]``, ``[N, H, M]``; if ``STORE_FINAL``); the state starts at ``S0, z0`` if ``HAS_INIT``, else 0.
    With ``SEG`` > 0, segment ``i_s`` alone: its ``SEG`` chunks from a zero state, the states relative to the
    segment's start, its total to row ``segment_row`` of ``S, z [segment rows, H, ...]`` (``chunk_carry_kernel``
    turns the totals into the carries the readers add, ``load_carried``); a sequence with fewer segments than
    the grid stores nothing for the others.

    Forward: ``x*`` key factors ``[TT, H, R_f]``, ``v`` values, ``z`` weights 1. ``REVERSE`` (the backward's
    state gradient): chunks last to first, ``x*`` query factors, ``v`` = ``do [TT, H, DV]`` read as ``g``
    (``load_g``: ``do / (den + eps)`` with ``NORMALIZE``), ``z`` weights ``w [TT, H]`` (fp32): ``hs[c]`` is then
    the gradient of the state leaving chunk ``c``, ``S`` that of the initial state. ``chunk_offsets [N]``: index
    of each sequence's first chunk (varlen).
    """
    B1: tl.constexpr = kr_block(1, R1, R2, R3, BM)
    B2: tl.constexpr = kr_block(2, R1, R2, R3, BM)
    B3: tl.constexpr = kr_block(3, R1, R2, R3, BM)
    BD: tl.constexpr = at_most(BV, DV)  # the Dv tile
    i_m, i_v = i_mv // tl.cdiv(DV, BD), i_mv % tl.cdiv(DV, BD)
    i_n, i_h = i_nh // H, i_nh % H
    M: tl.constexpr = R1 * R2 * R3
    BMA: tl.constexpr = B1 * B2 * B3
    o_m = i_m * BMA + tl.arange(0, BMA)
    o_v = i_v * BD + tl.arange(0, BD)
    mask_m = o_m < M
    mask_z = mask_m & (i_v == 0)
    bos, eos = seq_bounds(cu_seqlens, i_n, T_SEQ, IS_VARLEN)
    if IS_VARLEN:
        c0 = tl.load(chunk_offsets + i_n)
    else:
        c0 = i_n * tl.cdiv(T_SEQ, C)
    base = i_nh.to(tl.int64)
    b_s = tl.zeros([BMA, BD], dtype=tl.float32)
    b_z = tl.zeros([BMA], dtype=tl.float32)
    if HAS_INIT:
        b_s += tl.load(S0 + base * (M * DV) + o_m[:, None] * DV + o_v[None, :], mask=mask_m[:, None], other=0)
        b_z += tl.load(z0 + base * M + o_m, mask=mask_m, other=0)
    n_c = tl.cdiv(eos - bos, C)
    if SEG > 0:
        j0 = i_s * SEG
        j1 = tl.minimum(j0 + SEG, n_c)
        fin = segment_row(seg_offsets, i_n, j0, T_SEQ, C, SEG, IS_VARLEN) * H + i_h  # the segment's total
        has_seg = (j0 < n_c) | (i_s == 0)  # segment 0 of an empty sequence: a zero total
    else:
        j0 = 0
        j1 = n_c
        fin = i_nh
        has_seg = i_s == 0
    for j in range(j0, j1):
        i_cs = j  # chunk within the sequence
        if REVERSE:
            i_cs = j0 + j1 - 1 - j
        t0 = bos + i_cs * C
        i_c = (c0 + i_cs).to(tl.int64) * H + i_h
        tl.store(
            hs + i_c * (M * DV) + o_m[:, None] * DV + o_v[None, :], b_s.to(hs.dtype.element_ty), mask=mask_m[:, None]
        )
        tl.store(hz + i_c * M + o_m, b_z, mask=mask_z)
        o_t = t0 + tl.arange(0, C)
        mask_t = o_t < eos
        rows = o_t * H + i_h
        # [BMA, C]
        phi_t = kr_tile_t(x1, x2, x3, rows, mask_t, i_m, C, R1, R2, R3, B1, B2, B3, P)
        # [C, BD]
        if REVERSE:
            b_v = load_g(v, den, rows, o_v, mask_t, eps, DV, NORMALIZE, DOT == tl.bfloat16)
        else:
            b_v = tl.load(v + rows[:, None] * DV + o_v[None, :], mask=mask_t[:, None], other=0)
        if REVERSE and DOT == tl.float16:
            # g = do / (den + eps) reaches do / eps on a query with no keys (padding): beyond fp16's range, so
            # each token's row of g is divided by its largest magnitude (carried by phi, whose rows are rescaled)
            big = row_max(b_v)
            b_s += row_scaled_dot(phi_t * big[None, :], b_v / big[:, None], DOT, PREC)
        else:
            b_s += tl.dot(phi_t.to(DOT), b_v.to(DOT), input_precision=PREC)
        if REVERSE:
            b_z += tl.sum(phi_t * tl.load(w + rows, mask=mask_t, other=0)[None, :], 1)
        else:
            b_z += tl.sum(phi_t, 1)
    if STORE_FINAL:
        fin = fin.to(tl.int64)
        tl.store(S + fin * (M * DV) + o_m[:, None] * DV + o_v[None, :], b_s, mask=mask_m[:, None] & has_seg)
        tl.store(z + fin * M + o_m, b_z, mask=mask_z & has_seg)


@causal_autotuned(STATE_CONFIGS, "BM BV", STATE_KEY)
@triton.jit(do_not_specialize=["T_SEQ", "LENGTH_CLASS"])
def chunk_state_kernel(
    x1,
    x2,
    x3,
    v,
    S0,
    z0,
    hs,
    hz,
    S,
    z,
    cu_seqlens,
    chunk_offsets,
    seg_offsets,
    T_SEQ,
    LENGTH_CLASS,
    H: tl.constexpr,
    DV: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    P: tl.constexpr,
    C: tl.constexpr,
    SEG: tl.constexpr,
    HAS_INIT: tl.constexpr,
    FINAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
):
    """The forward's states (``walk_chunks`` over the keys ``x*`` and values ``v``): ``hs, hz`` entering each
    chunk and, with ``FINAL``, the final ``S, z`` (with ``SEG``: each segment's total, always). Grid: (M tiles * Dv
    tiles, N * H, segments)."""
    walk_chunks(
        x1, x2, x3, v, v, v, 0.0, S0, z0, hs, hz, S, z, cu_seqlens, chunk_offsets, seg_offsets, T_SEQ,
        tl.program_id(0), tl.program_id(1), tl.program_id(2),
        H, DV, R1, R2, R3, P, C, SEG, HAS_INIT, False, False, FINAL or SEG > 0, IS_VARLEN, DOT, PREC, BM, BV,
    )  # fmt: skip


@causal_autotuned(STATE_CONFIGS, "BM BV", STATE_KEY)
@triton.jit(do_not_specialize=["T_SEQ", "NSEG", "LENGTH_CLASS"])
def chunk_state_bwd_kernel(
    k1,
    k2,
    k3,
    v,
    S0,
    z0,
    hs,
    hz,
    q1,
    q2,
    q3,
    do,
    den,
    w,
    dS,
    dz,
    dhs,
    dhz,
    F,
    Fz,
    dF,
    dFz,
    cu_seqlens,
    chunk_offsets,
    seg_offsets,
    T_SEQ,
    NSEG,
    eps,
    LENGTH_CLASS,
    H: tl.constexpr,
    DV: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    P: tl.constexpr,
    C: tl.constexpr,
    SEG: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_DS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
):
    """The backward's two walks in one launch (``walk_chunks``): ``program_id(2) < segments`` recompute the states
    entering the chunks ``hs, hz`` over the keys; the others walk the queries in reverse over ``phi(Q)^T [g | w]``
    (``g`` from ``do`` and ``den``, ``load_g``) from ``dS, dz`` (the final state's gradient, 0 without ``HAS_DS``)
    to ``dhs, dhz`` and, with ``HAS_INIT``,
    ``dS0, dz0`` (in ``dF, dFz``). With ``SEG``: each walk segment by segment from 0, their totals to ``F, Fz``
    and ``dF, dFz`` (``chunk_carry_kernel`` adds the starts and forms ``dS0, dz0``).
    Grid: (M tiles * Dv tiles, N * H, 2 * ``NSEG``)."""
    i_s = tl.program_id(2) % NSEG
    START_F: tl.constexpr = HAS_INIT and SEG == 0
    START_R: tl.constexpr = HAS_DS and SEG == 0
    FINAL_R: tl.constexpr = HAS_INIT or SEG > 0
    if tl.program_id(2) < NSEG:
        walk_chunks(
            k1, k2, k3, v, v, v, 0.0, S0, z0, hs, hz, F, Fz, cu_seqlens, chunk_offsets, seg_offsets, T_SEQ,
            tl.program_id(0), tl.program_id(1), i_s,
            H, DV, R1, R2, R3, P, C, SEG, START_F, False, False, SEG > 0, IS_VARLEN, DOT, PREC, BM, BV,
        )  # fmt: skip
    else:
        walk_chunks(
            q1, q2, q3, do, w, den, eps, dS, dz, dhs, dhz, dF, dFz, cu_seqlens, chunk_offsets, seg_offsets, T_SEQ,
            tl.program_id(0), tl.program_id(1), i_s,
            H, DV, R1, R2, R3, P, C, SEG, START_R, True, NORMALIZE, FINAL_R, IS_VARLEN, DOT, PREC, BM, BV,
        )  # fmt: skip


@triton.jit
def carry_segments(
    seg, segz, S0, z0, S, z, first, n_seg, i_b, i_nh,
    H: tl.constexpr, M: tl.constexpr, DV: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr,
    STORE_FINAL: tl.constexpr, BLOCK: tl.constexpr, BS: tl.constexpr,
):  # fmt: skip
    """One block of ``BLOCK`` entries of a sequence's and head's (``i_nh``) ``n_seg`` segment totals, rows
    ``first`` on of ``seg [rows, H, M, DV]``, ``segz [rows, H, M]`` (fp32), turned in place into carries: the sum
    of ``S0, z0`` (with
    ``HAS_INIT``) and the totals of the segments before (after, with ``REVERSE``); with ``STORE_FINAL`` the sum of
    all to ``S, z [N, H, ...]``. ``BS`` segments at a time, as a ``[BS, BLOCK]`` scan (``tl.cumsum``)."""
    i_h = i_nh % H
    o = i_b * BLOCK + tl.arange(0, BLOCK)
    mask = o < M * DV
    mask_z = o < M
    base = i_nh.to(tl.int64)
    run = tl.zeros([BLOCK], dtype=tl.float32)
    run_z = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_INIT:
        run += tl.load(S0 + base * (M * DV) + o, mask=mask, other=0)
        run_z += tl.load(z0 + base * M + o, mask=mask_z, other=0)
    for j0 in range(0, n_seg, BS):
        o_s = j0 + tl.arange(0, BS)  # steps, in the order of the sum
        i_s = o_s
        if REVERSE:
            i_s = n_seg - 1 - o_s
        rows = (first + i_s).to(tl.int64) * H + i_h  # [BS]
        m = (o_s < n_seg)[:, None]
        p = seg + rows[:, None] * (M * DV) + o[None, :]  # [BS, BLOCK]
        t = tl.load(p, mask=m & mask[None, :], other=0)
        tl.store(p, run[None, :] + (tl.cumsum(t, 0) - t), mask=m & mask[None, :])
        run += tl.sum(t, 0)
        p_z = segz + rows[:, None] * M + o[None, :]
        t_z = tl.load(p_z, mask=m & mask_z[None, :], other=0)
        tl.store(p_z, run_z[None, :] + (tl.cumsum(t_z, 0) - t_z), mask=m & mask_z[None, :])
        run_z += tl.sum(t_z, 0)
    if STORE_FINAL:
        tl.store(S + base * (M * DV) + o, run, mask=mask)
        tl.store(z + base * M + o, run_z, mask=mask_z)


@triton.jit(do_not_specialize=["T_SEQ"])
def chunk_carry_kernel(
    F, Fz, S0, z0, S, z, dF, dFz, dS, dz, dS0, dz0, cu_seqlens, seg_offsets, T_SEQ,
    H: tl.constexpr, M: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, SEG: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_DS: tl.constexpr, FINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    BLOCK: tl.constexpr, BS: tl.constexpr,
):  # fmt: skip
    """After a segmented walk (``walk_chunks`` with ``SEG``): ``program_id(2) == 0`` turns the forward walk's
    segment totals ``F, Fz`` into the states entering the segments, from ``S0, z0`` (with ``HAS_INIT``), the final
    state to ``S, z`` with ``FINAL``; ``1`` (the backward) turns the reverse walk's ``dF, dFz`` into the gradients of
    the states leaving the segments, from ``dS, dz`` (with ``HAS_DS``), their sum to ``dS0, dz0`` with
    ``HAS_INIT``. Grid: (blocks of ``M * DV``, N * H, 1 or 2)."""
    i_n = tl.program_id(1) // H
    bos, eos = seq_bounds(cu_seqlens, i_n, T_SEQ, IS_VARLEN)
    n_seg = tl.maximum(tl.cdiv(tl.cdiv(eos - bos, C), SEG), 1)
    first = segment_row(seg_offsets, i_n, 0, T_SEQ, C, SEG, IS_VARLEN)
    if tl.program_id(2) == 0:
        carry_segments(
            F, Fz, S0, z0, S, z, first, n_seg, tl.program_id(0), tl.program_id(1),
            H, M, DV, HAS_INIT, False, FINAL, BLOCK, BS,
        )  # fmt: skip
    else:
        carry_segments(
            dF, dFz, dS, dz, dS0, dz0, first, n_seg, tl.program_id(0), tl.program_id(1),
            H, M, DV, HAS_DS, True, HAS_INIT, BLOCK, BS,
        )  # fmt: skip


@triton.jit
def segment_row(seg_offsets, i_n, j, T_SEQ, C: tl.constexpr, SEG: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Row of the segment totals (``[rows, H, ...]``, int64) of the segment holding chunk ``j`` of sequence
    ``i_n``: a dense batch's sequences have ``cdiv(cdiv(T_SEQ, C), SEG)`` segments each, a packed one's start at
    ``seg_offsets [N]``."""
    if IS_VARLEN:
        first = tl.load(seg_offsets + i_n)
    else:
        first = i_n * tl.cdiv(tl.cdiv(T_SEQ, C), SEG)
    return (first + j // SEG).to(tl.int64)


@triton.jit
def factor_similarity(x, y, rows, mask_t, R: tl.constexpr, RP: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``x_f y_f^T`` over the rows of a chunk, ``[C, C]`` fp32 (the width zero-padded to ``RP >= 16``)."""
    a = factor_block(x, rows, mask_t, 0, R, RP, RP > R)  # [C, RP]
    b = factor_block(y, rows, mask_t, 0, R, RP, RP > R)  # [C, RP]
    return tl.dot(a.to(DOT), tl.trans(b.to(DOT)), input_precision=PREC)


@triton.jit
def row_max(a):
    """Largest magnitude of each row of ``a`` (fp32), 1 for a zero row."""
    big = tl.max(tl.abs(a), 1)
    return tl.where(big > 0, big, 1.0)


@triton.jit
def row_scaled_dot(a, b, DOT: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` with each row of ``a`` (fp32) divided by its largest magnitude before the cast to ``DOT`` and
    multiplied back after: ``a`` may exceed fp16's range (a Hadamard block grows like ``R^P``)."""
    big = row_max(a)
    return tl.dot((a / big[:, None]).to(DOT), b.to(DOT), input_precision=PREC) * big[:, None]


@triton.jit
def hadamard_block(
    x1,
    x2,
    x3,
    y1,
    y2,
    y3,
    rows,
    mask_t,
    keep,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    RP1: tl.constexpr,
    RP2: tl.constexpr,
    RP3: tl.constexpr,
    P: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """The similarities of a chunk, ``s_f = x_f y_f^T [C, C]`` fp32, ``s_1`` zeroed outside ``keep [C, C]`` (the
    causal mask; ``s_1`` stands in for missing factors)."""
    s1 = factor_similarity(x1, y1, rows, mask_t, R1, RP1, DOT, PREC)
    s1 = tl.where(keep, s1, 0)
    s2, s3 = s1, s1
    if P >= 2:
        s2 = factor_similarity(x2, y2, rows, mask_t, R2, RP2, DOT, PREC)
    if P == 3:
        s3 = factor_similarity(x3, y3, rows, mask_t, R3, RP3, DOT, PREC)
    return s1, s2, s3


@causal_autotuned(OUTPUT_CONFIGS, "BM BV", ["R1", "R2", "R3", "DV", "P", "C", "SEG", "NORMALIZE", "LENGTH_CLASS"])
@triton.jit(do_not_specialize=["T_SEQ", "LENGTH_CLASS"])
def chunk_output_kernel(
    x1,
    x2,
    x3,
    y1,
    y2,
    y3,
    v,
    hs,
    hz,
    cs,
    cz,
    o,
    res,
    dens,
    cu_seqlens,
    chunk_seq,
    chunk_tok,
    seg_offsets,
    T_SEQ,
    eps,
    LENGTH_CLASS,
    H: tl.constexpr,
    DV: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    P: tl.constexpr,
    C: tl.constexpr,
    SEG: tl.constexpr,
    NORMALIZE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    RES: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
):
    """``o_c = (A_c V_c + phi(Q_c) S_c) / (rowsum(A_c) + phi(Q_c) z_c + eps)`` for one chunk and Dv tile; the
    denominators ``rowsum(A_c) + phi(Q_c) z_c`` go to ``dens [TT, H]`` (fp32, for the backward), and with ``RES``
    the rounding residual of ``o`` to ``res`` (``store_output``).

    ``x*, y*``: query and key factors ``[TT, H, R_f]``; ``hs, hz``: the states entering the chunks (relative to
    their segment with ``SEG``, whose carries ``cs, cz`` are added, ``load_carried``);
    ``chunk_seq, chunk_tok [NT]``: sequence and first token of each chunk (varlen). Grid: (NT, Dv tiles, H).
    """
    B1: tl.constexpr = kr_block(1, R1, R2, R3, BM)
    B2: tl.constexpr = kr_block(2, R1, R2, R3, BM)
    B3: tl.constexpr = kr_block(3, R1, R2, R3, BM)
    NM: tl.constexpr = kr_tile_count(R1, R2, R3, BM)
    BD: tl.constexpr = at_most(BV, DV)  # the Dv tile
    RP1: tl.constexpr = at_least(R1, 16)  # widths padded for tl.dot
    RP2: tl.constexpr = at_least(R2, 16)  # widths padded for tl.dot
    RP3: tl.constexpr = at_least(R3, 16)  # widths padded for tl.dot
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    M: tl.constexpr = R1 * R2 * R3
    BMA: tl.constexpr = B1 * B2 * B3
    if IS_VARLEN:
        i_n = tl.load(chunk_seq + i_c)
        t0 = tl.load(chunk_tok + i_c)
    else:
        i_n = i_c // tl.cdiv(T_SEQ, C)
        t0 = i_n * T_SEQ + (i_c % tl.cdiv(T_SEQ, C)) * C
    bos, eos = seq_bounds(cu_seqlens, i_n, T_SEQ, IS_VARLEN)
    o_t = t0 + tl.arange(0, C)
    o_v = i_v * BD + tl.arange(0, BD)
    mask_t = o_t < eos
    rows = o_t * H + i_h
    # intra-chunk: the masked Hadamard block, [C, C]
    keep = o_t[:, None] >= o_t[None, :]
    s1, s2, s3 = hadamard_block(x1, x2, x3, y1, y2, y3, rows, mask_t, keep, R1, R2, R3, RP1, RP2, RP3, P, DOT, PREC)
    A = s1
    if P >= 2:
        A *= s2
    if P == 3:
        A *= s3
    den = tl.sum(A, 1)  # [C]
    # [C, BD]
    b_v = tl.load(v + rows[:, None] * DV + o_v[None, :], mask=mask_t[:, None], other=0)
    acc = row_scaled_dot(A, b_v, DOT, PREC)
    # inter-chunk: the state entering the chunk
    base = (i_c.to(tl.int64) * H + i_h) * M
    cbase = i_h * M
    if SEG > 0:
        cbase += segment_row(seg_offsets, i_n, (t0 - bos) // C, T_SEQ, C, SEG, IS_VARLEN) * (H * M)
    for i_m in range(NM):
        phi, _, _, _, _, _, _ = kr_tile(x1, x2, x3, rows, mask_t, i_m, C, R1, R2, R3, B1, B2, B3, P)  # [C, BMA]
        o_m = i_m * BMA + tl.arange(0, BMA)
        mask_m = o_m < M
        # [BMA, BD]
        p_s = o_m[:, None] * DV + o_v[None, :]
        b_s = load_carried(hs + base * DV, cs + cbase * DV, p_s, mask_m[:, None], SEG > 0)
        acc += tl.dot(phi.to(b_s.dtype), b_s, input_precision=PREC)
        if NORMALIZE:
            b_z = load_carried(hz + base, cz + cbase, o_m, mask_m, SEG > 0)  # [BMA]
            den += tl.sum(phi * b_z[None, :], 1)
    if NORMALIZE:
        acc = acc / (den + eps)[:, None]
        tl.store(dens + rows, den, mask=mask_t & (i_v == 0))
    store_output(o, res, rows[:, None] * DV + o_v[None, :], acc, mask_t[:, None], RES)


@triton.jit
def similarity_grad(y, ds, rows, mask_t, R: tl.constexpr, RP: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``ds y [C, RP]`` fp32 for one factor of a chunk (``ds [C, C]`` fp32: the gradient of ``x y^T``)."""
    b = factor_block(y, rows, mask_t, 0, R, RP, RP > R)  # [C, RP]
    return row_scaled_dot(ds, b, DOT, PREC)


@triton.jit
def intra_grads(
    y1, y2, y3, dA, s1, s2, s3, rows, mask_t,
    R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, RP1: tl.constexpr, RP2: tl.constexpr, RP3: tl.constexpr,
    P: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """``(dA prod_{f' != f} s_f') y_f [C, RP_f]`` fp32: the gradient of ``A = prod_f x_f y_f^T`` w.r.t. the ``x``
    side, given ``dA [C, C]`` (masked) and the similarities ``s_f`` (fp32); the first stands in for missing
    factors."""
    d1 = dA
    if P >= 2:
        d1 = d1 * s2
    if P == 3:
        d1 = d1 * s3
    g1 = similarity_grad(y1, d1, rows, mask_t, R1, RP1, DOT, PREC)
    g2, g3 = g1, g1
    if P >= 2:
        d2 = dA * s1
        if P == 3:
            d2 = d2 * s3
        g2 = similarity_grad(y2, d2, rows, mask_t, R2, RP2, DOT, PREC)
    if P == 3:
        g3 = similarity_grad(y3, dA * s1 * s2, rows, mask_t, R3, RP3, DOT, PREC)
    return g1, g2, g3


@triton.jit
def side_grads(
    x1, x2, x3, y1, y2, y3, v, do, den, w, hs, hz, cs, cz, dx1, dx2, dx3, dv, cu_seqlens, chunk_seq, chunk_tok,
    seg_offsets, T_SEQ, i_c, i_h, eps, H: tl.constexpr, DV: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
    R3: tl.constexpr, P: tl.constexpr, C: tl.constexpr, SEG: tl.constexpr, KEYS: tl.constexpr, NORMALIZE: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    """Gradients of one side of one chunk, given ``g`` (d numerator ``[TT, H, DV]``, from ``do`` and ``den``:
    ``load_g``) and ``w`` (d denominator, ``[TT, H]``). ``x*``: the factors of that side, ``y*``: those of the
    other one.

    Queries (``dx = dq``): ``dA = tril(g V^T + w 1^T)``, ``dq_f += (dA prod_{f' != f} s_f') K_f`` and
    ``dphi(Q) = g hs_c^T + w hz_c^T`` (``hs, hz``: the states entering the chunks). With ``NORMALIZE`` the
    queries' ``w`` is recomputed here as ``-(sum(phi(Q) * g hs_c^T) + rowsum(A * g V^T)) / (phi(Q) . hz_c +
    rowsum(A) + eps)``, from the same rounded operands as the two terms it cancels against (the prep kernel's
    ``w``, from the rounded output, left bf16 P = 3 ``dq`` at 4e-2 after a long history); the keys keep it.
    Keys (``dx = dk``, and ``dv``): the same in transposed form, every ``[C, C]`` block formed as such (no
    transpose of a computed block): ``dA^T = triu(V g^T + 1 w^T)``, ``dk_f += (dA^T prod s_f'^T) Q_f``,
    ``dv = A^T g``; then ``dphi(K) = V dhs_c^T + 1 dhz_c^T``, ``dv += phi(K) dhs_c`` (``hs, hz``: the gradients
    of the states leaving the chunks).

    A program owns the rows of its chunk: ``dx*`` and ``dv`` are summed in registers and stored once, in the
    inputs' dtype. With ``SEG``, ``hs, hz`` are relative to their segment, whose carries ``cs, cz`` are added
    (``load_carried``).
    """
    RP1: tl.constexpr = at_least(R1, 16)  # widths padded for tl.dot
    RP2: tl.constexpr = at_least(R2, 16)  # widths padded for tl.dot
    RP3: tl.constexpr = at_least(R3, 16)  # widths padded for tl.dot
    M: tl.constexpr = R1 * R2 * R3
    if IS_VARLEN:
        i_n = tl.load(chunk_seq + i_c)
        t0 = tl.load(chunk_tok + i_c)
    else:
        i_n = i_c // tl.cdiv(T_SEQ, C)
        t0 = i_n * T_SEQ + (i_c % tl.cdiv(T_SEQ, C)) * C
    bos, eos = seq_bounds(cu_seqlens, i_n, T_SEQ, IS_VARLEN)
    o_t = t0 + tl.arange(0, C)
    o_v = tl.arange(0, DV)
    mask_t = o_t < eos
    rows = o_t * H + i_h
    base = (i_c.to(tl.int64) * H + i_h) * M
    cbase = i_h * M
    if SEG > 0:
        cbase += segment_row(seg_offsets, i_n, (t0 - bos) // C, T_SEQ, C, SEG, IS_VARLEN) * (H * M)
    # [C, DV]
    b_g = load_g(do, den, rows, o_v, mask_t, eps, DV, NORMALIZE, DOT == tl.bfloat16)
    b_v = tl.load(v + rows[:, None] * DV + o_v[None, :], mask=mask_t[:, None], other=0).to(tl.float32)
    b_w = tl.load(w + rows, mask=mask_t, other=0)  # [C]
    # g = do / (den + eps) reaches do / eps on a query with no keys (padding), beyond fp16's range: its rows go
    # through the fp16 dots divided by their largest magnitude (bf16 and fp32 have the range)
    if DOT == tl.float16:
        big_g = row_max(b_g)  # [C]
    else:
        big_g = tl.full([C], 1.0, tl.float32)
    gs = (b_g / big_g[:, None]).to(DOT)
    if KEYS:
        keep = o_t[:, None] <= o_t[None, :]  # [key, query]
        s1, s2, s3 = hadamard_block(
            x1, x2, x3, y1, y2, y3, rows, mask_t, keep, R1, R2, R3, RP1, RP2, RP3, P, DOT, PREC
        )  # fmt: skip
        dA = tl.dot(b_v.to(DOT), tl.trans(gs), input_precision=PREC) * big_g[None, :] + b_w[None, :]
    else:
        keep = o_t[:, None] >= o_t[None, :]  # [query, key]
        s1, s2, s3 = hadamard_block(
            x1, x2, x3, y1, y2, y3, rows, mask_t, keep, R1, R2, R3, RP1, RP2, RP3, P, DOT, PREC
        )  # fmt: skip
        dA = tl.dot(gs, tl.trans(b_v.to(DOT)), input_precision=PREC) * big_g[:, None]  # g V^T
    # through the state: queries G = g, w; keys G = V, w = 1 (and dv)
    if KEYS:
        G, b_w = b_v, tl.full([C], 1.0, tl.float32)
    else:
        G = b_g
    CONSISTENT: tl.constexpr = NORMALIZE and not KEYS
    h1, h2, h3, b_dv = kr_state_grads(
        x1, x2, x3, rows, mask_t, G, b_w, hs + base * DV, hz + base, cs + cbase * DV, cz + cbase,
        DV, R1, R2, R3, RP1, RP2, RP3, P, C, BM, PREC, KEYS, CONSISTENT, SEG > 0,
    )  # fmt: skip
    if CONSISTENT:
        # the rows hz_c^T of dphi(Q), through the tensor cores (fp16: in fp32, hz_c is beyond its range)
        ZDOT: tl.constexpr = tl.float32 if DOT == tl.float16 else DOT
        z1, z2, z3 = den_factor_grads(
            x1, x2, x3, rows, mask_t, hz + base, cz + cbase, 1.0, R1, R2, R3, RP1, RP2, RP3, P, C, ZDOT, PREC, SEG > 0
        )  # fmt: skip
        A = s1 * s2 * s3 if P == 3 else (s1 * s2 if P == 2 else s1)  # masked by s1
        phi_dphi, phi_z = factor_dots(x1, rows, mask_t, h1, z1, R1, RP1)  # phi(Q) . g hs_c^T, phi(Q) . hz_c
        b_w = -(phi_dphi + tl.sum(A * dA, 1)) / (phi_z + tl.sum(A, 1) + eps)
        b_w = tl.where(mask_t, b_w, 0)  # rows past the sequence: 0 / 0 with eps = 0
        h1 += b_w[:, None] * z1
        h2 += b_w[:, None] * z2
        h3 += b_w[:, None] * z3
    if not KEYS:
        dA += b_w[:, None]
    dA = tl.where(keep, dA, 0)  # [C, C]
    g1, g2, g3 = intra_grads(y1, y2, y3, dA, s1, s2, s3, rows, mask_t, R1, R2, R3, RP1, RP2, RP3, P, DOT, PREC)
    store_factor_grad(dx1, rows, mask_t, g1 + h1, R1, RP1)
    if P >= 2:
        store_factor_grad(dx2, rows, mask_t, g2 + h2, R2, RP2)
    if P == 3:
        store_factor_grad(dx3, rows, mask_t, g3 + h3, R3, RP3)
    if KEYS:
        A = s1  # A^T [key, query]
        if P >= 2:
            A *= s2
        if P == 3:
            A *= s3
        b_dv += row_scaled_dot(A * big_g[None, :], gs, DOT, PREC)  # A^T g, [C, DV]
        tl.store(dv + rows[:, None] * DV + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=mask_t[:, None])


@causal_autotuned(BWD_CONFIGS, "BM", ["R1", "R2", "R3", "DV", "P", "C", "SEG", "NORMALIZE", "LENGTH_CLASS"])
@triton.jit(do_not_specialize=["T_SEQ", "LENGTH_CLASS"])
def chunk_bwd_kernel(
    q1,
    q2,
    q3,
    k1,
    k2,
    k3,
    v,
    do,
    den,
    w,
    hs,
    hz,
    dhs,
    dhz,
    F,
    Fz,
    dF,
    dFz,
    dq1,
    dq2,
    dq3,
    dk1,
    dk2,
    dk3,
    dv,
    cu_seqlens,
    chunk_seq,
    chunk_tok,
    seg_offsets,
    T_SEQ,
    eps,
    LENGTH_CLASS,
    H: tl.constexpr,
    DV: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    P: tl.constexpr,
    C: tl.constexpr,
    SEG: tl.constexpr,
    NORMALIZE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
):
    """Both sides of one chunk's gradients in one launch (``side_grads``): ``program_id(2) == 0`` the queries
    (``dq*``, through the states entering the chunks ``hs, hz``), ``1`` the keys (``dk*`` and ``dv``, through the
    gradients of the states leaving them ``dhs, dhz``); with ``SEG`` the segments' carries ``F, Fz`` and ``dF, dFz``
    are added to them. Grid: (NT, H, 2)."""
    if tl.program_id(2) == 0:
        side_grads(
            q1, q2, q3, k1, k2, k3, v, do, den, w, hs, hz, F, Fz, dq1, dq2, dq3, dv, cu_seqlens, chunk_seq, chunk_tok,
            seg_offsets, T_SEQ, tl.program_id(0), tl.program_id(1), eps,
            H, DV, R1, R2, R3, P, C, SEG, False, NORMALIZE, IS_VARLEN, DOT, PREC, BM,
        )  # fmt: skip
    else:
        side_grads(
            k1, k2, k3, q1, q2, q3, v, do, den, w, dhs, dhz, dF, dFz, dk1, dk2, dk3, dv, cu_seqlens, chunk_seq,
            chunk_tok, seg_offsets, T_SEQ, tl.program_id(0), tl.program_id(1), eps,
            H, DV, R1, R2, R3, P, C, SEG, True, NORMALIZE, IS_VARLEN, DOT, PREC, BM,
        )  # fmt: skip


@triton.jit
def load_g(do, den, rows, o_v, mask_t, eps, DV: tl.constexpr, NORMALIZE: tl.constexpr, ROUND: tl.constexpr):
    """The backward's ``g = do / (den + eps)`` (``do`` without ``NORMALIZE``) of ``rows``, columns ``o_v``: fp32
    ``[len(rows), len(o_v)]``, rounded to bf16 with ``ROUND`` (bf16 dots: as every dot reads it; fp16 dots read it
    divided by its row's largest magnitude, so there ``w`` is consistent to fp16's rounding only). Every kernel
    that reads ``g`` forms it here, from the same operations, so ``w`` (``bwd_prep_kernel``) matches it exactly."""
    b_g = tl.load(do + rows[:, None] * DV + o_v[None, :], mask=mask_t[:, None], other=0).to(tl.float32)
    if NORMALIZE:
        # rows past the sequence: den = 1, not 0 (0 * 1 / (0 + eps) is NaN with eps = 0)
        b_g = b_g * (1.0 / (tl.load(den + rows, mask=mask_t, other=1) + eps))[:, None]
        if ROUND:
            b_g = b_g.to(tl.bfloat16).to(tl.float32)
    return b_g


@triton.jit
def bwd_prep_kernel(
    do, o, res, den, w, eps, R,
    DV: tl.constexpr, NORMALIZE: tl.constexpr, RES: tl.constexpr, ROUND: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """The backward's ``w = -sum(g * o)`` per (token, head), rows ``r < R = TT * H`` (``[R]`` fp32; ``g`` from
    ``load_g``, ``o`` plus its rounding residual with ``RES``, see ``store_output``; 0 without ``NORMALIZE``).
    ``g`` itself is formed again where it is read, from ``do`` and ``den``. Grid: (row blocks,)."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    mask = o_r < R
    if NORMALIZE:
        o_v = tl.arange(0, DV)
        b_g = load_g(do, den, o_r, o_v, mask, eps, DV, NORMALIZE, ROUND)  # [BR, DV]
        p = o_r[:, None] * DV + o_v[None, :]
        b_w = -tl.sum(b_g * load_output(o, res, p, mask[:, None], RES), 1)
    else:
        b_w = tl.zeros([BR], dtype=tl.float32)
    tl.store(w + o_r, b_w, mask=mask)


class Chunks(NamedTuple):
    """The chunks of a batch (``_chunk_index``)."""

    NT: int  # number of chunks
    offsets: torch.Tensor  # int32 [N]: each sequence's first chunk (varlen) or a dummy
    seq: torch.Tensor  # int32 [NT]: each chunk's sequence (varlen) or a dummy
    tok: torch.Tensor  # int32 [NT]: each chunk's first token (varlen) or a dummy
    most: int  # chunks of the longest sequence
    counts: torch.Tensor | None  # int64 [N]: chunks of each sequence (varlen)


def _chunk_index(seqs: Seqs, C: int, device) -> Chunks:
    """The chunks of ``seqs`` at chunk size ``C`` (a packed batch: one device sync for the two counts)."""
    if not seqs.IS_VARLEN:
        none = dummy(device)
        return Chunks(seqs.N * cdiv(seqs.T_SEQ, C), none, none, none, cdiv(seqs.T_SEQ, C), None)
    cu = seqs.cu_seqlens.long()
    n_chunks = (cu[1:] - cu[:-1] + C - 1) // C  # [N]
    offsets = torch.cumsum(n_chunks, 0) - n_chunks  # [N]
    NT, most = torch.stack((n_chunks.sum(), n_chunks.max())).tolist()
    chunk_seq = torch.repeat_interleave(torch.arange(seqs.N, device=device), n_chunks, output_size=NT)  # [NT]
    chunk_tok = cu[chunk_seq] + (torch.arange(NT, device=device) - offsets[chunk_seq]) * C
    i32 = dict(dtype=torch.int32)
    return Chunks(NT, offsets.to(**i32), chunk_seq.to(**i32), chunk_tok.to(**i32), most, n_chunks)


class Segments(NamedTuple):
    """How the state walks are split (``_segments``)."""

    NSEG: int  # segments of the longest sequence (the walks' grid)
    SEG: int  # chunks per segment; 0: whole walks
    rows: int  # rows of the segment totals [rows, H, ...]
    offsets: torch.Tensor  # int32 [N]: each sequence's first row (varlen) or a dummy


def _segments(seqs: Seqs, chunks: Chunks, M: int, Dv: int, H: int, device) -> Segments:
    """``segment_count`` and where each sequence's segments lie in the totals (a packed batch: at most
    ``NT / SEG + N`` rows, as each sequence adds at most one partial segment; no device sync)."""
    NSEG = segment_count(seqs, chunks.most, M, Dv, H, device)
    if NSEG == 1:
        return Segments(1, 0, 0, dummy(device))
    SEG = segment_chunks()
    if not seqs.IS_VARLEN:
        return Segments(NSEG, SEG, seqs.N * NSEG, dummy(device))
    n_seg = ((chunks.counts + SEG - 1) // SEG).clamp_min(1)  # [N]
    offsets = (torch.cumsum(n_seg, 0) - n_seg).to(torch.int32)
    return Segments(NSEG, SEG, cdiv(chunks.NT, SEG) + seqs.N, offsets)


def _chunk_states(NT: int, H: int, M: int, Dv: int, DOT: tl.dtype, device) -> State:
    """Empty per-chunk states ``(hs [NT, H, M, Dv], hz [NT, H, M])`` for dots in ``DOT``: ``hs`` in bf16 for bf16
    dots (the dtype the tensor cores read anyway), else fp32 (fp16's range is too small for a long sequence's
    state)."""
    hs_dtype = torch.bfloat16 if DOT is tl.bfloat16 else torch.float32  # `is`: a tl.dtype's == costs us
    return empty((NT, H, M, Dv), hs_dtype, device), empty((NT, H, M), torch.float32, device)


def _state_grid(widths: tuple[int, ...], Dv: int, NH: int, walks: int = 1):
    """Grid of the state kernels: (M tiles * Dv tiles, N * H, walks * segments)."""
    R1, R2, R3 = widths3(widths)
    return lambda meta: (tile_count(R1, R2, R3, meta["BM"]) * cdiv(Dv, min(meta["BV"], Dv)), NH, walks)


def _segment_totals(n: int, H: int, M: int, Dv: int, device) -> State:
    """Empty fp32 segment totals of a segmented walk, ``([n, H, M, Dv], [n, H, M])`` (then carries, in place)."""
    return empty((n, H, M, Dv), torch.float32, device), empty((n, H, M), torch.float32, device)


def _launch_key(
    pass_: str, seqs: Seqs, segs: Segments, v: torch.Tensor, widths, C: int, flags: tuple[bool, ...], *tensors
) -> tuple | None:
    """The ``launch`` key of a dense batch's kernels in the forward or backward ``pass_`` (both launch the carry
    kernel): the shapes, the segments (``segment_count`` may be replaced, as tests do), the options (``flags``)
    that set keyword arguments and each tensor's ``alignment`` as launched; None for a packed batch (its chunk
    counts, in the grids, vary with ``cu_seqlens``)."""
    if seqs.IS_VARLEN:
        return None
    return (pass_, v.shape, v.device, widths, C, segs.NSEG, segs.SEG, flags, alignment(*tensors))


def _carry(F, Fz, S0, z0, S, z, dF, dFz, dS, dz, seqs, segs, H, M, Dv, C, key, dS0=None, dz0=None, final=False) -> None:
    """``chunk_carry_kernel``: the forward walk's totals ``F, Fz`` from ``S0, z0`` (None: 0), the final state to
    ``S, z`` with ``final``; with ``dF`` (the backward) also the reverse walk's totals from ``dS, dz`` (None: 0),
    their sum to ``dS0, dz0`` when there is an initial state. ``key``: the caller's ``launch`` key."""
    # a [16, 256] fp32 tile a scan step (the interpreter: wider blocks, fewer programs to simulate)
    BLOCK, BS = (1024 if interpreting() else 256), 16
    has_init, has_ds = S0 is not None, dS is not None
    launch(
        chunk_carry_kernel, (cdiv(M * Dv, BLOCK), seqs.N * H, 1 if dF is None else 2),
        F, Fz, S0 if has_init else F, z0 if has_init else Fz, S if final else F, z if final else Fz,
        *((F, Fz) * 3 if dF is None else (dF, dFz, dS if has_ds else dF, dz if has_ds else dFz, dS0, dz0)),
        seqs.cu_seqlens, segs.offsets, seqs.T_SEQ, key=key, H=H, M=M, DV=Dv, C=C, SEG=segs.SEG, HAS_INIT=has_init,
        HAS_DS=has_ds, FINAL=final, IS_VARLEN=seqs.IS_VARLEN, BLOCK=BLOCK, BS=BS,
    )  # fmt: skip


def _chunk_fwd(
    q: list[torch.Tensor],
    k: list[torch.Tensor],
    v: torch.Tensor,
    S0: torch.Tensor | None,
    z0: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    normalize: bool,
    eps: float,
    chunk_size: int,
    backward: bool,
    final: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal forward: ``(o [B, T, H, Dv], S [N, H, M, Dv], z [N, H, M], den [B * T, H], res)``, the final state
    in fp32 with ``final``, else ``S, z`` empty (neither allocated nor stored); ``den`` (with ``normalize``) and
    ``res`` (``o``'s rounding residual, empty unless ``keeps_residual``) are for the backward."""
    q = tuple(x.contiguous() for x in q)
    k = tuple(x.contiguous() for x in k)
    v = v.contiguous()
    B, T, H, Dv = v.shape
    C = chunk_size
    seqs = sequences(cu_seqlens, B, T, v.device)
    chunks = _chunk_index(seqs, C, v.device)
    S0 = None if S0 is None else S0.float().contiguous()
    z0 = None if z0 is None else z0.float().contiguous()
    eps = float(eps)  # an int eps would specialise the kernels otherwise (launch keys)
    widths = tuple(x.shape[-1] for x in q)
    R1, R2, R3 = widths3(widths)
    M = math.prod(widths)
    DOT, PREC = dot_config(v.dtype)
    NT = chunks.NT
    keeps = keeps_residual(v.dtype, normalize, backward)
    segs = _segments(seqs, chunks, M, Dv, H, v.device)
    SEG = segs.SEG
    key = _launch_key("fwd", seqs, segs, v, widths, C, (normalize, keeps, final), *q, *k, v, S0, z0)
    hs, hz = _chunk_states(NT, H, M, Dv, DOT, v.device)
    if final:
        S, z = empty((seqs.N, H, M, Dv), torch.float32, v.device), empty((seqs.N, H, M), torch.float32, v.device)
    else:
        S, z = v.new_empty(0, dtype=torch.float32), v.new_empty(0, dtype=torch.float32)
    has_init = S0 is not None
    F, Fz = _segment_totals(segs.rows, H, M, Dv, v.device) if SEG else (S, z)
    launch(
        chunk_state_kernel, _state_grid(widths, Dv, seqs.N * H, segs.NSEG),
        *factors3(k), v, S0 if has_init else S, z0 if has_init else z, hs, hz, F, Fz,
        seqs.cu_seqlens, chunks.offsets, segs.offsets, seqs.T_SEQ, key=key, LENGTH_CLASS=length_class(B * T),
        H=H, DV=Dv, R1=R1, R2=R2, R3=R3, P=len(k), C=C, SEG=SEG, HAS_INIT=has_init and not SEG, FINAL=final,
        IS_VARLEN=seqs.IS_VARLEN, DOT=DOT, PREC=PREC,
    )  # fmt: skip
    if SEG:
        _carry(F, Fz, S0, z0, S, z, None, None, None, None, seqs, segs, H, M, Dv, C, key, final=final)
    o = empty(v.shape, v.dtype, v.device)
    den = empty((B * T, H), torch.float32, v.device)
    res = empty(v.shape, v.dtype, v.device) if keeps else v.new_empty(0)
    launch(
        chunk_output_kernel, lambda meta: (NT, cdiv(Dv, min(meta["BV"], Dv)), H),
        *factors3(q), *factors3(k), v, hs, hz, F, Fz, o, res if keeps else o, den,
        seqs.cu_seqlens, chunks.seq, chunks.tok, segs.offsets, seqs.T_SEQ, eps, key=key,
        LENGTH_CLASS=length_class(B * T),
        H=H, DV=Dv, R1=R1, R2=R2, R3=R3, P=len(q), C=C, SEG=SEG, NORMALIZE=normalize, IS_VARLEN=seqs.IS_VARLEN,
        RES=keeps, DOT=DOT, PREC=PREC,
    )  # fmt: skip
    return o, S, z, den, res


# the autotuned kernels (tests and benchmarks pin their configs)
KERNELS = (chunk_state_kernel, chunk_state_bwd_kernel, chunk_output_kernel, chunk_bwd_kernel)

chunk_fwd = torch.library.custom_op("hadamard_attn::chunk_fwd", _chunk_fwd, mutates_args=())


@chunk_fwd.register_fake
def _(q, k, v, S0, z0, cu_seqlens, normalize, eps, chunk_size, backward, final):
    res = torch.empty_like(v) if keeps_residual(v.dtype, normalize, backward) else v.new_empty(0)
    o, S, z, den = fake_forward_outputs(q, v, cu_seqlens)
    if not final:
        S, z = v.new_empty(0, dtype=torch.float32), v.new_empty(0, dtype=torch.float32)
    return o, S, z, den, res


def _heads(x: torch.Tensor | None, dim: int = 2, *, h: int, n: int) -> torch.Tensor | None:
    """Heads ``h`` to ``h + n`` of ``x`` (its dimension ``dim``), a view; None and tensors without that dimension
    (an empty ``res``) as they are."""
    return x if x is None or x.dim() <= dim else x.narrow(dim, h, n)


def _chunk_bwd(
    q: list[torch.Tensor],
    k: list[torch.Tensor],
    v: torch.Tensor,
    o: torch.Tensor,
    res: torch.Tensor,
    den: torch.Tensor,
    S0: torch.Tensor | None,
    z0: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    do: torch.Tensor,
    dS: torch.Tensor | None,
    dz: torch.Tensor | None,
    normalize: bool,
    eps: float,
    chunk_size: int,
    heads: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal backward: ``(dq, dk, dv, dS0, dz0)`` (``dS0, dz0`` fp32, empty without ``S0``); ``dS, dz``: the final
    state's gradient, None for none. Any input may be a view of a larger tensor.

    Two launches after ``bwd_prep_kernel``: ``chunk_state_bwd_kernel`` recomputes the states entering the chunks
    and, in the same launch, walks the queries in reverse for the gradients of the states leaving them;
    ``chunk_bwd_kernel`` does the rest, both sides at once. With fewer ``heads`` than ``H`` (``backward_plan``), one
    such backward per group of heads, on their slices, its gradients copied into the whole.
    """
    B, T, H, Dv = v.shape
    if heads < 1:
        raise ValueError(f"heads: expected at least 1 head a pass, got {heads}")
    if heads < H:
        dq = [empty(x.shape, x.dtype, v.device) for x in q]
        dk = [empty(x.shape, x.dtype, v.device) for x in k]
        dv = empty(v.shape, v.dtype, v.device)
        dS0 = None if S0 is None else empty(S0.shape, torch.float32, v.device)
        dz0 = None if z0 is None else empty(z0.shape, torch.float32, v.device)
        den = den.view(B * T, H)
        for h in range(0, H, heads):
            n = min(heads, H - h)
            part = functools.partial(_heads, h=h, n=n)
            grads = _chunk_bwd(
                [part(x) for x in q], [part(x) for x in k], part(v), part(o), part(res), part(den, 1),
                part(S0, 1), part(z0, 1), cu_seqlens, part(do), part(dS, 1), part(dz, 1), normalize, eps, chunk_size, n,
            )  # fmt: skip
            for whole, g in zip((*dq, *dk, dv), (*grads[0], *grads[1], grads[2])):
                part(whole).copy_(g)
            if S0 is not None:
                part(dS0, 1).copy_(grads[3])
                part(dz0, 1).copy_(grads[4])
        if S0 is None:
            dS0, dz0 = v.new_empty(0, dtype=torch.float32), v.new_empty(0, dtype=torch.float32)
        return dq, dk, dv, dS0, dz0
    q = tuple(x.contiguous() for x in q)
    k = tuple(x.contiguous() for x in k)
    v = v.contiguous()
    C = chunk_size
    seqs = sequences(cu_seqlens, B, T, v.device)
    chunks = _chunk_index(seqs, C, v.device)
    S0 = None if S0 is None else S0.float().contiguous()
    z0 = None if z0 is None else z0.float().contiguous()
    DOT, PREC = dot_config(v.dtype)
    eps = float(eps)
    # d denominator per token: w [B, T, H] (fp32); the kernels form d numerator g from do and den (load_g)
    do = do.contiguous()
    o = o.contiguous()
    res = res.contiguous()
    den = den.contiguous()
    widths = tuple(x.shape[-1] for x in q)
    R1, R2, R3 = widths3(widths)
    M = math.prod(widths)
    keeps = res.numel() > 0
    has_ds = dS is not None
    dS = dS.float().contiguous() if has_ds else None
    dz = dz.float().contiguous() if has_ds else None
    segs = _segments(seqs, chunks, M, Dv, H, v.device)
    SEG = segs.SEG
    key = _launch_key("bwd", seqs, segs, v, widths, C, (normalize, keeps), *q, *k, v, do, o, res, den, S0, z0, dS, dz)
    w = empty((B, T, H), torch.float32, v.device)
    BR = 16
    launch(
        bwd_prep_kernel, (cdiv(B * T * H, BR),),
        do, o, res if keeps else o, den, w, eps, B * T * H, key=key,
        DV=Dv, NORMALIZE=normalize, RES=keeps, ROUND=DOT is tl.bfloat16, BR=BR,
    )  # fmt: skip
    NT = chunks.NT
    hs, hz = _chunk_states(NT, H, M, Dv, DOT, v.device)
    dhs, dhz = _chunk_states(NT, H, M, Dv, DOT, v.device)
    if not has_ds:
        dS = dz = hz
    has_init = S0 is not None
    if has_init:
        dS0, dz0 = empty(S0.shape, torch.float32, v.device), empty(z0.shape, torch.float32, v.device)
    else:
        dS0, dz0 = v.new_empty(0, dtype=torch.float32), v.new_empty(0, dtype=torch.float32)
    if SEG:
        F, Fz = _segment_totals(segs.rows, H, M, Dv, v.device)
        dF, dFz = _segment_totals(segs.rows, H, M, Dv, v.device)
    else:  # the reverse walk ends in dS0, dz0 (with an initial state); the forward walk stores no final state
        F, Fz = dS, dz
        dF, dFz = (dS0, dz0) if has_init else (dS, dz)
    launch(
        chunk_state_bwd_kernel, _state_grid(widths, Dv, seqs.N * H, 2 * segs.NSEG),
        *factors3(k), v, S0 if has_init else dS, z0 if has_init else dz, hs, hz,
        *factors3(q), do, den, w, dS, dz, dhs, dhz, F, Fz, dF, dFz,
        seqs.cu_seqlens, chunks.offsets, segs.offsets, seqs.T_SEQ, segs.NSEG, eps, key=key,
        LENGTH_CLASS=length_class(B * T),
        H=H, DV=Dv, R1=R1, R2=R2, R3=R3, P=len(q), C=C, SEG=SEG, HAS_INIT=has_init, HAS_DS=has_ds,
        NORMALIZE=normalize, IS_VARLEN=seqs.IS_VARLEN, DOT=DOT, PREC=PREC,
    )  # fmt: skip
    if SEG:
        ds = (dS, dz) if has_ds else (None, None)
        _carry(F, Fz, S0, z0, None, None, dF, dFz, *ds, seqs, segs, H, M, Dv, C, key, dS0=dS0, dz0=dz0)
    dq = [empty(x.shape, x.dtype, v.device) for x in q]
    dk = [empty(x.shape, x.dtype, v.device) for x in k]
    dv = empty(v.shape, v.dtype, v.device)
    launch(
        chunk_bwd_kernel, (NT, H, 2),
        *factors3(q), *factors3(k), v, do, den, w, hs, hz, dhs, dhz, F, Fz, dF, dFz, *factors3(dq), *factors3(dk), dv,
        seqs.cu_seqlens, chunks.seq, chunks.tok, segs.offsets, seqs.T_SEQ, eps, key=key,
        LENGTH_CLASS=length_class(B * T), H=H, DV=Dv, R1=R1, R2=R2, R3=R3, P=len(q), C=C, SEG=SEG,
        NORMALIZE=normalize, IS_VARLEN=seqs.IS_VARLEN, DOT=DOT, PREC=PREC,
    )  # fmt: skip
    return dq, dk, dv, dS0, dz0


chunk_bwd = torch.library.custom_op("hadamard_attn::chunk_bwd", _chunk_bwd, mutates_args=())


@chunk_bwd.register_fake
def _(q, k, v, o, res, den, S0, z0, cu_seqlens, do, dS, dz, normalize, eps, chunk_size, heads):
    f32 = dict(dtype=torch.float32)
    return (
        [torch.empty_like(x) for x in q],
        [torch.empty_like(x) for x in k],
        torch.empty_like(v),
        v.new_empty(0, **f32) if S0 is None else S0.new_empty(S0.shape, **f32),
        v.new_empty(0, **f32) if z0 is None else z0.new_empty(z0.shape, **f32),
    )


class ChunkHLATriton(torch.autograd.Function):
    """Autograd around the custom ops ``hadamard_attn::chunk_fwd`` / ``chunk_bwd`` (no graph break under
    ``torch.compile``; their Python functions in eager mode, see ``traced``)."""

    @staticmethod
    def forward(ctx, P, normalize, eps, chunk_size, given, final, cu_seqlens, v, S0, z0, *factors):
        """``chunk_size``: the forward's; ``given``: whether the caller chose it (then the backward's too);
        ``final``: whether to return the final state (else ``None, None``)."""
        q, k = list(factors[:P]), list(factors[P:])
        backward = any(ctx.needs_input_grad)
        o, S, z, den, res = traced(chunk_fwd, _chunk_fwd)(
            q, k, v, S0, z0, cu_seqlens, normalize, eps, chunk_size, backward, final
        )
        ctx.save_for_backward(v, o, res, den, S0, z0, cu_seqlens, *factors)
        ctx.cfg = (P, normalize, eps, chunk_size, given)
        ctx.set_materialize_grads(False)  # an unused final state costs no zeros
        return (o, S, z) if final else (o, None, None)

    @staticmethod
    def backward(ctx, do, dS, dz):
        P, normalize, eps, C, given = ctx.cfg
        v, o, res, den, S0, z0, cu_seqlens, *factors = ctx.saved_tensors
        do, dS, dz = upstream_grads(o, do, dS, dz)
        # planned now, with the memory free now (other layers' activations come and go between the passes)
        widths = tuple(x.shape[-1] for x in factors[:P])
        C, heads = (C, v.shape[2]) if given else backward_plan(C, widths, v, cu_seqlens)
        dq, dk, dv, dS0, dz0 = traced(chunk_bwd, _chunk_bwd)(
            factors[:P], factors[P:], v, o, res, den, S0, z0, cu_seqlens, do, dS, dz, normalize, eps, C, heads
        )
        if S0 is None:
            dS0 = dz0 = None
        return None, None, None, None, None, None, None, dv, dS0, dz0, *dq, *dk


def chunk_hadamard_attn_triton(
    q: tuple[torch.Tensor, ...],
    k: tuple[torch.Tensor, ...],
    v: torch.Tensor,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Causal HLA with the Triton forward, on validated inputs (see ``hadamard_attn``).

    ``q, k``: P <= 3 factors ``[B, T, H, R_f]``; ``v [B, T, H, Dv]``; state ``(S [N, H, M, Dv], z [N, H, M])``
    in fp32. ``chunk_size``: a power of two >= 16, forward and backward (default: ``default_chunk_size``, and
    ``backward_plan`` for the backward, when it runs: its chunk size and heads per pass; a given ``chunk_size``
    runs the backward for all heads at once). Differentiable w.r.t. the factors, ``v`` and
    ``initial_state``, also through the final state.
    """
    S0, z0 = (None, None) if initial_state is None else initial_state
    C = chunk_size or default_chunk_size()
    given = bool(chunk_size)
    final = bool(output_final_state)
    o, S, z = ChunkHLATriton.apply(len(q), normalize, eps, C, given, final, cu_seqlens, v, S0, z0, *q, *k)
    return o, ((S, z) if final else None)
