"""Non-causal HLA in Triton: a state-build kernel and a read-out kernel, and their backward.

Forward, per head and sequence (``phi`` = row-major Khatri-Rao product of the factors, formed tile by tile in
registers, never in memory):

    S = S_0 + phi(K)^T V   [M, Dv]      z = z_0 + phi(K)^T 1   [M]        (``state_kernel``)
    o = phi(Q) S / (phi(Q) z + eps)                                        (``readout_kernel``)

Backward, with ``g = do / (den + eps)`` rounded to the dot dtype (stored once, as every dot reads it) and
``w = -sum(g * o) = -sum(phi(Q) * g S^T) / (phi(Q) . z + eps)`` per token (both sums from the query pass's own
tiles, so that the two terms of ``dphi(Q)`` cancel where they must; the output is not saved):

    dphi(Q) = g S^T + w z^T   -> dq_f                                      (``token_bwd_kernel``, queries)
    dS = dS_final + phi(Q)^T g,   dz = dz_final + phi(Q)^T w               (``state_kernel``)
    dphi(K) = V dS^T + 1 dz^T -> dk_f,   dv = phi(K) dS                    (``token_bwd_kernel``, keys)

Tokens are flattened to ``[TT = B * T]``; sequences are the B rows of a dense batch or the ``cu_seqlens``
ranges, each with its own state. A block of tokens that straddles sequences is handled one sequence at a time.
"""

from __future__ import annotations

import functools
import math

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
    dot_dtype,
    empty,
    factor_dots,
    factors3,
    fake_forward_outputs,
    interpreting,
    kr_block,
    kr_state_grads,
    kr_tile,
    kr_tile_count,
    kr_tile_t,
    launch,
    length_class,
    seq_bounds,
    seq_of,
    sequences,
    store_factor_grad,
    tile_count,
    traced,
    upstream_grads,
    widths3,
)

State = tuple[torch.Tensor, torch.Tensor]


