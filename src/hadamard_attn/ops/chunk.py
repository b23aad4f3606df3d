"""Causal HLA in PyTorch, chunked: an explicit masked C x C Hadamard block inside each chunk, the state
carried from chunk to chunk.

The state is kept as ``[S | z]  [B, H, M, Dv + 1]`` (see ``parallel.py``). The backward makes two sweeps and
stores no per-chunk state: a forward sweep rebuilds the state chunk by chunk and yields the query gradients
and the intra-chunk gradients; a reverse sweep carries the gradient of the state and yields the inter-chunk
key and value gradients. Extra memory: the ``[T, Dv + 1]`` gradient of ``[numerator | denominator]``.
"""

from __future__ import annotations

import torch

from .parallel import State, augment_state, normalize_output, read_grads, split_state, tile, with_ones
from .utils import khatri_rao, khatri_rao_backward, state_dtype


def similarities(qt: tuple[torch.Tensor, ...], kt: tuple[torch.Tensor, ...], mask: torch.Tensor):
    """Per-factor masked similarities ``[q_f k_f^T]`` and their Hadamard product ``A``, each ``[B, H, C, C]``."""
    sims = [(a @ b.transpose(-1, -2)) * mask for a, b in zip(qt, kt)]
    A = sims[0]
    for s in sims[1:]:
        A = A * s
    return sims, A


def product_of_others(sims: list[torch.Tensor], f: int) -> torch.Tensor | None:
    """``prod_{g != f} sims[g]`` (None when P == 1)."""
    out = None
    for g, s in enumerate(sims):
        if g != f:
            out = s if out is None else out * s
    return out


class ChunkHLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, P, normalize, eps, chunk_size, v, S0, z0, *factors):
        q, k = factors[:P], factors[P:]
        B, T, H, Dv = v.shape
        M = 1
        for x in q:
            M *= x.shape[-1]
        acc = state_dtype(v.dtype)
        init = None if S0 is None else (S0, z0)
        S_aug = augment_state(init, B, H, M, Dv, acc, v.device)  # [B, H, M, Dv + 1]
        full_mask = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=v.device).tril()
        o = torch.empty_like(v)
        for t0 in range(0, T, chunk_size):
            t1 = min(t0 + chunk_size, T)
            mask = full_mask[: t1 - t0, : t1 - t0]
            qt = tuple(tile(x, t0, t1, acc) for x in q)  # [B, H, C, R_f]
            kt = tuple(tile(x, t0, t1, acc) for x in k)
            vt = with_ones(tile(v, t0, t1, acc))  # [B, H, C, Dv + 1]
            _, A = similarities(qt, kt, mask)  # [B, H, C, C]
            nd = A @ vt + khatri_rao(qt) @ S_aug  # [B, H, C, Dv + 1]
            o[:, t0:t1] = normalize_output(nd, normalize, eps).transpose(1, 2)
            S_aug = S_aug + khatri_rao(kt).transpose(-1, -2) @ vt
        ctx.save_for_backward(v, S0, z0, *factors)
        ctx.cfg = (P, normalize, eps, chunk_size)
        S, z = split_state(S_aug)
        return o, S, z

    @staticmethod
    def backward(ctx, do, dS, dz):
        P, normalize, eps, chunk_size = ctx.cfg
        v, S0, z0, *factors = ctx.saved_tensors
        q, k = factors[:P], factors[P:]
        B, T, H, Dv = v.shape
        M = 1
        for x in q:
            M *= x.shape[-1]
        acc = state_dtype(v.dtype)
        init = None if S0 is None else (S0, z0)
        full_mask = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=v.device).tril()
        chunks = [(t0, min(t0 + chunk_size, T)) for t0 in range(0, T, chunk_size)]
        dq = [torch.zeros(x.shape, dtype=acc, device=x.device) for x in q]
        dk = [torch.zeros(x.shape, dtype=acc, device=x.device) for x in k]
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        g_all = torch.empty(B, H, T, Dv + 1, dtype=acc, device=v.device)  # d[num | den]

        # forward sweep: state before each chunk -> query gradients, intra-chunk gradients
        S_aug = augment_state(init, B, H, M, Dv, acc, v.device)
        for t0, t1 in chunks:
            mask = full_mask[: t1 - t0, : t1 - t0]
            qt = tuple(tile(x, t0, t1, acc) for x in q)
            kt = tuple(tile(x, t0, t1, acc) for x in k)
            vt = with_ones(tile(v, t0, t1, acc))
            sims, A = similarities(qt, kt, mask)
            nd = A @ vt + khatri_rao(qt) @ S_aug
            _, g = read_grads(tile(do, t0, t1, acc), nd, normalize, eps)  # [B, H, C, Dv + 1]
            g_all[:, :, t0:t1] = g
            dQ = g @ S_aug.transpose(-1, -2)  # [B, H, C, M]
            dA = (g @ vt.transpose(-1, -2)) * mask  # [B, H, C, C]
            for f, (d_inter, a, b) in enumerate(zip(khatri_rao_backward(qt, dQ), qt, kt)):
                others = product_of_others(sims, f)
                dsim = dA if others is None else dA * others  # [B, H, C, C]
                dq[f][:, t0:t1] += (d_inter + dsim @ b).transpose(1, 2)
                dk[f][:, t0:t1] += (dsim.transpose(-1, -2) @ a).transpose(1, 2)
            dv[:, t0:t1] += (A.transpose(-1, -2) @ g[..., :-1]).transpose(1, 2)
            S_aug = S_aug + khatri_rao(kt).transpose(-1, -2) @ vt

        # reverse sweep: gradient of the state after each chunk -> inter-chunk key and value gradients
        G = torch.zeros(B, H, M, Dv + 1, dtype=acc, device=v.device)
        if dS is not None:
            G[..., :-1] += dS
        if dz is not None:
            G[..., -1] += dz
        for t0, t1 in reversed(chunks):
            qt = tuple(tile(x, t0, t1, acc) for x in q)
            kt = tuple(tile(x, t0, t1, acc) for x in k)
            vt = with_ones(tile(v, t0, t1, acc))
            K = khatri_rao(kt)  # [B, H, C, M]
            for f, d_inter in enumerate(khatri_rao_backward(kt, vt @ G.transpose(-1, -2))):
                dk[f][:, t0:t1] += d_inter.transpose(1, 2)
            dv[:, t0:t1] += (K @ G[..., :-1]).transpose(1, 2)
            G = G + khatri_rao(qt).transpose(-1, -2) @ g_all[:, :, t0:t1]
        dS0, dz0 = split_state(G) if S0 is not None else (None, None)
        cast = [d.to(x.dtype) for d, x in zip(dq + dk, q + k)]
        return (None, None, None, None, dv.to(v.dtype), dS0, dz0, *cast)


def chunk_hadamard_attn(
    q: tuple[torch.Tensor, ...],
    k: tuple[torch.Tensor, ...],
    v: torch.Tensor,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: State | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, State | None]:
    """Causal HLA on validated inputs: ``q, k`` P factors ``[B, T, H, R_f]``, ``v [B, T, H, Dv]``."""
    S0, z0 = (None, None) if initial_state is None else initial_state
    o, S, z = ChunkHLA.apply(len(q), normalize, eps, chunk_size, v, S0, z0, *q, *k)
    return o, ((S, z) if output_final_state else None)
