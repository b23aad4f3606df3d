"""Helpers shared by every HLA path: the Khatri-Rao feature and its gradient, dtypes, varlen offsets."""

from __future__ import annotations

import math
import string

import torch

# letters for einsum subscripts of the factor modes (P <= 20 is far beyond any practical use)
_MODES = string.ascii_lowercase[:20]


def khatri_rao(factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Row-wise Kronecker product of P factors: ``[..., R_1], ..., [..., R_P] -> [..., M]``.

    Row-major: factor 1 is the slowest index, so that ``out[..., (a_1 * R_2 + a_2) ...] = x_1[a_1] * x_2[a_2]``.
    Callers only ever apply it to a tile of tokens, never to a whole sequence.
    """
    out = factors[0]
    for x in factors[1:]:
        # [..., M_prev, 1] * [..., 1, R_f] -> [..., M_prev * R_f]
        out = (out.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return out


def khatri_rao_backward(factors: tuple[torch.Tensor, ...], grad: torch.Tensor) -> list[torch.Tensor]:
    """Gradient of ``khatri_rao(factors)`` w.r.t. each factor, given ``grad: [..., M]``."""
    P = len(factors)
    if P == 1:
        return [grad]
    widths = [x.shape[-1] for x in factors]
    grad = grad.unflatten(-1, widths)  # [..., R_1, ..., R_P]
    modes = _MODES[:P]
    out = []
    for f in range(P):
        others = [i for i in range(P) if i != f]
        spec = "...{},{}->...{}".format(modes, ",".join("..." + modes[i] for i in others), modes[f])
        out.append(torch.einsum(spec, grad, *(factors[i] for i in others)))
    return out


def feature_size(factors: tuple[torch.Tensor, ...]) -> int:
    """``M = R_1 * ... * R_P``, the size of the implicit feature and of the state."""
    return math.prod([x.shape[-1] for x in factors])


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States, denominators and accumulators are fp32, or fp64 for fp64 inputs (the reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def seq_bounds(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """``cu_seqlens [N + 1] -> [(start, end)] * N``."""
    offsets = cu_seqlens.tolist()
    return list(zip(offsets[:-1], offsets[1:]))