# fp16 backward: the query pass's g = do / (den + eps) and w are stored times G_SCALE and the state's range scale
# (den grows with the history; g alone falls into fp16's subnormals)
G_SCALE = tl.constexpr(4096.0)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# autotuning candidates, each the winner of some key in the H100 sweeps of 2026-11-26 (benchmarks/RESULTS.md); the
# first is what a check runs (valid up to Dv = 256; BM = 128 of the factor gradients needs too much shared memory
# there). (32, 32), N = 32,760: state build 0.295 ms at (64, 128, 128, 4 warps, 3 stages)
# against 0.370 with 2 stages; factor gradients (queries) 0.436 ms at BM = 128 against 0.516 at 64.
@autotuned(
    (64, 128, 128, 4, 3),
    (64, 128, 128, 4, 2),
    (128, 128, 128, 8, 2),
    (128, 64, 128, 4, 2),
    (64, 64, 128, 4, 3),
    keys="BT BM BV",
    key=["R1", "R2", "R3", "DV", "P", "W_MODE", "LENGTH_CLASS"],
    restore_value=["S", "z"],
)
@triton.jit(do_not_specialize=["TT", "T_SEQ", "LENGTH_CLASS"])
def state_kernel(
    x1,
    x2,
    x3,
    v,
    w,
    scale,
    S,
    z,
    cu_seqlens,
    seq_ids,
    TT,
    T_SEQ,
    LENGTH_CLASS,
    H: tl.constexpr,
    DV: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    P: tl.constexpr,
    W_MODE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
):
    """``S[n, h] += phi(x)^T v``, ``z[n, h] += phi(x)^T w`` over one split of the flat tokens (fp32 atomics), both
    divided by ``scale[n, h]`` if ``HAS_SCALE`` (the fp16 backward: ``v`` and ``w`` are the query pass's scaled
    ``G`` and ``w``).

    ``W_MODE``: 0 no z, 1 ``w = 1``, 2 ``w`` loaded as ``[TT, H, 16]`` columns (``DOT``; summed), z through the
    tensor cores either way.
    Grid: (M tiles * Dv tiles, splits, H).
    """
    B1: tl.constexpr = kr_block(1, R1, R2, R3, BM)
    B2: tl.constexpr = kr_block(2, R1, R2, R3, BM)
    B3: tl.constexpr = kr_block(3, R1, R2, R3, BM)
    BD: tl.constexpr = at_most(BV, DV)  # the Dv tile
    i_mv, i_s, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_m, i_v = i_mv // tl.cdiv(DV, BD), i_mv % tl.cdiv(DV, BD)
    M: tl.constexpr = R1 * R2 * R3
    BMA: tl.constexpr = B1 * B2 * B3
    # tokens of this split: [c0, c1)
    chunk = tl.cdiv(tl.cdiv(TT, tl.num_programs(1)), BT) * BT
    c0 = i_s * chunk
    c1 = tl.minimum(c0 + chunk, TT)
    if c0 < c1:
        o_v = i_v * BD + tl.arange(0, BD)
        o_m = i_m * BMA + tl.arange(0, BMA)
        o_c = tl.arange(0, 16)
        for n in range(seq_of(seq_ids, c0, T_SEQ, IS_VARLEN), seq_of(seq_ids, c1 - 1, T_SEQ, IS_VARLEN) + 1):
            bos, eos = seq_bounds(cu_seqlens, n, T_SEQ, IS_VARLEN)
            t_end = tl.minimum(c1, eos)
            acc = tl.zeros([BMA, BD], dtype=tl.float32)
            zacc = tl.zeros([BMA, 16], dtype=tl.float32)
            for t0 in range(tl.maximum(c0, bos), t_end, BT):
                o_t = t0 + tl.arange(0, BT)
                mask_t = o_t < t_end
                rows = o_t * H + i_h
                # [BMA, BT]
                phi_t = kr_tile_t(x1, x2, x3, rows, mask_t, i_m, BT, R1, R2, R3, B1, B2, B3, P)
                phi_t = phi_t.to(DOT)
                # [BT, BD]
                b_v = tl.load(v + rows[:, None] * DV + o_v[None, :], mask=mask_t[:, None], other=0)
                acc += tl.dot(phi_t, b_v.to(DOT), input_precision=PREC)
                if W_MODE == 1:
                    # z through the tensor cores: phi^T [1 0 ... 0]
                    b_w = tl.broadcast_to(tl.where(o_c[None, :] == 0, 1.0, 0.0).to(DOT), (BT, 16))
                    zacc += tl.dot(phi_t, b_w, input_precision=PREC)
                if W_MODE == 2:
                    b_w = tl.load(w + rows[:, None] * 16 + o_c[None, :], mask=mask_t[:, None], other=0)
                    zacc += tl.dot(phi_t, b_w, input_precision=PREC)
            base = (n * H + i_h).to(tl.int64)
            mask_m = o_m < M
            p_s = S + base * (M * DV) + o_m[:, None] * DV + o_v[None, :]
            b_z = tl.sum(zacc, 1)
            if HAS_SCALE:
                inv = 1.0 / tl.load(scale + n * H + i_h)
                acc = acc * inv
                b_z = b_z * inv
            tl.atomic_add(p_s, acc, mask=mask_m[:, None], sem="relaxed")
            if W_MODE > 0:
                tl.atomic_add(z + base * M + o_m, b_z, mask=mask_m & (i_v == 0), sem="relaxed")


