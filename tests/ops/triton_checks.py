"""Checks shared by the Triton kernel tests: inputs, the relative error, and the comparison with the float64
reference (forward, final state and every gradient)."""

from __future__ import annotations

import math

import torch

from hadamard_attn.ops.naive import naive_hadamard_attn

DEVICE = "cpu" if not torch.cuda.is_available() else "cuda"


def sixteen_bit_dots(monkeypatch, *modules) -> None:
    """The GPU's 16-bit paths under the interpreter, for the kernels of ``modules``: ``tl.dot`` operands (and the
    causal per-chunk states) in the input dtype, the interpreter's dot reading bf16/fp16 operands exactly (fp32
    products; its own bf16 dots are wrong). Nothing to do on a GPU."""
    if DEVICE != "cpu":
        return
    import numpy as np
    import pytest
    import triton.language as tl

    interp = pytest.importorskip("triton.runtime.interpreter")
    dts = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
    for module in modules:
        monkeypatch.setattr(module, "dot_dtype", lambda dtype: dtype, raising=False)  # the modules that use it
        monkeypatch.setattr(module, "dot_config", lambda dtype: (dts[dtype], "ieee"))
    dot = interp.InterpreterBuilder.create_dot

    def exact(h):
        if h.dtype.scalar == tl.bfloat16:
            data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interp.TensorHandle(data, tl.float32)
        if h.dtype.scalar == tl.float16:
            return interp.TensorHandle(h.data.astype(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, *args):
        return dot(self, exact(a), exact(b), *args)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", create_dot)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error; NaN anywhere in ``a`` makes it NaN (and fails every comparison)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(B, T, H, widths, Dv, N, init, seed=0, dtype=torch.float32, real=None):
    g = torch.Generator().manual_seed(seed)
    q = [torch.rand(B, T, H, r, generator=g) for r in widths]
    k = [torch.rand(B, T, H, r, generator=g) for r in widths]
    v = torch.randn(B, T, H, Dv, generator=g)
    if real is not None:  # padding tokens ([B, T] False): zero keys and values, as the transformers layers pass them
        real = real.cpu()[:, :, None, None]  # the inputs are drawn on the CPU and moved at the end
        k = [torch.where(real, x, 0) for x in k]
        v = torch.where(real, v, 0)
    M = math.prod(widths)
    st = [torch.rand(N, H, M, Dv, generator=g), torch.rand(N, H, M, generator=g)] if init else []
    xs = [x.to(DEVICE, dtype).requires_grad_(True) for x in [*q, *k, v]]
    return xs + [x.to(DEVICE).requires_grad_(True) for x in st]


def check(
    hla, widths, Dv, B, T, H, normalize, init, cu_seqlens=None, tol=1e-5, real=None, *, causal, eps=1e-6, final=True
):
    """Triton (fp32) vs naive (fp64): output, final state, and the gradients of all inputs through both; without
    ``final``, the output alone (no final state asked for) and the gradients through it."""
    P = len(widths)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=DEVICE)
    leaves = make(B, T, H, widths, Dv, N, init, real=real)
    ref = [x.detach().double().requires_grad_(True) for x in leaves]

    def run(fn, xs):
        st = (xs[2 * P + 1], xs[2 * P + 2]) if init else None
        return fn(tuple(xs[:P]), tuple(xs[P : 2 * P]), xs[2 * P], causal, normalize, eps, st, final, cu)

    o, state = run(hla.triton_hadamard_attn, leaves)
    o_ref, state_ref = run(naive_hadamard_attn, ref)
    assert o.dtype == torch.float32
    assert rel(o, o_ref) < tol, f"o: {rel(o, o_ref):.2e}"
    g = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=g).to(DEVICE)
    loss, loss_ref = (o * do).sum(), (o_ref * do.double()).sum()
    if final:
        (S, z), (S_ref, z_ref) = state, state_ref
        assert S.dtype == torch.float32 and z.dtype == torch.float32
        assert rel(S, S_ref) < tol, "S"
        assert rel(z, z_ref) < tol, "z"
        dS, dz = (torch.randn(t.shape, generator=g).to(DEVICE) for t in (S, z))
        loss = loss + (S * dS).sum() + (z * dz).sum()
        loss_ref = loss_ref + (S_ref * dS.double()).sum() + (z_ref * dz.double()).sum()
    else:
        assert state is None and state_ref is None
    grads = torch.autograd.grad(loss, leaves)
    grads_ref = torch.autograd.grad(loss_ref, ref)
    names = [f"q{f}" for f in range(P)] + [f"k{f}" for f in range(P)] + ["v"] + (["S0", "z0"] if init else [])
    for name, a, b in zip(names, grads, grads_ref):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        assert rel(a, b) < tol, f"d{name}: {rel(a, b):.2e}"


