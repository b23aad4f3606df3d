"""Hadamard Linear Attention: O(N) attention as a Hadamard product of linear-attention similarities."""

from .ops import hadamard_attn, hadamard_attn_step

__version__ = "0.1.0"

__all__ = ["hadamard_attn", "hadamard_attn_step", "__version__"]
