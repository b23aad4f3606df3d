"""The HLA attention layer: projections, q/k norm, rotary embedding, per-factor feature maps, the HLA operator."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .feature_maps import FactorMaps, check_factor_maps
from .ops import hadamard_attn
from .ops.api import check_backend, check_eps, check_flag

State = tuple[torch.Tensor, torch.Tensor]


@dataclass
class HLAConfig:
    """Configuration of :class:`HadamardAttention`.

    Args:
        dim: model width (input and output features).
        num_heads: number of heads H.
        head_dim: per-head q/k/v size; None means ``dim // num_heads`` (then ``dim`` must be divisible by it).
        widths: one feature width R_f per factor, P = ``len(widths)`` factors; they may differ, e.g. ``(64, 4)``.
            The state has ``M = R_1 * ... * R_P`` features per head. Fixed maps need ``head_dim`` (``elu``,
            ``relu``) or ``head_dim + 1`` (``affine``); ``hedgehog`` needs even widths.
        feature_map: one of ``"elu"``, ``"relu"``, ``"affine"``, ``"hedgehog"``, ``"mlp"``.
        shared_factors: one (query map, key map) pair for all factors, so ``A = S^P`` (needs equal widths).
        causal: token i attends to tokens j <= i.
        qk_norm: RMSNorm of q and k over ``head_dim`` before the rotary embedding and the feature maps.
        bias: bias in the q/k/v/o projections.
        normalize: divide by the attention row sums (``A V / (A 1 + eps)``) or return ``A V``.
        eps: added to the denominator, >= 0.
        backend: passed to :func:`hadamard_attn.hadamard_attn` (``"auto"``, ``"naive"``, ``"parallel"``, ...).
    """

    dim: int
    num_heads: int
    head_dim: int | None = None
    widths: tuple[int, ...] = (32, 32)
    feature_map: str = "hedgehog"
    shared_factors: bool = False
    causal: bool = False
    qk_norm: bool = True
    bias: bool = False
    normalize: bool = True
    eps: float = 1e-6
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("dim", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(
                    f"dim: {self.dim} is not divisible by num_heads {self.num_heads}; change one or set head_dim"
                )
            self.head_dim = self.dim // self.num_heads
        if self.head_dim < 1:
            raise ValueError(f"head_dim: must be >= 1, got {self.head_dim}")
        self.widths = tuple(self.widths)
        check_factor_maps(self.feature_map, self.head_dim, self.widths, self.shared_factors, self.normalize)
        for flag in ("shared_factors", "causal", "qk_norm", "bias", "normalize"):
            check_flag(getattr(self, flag), flag)
        check_eps(self.eps)
        check_backend(self.backend, self.causal)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention (Llama / Hugging Face).

    Args:
        x: ``[B, T, H, D]``.
        cos, sin: ``[T, D]``, ``[1, T, D]`` or ``[B, T, D]``.

    Returns:
        ``x * cos + rotate_half(x) * sin``, ``[B, T, H, D]``, with ``rotate_half([x1, x2]) = [-x2, x1]``.
    """
    B, T, _, D = x.shape
    if D % 2:
        raise ValueError(f"rotary_emb: the rotate-half rotary needs an even head_dim, got {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) not in ((T, D), (1, T, D), (B, T, D)):
            raise ValueError(
                f"rotary_emb: {name} must be [T, D] = {(T, D)} or [B, T, D] = {(B, T, D)} (or [1, T, D]), got "
                f"{tuple(t.shape)}"
            )
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # [B, T, H, D]
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


class HadamardAttention(nn.Module):
    """Hadamard Linear Attention layer, a drop-in for softmax self-attention.

    ``q, k, v = proj(x)``; q and k get RMSNorm (``qk_norm``) and the rotary embedding, then each factor f maps
    them with its own query map and key map to non-negative features ``[B, T, H, R_f]``; the HLA operator
    weighs the values by the Hadamard product of the P factor similarities; ``o_proj`` mixes the heads.
    """

    def __init__(self, config: HLAConfig) -> None:
        super().__init__()
        self.config = config
        H, D = config.num_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, H * D, bias=config.bias)
        self.k_proj = nn.Linear(config.dim, H * D, bias=config.bias)
        self.v_proj = nn.Linear(config.dim, H * D, bias=config.bias)
        self.o_proj = nn.Linear(H * D, config.dim, bias=config.bias)
        self.q_norm = nn.RMSNorm(D) if config.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(D) if config.qk_norm else nn.Identity()
        self.maps = FactorMaps(H, D, config.widths, config.feature_map, config.shared_factors)

    def forward(
        self,
        x: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        state: State | None = None,
        output_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, State]:
        """HLA self-attention over ``x``.

        Args:
            x: ``[B, T, dim]``.
            rotary_emb: ``(cos, sin)``, each ``[T, head_dim]`` or ``[B, T, head_dim]``, for this call's positions.
            state: ``(S [N, H, M, head_dim], z [N, H, M])`` from an earlier call with ``output_state=True``; the
                tokens of this call attend to it (e.g. decoding token by token after a prompt).
            output_state: also return the state after this call's tokens.
            cu_seqlens: ``[N + 1]`` offsets of sequences packed into ``B == 1``.

        Returns:
            ``out [B, T, dim]``, or ``(out, state)`` with ``output_state``.
        """
        B, T, _ = x.shape
        H, D = self.config.num_heads, self.config.head_dim
        q = self.q_norm(self.q_proj(x).view(B, T, H, D))  # [B, T, H, D]
        k = self.k_norm(self.k_proj(x).view(B, T, H, D))  # [B, T, H, D]
        v = self.v_proj(x).view(B, T, H, D)  # [B, T, H, D]
        if rotary_emb is not None:
            q, k = apply_rotary(q, *rotary_emb), apply_rotary(k, *rotary_emb)
        qs, ks = self.maps(q, k)  # P x [B, T, H, R_f]
        o, final_state = hadamard_attn(
            qs,
            ks,
            v,
            causal=self.config.causal,
            normalize=self.config.normalize,
            eps=self.config.eps,
            initial_state=state,
            output_final_state=output_state,
            cu_seqlens=cu_seqlens,
            backend=self.config.backend,
        )
        out = self.o_proj(o.reshape(B, T, H * D))  # [B, T, dim]
        return (out, final_state) if output_state else out
