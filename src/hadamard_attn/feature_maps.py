"""Per-factor feature maps: ``[..., H, D] -> [..., H, R]``, applied to q (query map) and k (key map) of one factor.

Every map takes any leading dims with the heads at dim -2 (``[B, T, H, D]`` for a sequence, ``[B, H, D]`` for a
decode step) and has two attributes: ``width`` (R, its number of output features) and ``signed`` (whether it may
produce negative features; HLA needs non-negative ones unless the number of factors P is even, spec §3).

Fixed maps (``elu``, ``relu``, ``affine``) have no parameters and a width set by the head dim. Learnable maps
(``hedgehog``, ``mlp``) have per-head weights, any width, and end in a softmax over their output channels, so
each factor's similarity stays in [0, 1] (spec §3).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class FeatureMap(nn.Module):
    """Base class: validates and stores ``num_heads``, ``head_dim`` and ``width``."""

    signed: bool = False

    def __init__(self, num_heads: int, head_dim: int, width: int) -> None:
        super().__init__()
        error = self.width_error(head_dim, width)
        if error is not None:
            raise ValueError(f"{type(self).__name__}: width {error}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.width = width

    @classmethod
    def width_error(cls, head_dim: int, width: int) -> str | None:
        """Why this map cannot produce ``width`` features from ``head_dim`` inputs, or None if it can."""
        if width < 1:
            return f"must be >= 1, got {width}"
        return None

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, width={self.width}"


class FixedFeatureMap(FeatureMap):
    """A map without parameters whose width is a function of the head dim."""

    @staticmethod
    def fixed_width(head_dim: int) -> int:
        return head_dim

    @classmethod
    def width_error(cls, head_dim: int, width: int) -> str | None:
        fixed = cls.fixed_width(head_dim)
        if width != fixed:
            return (
                f"must be {fixed} for head_dim {head_dim} (a fixed map has a fixed width), got {width}; "
                "use a learnable map ('hedgehog' or 'mlp') for another width"
            )
        return None


class EluFeatureMap(FixedFeatureMap):
    """``elu(x) + 1``: positive, width D."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1  # [..., H, D]


class ReluFeatureMap(FixedFeatureMap):
    """``relu(x)``: non-negative, width D."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)  # [..., H, D]


class AffineFeatureMap(FixedFeatureMap):
    """``[1, x D^(-1/4)]``: signed, width D + 1; ``<a(q), b(k)> = 1 + q.k / sqrt(D)`` (only for even P)."""

    signed = True

    @staticmethod
    def fixed_width(head_dim: int) -> int:
        return head_dim + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = x.new_ones(*x.shape[:-1], 1)
        return torch.cat([ones, x * self.head_dim**-0.25], dim=-1)  # [..., H, D + 1]


class HedgehogFeatureMap(FeatureMap):
    """Hedgehog: ``softmax([x W_h, -x W_h])`` over the R channels, with a per-head ``W [H, D, R/2]``.

    W starts with orthogonal columns scaled by ``D^(-1/4)``: with ``R/2 >= D`` the logit ``x W_h (y W_h)^T``
    starts at ``x.y / sqrt(D)``, the softmax attention logit; narrower maps start at the projection of q and k
    onto R/2 random directions (about ``(R / 2D) x.y / sqrt(D)``), which attention transfer then trains.
    """

    def __init__(self, num_heads: int, head_dim: int, width: int) -> None:
        super().__init__(num_heads, head_dim, width)
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, width // 2))
        self.reset_parameters()

    @classmethod
    def width_error(cls, head_dim: int, width: int) -> str | None:
        if width < 2 or width % 2:
            return f"must be even and >= 2 (softmax over [xW, -xW], R = 2r), got {width}"
        return None

    def reset_parameters(self) -> None:
        for w in self.weight.data:  # [D, R/2] per head
            nn.init.orthogonal_(w)
        self.weight.data.mul_(self.head_dim**-0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xw = torch.einsum("...hd,hdr->...hr", x, self.weight)  # [..., H, R/2]
        return torch.cat([xw, -xw], dim=-1).softmax(-1)  # [..., H, R]


class MLPFeatureMap(FeatureMap):
    """A per-head 2-layer MLP, ``softmax(W2_h gelu(W1_h x + b1_h) + b2_h)`` over the R output channels.

    Args:
        hidden: hidden size of the MLP; defaults to ``head_dim``.
    """

    def __init__(self, num_heads: int, head_dim: int, width: int, hidden: int | None = None) -> None:
        super().__init__(num_heads, head_dim, width)
        self.hidden = head_dim if hidden is None else hidden
        self.w1 = nn.Parameter(torch.empty(num_heads, head_dim, self.hidden))
        self.b1 = nn.Parameter(torch.empty(num_heads, self.hidden))
        self.w2 = nn.Parameter(torch.empty(num_heads, self.hidden, width))
        self.b2 = nn.Parameter(torch.empty(num_heads, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default, per head: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(torch.einsum("...hd,hde->...he", x, self.w1) + self.b1)  # [..., H, hidden]
        return (torch.einsum("...he,her->...hr", h, self.w2) + self.b2).softmax(-1)  # [..., H, R]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden={self.hidden}"


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    "elu": EluFeatureMap,
    "relu": ReluFeatureMap,
    "affine": AffineFeatureMap,
    "hedgehog": HedgehogFeatureMap,
    "mlp": MLPFeatureMap,
}


def make_feature_map(name: str, num_heads: int, head_dim: int, width: int) -> FeatureMap:
    """Build the feature map called ``name`` (one of :data:`FEATURE_MAPS`) for ``num_heads`` heads of
    ``head_dim`` inputs and ``width`` outputs."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature map: must be one of {tuple(FEATURE_MAPS)}, got {name!r}")
    return FEATURE_MAPS[name](num_heads, head_dim, width)


