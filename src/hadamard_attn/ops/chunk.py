"""Causal HLA in PyTorch, chunked: an explicit masked C x C Hadamard block inside each chunk, the state
carried from chunk to chunk.

Chunks are processed a block of ``G = block_size / C`` chunks at a time, batched: the states entering the
chunks of a block are an exclusive prefix sum of their increments (``[G, M, Dv + 1]``, bounded by the block,
not by T), so the Python loop runs ``T / block_size`` times. The state is kept as ``[S | z]``
``[B, H, M, Dv + 1]`` (see ``parallel.py``).

The backward stores no per-chunk state: a forward sweep rebuilds the states and yields the query gradients and
the intra-chunk gradients; a reverse sweep carries the gradient of the state and yields the inter-chunk key and
value gradients. Extra memory: the ``[T, Dv + 1]`` gradient of ``[numerator | denominator]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .parallel import State, augment_state, normalize_output, read_grads, split_state, tile, with_ones
from .utils import feature_size, khatri_rao, khatri_rao_backward, state_dtype


def chunked(x: torch.Tensor, t0: int, t1: int, C: int, dtype: torch.dtype) -> torch.Tensor:
    """``x[:, t0:t1]  [B, L, H, D] -> [B, H, G, C, D]``, zero-padded to ``G = ceil(L / C)`` full chunks."""
    xt = tile(x, t0, t1, dtype)  # [B, H, L, D]
    pad = -(t1 - t0) % C
    return F.pad(xt, (0, 0, 0, pad)).unflatten(2, (-1, C))


def unchunked(x: torch.Tensor, L: int) -> torch.Tensor:
    """``[B, H, G, C, D] -> [B, L, H, D]`` (drops the padding)."""
    return x.flatten(2, 3)[:, :, :L].transpose(1, 2)


def similarities(qt: tuple[torch.Tensor, ...], kt: tuple[torch.Tensor, ...], mask: torch.Tensor):
    """Masked per-factor similarities ``q_f k_f^T`` and their Hadamard product ``A``, each ``[..., C, C]``."""
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


def exclusive_cumsum(x: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    """``out[c] = sum_{c' < c} x[c']`` along ``dim`` (``c' > c`` if ``reverse``)."""
    if reverse:
        return exclusive_cumsum(x.flip(dim), dim).flip(dim)
    incl = x.cumsum(dim)
    return torch.cat([torch.zeros_like(incl.narrow(dim, 0, 1)), incl.narrow(dim, 0, x.shape[dim] - 1)], dim)


class ChunkHLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, P, normalize, eps, chunk_size, block_size, v, S0, z0, *factors):
        q, k = factors[:P], factors[P:]
        B, T, H, Dv = v.shape
        acc = state_dtype(v.dtype)
        C, L = chunk_size, block_size
        mask = torch.ones(C, C, dtype=torch.bool, device=v.device).tril()
        S_aug = augment_state(None if S0 is None else (S0, z0), B, H, feature_size(q), Dv, acc, v.device)
        o = torch.empty_like(v)
        for t0 in range(0, T, L):
            t1 = min(t0 + L, T)
            qt = tuple(chunked(x, t0, t1, C, acc) for x in q)  # [B, H, G, C, R_f]
            kt = tuple(chunked(x, t0, t1, C, acc) for x in k)
            vt = with_ones(chunked(v, t0, t1, C, acc))  # [B, H, G, C, E]
            _, A = similarities(qt, kt, mask)  # [B, H, G, C, C]
            dS = khatri_rao(kt).transpose(-1, -2) @ vt  # [B, H, G, M, E]
            S_in = S_aug.unsqueeze(2) + exclusive_cumsum(dS, 2)  # state entering each chunk
            nd = A @ vt + khatri_rao(qt) @ S_in  # [B, H, G, C, E]
            o[:, t0:t1] = unchunked(normalize_output(nd, normalize, eps), t1 - t0)
            S_aug = S_aug + dS.sum(2)
        ctx.save_for_backward(v, S0, z0, *factors)
        ctx.cfg = (P, normalize, eps, chunk_size, block_size)
        S, z = split_state(S_aug)
        return o, S, z

    @staticmethod
    def backward(ctx, do, dS_final, dz_final):
        P, normalize, eps, C, L = ctx.cfg
        v, S0, z0, *factors = ctx.saved_tensors
        q, k = factors[:P], factors[P:]
        B, T, H, Dv = v.shape
        acc = state_dtype(v.dtype)
        mask = torch.ones(C, C, dtype=torch.bool, device=v.device).tril()
        blocks = [(t0, min(t0 + L, T)) for t0 in range(0, T, L)]
        dq = [torch.zeros(x.shape, dtype=acc, device=x.device) for x in q]
        dk = [torch.zeros(x.shape, dtype=acc, device=x.device) for x in k]
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        g_all = torch.empty(B, T, H, Dv + 1, dtype=acc, device=v.device)  # d[num | den] per token

        # forward sweep: states entering each chunk -> query gradients, intra-chunk gradients
        S_aug = augment_state(None if S0 is None else (S0, z0), B, H, feature_size(q), Dv, acc, v.device)
        for t0, t1 in blocks:
            qt = tuple(chunked(x, t0, t1, C, acc) for x in q)  # [B, H, G, C, R_f]
            kt = tuple(chunked(x, t0, t1, C, acc) for x in k)
            vt = with_ones(chunked(v, t0, t1, C, acc))  # [B, H, G, C, E]
            sims, A = similarities(qt, kt, mask)  # [B, H, G, C, C]
            dS = khatri_rao(kt).transpose(-1, -2) @ vt  # [B, H, G, M, E]
            S_in = S_aug.unsqueeze(2) + exclusive_cumsum(dS, 2)
            nd = A @ vt + khatri_rao(qt) @ S_in
            _, g = read_grads(chunked(do, t0, t1, C, acc), nd, normalize, eps)  # [B, H, G, C, E]
            g.flatten(2, 3)[:, :, t1 - t0 :] = 0  # padded rows (0/0 when eps = 0) must not reach the state
            g_all[:, t0:t1] = unchunked(g, t1 - t0)
            dA = (g @ vt.transpose(-1, -2)) * mask  # [B, H, G, C, C]
            dQ = khatri_rao_backward(qt, g @ S_in.transpose(-1, -2))  # P x [B, H, G, C, R_f]
            for f in range(P):
                others = product_of_others(sims, f)
                dsim = dA if others is None else dA * others  # [B, H, G, C, C]
                dq[f][:, t0:t1] += unchunked(dQ[f] + dsim @ kt[f], t1 - t0)
                dk[f][:, t0:t1] += unchunked(dsim.transpose(-1, -2) @ qt[f], t1 - t0)
            dv[:, t0:t1] += unchunked(A.transpose(-1, -2) @ g[..., :-1], t1 - t0)
            S_aug = S_aug + dS.sum(2)

        # reverse sweep: gradient of the state leaving each chunk -> inter-chunk key and value gradients
        G = torch.zeros(B, H, feature_size(q), Dv + 1, dtype=acc, device=v.device)
        if dS_final is not None:
            G[..., :-1] += dS_final
        if dz_final is not None:
            G[..., -1] += dz_final
        for t0, t1 in reversed(blocks):
            qt = tuple(chunked(x, t0, t1, C, acc) for x in q)
            kt = tuple(chunked(x, t0, t1, C, acc) for x in k)
            vt = with_ones(chunked(v, t0, t1, C, acc))
            K = khatri_rao(kt)  # [B, H, G, C, M]
            dG = khatri_rao(qt).transpose(-1, -2) @ chunked(g_all, t0, t1, C, acc)  # [B, H, G, M, E]
            G_out = G.unsqueeze(2) + exclusive_cumsum(dG, 2, reverse=True)  # grad of the state leaving each chunk
            for f, d in enumerate(khatri_rao_backward(kt, vt @ G_out.transpose(-1, -2))):
                dk[f][:, t0:t1] += unchunked(d, t1 - t0)
            dv[:, t0:t1] += unchunked(K @ G_out[..., :-1], t1 - t0)
            G = G + dG.sum(2)
        dS0, dz0 = split_state(G) if S0 is not None else (None, None)
        cast = [d.to(x.dtype) for d, x in zip(dq + dk, q + k)]
        return (None, None, None, None, None, dv.to(v.dtype), dS0, dz0, *cast)


def chunk_hadamard_attn(
    q: tuple[torch.Tensor, ...],
    k: tuple[torch.Tensor, ...],
    v: torch.Tensor,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: State | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    block_size: int = 1024,
) -> tuple[torch.Tensor, State | None]:
    """Causal HLA on validated inputs: ``q, k`` P factors ``[B, T, H, R_f]``, ``v [B, T, H, Dv]``.

    ``chunk_size``: tokens per explicit C x C block. ``block_size``: tokens processed per batched step (rounded
    up to a multiple of ``chunk_size``); memory holds one block's features and chunk states.
    """
    block_size = -(-block_size // chunk_size) * chunk_size
    S0, z0 = (None, None) if initial_state is None else initial_state
    o, S, z = ChunkHLA.apply(len(q), normalize, eps, chunk_size, block_size, v, S0, z0, *q, *k)
    return o, ((S, z) if output_final_state else None)
