"""Causal HLA in Triton, chunked: a state kernel that walks the chunks in order, an output kernel parallel over
chunks.

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

Cost of the per-chunk states ``hs [NT, H, M, Dv]`` (``NT`` chunks in all): ``M * Dv / C`` numbers per token and
head, linear in T. Stored in bf16 for bf16 inputs (the dtype the tensor cores read anyway), in fp32 for fp16
(the state outgrows fp16's range at long lengths) and fp32 inputs. B=1, H=12, Dv=128, C=64, N=32,760 in bf16:
0.4 GB for widths (16, 16), 1.6 GB for (32, 32). ``hz [NT, H, M]`` is fp32.

Numerics: the denominator never goes through a low-precision dot: ``rowsum(A_c)`` and ``phi(Q_c) z_c`` are fp32
element-wise reductions. ``A_c`` can exceed fp16's range (``R^P``), so each row is divided by its largest
magnitude before the ``A_c V_c`` dot and multiplied back after it.

Backward: the torch chunk path's (``hadamard_attn.ops.chunk.chunk_backward``), which needs only the inputs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..chunk import chunk_backward
from .parallel import _configs
from .utils import (
    block_heuristics,
    dot_config,
    dot_dtype,
    empty,
    factor_block,
    interpreting,
    kr_tile,
    kr_tile_t,
    seq_bounds,
    sequences,
    widths3,
)

State = tuple[torch.Tensor, torch.Tensor]


def default_chunk_size() -> int:
    """Tokens per chunk: 64 on the GPU; 16 under the interpreter (tiny tests still span several chunks)."""
    return 16 if interpreting() else 64


@triton.autotune(
    configs=_configs((64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2), (32, 32, 4, 3), keys="BM BV"),
    key=["R1", "R2", "R3", "DV", "P", "C", "HAS_INIT", "DOT"],
)
@triton.heuristics({**block_heuristics(), "BV": lambda a: min(a["BV"], a["DV"])})
@triton.jit(do_not_specialize=["T_SEQ"])
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
    T_SEQ,
    H: tl.constexpr,
    DV: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    P: tl.constexpr,
    C: tl.constexpr,
    HAS_INIT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    B1: tl.constexpr,
    B2: tl.constexpr,
    B3: tl.constexpr,
    NM: tl.constexpr,
):
    """One state tile of one sequence and head through its chunks: ``hs[c], hz[c]`` = the state entering chunk
    ``c``, then ``S, z`` = the final state (fp32 ``[N, H, M, DV]``, ``[N, H, M]``).

    ``x*``: key factors ``[TT, H, R_f]``; ``chunk_offsets [N]``: index of each sequence's first chunk (varlen).
    Grid: (M tiles * Dv tiles, N * H).
    """
    i_mv, i_nh = tl.program_id(0), tl.program_id(1)
    i_m, i_v = i_mv // tl.cdiv(DV, BV), i_mv % tl.cdiv(DV, BV)
    i_n, i_h = i_nh // H, i_nh % H
    M: tl.constexpr = R1 * R2 * R3
    BMA: tl.constexpr = B1 * B2 * B3
    o_m = i_m * BMA + tl.arange(0, BMA)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_m = o_m < M
    mask_z = mask_m & (i_v == 0)
    bos, eos = seq_bounds(cu_seqlens, i_n, T_SEQ, IS_VARLEN)
    if IS_VARLEN:
        c0 = tl.load(chunk_offsets + i_n)
    else:
        c0 = i_n * tl.cdiv(T_SEQ, C)
    base = i_nh.to(tl.int64)
    b_s = tl.zeros([BMA, BV], dtype=tl.float32)
    b_z = tl.zeros([BMA], dtype=tl.float32)
    if HAS_INIT:
        b_s += tl.load(S0 + base * (M * DV) + o_m[:, None] * DV + o_v[None, :], mask=mask_m[:, None], other=0)
        b_z += tl.load(z0 + base * M + o_m, mask=mask_m, other=0)
    for t0 in range(bos, eos, C):
        i_c = (c0 + (t0 - bos) // C).to(tl.int64) * H + i_h
        tl.store(
            hs + i_c * (M * DV) + o_m[:, None] * DV + o_v[None, :], b_s.to(hs.dtype.element_ty), mask=mask_m[:, None]
        )
        tl.store(hz + i_c * M + o_m, b_z, mask=mask_z)
        o_t = t0 + tl.arange(0, C)
        mask_t = o_t < eos
        rows = o_t * H + i_h
        # [BMA, C]
        phi_t = kr_tile_t(x1, x2, x3, rows, mask_t, i_m, C, R1, R2, R3, B1, B2, B3, P)
        # [C, BV]
        b_v = tl.load(v + rows[:, None] * DV + o_v[None, :], mask=mask_t[:, None], other=0)
        b_s += tl.dot(phi_t.to(DOT), b_v.to(DOT), input_precision=PREC)
        b_z += tl.sum(phi_t, 1)
    tl.store(S + base * (M * DV) + o_m[:, None] * DV + o_v[None, :], b_s, mask=mask_m[:, None])
    tl.store(z + base * M + o_m, b_z, mask=mask_z)


@triton.jit
def factor_similarity(x, y, rows, mask_t, R: tl.constexpr, RP: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``x_f y_f^T`` over the rows of a chunk, ``[C, C]`` fp32 (the width zero-padded to ``RP >= 16``)."""
    a, _ = factor_block(x, rows, mask_t, 0, R, RP, RP > R)  # [C, RP]
    b, _ = factor_block(y, rows, mask_t, 0, R, RP, RP > R)  # [C, RP]
    return tl.dot(a.to(DOT), tl.trans(b.to(DOT)), input_precision=PREC)