@autotuned(
    (128, 64, 128, 4, 3),
    (64, 64, 128, 4, 4),
    (128, 32, 128, 4, 3),
    (128, 64, 128, 8, 3),
    keys="BT BM BV",
    key=["R1", "R2", "R3", "DV", "P", "NORMALIZE", "LENGTH_CLASS"],
)
@triton.jit(do_not_specialize=["TT", "T_SEQ", "LENGTH_CLASS"])
def readout_kernel(
    x1,
    x2,
    x3,
    Sz,
    scale,
    o,
    den,
    cu_seqlens,
    seq_ids,
    TT,
    T_SEQ,
    eps,
    LENGTH_CLASS,
    H: tl.constexpr,
    DV: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    P: tl.constexpr,
    NORMALIZE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
):
    """``o = phi(x) S / (phi(x) z + eps)`` for a block of tokens; stores ``den = phi(x) z`` too (fp32 ``[TT, H]``,
    for the backward).

    ``Sz [N, H, M, DV + 16]`` in ``DOT``: ``S``, then ``z`` split in two columns (high and low part), then zeros;
    divided by ``scale [N, H]`` if ``HAS_SCALE``. Grid: (token blocks, Dv tiles, H).
    """
    B1: tl.constexpr = kr_block(1, R1, R2, R3, BM)
    B2: tl.constexpr = kr_block(2, R1, R2, R3, BM)
    B3: tl.constexpr = kr_block(3, R1, R2, R3, BM)
    NM: tl.constexpr = kr_tile_count(R1, R2, R3, BM)
    BD: tl.constexpr = at_most(BV, DV)  # the Dv tile
    i_t, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    M: tl.constexpr = R1 * R2 * R3
    BMA: tl.constexpr = B1 * B2 * B3
    o_t = i_t * BT + tl.arange(0, BT)
    o_v = i_v * BD + tl.arange(0, BD)
    o_c = DV + tl.arange(0, 16)
    rows = o_t * H + i_h
    t_last = tl.minimum(i_t * BT + BT, TT) - 1
    for n in range(seq_of(seq_ids, i_t * BT, T_SEQ, IS_VARLEN), seq_of(seq_ids, t_last, T_SEQ, IS_VARLEN) + 1):
        bos, eos = seq_bounds(cu_seqlens, n, T_SEQ, IS_VARLEN)
        mask_t = (o_t >= bos) & (o_t < eos)
        p_sz = Sz + (n * H + i_h).to(tl.int64) * (M * (DV + 16))
        acc = tl.zeros([BT, BD], dtype=tl.float32)
        dacc = tl.zeros([BT, 16], dtype=tl.float32)
        for i_m in range(NM):
            phi, _, _, _, _, _, _ = kr_tile(x1, x2, x3, rows, mask_t, i_m, BT, R1, R2, R3, B1, B2, B3, P)
            phi = phi.to(DOT)
            o_m = i_m * BMA + tl.arange(0, BMA)
            mask_m = o_m < M
            # [BMA, BD]
            b_s = tl.load(p_sz + o_m[:, None] * (DV + 16) + o_v[None, :], mask=mask_m[:, None], other=0)
            acc += tl.dot(phi, b_s, input_precision=PREC)
            if NORMALIZE:
                b_z = tl.load(p_sz + o_m[:, None] * (DV + 16) + o_c[None, :], mask=mask_m[:, None], other=0)
                dacc += tl.dot(phi, b_z, input_precision=PREC)
        if HAS_SCALE:
            sc = tl.load(scale + n * H + i_h)
            acc = acc * sc
            dacc = dacc * sc
        if NORMALIZE:
            b_den = tl.sum(dacc, 1)  # [BT]
            acc = acc / (b_den + eps)[:, None]
            tl.store(den + rows, b_den, mask=mask_t & (i_v == 0))
        tl.store(o + rows[:, None] * DV + o_v[None, :], acc.to(o.dtype.element_ty), mask=mask_t[:, None])


