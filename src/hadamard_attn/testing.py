"""Helpers for testing HLA paths against the float64 reference (used by the test suite and the benchmarks)."""

from __future__ import annotations

import math

import torch


def rel_rms(ref: torch.Tensor, x: torch.Tensor) -> float:
    """``rms(x - ref) / rms(ref)`` computed in float64 (``inf`` where ``x`` is not finite)."""
    ref, x = ref.double(), x.double()
    if not torch.isfinite(x).all():
        return math.inf
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-300)).item()


def assert_close(name: str, ref: torch.Tensor, x: torch.Tensor, tol: float, atol: float = 0.0) -> None:
    """Fail unless ``x`` is finite and ``rms(x - ref) <= tol * rms(ref) + atol`` (same shape).

    ``atol`` is for quantities that are zero up to rounding (e.g. ``dq`` at T = 1, where ``o = v``).
    """
    assert ref.shape == x.shape, f"{name}: shape {tuple(x.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: not finite"
    ref, x = ref.double(), x.double()
    err, scale = (x - ref).pow(2).mean().sqrt().item(), ref.pow(2).mean().sqrt().item()
    assert err <= tol * scale + atol, f"{name}: RMS error {err:.3e} > {tol:.1e} * RMS {scale:.3e} + {atol:.1e}"


def random_inputs(
    B: int,
    T: int,
    H: int,
    widths: tuple[int, ...],
    Dv: int,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Non-negative query/key features and signed values, each requiring grad.

    Returns:
        ``q, k``: lists of P tensors ``[B, T, H, R_f]`` in [0, 1); ``v``: ``[B, T, H, Dv]`` standard normal.
    """

    def leaf(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).requires_grad_()

    q = [leaf(torch.rand(B, T, H, r, generator=generator, device=device)) for r in widths]
    k = [leaf(torch.rand(B, T, H, r, generator=generator, device=device)) for r in widths]
    v = leaf(torch.randn(B, T, H, Dv, generator=generator, device=device))
    return q, k, v


def random_state(
    N: int,
    H: int,
    M: int,
    Dv: int,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A state ``(S [N, H, M, Dv], z [N, H, M])`` as left by a few earlier tokens (z > 0), requiring grad."""
    S = torch.randn(N, H, M, Dv, generator=generator, device=device).to(dtype).requires_grad_()
    z = (1 + torch.rand(N, H, M, generator=generator, device=device)).to(dtype).requires_grad_()
    return S, z
