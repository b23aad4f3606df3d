"""One causal decode step in Triton: add a token to the state, then read the state with its query.

    S' = S + phi(k) v^T    [M, Dv]        z' = z + phi(k)    [M]
    o  = phi(q)^T S' / (phi(q)^T z' + eps)

One program per (Dv tile, batch row and head) walks the M tiles once: it reads each ``[BM, BV]`` tile of the fp32
state, adds the token's outer product, writes the new tile and accumulates the query's read-out, so the state is
read once and written once (the torch step makes several copies of it). The denominator, ``M`` numbers, is
recomputed by every Dv tile; ``z'`` is written by the first. ``phi`` is the row-major Khatri-Rao product of the
factors, formed tile by tile in registers (``kr_tile``). Inference only: no backward (``hadamard_attn_step``
takes the torch path for inputs that need gradients).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .utils import (
    alignment,
    at_most,
    autotuned,
    cdiv,
    empty,
    factors3,
    kr_block,
    kr_tile,
    kr_tile_count,
    launch,
    traced,
    widths3,
)

State = tuple[torch.Tensor, torch.Tensor]


@autotuned(
    (64, 64, 4, 1),
    (128, 32, 4, 1),
    (256, 64, 8, 1),
    keys="BM BV",
    key=["R1", "R2", "R3", "DV", "P", "HAS_STATE", "NORMALIZE"],
)
@triton.jit
def step_kernel(
    q1,
    q2,
    q3,
    k1,
    k2,
    k3,
    v,
    S,
    z,
    S_new,
    z_new,
    o,
    eps,
    DV: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    P: tl.constexpr,
    HAS_STATE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
):
    """``S_new = S + phi(k) v^T``, ``z_new = z + phi(k)`` (fp32 ``[N, M, DV]``, ``[N, M]``; ``S, z`` read only if
    ``HAS_STATE``, else 0) and ``o = phi(q) S_new / (phi(q) z_new + eps)`` (``[N, DV]``, without the denominator
    unless ``NORMALIZE``). Factors ``[N, R_f]``, ``v [N, DV]``, ``N`` = batch rows x heads. Grid: (Dv tiles, N).
    """
    B1: tl.constexpr = kr_block(1, R1, R2, R3, BM)
    B2: tl.constexpr = kr_block(2, R1, R2, R3, BM)
    B3: tl.constexpr = kr_block(3, R1, R2, R3, BM)
    NM: tl.constexpr = kr_tile_count(R1, R2, R3, BM)
    BD: tl.constexpr = at_most(BV, DV)  # the Dv tile
    i_v, i_n = tl.program_id(0), tl.program_id(1)
    M: tl.constexpr = R1 * R2 * R3
    BMA: tl.constexpr = B1 * B2 * B3
    rows = i_n + tl.arange(0, 1)  # [1]: this row of the factors
    mask_r = rows >= 0
    o_v = i_v * BD + tl.arange(0, BD)
    b_v = tl.load(v + i_n * DV + o_v).to(tl.float32)  # [BD]
    base = i_n.to(tl.int64) * M
    num = tl.zeros([BD], dtype=tl.float32)
    den = tl.zeros([BMA], dtype=tl.float32)
    for i_m in range(NM):
        o_m = i_m * BMA + tl.arange(0, BMA)
        mask_m = o_m < M
        phi_q = tl.reshape(kr_tile(q1, q2, q3, rows, mask_r, i_m, 1, R1, R2, R3, B1, B2, B3, P)[0], (BMA,))
        phi_k = tl.reshape(kr_tile(k1, k2, k3, rows, mask_r, i_m, 1, R1, R2, R3, B1, B2, B3, P)[0], (BMA,))
        p_s = (base + o_m[:, None]) * DV + o_v[None, :]
        b_s = phi_k[:, None] * b_v[None, :]  # [BMA, BD]
        b_z = phi_k  # [BMA]
        if HAS_STATE:
            b_s += tl.load(S + p_s, mask=mask_m[:, None], other=0)
            b_z += tl.load(z + base + o_m, mask=mask_m, other=0)
        tl.store(S_new + p_s, b_s, mask=mask_m[:, None])
        tl.store(z_new + base + o_m, b_z, mask=mask_m & (i_v == 0))
        num += tl.sum(phi_q[:, None] * b_s, 0)
        den += phi_q * b_z
    if NORMALIZE:
        num = num / (tl.sum(den, 0) + eps)
    tl.store(o + i_n * DV + o_v, num.to(o.dtype.element_ty))


def _step(
    q: list[torch.Tensor],
    k: list[torch.Tensor],
    v: torch.Tensor,
    S: torch.Tensor | None,
    z: torch.Tensor | None,
    normalize: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o [B, H, Dv], S' [B, H, M, Dv], z' [B, H, M])``, the state fp32; see ``step_kernel``."""
    q = [x.contiguous() for x in q]
    k = [x.contiguous() for x in k]
    v = v.contiguous()
    B, H, Dv = v.shape
    M = math.prod(x.shape[-1] for x in q)
    has_state = S is not None
    S = S.contiguous() if has_state else None
    z = z.contiguous() if has_state else None
    eps = float(eps)  # an int eps would specialise the kernel otherwise (the launch key)
    widths = tuple(x.shape[-1] for x in q)
    key = (v.shape, v.device, widths, normalize, alignment(*q, *k, v, S, z))
    S_new = empty((B, H, M, Dv), torch.float32, v.device)
    z_new = empty((B, H, M), torch.float32, v.device)
    o = empty(v.shape, v.dtype, v.device)
    R1, R2, R3 = widths3(widths)
    launch(
        step_kernel, lambda meta: (cdiv(Dv, min(meta["BV"], Dv)), B * H),
        *factors3(q), *factors3(k), v,
        S if has_state else S_new, z if has_state else z_new, S_new, z_new, o, eps, key=key,
        DV=Dv, R1=R1, R2=R2, R3=R3, P=len(q), HAS_STATE=has_state, NORMALIZE=normalize,
    )  # fmt: skip
    return o, S_new, z_new


step = torch.library.custom_op("hadamard_attn::step", _step, mutates_args=())


@step.register_fake
def _(q, k, v, S, z, normalize, eps):
    B, H, Dv = v.shape
    M = math.prod(x.shape[-1] for x in q)
    return torch.empty_like(v), v.new_empty(B, H, M, Dv, dtype=torch.float32), v.new_empty(B, H, M, dtype=torch.float32)


def step_hadamard_attn_triton(
    q: tuple[torch.Tensor, ...],
    k: tuple[torch.Tensor, ...],
    v: torch.Tensor,
    state: State | None,
    normalize: bool = True,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, State]:
    """Decode step with the Triton kernel on validated inputs: ``q, k`` P factors ``[B, H, R_f]``, ``v [B, H, Dv]``,
    ``state`` fp32 ``(S [B, H, M, Dv], z [B, H, M])`` or None. Returns ``(o, (S', z'))``; not differentiable."""
    S, z = (None, None) if state is None else state
    o, S_new, z_new = traced(step, _step)(list(q), list(k), v, S, z, normalize, eps)
    return o, (S_new, z_new)
