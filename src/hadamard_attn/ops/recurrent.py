"""Causal HLA one token at a time: ``S_t = S_{t-1} + phi(k_t) v_t^T``, ``o_t = phi(q_t)^T S_t``.

The decode step of generation, and a third, independent causal path. Plain autograd (no custom backward):
it is the step-by-step reference, not a training path.
"""

from __future__ import annotations

import torch

from .parallel import State, augment_state, normalize_output, split_state, with_ones
from .utils import feature_size, khatri_rao, state_dtype


def _step(qt, kt, vt, S_aug, normalize, eps):
    """One token: ``qt, kt`` P factors ``[B, H, R_f]``, ``vt [B, H, Dv]``, ``S_aug [B, H, M, Dv + 1]``."""
    acc = S_aug.dtype
    Q = khatri_rao(tuple(x.to(acc) for x in qt))  # [B, H, M]
    K = khatri_rao(tuple(x.to(acc) for x in kt))  # [B, H, M]
    S_aug = S_aug + K.unsqueeze(-1) * with_ones(vt.to(acc)).unsqueeze(-2)
    nd = (Q.unsqueeze(-2) @ S_aug).squeeze(-2)  # [B, H, Dv + 1]
    return normalize_output(nd, normalize, eps).to(vt.dtype), S_aug


def _initial(q, v, state):
    B, H, Dv = v.shape[0], v.shape[-2], v.shape[-1]
    return augment_state(state, B, H, feature_size(q), Dv, state_dtype(v.dtype), v.device)


def step_hadamard_attn(
    q: tuple[torch.Tensor, ...],
    k: tuple[torch.Tensor, ...],
    v: torch.Tensor,
    state: State | None,
    normalize: bool = True,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, State]:
    """Decode step on validated inputs: ``q, k`` P factors ``[B, H, R_f]``, ``v [B, H, Dv]``."""
    o, S_aug = _step(q, k, v, _initial(q, v, state), normalize, eps)
    return o, split_state(S_aug)


def recurrent_hadamard_attn(
    q: tuple[torch.Tensor, ...],
    k: tuple[torch.Tensor, ...],
    v: torch.Tensor,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: State | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, State | None]:
    """Causal HLA token by token on validated inputs: ``q, k`` P factors ``[B, T, H, R_f]``, ``v [B, T, H, Dv]``."""
    S_aug = _initial(q, v, initial_state)
    outs = []
    for t in range(v.shape[1]):
        o, S_aug = _step(tuple(x[:, t] for x in q), tuple(x[:, t] for x in k), v[:, t], S_aug, normalize, eps)
        outs.append(o)
    return torch.stack(outs, dim=1), (split_state(S_aug) if output_final_state else None)
