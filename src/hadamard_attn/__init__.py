"""Hadamard Linear Attention: O(N) attention as a Hadamard product of linear-attention similarities."""

from .feature_maps import (
    FEATURE_MAPS,
    AffineFeatureMap,
    EluFeatureMap,
    FactorMaps,
    FeatureMap,
    HedgehogFeatureMap,
    MLPFeatureMap,
    ReluFeatureMap,
    make_feature_map,
)
from .layers import HadamardAttention, HLAConfig, apply_rotary
from .ops import hadamard_attn, hadamard_attn_step

__version__ = "0.1.0"

__all__ = ["hadamard_attn", "hadamard_attn_step", "__version__"]
__all__ += [
    "FEATURE_MAPS",
    "AffineFeatureMap",
    "EluFeatureMap",
    "FactorMaps",
    "FeatureMap",
    "HLAConfig",
    "HadamardAttention",
    "HedgehogFeatureMap",
    "MLPFeatureMap",
    "ReluFeatureMap",
    "apply_rotary",
    "make_feature_map",
]