def check_half(hla, xs, st, causal, scale, grad_tol):
    """16-bit inputs ``xs`` (P query factors, P key factors, v) with an fp32 initial state ``st`` of magnitude
    ``scale``, far beyond fp16's range: Triton vs naive in float64. The output comes back in the input dtype
    (within 1e-2), the state in fp32 (within 1e-5), and every gradient within ``grad_tol``."""
    P = (len(xs) - 1) // 2
    dtype = xs[0].dtype
    leaves = [x.detach().requires_grad_(True) for x in [*xs, *st]]
    ref = [x.detach().double().requires_grad_(True) for x in leaves]

    def run(fn, t):
        return fn(tuple(t[:P]), tuple(t[P : 2 * P]), t[2 * P], causal, True, 1e-6, (t[-2], t[-1]), True, None)

    o, (S, z) = run(hla.triton_hadamard_attn, leaves)
    o_ref, (S_ref, z_ref) = run(naive_hadamard_attn, ref)
    assert o.dtype == dtype and S.dtype == torch.float32 and z.dtype == torch.float32
    assert rel(o, o_ref) < 1e-2
    assert rel(S, S_ref) < 1e-5 and rel(z, z_ref) < 1e-5
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    dS = torch.randn(S.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE) / scale
    grads = torch.autograd.grad((o.float() * do).sum() + (S * dS).sum(), leaves)
    grads_ref = torch.autograd.grad((o_ref * do.double()).sum() + (S_ref * dS.double()).sum(), ref)
    for a, b in zip(grads, grads_ref):
        assert a.isfinite().all() and rel(a, b) < grad_tol


def check_partial(hla, used: str, *, causal: bool) -> None:
    """Gradients through part of the outputs only (``used``: some of ``o``, ``S``, ``z``; the others get no
    gradient, None in autograd), with an initial state, against the float64 reference."""
    P, widths = 2, (4, 8)
    leaves = make(2, 21, 2, widths, 16, 2, True)
    ref = [x.detach().double().requires_grad_(True) for x in leaves]

    def loss(fn, xs):
        o, (S, z) = fn(tuple(xs[:P]), tuple(xs[P : 2 * P]), xs[2 * P], causal, True, 1e-6, (xs[-2], xs[-1]), True)
        outs = {"o": o, "S": S, "z": z}
        return sum((outs[name].double() * (1.0 + outs[name].double().detach().sin())).sum() for name in used)

    grads = torch.autograd.grad(loss(hla.triton_hadamard_attn, leaves), leaves, allow_unused=True)
    grads_ref = torch.autograd.grad(loss(naive_hadamard_attn, ref), ref, allow_unused=True)
    for i, (a, b, x) in enumerate(zip(grads, grads_ref, ref)):  # None: no dependence (z alone: not on q or v)
        a, b = (torch.zeros_like(x) if t is None else t for t in (a, b))
        assert torch.isfinite(a).all() and (a.double() - b).abs().max() <= 1e-5 * b.abs().max().clamp_min(1.0), i


def check_long_history_dq(hla, widths, *, causal: bool, tol: float = 1.5e-2) -> None:
    """bf16 queries against a long history (an initial state of 2^12 tokens, batch 1, T = 40, H = 2, Dv = 16): the
    query gradients within ``tol`` of float64. ``dphi(Q) = g S^T + w z^T`` is then a small difference of two large
    terms; run it with ``sixteen_bit_dots`` for the GPU's rounding."""
    P = len(widths)
    leaves = [x.detach() for x in make(1, 40, 2, widths, 16, 1, True)]
    leaves[-2], leaves[-1] = leaves[-2] * 4096, (leaves[-1] + 1) * 4096  # S0, z0: a long history
    leaves = [(x.to(torch.bfloat16) if i <= 2 * P else x).requires_grad_(True) for i, x in enumerate(leaves)]
    ref = [x.detach().double().requires_grad_(True) for x in leaves]

    def run(fn, t):
        return fn(tuple(t[:P]), tuple(t[P : 2 * P]), t[2 * P], causal, True, 1e-6, tuple(t[-2:]), False, None)[0]

    o, o_ref = run(hla.triton_hadamard_attn, leaves), run(naive_hadamard_attn, ref)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    dq = torch.autograd.grad((o.float() * do).sum(), leaves[:P])
    dq_ref = torch.autograd.grad((o_ref * do.double()).sum(), ref[:P])
    for f, (a, b) in enumerate(zip(dq, dq_ref)):
        assert rel(a, b) < tol, f"dq{f}: {rel(a, b):.2e}"
