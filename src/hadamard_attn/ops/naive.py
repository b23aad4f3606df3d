"""The quadratic ground truth: forms the T x T Hadamard product of the P similarity matrices.

Every fast path is tested against this one in float64. It is O(T^2) in time and memory: use it on small
inputs only.
"""

from __future__ import annotations

import torch

from .utils import khatri_rao, state_dtype


def naive_hadamard_attn(
    q: tuple[torch.Tensor, ...],
    k: tuple[torch.Tensor, ...],
    v: torch.Tensor,
    causal: bool = False,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Reference HLA on already validated inputs (see :func:`hadamard_attn.hadamard_attn`).

    Args:
        q, k: P factors each, ``[B, T, H, R_f]``.
        v: ``[B, T, H, Dv]``.
        initial_state: ``(S [N, H, M, Dv], z [N, H, M])``; N = B, or the number of sequences with ``cu_seqlens``.

    Returns:
        ``o [B, T, H, Dv]`` in ``v.dtype`` and the final state (or None).
    """
    B, T, H, Dv = v.shape
    acc = torch.promote_types(state_dtype(v.dtype), v.dtype)
    q = tuple(x.to(acc) for x in q)
    k = tuple(x.to(acc) for x in k)
    vf = v.to(acc)

    # seq[b, t]: index of the sequence (and of its state) that token (b, t) belongs to
    if cu_seqlens is None:
        N = B
        seq = torch.arange(B, device=v.device)[:, None].expand(B, T)  # [B, T]
    else:
        N = cu_seqlens.numel() - 1
        seq = torch.bucketize(torch.arange(T, device=v.device), cu_seqlens[1:], right=True)[None]  # [1, T]

    # A[b, h, i, j] = prod_f <q_f[b, i, h], k_f[b, j, h]>
    A = torch.ones(B, H, T, T, dtype=acc, device=v.device)
    for qf, kf in zip(q, k):
        A = A * torch.einsum("bihr,bjhr->bhij", qf, kf)
    mask = seq[:, :, None] == seq[:, None, :]  # [B, T, T]
    if causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=v.device).tril()
    A = A * mask[:, None]

    num = torch.einsum("bhij,bjhd->bihd", A, vf)  # [B, T, H, Dv]
    den = torch.einsum("bhij->bih", A)  # [B, T, H]

    M = 1
    for x in q:
        M *= x.shape[-1]
    phi_q = khatri_rao(q)  # [B, T, H, M]
    phi_k = khatri_rao(k)  # [B, T, H, M]
    if initial_state is None:
        S0 = torch.zeros(N, H, M, Dv, dtype=acc, device=v.device)
        z0 = torch.zeros(N, H, M, dtype=acc, device=v.device)
    else:
        S0, z0 = (s.to(acc) for s in initial_state)
        num = num + torch.einsum("bthm,bthmd->bthd", phi_q, S0[seq])
        den = den + torch.einsum("bthm,bthm->bth", phi_q, z0[seq])

    o = num / (den + eps)[..., None] if normalize else num

    final_state = None
    if output_final_state:
        onehot = torch.nn.functional.one_hot(seq, N).to(acc)  # [B, T, N]
        S = S0 + torch.einsum("btn,bthm,bthd->nhmd", onehot, phi_k, vf)
        z = z0 + torch.einsum("btn,bthm->nhm", onehot, phi_k)
        sd = state_dtype(v.dtype)
        final_state = (S.to(sd), z.to(sd))
    return o.to(v.dtype), final_state