def check_factor_maps(
    feature_map: str, head_dim: int, widths: tuple[int, ...], shared_factors: bool, normalize: bool
) -> None:
    """Raise a ValueError naming the field when these factor maps cannot be built or would be unsound."""
    if not widths:
        raise ValueError("widths: needs at least one factor width, got ()")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map: must be one of {tuple(FEATURE_MAPS)}, got {feature_map!r}")
    for f, width in enumerate(widths):
        error = FEATURE_MAPS[feature_map].width_error(head_dim, width)
        if error is not None:
            raise ValueError(f"widths[{f}]: with feature_map={feature_map!r} the width {error}")
    if shared_factors and len(set(widths)) > 1:
        raise ValueError(f"shared_factors: needs equal widths, got widths={widths}")
    if FEATURE_MAPS[feature_map].signed and len(widths) % 2 and normalize:
        raise ValueError(
            f"feature_map={feature_map!r} is signed: with an odd number of factors P = len(widths) = "
            f"{len(widths)} and normalize=True the denominator can cross zero (spec §3); "
            "use an even P, normalize=False or a non-negative map"
        )


class FactorMaps(nn.Module):
    """The feature maps of one attention layer: for each factor f a query map and a key map.

    With ``shared_factors`` one (query map, key map) pair serves every factor, so ``A = S^P``.

    Args:
        num_heads, head_dim: the query heads the maps read.
        widths: ``(R_1, ..., R_P)``, one width per factor.
        feature_map: a name in :data:`FEATURE_MAPS`.
        num_kv_heads: the key heads, for grouped-query attention (default ``num_heads``); the caller repeats
            the key features to the query heads.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        widths: tuple[int, ...],
        feature_map: str = "hedgehog",
        shared_factors: bool = False,
        num_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        check_factor_maps(feature_map, head_dim, tuple(widths), shared_factors, normalize=False)
        self.num_factors = len(widths)
        distinct = widths[:1] if shared_factors else widths
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.q_maps = nn.ModuleList(make_feature_map(feature_map, num_heads, head_dim, w) for w in distinct)
        self.k_maps = nn.ModuleList(make_feature_map(feature_map, kv_heads, head_dim, w) for w in distinct)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``q [..., H, D]``, ``k [..., H_kv, D]`` -> P query features ``[..., H, R_f]`` and P key features
        ``[..., H_kv, R_f]``, in ``q``'s dtype.

        The maps compute in their parameters' dtype (fp32 maps trained on a bf16 model see q and k in fp32) and
        the features come back in ``q``'s dtype, the dtype the HLA operator takes (under CUDA autocast the
        softmax of the learnable maps runs in fp32 too)."""
        param = next(self.parameters(), None)
        dtype = q.dtype if param is None else param.dtype
        qs = [m(q.to(dtype)).to(q.dtype) for m in self.q_maps]
        ks = [m(k.to(dtype)).to(q.dtype) for m in self.k_maps]
        if len(qs) < self.num_factors:  # shared factors
            qs, ks = qs * self.num_factors, ks * self.num_factors
        return qs, ks
