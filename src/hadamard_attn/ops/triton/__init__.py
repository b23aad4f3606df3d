"""Fused Triton kernels for HLA; ``hadamard_attn(..., backend="triton")`` comes here.

``unsupported_reason`` says which inputs the kernels take; ``triton_hadamard_attn`` runs them with the
semantics of ``naive_hadamard_attn``.
"""

from __future__ import annotations

import math
import os

import torch

from .chunk import chunk_hadamard_attn_triton
from .parallel import parallel_hadamard_attn_triton
from .step import step_hadamard_attn_triton

__all__ = [
    "chunk_hadamard_attn_triton",
    "parallel_hadamard_attn_triton",
    "step_hadamard_attn_triton",
    "triton_hadamard_attn",
    "unsupported_reason",
]

State = tuple[torch.Tensor, torch.Tensor]

MAX_FACTORS = 3
MAX_WIDTH = 64
MAX_M = 4096
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def unsupported_reason(q, k, v: torch.Tensor, causal: bool) -> str | None:
    """None when the kernels run these (validated) inputs, else why not (the same for causal and non-causal)."""
    if v.device.type != "cuda" and not (v.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {v.device}"
    if v.dtype not in DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32 inputs, got {v.dtype}"
    if len(q) > MAX_FACTORS:
        return f"the Triton kernels take P <= {MAX_FACTORS} factors, got P = {len(q)}"
    widths = [x.shape[-1] for x in q]
    if not all(_pow2(r) and r <= MAX_WIDTH for r in widths):
        return f"the Triton kernels take factor widths that are powers of two up to {MAX_WIDTH}, got {widths}"
    if math.prod(widths) > MAX_M:
        return f"the Triton kernels take M = R_1 * ... * R_P <= {MAX_M}, got {math.prod(widths)}"
    Dv = v.shape[-1]
    if not (_pow2(Dv) and 16 <= Dv <= 256):
        return f"the Triton kernels take Dv a power of two in [16, 256], got {Dv}"
    if max(x.numel() for x in (*q, *k, v)) >= 2**31:
        return "the Triton kernels index with int32: every input must have fewer than 2**31 elements"
    return None


def triton_hadamard_attn(
    q: tuple[torch.Tensor, ...],
    k: tuple[torch.Tensor, ...],
    v: torch.Tensor,
    causal: bool = False,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    supported: bool = False,
) -> tuple[torch.Tensor, State | None]:
    """HLA with the Triton kernels, on inputs validated by ``hadamard_attn`` and accepted by ``unsupported_reason``.

    Same arguments and results as ``naive_hadamard_attn``. ``supported``: the caller has just had
    ``unsupported_reason`` return None for these inputs (``hadamard_attn`` does), so it is not asked again (a causal
    forward through ``hadamard_attn``: 59 to 61 us of host time against 64 to 68 us on a 2-core VM).
    """
    reason = None if supported else unsupported_reason(q, k, v, causal)
    if reason is not None:
        raise ValueError(reason)
    fn = chunk_hadamard_attn_triton if causal else parallel_hadamard_attn_triton
    return fn(q, k, v, normalize, eps, initial_state, output_final_state, cu_seqlens)