@autotuned(
    (64, 64, 4, 2),
    (64, 128, 4, 2),
    (64, 64, 4, 3),
    (64, 32, 4, 3),
    (128, 64, 8, 2),
    keys="BT BM",
    key=["R1", "R2", "R3", "DV", "P", "QUERY", "NORMALIZE", "LENGTH_CLASS"],
)
@triton.jit(do_not_specialize=["TT", "T_SEQ", "LENGTH_CLASS"])
def token_bwd_kernel(
    x1,
    x2,
    x3,
    g,
    den,
    w,
    gq,
    S,
    scale,
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
    LENGTH_CLASS,
    H: tl.constexpr,
    DV: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    P: tl.constexpr,
    QUERY: tl.constexpr,
    NORMALIZE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
):
    """Gradient of the factors on one side, for a block of tokens: ``dphi(x) = G S^T + w z^T`` -> ``dx_f``.

    Queries (``QUERY``): ``G = do / (den + eps)`` rounded to ``DOT`` (as the dot reads it) and
    ``w = -sum(G * o) = -sum(phi(x) * G S^T) / (phi(x) . z + eps)`` (``do``, 0 without ``NORMALIZE``). ``w`` comes
    out of the same pass over the state as ``G S^T``, from the same rounded operands; the factor gradients of ``z^T``
    (``den_factor_grads``, on the tensor cores) are added once ``w`` is known, and ``dphi`` in the direction of
    ``phi`` cancels to fp32 rounding (``w`` from an ``o`` rounded to bf16 gave ``dq`` 4.9e-2 for (16, 16, 16) bf16
    at T = 16,384 on the H100; no output residual is kept). For the state gradient, ``G`` is stored to ``gq`` and
    ``w`` as ``[TT, H, 16]`` columns, both times ``scale G_SCALE`` with ``HAS_SCALE`` (fp16). Keys: ``G = v``,
    ``w = 1``, and ``dv = phi(x) S`` is stored too. ``S`` (in ``DOT``, divided by ``scale``), ``z`` are the final
    state (queries) or its gradient (keys). A program owns its rows: ``dx_f`` (and ``dv``) are summed in registers
    and stored once, in the inputs' dtype. Grid: (token blocks, H).
    """
    W1: tl.constexpr = at_least(R1, 16)  # register widths of the factor gradients
    W2: tl.constexpr = at_least(R2, 16)
    W3: tl.constexpr = at_least(R3, 16)
    SPLIT_Z: tl.constexpr = QUERY and NORMALIZE
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    M: tl.constexpr = R1 * R2 * R3
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
        b_w = tl.full([BT], 0.0 if QUERY else 1.0, dtype=tl.float32)  # the keys' w = 1 (queries: SPLIT_Z or 0)
        sc = 1.0
        r = 1.0  # fp16: G_SCALE
        if HAS_SCALE:
            sc = tl.load(scale + n * H + i_h)
            r = G_SCALE
        out = sc  # the factor gradients' multiplier
        if SPLIT_Z:
            # G gs, gs = sc r: den grows with the history and G alone falls below fp16's normal range, while
            # den / sc stays below 2^12 |phi|_1; the state build divides by gs again
            b_g = b_g * (sc * r / (tl.load(den + rows, mask=mask_t, other=0) + eps))[:, None]
            if DOT == tl.float16:
                # do / eps on a query without features (den = 0) is beyond fp16's range: clamped, so that its
                # zero features carry 0 (not inf * 0 = NaN) into the state gradient
                b_g = tl.clamp(b_g, -65504.0, 65504.0)
            b_g = b_g.to(DOT).to(tl.float32)
            tl.store(gq + rows[:, None] * DV + o_v[None, :], b_g.to(gq.dtype.element_ty), mask=mask_t[:, None])
        # keys and unnormalised queries: dphi = sc (G S^T + (w / sc) z^T), summed unscaled, then multiplied by sc;
        # normalised queries: (G gs) (S / sc)^T, then w z^T below
        g1, g2, g3, b_dv = kr_state_grads(
            x1, x2, x3, rows, mask_t, b_g, b_w / sc, S + base * (M * DV), z + base * M, S, z,
            DV, R1, R2, R3, W1, W2, W3, P, BT, BM, PREC, not QUERY, SPLIT_Z, False,
        )  # fmt: skip
        if SPLIT_Z:
            z1, z2, z3 = den_factor_grads(
                x1, x2, x3, rows, mask_t, z + base * M, z, 1.0 / sc, R1, R2, R3, W1, W2, W3, P, BT, DOT, PREC, False
            )  # fmt: skip
            # w = -sum(G * o) = -sum(phi * G S^T) / (den + eps), with den = phi . z: both sums from the factor
            # gradients they cancel against (not the forward's den, from phi rounded to DOT), so dphi's component
            # along phi cancels exactly (the forward's den: bf16 P = 3 dq 4e-2 against 6e-3 in
            # test_parallel_query_gradient_cancels_in_bf16). G S^T's sums are r times the true ones (G gs against
            # S / sc), z1 is of z / sc: b_w = w r
            phi_dphi, phi_z = factor_dots(x1, rows, mask_t, g1, z1, R1, W1)
            b_w = -phi_dphi / (phi_z * sc + eps)
            g1 += (b_w * sc)[:, None] * z1  # z1: of z / sc
            g2 += (b_w * sc)[:, None] * z2
            g3 += (b_w * sc)[:, None] * z3
            out = 1.0 / r
            b_w = b_w * sc  # the state build's columns, two DOT parts (high and low): w gs
            w_st = b_w
            if DOT == tl.float16:
                # a query with tiny features can have |w| beyond fp16's range: clamped for the state gradient's
                # columns (an inf high part and -inf low part made its head's dz, then every dk and dv, NaN)
                w_st = tl.clamp(b_w, -65504.0, 65504.0)
            w_hi = w_st.to(DOT).to(tl.float32)
            o_c = tl.arange(0, 16)
            b_wm = tl.where(o_c[None, :] == 0, w_hi[:, None], tl.where(o_c[None, :] == 1, (w_st - w_hi)[:, None], 0))
            tl.store(w + rows[:, None] * 16 + o_c[None, :], b_wm.to(w.dtype.element_ty), mask=mask_t[:, None])
        store_factor_grad(dx1, rows, mask_t, g1 * out, R1, W1)
        if P >= 2:
            store_factor_grad(dx2, rows, mask_t, g2 * out, R2, W2)
        if P == 3:
            store_factor_grad(dx3, rows, mask_t, g3 * out, R3, W3)
        if not QUERY:
            tl.store(dv + rows[:, None] * DV + o_v[None, :], (b_dv * out).to(dv.dtype.element_ty), mask=mask_t[:, None])


