"""Non-causal HLA in PyTorch: one pass over the keys builds the state, one pass over the queries reads it.

Both passes go over tiles of ``block_size`` tokens, so the Khatri-Rao features exist one tile at a time and
memory does not grow like ``T * M``. The denominator rides along as an extra value column of ones: the state
is kept as ``[S | z]``, ``[B, H, M, Dv + 1]``, and one matmul gives numerator and denominator.
The backward recomputes the features tile by tile instead of storing them.
"""

from __future__ import annotations

import torch

from .utils import feature_size, khatri_rao, khatri_rao_backward, state_dtype

State = tuple[torch.Tensor, torch.Tensor]


def tile(x: torch.Tensor, t0: int, t1: int, dtype: torch.dtype) -> torch.Tensor:
    """``x[:, t0:t1]`` as ``[B, H, BT, D]`` in ``dtype`` (a view where possible)."""
    return x[:, t0:t1].transpose(1, 2).to(dtype)


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """``[..., Dv] -> [..., Dv + 1]``: append the column of ones that makes the denominator."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def augment_state(state: State | None, B: int, H: int, M: int, Dv: int, dtype, device) -> torch.Tensor:
    """``(S [B, H, M, Dv], z [B, H, M]) -> [S | z]  [B, H, M, Dv + 1]`` (zeros for None)."""
    if state is None:
        return torch.zeros(B, H, M, Dv + 1, dtype=dtype, device=device)
    S, z = state
    return torch.cat([S, z.unsqueeze(-1)], dim=-1).to(dtype)


def split_state(S_aug: torch.Tensor) -> State:
    """``[S | z] -> (S, z)``."""
    return S_aug[..., :-1].contiguous(), S_aug[..., -1].contiguous()


def read_grads(do: torch.Tensor, nd: torch.Tensor, normalize: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and the gradient w.r.t. ``[numerator | denominator]`` for one tile.

    Args:
        do: ``[B, H, BT, Dv]`` gradient of the output.
        nd: ``[B, H, BT, Dv + 1]`` numerator and denominator.

    Returns:
        ``o [B, H, BT, Dv]`` and ``g [B, H, BT, Dv + 1]``.
    """
    num, den = nd[..., :-1], nd[..., -1:]
    if not normalize:
        return num, torch.cat([do, torch.zeros_like(den)], dim=-1)
    inv = 1.0 / (den + eps)  # [B, H, BT, 1]
    o = num * inv
    # o = num / (den + eps): d/dnum = inv, d/dden = -o * inv
    return o, torch.cat([do * inv, -(do * o).sum(-1, keepdim=True) * inv], dim=-1)


def normalize_output(nd: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    """``[num | den] [..., Dv + 1] -> o [..., Dv]``."""
    return nd[..., :-1] / (nd[..., -1:] + eps) if normalize else nd[..., :-1]


class ParallelHLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, P, normalize, eps, block_size, v, S0, z0, *factors):
        q, k = factors[:P], factors[P:]
        B, T, H, Dv = v.shape
        acc = state_dtype(v.dtype)
        init = None if S0 is None else (S0, z0)
        S_aug = augment_state(init, B, H, feature_size(q), Dv, acc, v.device)  # [B, H, M, Dv + 1]
        for t0 in range(0, T, block_size):
            t1 = min(t0 + block_size, T)
            K = khatri_rao(tuple(tile(x, t0, t1, acc) for x in k))  # [B, H, BT, M]
            S_aug += K.transpose(-1, -2) @ with_ones(tile(v, t0, t1, acc))
        o = torch.empty_like(v)
        for t0 in range(0, T, block_size):
            t1 = min(t0 + block_size, T)
            Q = khatri_rao(tuple(tile(x, t0, t1, acc) for x in q))  # [B, H, BT, M]
            o[:, t0:t1] = normalize_output(Q @ S_aug, normalize, eps).transpose(1, 2)
        ctx.save_for_backward(v, S_aug, *factors)
        ctx.cfg = (P, normalize, eps, block_size, S0 is not None)
        S, z = split_state(S_aug)
        return o, S, z

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved state is not part of a graph: no double backward
    def backward(ctx, do, dS, dz):
        P, normalize, eps, block_size, has_init = ctx.cfg
        v, S_aug, *factors = ctx.saved_tensors
        q, k = factors[:P], factors[P:]
        B, T, H, Dv = v.shape
        acc = S_aug.dtype
        # gradient w.r.t. the final state [S | z], to which every query's gradient is added
        dS_aug = torch.zeros_like(S_aug)
        if dS is not None:
            dS_aug[..., :-1] += dS
        if dz is not None:
            dS_aug[..., -1] += dz
        dq = [torch.empty_like(x) for x in q]
        dk = [torch.empty_like(x) for x in k]
        dv = torch.empty_like(v)
        for t0 in range(0, T, block_size):
            t1 = min(t0 + block_size, T)
            qt = tuple(tile(x, t0, t1, acc) for x in q)
            Q = khatri_rao(qt)  # [B, H, BT, M]
            _, g = read_grads(tile(do, t0, t1, acc), Q @ S_aug, normalize, eps)  # [B, H, BT, Dv + 1]
            for d, gf in zip(dq, khatri_rao_backward(qt, g @ S_aug.transpose(-1, -2))):
                d[:, t0:t1] = gf.transpose(1, 2)
            dS_aug += Q.transpose(-1, -2) @ g
        for t0 in range(0, T, block_size):
            t1 = min(t0 + block_size, T)
            kt = tuple(tile(x, t0, t1, acc) for x in k)
            K = khatri_rao(kt)  # [B, H, BT, M]
            dK = with_ones(tile(v, t0, t1, acc)) @ dS_aug.transpose(-1, -2)  # [B, H, BT, M]
            for d, gf in zip(dk, khatri_rao_backward(kt, dK)):
                d[:, t0:t1] = gf.transpose(1, 2)
            dv[:, t0:t1] = (K @ dS_aug[..., :-1]).transpose(1, 2)
        dS0, dz0 = split_state(dS_aug) if has_init else (None, None)
        return (None, None, None, None, dv, dS0, dz0, *dq, *dk)


def parallel_hadamard_attn(
    q: tuple[torch.Tensor, ...],
    k: tuple[torch.Tensor, ...],
    v: torch.Tensor,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: State | None = None,
    output_final_state: bool = False,
    block_size: int = 1024,
) -> tuple[torch.Tensor, State | None]:
    """Non-causal HLA on validated inputs: ``q, k`` P factors ``[B, T, H, R_f]``, ``v [B, T, H, Dv]``."""
    S0, z0 = (None, None) if initial_state is None else initial_state
    o, S, z = ParallelHLA.apply(len(q), normalize, eps, block_size, v, S0, z0, *q, *k)
    return o, ((S, z) if output_final_state else None)