@triton.autotune(
    configs=_configs((64, 64, 4, 2), (64, 128, 4, 2), (128, 128, 8, 2), (32, 64, 4, 3), keys="BM BV"),
    key=["R1", "R2", "R3", "DV", "P", "C", "NORMALIZE", "DOT"],
)
@triton.heuristics(
    {
        **block_heuristics(),
        "BV": lambda a: min(a["BV"], a["DV"]),
        "RP1": lambda a: max(a["R1"], 16),
        "RP2": lambda a: max(a["R2"], 16),
        "RP3": lambda a: max(a["R3"], 16),
    }
)
@triton.jit(do_not_specialize=["T_SEQ"])
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
    o,
    cu_seqlens,
    chunk_seq,
    chunk_tok,
    T_SEQ,
    eps,
    H: tl.constexpr,
    DV: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    P: tl.constexpr,
    C: tl.constexpr,
    NORMALIZE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    B1: tl.constexpr,
    B2: tl.constexpr,
    B3: tl.constexpr,
    NM: tl.constexpr,
    RP1: tl.constexpr,
    RP2: tl.constexpr,
    RP3: tl.constexpr,
):
    """``o_c = (A_c V_c + phi(Q_c) S_c) / (rowsum(A_c) + phi(Q_c) z_c + eps)`` for one chunk and Dv tile.

    ``x*, y*``: query and key factors ``[TT, H, R_f]``; ``hs, hz``: the states entering the chunks;
    ``chunk_seq, chunk_tok [NT]``: sequence and first token of each chunk (varlen). Grid: (NT, Dv tiles, H).
    """
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    M: tl.constexpr = R1 * R2 * R3
    BMA: tl.constexpr = B1 * B2 * B3
    if IS_VARLEN:
        i_n = tl.load(chunk_seq + i_c)
        t0 = tl.load(chunk_tok + i_c)
    else:
        i_n = i_c // tl.cdiv(T_SEQ, C)
        t0 = i_n * T_SEQ + (i_c % tl.cdiv(T_SEQ, C)) * C
    _, eos = seq_bounds(cu_seqlens, i_n, T_SEQ, IS_VARLEN)
    o_t = t0 + tl.arange(0, C)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_t = o_t < eos
    rows = o_t * H + i_h
    # intra-chunk: the masked Hadamard block, [C, C]
    A = factor_similarity(x1, y1, rows, mask_t, R1, RP1, DOT, PREC)
    if P >= 2:
        A *= factor_similarity(x2, y2, rows, mask_t, R2, RP2, DOT, PREC)
    if P == 3:
        A *= factor_similarity(x3, y3, rows, mask_t, R3, RP3, DOT, PREC)
    A = tl.where(o_t[:, None] >= o_t[None, :], A, 0)
    den = tl.sum(A, 1)  # [C]
    big = tl.max(tl.abs(A), 1)
    big = tl.where(big > 0, big, 1.0)  # [C]
    # [C, BV]
    b_v = tl.load(v + rows[:, None] * DV + o_v[None, :], mask=mask_t[:, None], other=0)
    acc = tl.dot((A / big[:, None]).to(DOT), b_v.to(DOT), input_precision=PREC) * big[:, None]
    # inter-chunk: the state entering the chunk
    base = (i_c.to(tl.int64) * H + i_h) * M
    for i_m in range(NM):
        phi, _, _, _, _, _, _ = kr_tile(x1, x2, x3, rows, mask_t, i_m, C, R1, R2, R3, B1, B2, B3, P)  # [C, BMA]
        o_m = i_m * BMA + tl.arange(0, BMA)
        mask_m = o_m < M
        # [BMA, BV]
        b_s = tl.load(hs + (base + o_m[:, None]) * DV + o_v[None, :], mask=mask_m[:, None], other=0)
        acc += tl.dot(phi.to(b_s.dtype), b_s, input_precision=PREC)
        if NORMALIZE:
            b_z = tl.load(hz + base + o_m, mask=mask_m, other=0)  # [BMA]
            den += tl.sum(phi * b_z[None, :], 1)
    if NORMALIZE:
        acc = acc / (den + eps)[:, None]
    tl.store(o + rows[:, None] * DV + o_v[None, :], acc.to(o.dtype.element_ty), mask=mask_t[:, None])


