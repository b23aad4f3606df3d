"""Non-causal HLA in Triton: a state-build kernel and a read-out kernel, and their backward.

Forward, per head and sequence (``phi`` = row-major Khatri-Rao product of the factors, formed tile by tile in
registers, never in memory):

    S = S_0 + phi(K)^T V   [M, Dv]      z = z_0 + phi(K)^T 1   [M]        (``state_kernel``)
    o = phi(Q) S / (phi(Q) z + eps)                                        (``readout_kernel``)

Backward, with ``g = do / (den + eps)`` and ``w = -sum(do * o) / (den + eps)`` per token:

    dphi(Q) = g S^T + w z^T   -> dq_f                                      (``token_bwd_kernel``, queries)
    dS = dS_final + phi(Q)^T g,   dz = dz_final + phi(Q)^T w               (``state_kernel``)
    dphi(K) = V dS^T + 1 dz^T -> dk_f,   dv = phi(K) dS                    (``token_bwd_kernel``, keys)

Tokens are flattened to ``[TT = B * T]``; sequences are the B rows of a dense batch or the ``cu_seqlens``
ranges, each with its own state. A block of tokens that straddles sequences is handled one sequence at a time.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .utils import (
    block_heuristics,
    dot_config,
    dot_dtype,
    empty,
    interpreting,
    kr_index,
    kr_tile,
    kr_tile_backward,
    seq_bounds,
    seq_of,
    sequences,
    widths3,
)

State = tuple[torch.Tensor, torch.Tensor]


def _configs(*candidates: tuple[int, ...], keys: str) -> list[triton.Config]:
    """Autotuning candidates ``(*block sizes named by keys, num_warps, num_stages)``; the interpreter gets one
    config of 16s."""
    names = keys.split()
    if interpreting():
        return [triton.Config(dict.fromkeys(names, 16), num_warps=1, num_stages=1)]
    return [triton.Config(dict(zip(names, c[:-2])), num_warps=c[-2], num_stages=c[-1]) for c in candidates]


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.autotune(
    configs=_configs(
        (64, 128, 128, 8, 3),
        (128, 128, 128, 8, 2),
        (64, 64, 128, 4, 3),
        (64, 128, 64, 4, 3),
        (64, 128, 128, 4, 2),
        keys="BT BM BV",
    ),
    key=["R1", "R2", "R3", "DV", "P", "W_MODE", "SCALE_V", "DOT"],
    restore_value=["S", "z"],
)
@triton.heuristics(block_heuristics())
@triton.jit(do_not_specialize=["TT", "T_SEQ"])
def state_kernel(
    x1,
    x2,
    x3,
    v,
    den,
    w,
    S,
    z,
    cu_seqlens,
    seq_ids,
    TT,
    T_SEQ,
    eps,
    H: tl.constexpr,
    DV: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    P: tl.constexpr,
    W_MODE: tl.constexpr,
    SCALE_V: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    B1: tl.constexpr,
    B2: tl.constexpr,
    B3: tl.constexpr,
    NM: tl.constexpr,
):
    """``S[n, h] += phi(x)^T v``, ``z[n, h] += phi(x)^T w`` over one split of the flat tokens (fp32 atomics).

    ``W_MODE``: 0 no z, 1 ``w = 1``, 2 ``w`` loaded ``[TT, H]``. ``SCALE_V``: ``v`` is multiplied per token by
    ``1 / (den + eps)`` (the backward's ``g``). Grid: (M tiles * Dv tiles, splits, H).
    """
    i_mv, i_s, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_m, i_v = i_mv // tl.cdiv(DV, BV), i_mv % tl.cdiv(DV, BV)
    # tokens of this split: [c0, c1)
    chunk = tl.cdiv(tl.cdiv(TT, tl.num_programs(1)), BT) * BT
    c0 = i_s * chunk
    c1 = tl.minimum(c0 + chunk, TT)
    if c0 < c1:
        o_v = i_v * BV + tl.arange(0, BV)
        m = kr_index(i_m, R1, R2, R3, B1, B2, B3, P)
        mask_m = m < R1 * R2 * R3
        for n in range(seq_of(seq_ids, c0, T_SEQ, IS_VARLEN), seq_of(seq_ids, c1 - 1, T_SEQ, IS_VARLEN) + 1):
            bos, eos = seq_bounds(cu_seqlens, n, T_SEQ, IS_VARLEN)
            t_end = tl.minimum(c1, eos)
            acc = tl.zeros([BM, BV], dtype=tl.float32)
            zacc = tl.zeros([BT, B1 * B2 * B3], dtype=tl.float32)
            for t0 in range(tl.maximum(c0, bos), t_end, BT):
                o_t = t0 + tl.arange(0, BT)
                mask_t = o_t < t_end
                rows = o_t * H + i_h
                phi, _, _, _, _, _, _, _ = kr_tile(x1, x2, x3, rows, mask_t, i_m, BT, R1, R2, R3, B1, B2, B3, P)
                # [BT, BV]
                b_v = tl.load(v + rows[:, None] * DV + o_v[None, :], mask=mask_t[:, None], other=0)
                if SCALE_V:
                    b_den = tl.load(den + rows, mask=mask_t, other=0)
                    b_v = b_v.to(tl.float32) / (b_den + eps)[:, None]
                # [BM, BT] @ [BT, BV]
                acc += tl.dot(tl.trans(phi.to(DOT)), b_v.to(DOT), input_precision=PREC)
                if W_MODE == 1:
                    zacc += phi
                if W_MODE == 2:
                    zacc += phi * tl.load(w + rows, mask=mask_t, other=0)[:, None]
            base = (n * H + i_h).to(tl.int64)
            tl.atomic_add(
                S + base * (R1 * R2 * R3 * DV) + m[:, None] * DV + o_v[None, :],
                acc,
                mask=mask_m[:, None],
                sem="relaxed",
            )
            if W_MODE > 0:
                tl.atomic_add(z + base * (R1 * R2 * R3) + m, tl.sum(zacc, 0), mask=mask_m & (i_v == 0), sem="relaxed")


@triton.autotune(
    configs=_configs(
        (128, 64, 128, 8, 3),
        (128, 128, 128, 8, 2),
        (64, 128, 128, 4, 3),
        (128, 64, 128, 4, 3),
        (64, 64, 128, 4, 4),
        keys="BT BM BV",
    ),
    key=["R1", "R2", "R3", "DV", "P", "NORMALIZE", "DOT"],
)
@triton.heuristics(block_heuristics())
@triton.jit(do_not_specialize=["TT", "T_SEQ"])
def readout_kernel(
    x1,
    x2,
    x3,
    S,
    z,
    o,
    den,
    cu_seqlens,
    seq_ids,
    TT,
    T_SEQ,
    eps,
    H: tl.constexpr,
    DV: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    P: tl.constexpr,
    NORMALIZE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    B1: tl.constexpr,
    B2: tl.constexpr,
    B3: tl.constexpr,
    NM: tl.constexpr,
):
    """``o = phi(x) S / (phi(x) z + eps)`` for a block of tokens; stores ``den = phi(x) z`` too (fp32 ``[TT, H]``).

    Grid: (token blocks, Dv tiles, H).
    """
    i_t, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    rows = o_t * H + i_h
    t_last = tl.minimum(i_t * BT + BT, TT) - 1
    for n in range(seq_of(seq_ids, i_t * BT, T_SEQ, IS_VARLEN), seq_of(seq_ids, t_last, T_SEQ, IS_VARLEN) + 1):
        bos, eos = seq_bounds(cu_seqlens, n, T_SEQ, IS_VARLEN)
        mask_t = (o_t >= bos) & (o_t < eos)
        base = (n * H + i_h).to(tl.int64)
        acc = tl.zeros([BT, BV], dtype=tl.float32)
        dacc = tl.zeros([BT, B1 * B2 * B3], dtype=tl.float32)
        for i_m in range(NM):
            phi, m, _, _, _, _, _, _ = kr_tile(x1, x2, x3, rows, mask_t, i_m, BT, R1, R2, R3, B1, B2, B3, P)
            mask_m = m < R1 * R2 * R3
            # [BM, BV]
            b_s = tl.load(
                S + base * (R1 * R2 * R3 * DV) + m[:, None] * DV + o_v[None, :], mask=mask_m[:, None], other=0
            )
            acc += tl.dot(phi.to(DOT), b_s.to(DOT), input_precision=PREC)
            if NORMALIZE:
                dacc += phi * tl.load(z + base * (R1 * R2 * R3) + m, mask=mask_m, other=0)[None, :]
        if NORMALIZE:
            b_den = tl.sum(dacc, 1)  # [BT]
            acc = acc / (b_den + eps)[:, None]
            tl.store(den + rows, b_den, mask=mask_t & (i_v == 0))
        tl.store(o + rows[:, None] * DV + o_v[None, :], acc.to(o.dtype.element_ty), mask=mask_t[:, None])


@triton.autotune(
    configs=_configs((64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3), keys="BT BM"),
    key=["R1", "R2", "R3", "DV", "P", "QUERY", "NORMALIZE", "DOT"],
    reset_to_zero=["dx1", "dx2", "dx3"],
)
@triton.heuristics(block_heuristics())
@triton.jit(do_not_specialize=["TT", "T_SEQ"])
def token_bwd_kernel(
    x1,
    x2,
    x3,
    g,
    o,
    den,
    w,
    S,
    z,
    dx1,
    dx2,
    dx3,
    dv,
    cu_seqlens,
    seq_ids,
    TT,
    T_SEQ,
    eps,
    H: tl.constexpr,
    DV: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    P: tl.constexpr,
    QUERY: tl.constexpr,
    NORMALIZE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    B1: tl.constexpr,
    B2: tl.constexpr,
    B3: tl.constexpr,
    NM: tl.constexpr,
):
    """Gradient of the factors on one side, for a block of tokens: ``dphi(x) = G S^T + w z^T`` -> ``dx_f``.

    Queries (``QUERY``): ``G = do / (den + eps)``, ``w = -sum(do * o) / (den + eps)`` (``do``, 0 without
    ``NORMALIZE``), ``w`` stored ``[TT, H]`` for the state gradient. Keys: ``G = v``, ``w = 1``, and
    ``dv = phi(x) S`` is stored too. ``S, z`` are the final state (queries) or its gradient (keys).
    Grid: (token blocks, H).
    """
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    o_v = tl.arange(0, DV)
    rows = o_t * H + i_h
    t_last = tl.minimum(i_t * BT + BT, TT) - 1
    for n in range(seq_of(seq_ids, i_t * BT, T_SEQ, IS_VARLEN), seq_of(seq_ids, t_last, T_SEQ, IS_VARLEN) + 1):
        bos, eos = seq_bounds(cu_seqlens, n, T_SEQ, IS_VARLEN)
        mask_t = (o_t >= bos) & (o_t < eos)
        base = (n * H + i_h).to(tl.int64)
        # [BT, DV]
        b_g = tl.load(g + rows[:, None] * DV + o_v[None, :], mask=mask_t[:, None], other=0).to(tl.float32)
        if QUERY:
            if NORMALIZE:
                inv = 1.0 / (tl.load(den + rows, mask=mask_t, other=0) + eps)
                b_o = tl.load(o + rows[:, None] * DV + o_v[None, :], mask=mask_t[:, None], other=0).to(tl.float32)
                b_w = -tl.sum(b_g * b_o, 1) * inv  # [BT]
                b_g = b_g * inv[:, None]
            else:
                b_w = tl.zeros([BT], dtype=tl.float32)
            tl.store(w + rows, b_w, mask=mask_t)
        else:
            b_w = tl.full([BT], 1.0, dtype=tl.float32)
            dv_acc = tl.zeros([BT, DV], dtype=tl.float32)
        b_g = b_g.to(DOT)
        for i_m in range(NM):
            phi, m, a1, a2, a3, o1, o2, o3 = kr_tile(x1, x2, x3, rows, mask_t, i_m, BT, R1, R2, R3, B1, B2, B3, P)
            mask_m = m < R1 * R2 * R3
            # [BM, DV]
            b_s = tl.load(
                S + base * (R1 * R2 * R3 * DV) + m[:, None] * DV + o_v[None, :], mask=mask_m[:, None], other=0
            )
            b_z = tl.load(z + base * (R1 * R2 * R3) + m, mask=mask_m, other=0)
            b_s = b_s.to(DOT)
            # [BT, DV] @ [DV, BM]
            dphi = tl.dot(b_g, tl.trans(b_s), input_precision=PREC) + b_w[:, None] * b_z[None, :]
            kr_tile_backward(dphi, a1, a2, a3, o1, o2, o3, dx1, dx2, dx3, rows, mask_t, BT, R1, R2, R3, B1, B2, B3, P)
            if not QUERY:
                dv_acc += tl.dot(phi.to(DOT), b_s, input_precision=PREC)
        if not QUERY:
            tl.store(dv + rows[:, None] * DV + o_v[None, :], dv_acc.to(dv.dtype.element_ty), mask=mask_t[:, None])


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous()


def _build_state(x, v, S, z, seqs, w_mode, den=None, w=None, eps=0.0):
    """``S += phi(x)^T v``, ``z += phi(x)^T w`` in place (see ``state_kernel``)."""
    B, T, H, Dv = v.shape
    R1, R2, R3 = widths3(tuple(t.shape[-1] for t in x))
    x1, x2, x3 = (x + (x[0],) * (3 - len(x)))[:3]
    DOT, PREC = dot_config(v.dtype)
    TT = B * T

    def grid(meta):
        tiles = meta["NM"] * triton.cdiv(Dv, meta["BV"]) * H
        splits = min(triton.cdiv(4 * _num_sms(v.device), tiles), triton.cdiv(TT, 4 * meta["BT"]))
        return tiles // H, max(splits, 1), H

    state_kernel[grid](
        x1, x2, x3, v, den if den is not None else v, w if w is not None else v, S, z,
        seqs.cu_seqlens, seqs.seq_ids, TT, seqs.T_SEQ, eps,
        H=H, DV=Dv, R1=R1, R2=R2, R3=R3, P=len(x), W_MODE=w_mode, SCALE_V=den is not None,
        IS_VARLEN=seqs.IS_VARLEN, DOT=DOT, PREC=PREC,
    )  # fmt: skip


def _token_bwd(x, g, S, z, seqs, query, normalize, eps, o=None, den=None, w=None, dv=None):
    """Factor gradients ``dx_f`` (fp32) of one side; see ``token_bwd_kernel``."""
    B, T, H, Dv = g.shape
    R1, R2, R3 = widths3(tuple(t.shape[-1] for t in x))
    dx = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in x]
    x1, x2, x3 = (x + (x[0],) * (3 - len(x)))[:3]
    d1, d2, d3 = (dx + [dx[0]] * (3 - len(dx)))[:3]
    DOT, PREC = dot_config(g.dtype)
    TT = B * T
    token_bwd_kernel[lambda meta: (triton.cdiv(TT, meta["BT"]), H)](
        x1, x2, x3, g, o if o is not None else g, den if den is not None else g, w if w is not None else g,
        S, z, d1, d2, d3, dv if dv is not None else g, seqs.cu_seqlens, seqs.seq_ids, TT, seqs.T_SEQ, eps,
        H=H, DV=Dv, R1=R1, R2=R2, R3=R3, P=len(x), QUERY=query, NORMALIZE=normalize,
        IS_VARLEN=seqs.IS_VARLEN, DOT=DOT, PREC=PREC,
    )  # fmt: skip
    return dx


class ParallelHLATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, P, normalize, eps, cu_seqlens, v, S0, z0, *factors):
        q = tuple(_flat(x) for x in factors[:P])
        k = tuple(_flat(x) for x in factors[P:])
        v = _flat(v)
        B, T, H, Dv = v.shape
        M = math.prod(x.shape[-1] for x in q)
        seqs = sequences(cu_seqlens, B, T, v.device)
        N = seqs.N
        if S0 is None:
            S = torch.zeros(N, H, M, Dv, dtype=torch.float32, device=v.device)
            z = torch.zeros(N, H, M, dtype=torch.float32, device=v.device)
        else:
            S, z = S0.float().clone().contiguous(), z0.float().clone().contiguous()
        _build_state(k, v, S, z, seqs, w_mode=1)
        o = empty(v.shape, v.dtype, v.device)
        den = empty((B * T, H), torch.float32, v.device)
        R1, R2, R3 = widths3(tuple(x.shape[-1] for x in q))
        x1, x2, x3 = (q + (q[0],) * (3 - P))[:3]
        DOT, PREC = dot_config(v.dtype)
        TT = B * T
        readout_kernel[lambda meta: (triton.cdiv(TT, meta["BT"]), triton.cdiv(Dv, meta["BV"]), H)](
            x1, x2, x3, S.to(dot_dtype(v.dtype)), z, o, den, seqs.cu_seqlens, seqs.seq_ids, TT, seqs.T_SEQ, eps,
            H=H, DV=Dv, R1=R1, R2=R2, R3=R3, P=P, NORMALIZE=normalize, IS_VARLEN=seqs.IS_VARLEN, DOT=DOT, PREC=PREC,
        )  # fmt: skip
        ctx.save_for_backward(v, o, den, S, z, cu_seqlens, *q, *k)
        ctx.cfg = (P, normalize, eps, S0 is not None)
        return o, S, z

    @staticmethod
    def backward(ctx, do, dS, dz):
        P, normalize, eps, has_init = ctx.cfg
        v, o, den, S, z, cu_seqlens, *factors = ctx.saved_tensors
        q, k = tuple(factors[:P]), tuple(factors[P:])
        B, T, H, Dv = v.shape
        seqs = sequences(cu_seqlens, B, T, v.device)
        do = _flat(do)
        # queries: dq, and w = d(loss)/d(den)
        w = empty((B * T, H), torch.float32, v.device)
        dq = _token_bwd(q, do, S.to(dot_dtype(v.dtype)), z, seqs, True, normalize, eps, o=o, den=den, w=w)
        # gradient of the state: upstream + phi(Q)^T [g | w]
        dS_tot = torch.zeros_like(S) if dS is None else dS.float().clone().contiguous()
        dz_tot = torch.zeros_like(z) if dz is None else dz.float().clone().contiguous()
        _build_state(
            q,
            do,
            dS_tot,
            dz_tot,
            seqs,
            w_mode=2 if normalize else 0,
            den=den if normalize else None,
            w=w,
            eps=eps,
        )
        # keys: dk and dv
        dv = empty(v.shape, v.dtype, v.device)
        dk = _token_bwd(k, v, dS_tot.to(dot_dtype(v.dtype)), dz_tot, seqs, False, normalize, eps, dv=dv)
        dS0, dz0 = (dS_tot, dz_tot) if has_init else (None, None)
        grads = [d.to(x.dtype) for d, x in zip(dq + dk, q + k)]
        return (None, None, None, None, dv, dS0, dz0, *grads)


def parallel_hadamard_attn_triton(
    q: tuple[torch.Tensor, ...],
    k: tuple[torch.Tensor, ...],
    v: torch.Tensor,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Non-causal HLA with the Triton kernels, on validated inputs (see ``hadamard_attn``).

    ``q, k``: P <= 3 factors ``[B, T, H, R_f]``; ``v [B, T, H, Dv]``; state ``(S [N, H, M, Dv], z [N, H, M])``
    in fp32. Differentiable w.r.t. the factors, ``v`` and ``initial_state``, also through the final state.
    """
    S0, z0 = (None, None) if initial_state is None else initial_state
    o, S, z = ParallelHLATriton.apply(len(q), normalize, eps, cu_seqlens, v, S0, z0, *q, *k)
    return o, ((S, z) if output_final_state else None)