def _seqs_key(seqs: Seqs) -> tuple:
    """The sequences' part of a ``launch`` key (the non-causal grids follow the token count, never ``cu_seqlens``):
    dense or packed, and a packed batch's ``cu_seqlens`` dtype and alignment (the caller's tensor, or a copy)."""
    return seqs.IS_VARLEN, alignment(seqs.cu_seqlens)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous()


def _range_scale(S: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """fp16 inputs: a power of two per sequence and head, ``[N, H]`` fp32, that brings the state into fp16's range
    for the copy the tensor cores read (``|S|, z <= 2^12``); None for bf16 and fp32 (they have the range)."""
    if dtype != torch.float16:
        return None
    big = torch.maximum(S.abs().amax((-2, -1)), z.abs().amax(-1))  # [N, H]
    # also below 1: a small state (a gradient) is brought up as well, away from fp16's subnormals
    return torch.exp2(torch.ceil(torch.log2(big / 2**12))).clamp(2.0**-64, 2.0**64)


def _dot_state(S: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``S / scale`` in the ``tl.dot`` operand dtype of ``dtype`` inputs."""
    return (S if scale is None else S / scale[..., None, None]).to(dot_dtype(dtype))


@triton.jit
def pack_state_kernel(S, z, scale, Sz, M, DV: tl.constexpr, HAS_SCALE: tl.constexpr, BMP: tl.constexpr):
    """``Sz[n, h] = [S | z_hi | z_lo | 0] / scale  [M, DV + 16]`` in ``Sz``'s dtype (the dot dtype), from the fp32
    ``S [N, H, M, DV]``, ``z [N, H, M]`` and ``scale [N, H]``; ``z_hi + z_lo = z / scale`` to ~16 bits.
    Grid: (M blocks, N * H)."""
    i_m, i_nh = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BMP + tl.arange(0, BMP)
    o_v = tl.arange(0, DV)
    o_c = tl.arange(0, 16)
    mask = (o_m < M)[:, None]
    base = i_nh.to(tl.int64) * M
    b_s = tl.load(S + (base + o_m[:, None]) * DV + o_v[None, :], mask=mask, other=0)  # [BMP, DV]
    b_z = tl.load(z + base + o_m, mask=o_m < M, other=0)  # [BMP]
    if HAS_SCALE:
        sc = tl.load(scale + i_nh)
        b_s = b_s / sc
        b_z = b_z / sc
    dt = Sz.dtype.element_ty
    z_hi = b_z.to(dt)
    z_lo = (b_z - z_hi.to(tl.float32)).to(dt)
    b_c = tl.where(o_c[None, :] == 0, z_hi[:, None], tl.where(o_c[None, :] == 1, z_lo[:, None], 0))  # [BMP, 16]
    p = Sz + (base + o_m[:, None]) * (DV + 16)
    tl.store(p + o_v[None, :], b_s.to(dt), mask=mask)
    tl.store(p + DV + o_c[None, :], b_c.to(dt), mask=mask)


def _with_z(S: torch.Tensor, z: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``[S | z_hi | z_lo | 0] / scale  [N, H, M, Dv + 16]`` in the dot dtype of ``dtype`` inputs, in one launch
    (``pack_state_kernel``)."""
    N, H, M, Dv = S.shape
    Sz = empty((N, H, M, Dv + 16), dot_dtype(dtype), S.device)
    BMP = 16 if interpreting() else 32
    key = (S.shape, S.device, alignment(S, z, scale, Sz))
    launch(
        pack_state_kernel, (cdiv(M, BMP), N * H),
        S, z, scale if scale is not None else z, Sz, M, key=key, DV=Dv, HAS_SCALE=scale is not None, BMP=BMP,
    )  # fmt: skip
    return Sz


def _build_state(x, v, S, z, seqs, w_mode, w=None, scale=None):
    """``S += phi(x)^T v / scale``, ``z += phi(x)^T w`` in place (see ``state_kernel``; ``scale [N, H]`` or None)."""
    B, T, H, Dv = v.shape
    widths = tuple(t.shape[-1] for t in x)
    R1, R2, R3 = widths3(widths)
    x1, x2, x3 = factors3(x)
    DOT, PREC = dot_config(v.dtype)
    TT = B * T
    key = (v.shape, v.device, widths, w_mode, *_seqs_key(seqs), alignment(*x, v, w, scale, S, z))

    def grid(meta):
        # split the tokens so that there are about 8 programs per SM (H100, (32, 32), N = 32760: 4 per SM
        # left a wave half empty, 0.45 ms; 8 per SM, 0.35 ms; 12, 0.355 ms)
        tiles = tile_count(R1, R2, R3, meta["BM"]) * cdiv(Dv, min(meta["BV"], Dv)) * H
        splits = min(cdiv(8 * _num_sms(v.device), tiles), cdiv(TT, 4 * meta["BT"]))
        return tiles // H, max(splits, 1), H

    launch(
        state_kernel, grid,
        x1, x2, x3, v, w if w is not None else v, scale if scale is not None else z, S, z,
        seqs.cu_seqlens, seqs.seq_ids, TT, seqs.T_SEQ, key=key,
        LENGTH_CLASS=length_class(TT), H=H, DV=Dv, R1=R1, R2=R2, R3=R3, P=len(x), W_MODE=w_mode,
        IS_VARLEN=seqs.IS_VARLEN, HAS_SCALE=scale is not None, DOT=DOT, PREC=PREC,
    )  # fmt: skip


def _token_bwd(x, g, S, scale, z, seqs, query, normalize, eps, den=None, w=None, gq=None, dv=None):
    """Factor gradients ``dx_f`` of one side, in the factors' dtype; see ``token_bwd_kernel``."""
    B, T, H, Dv = g.shape
    widths = tuple(t.shape[-1] for t in x)
    R1, R2, R3 = widths3(widths)
    dx = [empty(t.shape, t.dtype, t.device) for t in x]
    x1, x2, x3 = factors3(x)
    d1, d2, d3 = factors3(dx)
    DOT, PREC = dot_config(g.dtype)
    TT = B * T
    key = (
        g.shape,
        g.device,
        widths,
        query,
        normalize,
        *_seqs_key(seqs),
        alignment(*x, g, den, w, gq, S, scale, z, dv, *dx),
    )
    launch(
        token_bwd_kernel, lambda meta: (cdiv(TT, meta["BT"]), H),
        x1, x2, x3, g, den if den is not None else g, w if w is not None else g, gq if gq is not None else g,
        S, scale if scale is not None else z, z, d1, d2, d3, dv if dv is not None else g,
        seqs.cu_seqlens, seqs.seq_ids, TT, seqs.T_SEQ, float(eps), key=key,
        LENGTH_CLASS=length_class(TT), H=H, DV=Dv, R1=R1, R2=R2, R3=R3, P=len(x), QUERY=query,
        NORMALIZE=normalize, IS_VARLEN=seqs.IS_VARLEN, HAS_SCALE=scale is not None, DOT=DOT, PREC=PREC,
    )  # fmt: skip
    return dx


def _parallel_fwd(
    q: list[torch.Tensor],
    k: list[torch.Tensor],
    v: torch.Tensor,
    S0: torch.Tensor | None,
    z0: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    normalize: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: ``(o [B, T, H, Dv], S [N, H, M, Dv], z [N, H, M], den [B * T, H])``; ``den`` is for the backward."""
    q = tuple(_flat(x) for x in q)
    k = tuple(_flat(x) for x in k)
    v = _flat(v)
    B, T, H, Dv = v.shape
    M = math.prod(x.shape[-1] for x in q)
    seqs = sequences(cu_seqlens, B, T, v.device)
    if S0 is None:
        S = torch.zeros(seqs.N, H, M, Dv, dtype=torch.float32, device=v.device)
        z = torch.zeros(seqs.N, H, M, dtype=torch.float32, device=v.device)
    else:
        S, z = S0.float().clone().contiguous(), z0.float().clone().contiguous()
    _build_state(k, v, S, z, seqs, w_mode=1)
    o = empty(v.shape, v.dtype, v.device)
    den = empty((B * T, H), torch.float32, v.device)
    R1, R2, R3 = widths3(tuple(x.shape[-1] for x in q))
    x1, x2, x3 = factors3(q)
    DOT, PREC = dot_config(v.dtype)
    TT = B * T
    scale = _range_scale(S, z, v.dtype)
    Sz = _with_z(S, z, scale, v.dtype)
    key = (
        v.shape,
        v.device,
        tuple(x.shape[-1] for x in q),
        normalize,
        *_seqs_key(seqs),
        alignment(*q, Sz, scale, z, o, den),
    )
    launch(
        readout_kernel, lambda meta: (cdiv(TT, meta["BT"]), cdiv(Dv, min(meta["BV"], Dv)), H),
        x1, x2, x3, Sz, scale if scale is not None else z, o,
        den,
        seqs.cu_seqlens, seqs.seq_ids, TT, seqs.T_SEQ, float(eps), key=key,
        LENGTH_CLASS=length_class(TT), H=H, DV=Dv, R1=R1, R2=R2, R3=R3, P=len(q), NORMALIZE=normalize,
        IS_VARLEN=seqs.IS_VARLEN, HAS_SCALE=scale is not None, DOT=DOT, PREC=PREC,
    )  # fmt: skip
    return o, S, z, den


parallel_fwd = torch.library.custom_op("hadamard_attn::parallel_fwd", _parallel_fwd, mutates_args=())


@parallel_fwd.register_fake
def _(q, k, v, S0, z0, cu_seqlens, normalize, eps):
    return fake_forward_outputs(q, v, cu_seqlens)


def _parallel_bwd(
    q: list[torch.Tensor],
    k: list[torch.Tensor],
    v: torch.Tensor,
    den: torch.Tensor,
    S: torch.Tensor,
    z: torch.Tensor,
    do: torch.Tensor,
    dS: torch.Tensor | None,
    dz: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    normalize: bool,
    eps: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dq, dk, dv, dS0, dz0)`` given the saved forward and the gradients of ``o, S, z`` (``dS, dz``
    None for an unused final state)."""
    # the saved inputs as the caller gave them: the kernels read them contiguous (factors given as one
    # [B, T, H, P, R] tensor are strided views)
    q = tuple(_flat(x) for x in q)
    k = tuple(_flat(x) for x in k)
    v = _flat(v)
    B, T, H, Dv = v.shape
    seqs = sequences(cu_seqlens, B, T, v.device)
    do = _flat(do)
    # queries: dq, and w = d(loss)/d(den)
    w = empty((B * T, H, 16), dot_dtype(v.dtype), v.device)
    scale = _range_scale(S, z, v.dtype)
    S_dot = _dot_state(S, scale, v.dtype)
    # do / (den + eps) as the dots read it (times the state's range scale, fp16)
    gq = empty(v.shape, dot_dtype(v.dtype), v.device) if normalize else do
    dq = _token_bwd(q, do, S_dot, scale, z, seqs, True, normalize, eps, den=den, w=w, gq=gq)
    # gradient of the state: upstream + phi(Q)^T [g | w]
    if dS is None:
        dS_tot, dz_tot = torch.zeros_like(S), torch.zeros_like(z)
    else:
        dS_tot, dz_tot = dS.float().clone().contiguous(), dz.float().clone().contiguous()
    gs = scale * G_SCALE.value if scale is not None and normalize else None  # the query pass's scale of g and w
    _build_state(q, gq, dS_tot, dz_tot, seqs, w_mode=2 if normalize else 0, w=w, scale=gs)
    # keys: dk and dv
    dv = empty(v.shape, v.dtype, v.device)
    scale = _range_scale(dS_tot, dz_tot, v.dtype)
    dS_dot = _dot_state(dS_tot, scale, v.dtype)
    dk = _token_bwd(k, v, dS_dot, scale, dz_tot, seqs, False, normalize, eps, dv=dv)
    return list(dq), list(dk), dv, dS_tot, dz_tot


parallel_bwd = torch.library.custom_op("hadamard_attn::parallel_bwd", _parallel_bwd, mutates_args=())


@parallel_bwd.register_fake
def _(q, k, v, den, S, z, do, dS, dz, cu_seqlens, normalize, eps):
    return (
        [torch.empty_like(x) for x in q],
        [torch.empty_like(x) for x in k],
        torch.empty_like(v),
        S.new_empty(S.shape),
        z.new_empty(z.shape),
    )


class ParallelHLA(torch.autograd.Function):
    """Autograd around the two custom ops (cheaper per call than ``register_autograd``; traced by
    ``torch.compile`` all the same; their Python functions in eager mode, see ``traced``)."""

    @staticmethod
    def forward(ctx, P, normalize, eps, cu_seqlens, v, S0, z0, *factors):
        q, k = list(factors[:P]), list(factors[P:])
        o, S, z, den = traced(parallel_fwd, _parallel_fwd)(q, k, v, S0, z0, cu_seqlens, normalize, eps)
        ctx.save_for_backward(v, den, S, z, cu_seqlens, *factors)
        ctx.cfg = (P, normalize, eps, S0 is not None)
        ctx.set_materialize_grads(False)  # an unused final state costs no zeros and copies
        return o, S, z

    @staticmethod
    def backward(ctx, do, dS, dz):
        P, normalize, eps, has_init = ctx.cfg
        v, den, S, z, cu_seqlens, *factors = ctx.saved_tensors
        do, dS, dz = upstream_grads(v, do, dS, dz)  # v: the output's shape and dtype
        dq, dk, dv, dS0, dz0 = traced(parallel_bwd, _parallel_bwd)(
            factors[:P], factors[P:], v, den, S, z, do, dS, dz, cu_seqlens, normalize, eps
        )
        if not has_init:
            dS0 = dz0 = None
        return None, None, None, None, dv, dS0, dz0, *dq, *dk


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
    Runs as the custom ops ``hadamard_attn::parallel_fwd`` / ``parallel_bwd`` (no graph break under
    ``torch.compile``).
    """
    S0, z0 = (None, None) if initial_state is None else initial_state
    o, S, z = ParallelHLA.apply(len(q), normalize, eps, cu_seqlens, v, S0, z0, *q, *k)
    return o, ((S, z) if output_final_state else None)