def _chunk_index(cu_seqlens: torch.Tensor | None, seqs, C: int, device):
    """``(NT, chunk_offsets [N], chunk_seq [NT], chunk_tok [NT])`` (int32): number of chunks, each sequence's
    first chunk, each chunk's sequence and first token; dummies for a dense batch."""
    if not seqs.IS_VARLEN:
        dummy = torch.empty(1, dtype=torch.int32, device=device)
        return seqs.N * triton.cdiv(seqs.T_SEQ, C), dummy, dummy, dummy
    cu = seqs.cu_seqlens.long()
    n_chunks = (cu[1:] - cu[:-1] + C - 1) // C  # [N]
    offsets = torch.cumsum(n_chunks, 0) - n_chunks  # [N]
    NT = int(n_chunks.sum())
    chunk_seq = torch.repeat_interleave(torch.arange(seqs.N, device=device), n_chunks, output_size=NT)  # [NT]
    chunk_tok = cu[chunk_seq] + (torch.arange(NT, device=device) - offsets[chunk_seq]) * C
    i32 = dict(dtype=torch.int32)
    return NT, offsets.to(**i32), chunk_seq.to(**i32), chunk_tok.to(**i32)


def _states_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the per-chunk states: that of the tensor-core operands for bf16, else fp32 (fp16's range is too
    small for a long sequence's state)."""
    return dot_dtype(dtype) if dtype == torch.bfloat16 else torch.float32


@torch.library.custom_op("hadamard_attn::chunk_fwd", mutates_args=())
def chunk_fwd(
    q: list[torch.Tensor],
    k: list[torch.Tensor],
    v: torch.Tensor,
    S0: torch.Tensor | None,
    z0: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    normalize: bool,
    eps: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal forward: ``(o [B, T, H, Dv], S [N, H, M, Dv], z [N, H, M])``, the state in fp32."""
    q = tuple(x.contiguous() for x in q)
    k = tuple(x.contiguous() for x in k)
    v = v.contiguous()
    B, T, H, Dv = v.shape
    C = chunk_size
    M = math.prod(x.shape[-1] for x in q)
    R1, R2, R3 = widths3(tuple(x.shape[-1] for x in q))
    P = len(q)
    q1, q2, q3 = (q + (q[0],) * (3 - P))[:3]
    k1, k2, k3 = (k + (k[0],) * (3 - P))[:3]
    DOT, PREC = dot_config(v.dtype)
    seqs = sequences(cu_seqlens, B, T, v.device)
    NT, chunk_offsets, chunk_seq, chunk_tok = _chunk_index(cu_seqlens, seqs, C, v.device)
    hs = empty((NT, H, M, Dv), _states_dtype(v.dtype), v.device)
    hz = empty((NT, H, M), torch.float32, v.device)
    S = empty((seqs.N, H, M, Dv), torch.float32, v.device)
    z = empty((seqs.N, H, M), torch.float32, v.device)
    has_init = S0 is not None
    S0 = S0.float().contiguous() if has_init else S
    z0 = z0.float().contiguous() if has_init else z
    chunk_state_kernel[lambda meta: (meta["NM"] * triton.cdiv(Dv, meta["BV"]), seqs.N * H)](
        k1, k2, k3, v, S0, z0, hs, hz, S, z, seqs.cu_seqlens, chunk_offsets, seqs.T_SEQ,
        H=H, DV=Dv, R1=R1, R2=R2, R3=R3, P=P, C=C, HAS_INIT=has_init, IS_VARLEN=seqs.IS_VARLEN,
        DOT=DOT, PREC=PREC,
    )  # fmt: skip
    o = empty(v.shape, v.dtype, v.device)
    chunk_output_kernel[lambda meta: (NT, triton.cdiv(Dv, meta["BV"]), H)](
        q1, q2, q3, k1, k2, k3, v, hs, hz, o, seqs.cu_seqlens, chunk_seq, chunk_tok, seqs.T_SEQ, eps,
        H=H, DV=Dv, R1=R1, R2=R2, R3=R3, P=P, C=C, NORMALIZE=normalize, IS_VARLEN=seqs.IS_VARLEN,
        DOT=DOT, PREC=PREC,
    )  # fmt: skip
    return o, S, z


@chunk_fwd.register_fake
def _(q, k, v, S0, z0, cu_seqlens, normalize, eps, chunk_size):
    B, T, H, Dv = v.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    M = math.prod(x.shape[-1] for x in q)
    return torch.empty_like(v), v.new_empty(N, H, M, Dv, dtype=torch.float32), v.new_empty(N, H, M, dtype=torch.float32)


@torch.library.custom_op("hadamard_attn::chunk_bwd", mutates_args=())
def chunk_bwd(
    q: list[torch.Tensor],
    k: list[torch.Tensor],
    v: torch.Tensor,
    S0: torch.Tensor | None,
    z0: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    do: torch.Tensor,
    dS: torch.Tensor,
    dz: torch.Tensor,
    normalize: bool,
    eps: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal backward from the inputs alone: ``(dq, dk, dv, dS0, dz0)`` by the torch chunk path's backward, one
    sequence at a time with ``cu_seqlens``; ``dS0, dz0`` empty without ``S0``."""
    bounds = [0, v.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
    parts = []
    for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        sl = slice(None) if cu_seqlens is None else slice(n, n + 1)  # this sequence's states (all B rows if dense)
        parts.append(
            chunk_backward(
                tuple(x[:, s:e] for x in q), tuple(x[:, s:e] for x in k), v[:, s:e],
                None if S0 is None else S0[sl], None if z0 is None else z0[sl],
                do[:, s:e], dS[sl], dz[sl], normalize, eps,
            )
        )  # fmt: skip
    dq = [torch.cat(d, 1) for d in zip(*(p[0] for p in parts))]
    dk = [torch.cat(d, 1) for d in zip(*(p[1] for p in parts))]
    dv = torch.cat([p[2] for p in parts], 1)
    if S0 is None:
        return dq, dk, dv, v.new_empty(0, dtype=torch.float32), v.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, torch.cat([p[3] for p in parts]), torch.cat([p[4] for p in parts])


@chunk_bwd.register_fake
def _(q, k, v, S0, z0, cu_seqlens, do, dS, dz, normalize, eps):
    f32 = dict(dtype=torch.float32)
    return (
        [torch.empty_like(x) for x in q],
        [torch.empty_like(x) for x in k],
        torch.empty_like(v),
        v.new_empty(0, **f32) if S0 is None else S0.new_empty(S0.shape, **f32),
        v.new_empty(0, **f32) if z0 is None else z0.new_empty(z0.shape, **f32),
    )


class ChunkHLATriton(torch.autograd.Function):
    """The Triton forward and the torch backward, as the custom ops ``hadamard_attn::chunk_fwd`` / ``chunk_bwd``
    (no graph break under ``torch.compile``)."""

    @staticmethod
    def forward(ctx, P, normalize, eps, chunk_size, cu_seqlens, v, S0, z0, *factors):
        o, S, z = chunk_fwd(list(factors[:P]), list(factors[P:]), v, S0, z0, cu_seqlens, normalize, eps, chunk_size)
        ctx.save_for_backward(v, S0, z0, cu_seqlens, *factors)
        ctx.cfg = (P, normalize, eps)
        return o, S, z

    @staticmethod
    def backward(ctx, do, dS, dz):
        P, normalize, eps = ctx.cfg
        v, S0, z0, cu_seqlens, *factors = ctx.saved_tensors
        dq, dk, dv, dS0, dz0 = chunk_bwd(factors[:P], factors[P:], v, S0, z0, cu_seqlens, do, dS, dz, normalize, eps)
        if S0 is None:
            dS0 = dz0 = None
        return None, None, None, None, None, dv, dS0, dz0, *dq, *dk


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
    in fp32. ``chunk_size``: a power of two >= 16 (default: ``default_chunk_size()``). Differentiable w.r.t. the
    factors, ``v`` and ``initial_state``, also through the final state.
    """
    S0, z0 = (None, None) if initial_state is None else initial_state
    C = chunk_size or default_chunk_size()
    o, S, z = ChunkHLATriton.apply(len(q), normalize, eps, C, cu_seqlens, v, S0, z0, *q, *k)
    return o, ((S, z) if output_final_state else None)
