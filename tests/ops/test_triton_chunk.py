"""The causal Triton kernels against the float64 quadratic reference, forward and every gradient.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by conftest
before the kernels are defined), with chunks of 16 tokens. Every output the kernels write is poisoned with NaN.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

pytest.importorskip("triton")

from hadamard_attn.ops import hadamard_attn  # noqa: E402
from hadamard_attn.ops.naive import naive_hadamard_attn  # noqa: E402

DEVICE = "cpu" if not torch.cuda.is_available() else "cuda"


@pytest.fixture(autouse=True)
def hla(monkeypatch):
    """The Triton package as imported now (another test file may have re-imported it), with every kernel output
    allocated full of NaN."""
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    import hadamard_attn.ops.triton  # noqa: F401

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(sys.modules["hadamard_attn.ops.triton.chunk"], "empty", poisoned)
    return sys.modules["hadamard_attn.ops.triton"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error; NaN anywhere in ``a`` makes it NaN (and fails every comparison)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(B, T, H, widths, Dv, N, init, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = [torch.rand(B, T, H, r, generator=g) for r in widths]
    k = [torch.rand(B, T, H, r, generator=g) for r in widths]
    v = torch.randn(B, T, H, Dv, generator=g)
    M = math.prod(widths)
    st = [torch.rand(N, H, M, Dv, generator=g), torch.rand(N, H, M, generator=g)] if init else []
    xs = [x.to(DEVICE, dtype).requires_grad_(True) for x in [*q, *k, v]]
    return xs + [x.to(DEVICE).requires_grad_(True) for x in st]


def check(hla, widths, Dv, B, T, H, normalize, init, cu_seqlens=None, tol=1e-5):
    """Triton (fp32) vs naive (fp64), causal: output, final state, and the gradients of all inputs through both."""
    P = len(widths)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=DEVICE)
    leaves = make(B, T, H, widths, Dv, N, init)
    ref = [x.detach().double().requires_grad_(True) for x in leaves]

    def run(fn, xs):
        st = (xs[2 * P + 1], xs[2 * P + 2]) if init else None
        return fn(tuple(xs[:P]), tuple(xs[P : 2 * P]), xs[2 * P], True, normalize, 1e-6, st, True, cu)

    o, (S, z) = run(hla.triton_hadamard_attn, leaves)
    o_ref, (S_ref, z_ref) = run(naive_hadamard_attn, ref)
    assert o.dtype == torch.float32 and S.dtype == torch.float32 and z.dtype == torch.float32
    assert rel(o, o_ref) < tol, f"o: {rel(o, o_ref):.2e}"
    assert rel(S, S_ref) < tol, "S"
    assert rel(z, z_ref) < tol, "z"

    g = torch.Generator().manual_seed(1)
    do, dS, dz = (torch.randn(t.shape, generator=g).to(DEVICE) for t in (o, S, z))
    loss = (o * do).sum() + (S * dS).sum() + (z * dz).sum()
    loss_ref = (o_ref * do.double()).sum() + (S_ref * dS.double()).sum() + (z_ref * dz.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    grads_ref = torch.autograd.grad(loss_ref, ref)
    names = [f"q{f}" for f in range(P)] + [f"k{f}" for f in range(P)] + ["v"] + (["S0", "z0"] if init else [])
    for name, a, b in zip(names, grads, grads_ref):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        assert rel(a, b) < tol, f"d{name}: {rel(a, b):.2e}"


@pytest.mark.parametrize(
    "widths, Dv, B, T, H, normalize, init",
    [
        ((4, 8), 32, 2, 37, 2, True, True),  # B = 2, 3 chunks (the last short), 2 feature tiles, 2 Dv tiles
        ((8,), 16, 1, 1, 1, False, False),  # T = 1; P = 1 padded to 16 features
        ((4, 4, 2), 16, 1, 23, 2, True, False),  # P = 3, one feature tile
        ((16, 4), 32, 3, 16, 1, False, True),  # unequal widths, B = 3, T = C exactly
        ((2, 8, 4), 16, 1, 33, 1, True, True),  # P = 3, unequal widths, factor 1 one index per tile
        ((32,), 16, 2, 17, 1, True, False),  # P = 1 in feature tiles of 16
        ((4, 64), 16, 1, 9, 1, True, False),  # a wide inner factor, a factor narrower than 16
    ],
)
def test_chunk(hla, widths, Dv, B, T, H, normalize, init):
    check(hla, widths, Dv, B, T, H, normalize, init)


@pytest.mark.parametrize("normalize, init", [(True, True), (False, False)])
def test_chunk_varlen(hla, normalize, init):
    # sequences of 1, 16 and 23 tokens: chunks restart at every sequence, the states stay per sequence
    check(hla, (4, 8), 16, 1, 40, 2, normalize, init, cu_seqlens=[0, 1, 17, 40])


def test_chunk_varlen_p3(hla):
    check(hla, (2, 4, 2), 16, 1, 21, 1, True, True, cu_seqlens=[0, 13, 21])


def test_chunk_state_carried(hla):
    """Two calls, the second starting from the first's final state, give the outputs and state of one call."""
    P = 2
    xs = [x.detach() for x in make(1, 41, 2, (4, 4), 16, 1, False)]
    q, k, v = tuple(xs[:P]), tuple(xs[P : 2 * P]), xs[2 * P]
    o, st = hla.triton_hadamard_attn(q, k, v, True, True, 1e-6, None, True)
    cut = 19  # not a chunk boundary
    o1, st1 = hla.triton_hadamard_attn(
        tuple(x[:, :cut] for x in q), tuple(x[:, :cut] for x in k), v[:, :cut], True, True, 1e-6, None, True
    )
    o2, st2 = hla.triton_hadamard_attn(
        tuple(x[:, cut:] for x in q), tuple(x[:, cut:] for x in k), v[:, cut:], True, True, 1e-6, st1, True
    )
    assert rel(torch.cat([o1, o2], 1), o) < 1e-6
    assert rel(st2[0], st[0]) < 1e-6 and rel(st2[1], st[1]) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunk_half(hla, dtype):
    """16-bit inputs with a state beyond fp16's range and an intra-chunk block beyond it too (widths 64 x 16 of
    values up to 8: A up to 2^22): the output and the gradients come back in the input dtype, the state in fp32."""
    P = 2
    leaves = make(1, 20, 1, (64, 16), 16, 1, True, dtype=dtype)
    xs = [(x.detach() * (8 if i < 2 * P else 1)).to(dtype) for i, x in enumerate(leaves[:5])]
    st = [x.detach() * 1e6 for x in leaves[5:]]
    ref = [x.double() for x in xs + st]

    def run(fn, t):
        return fn(tuple(t[:P]), tuple(t[P : 2 * P]), t[2 * P], True, True, 1e-6, (t[5], t[6]), True, None)

    o, (S, z) = run(hla.triton_hadamard_attn, xs + st)
    o_ref, (S_ref, z_ref) = run(naive_hadamard_attn, ref)
    assert o.dtype == dtype and S.dtype == torch.float32 and z.dtype == torch.float32
    assert rel(o, o_ref) < 1e-2
    assert rel(S, S_ref) < 1e-5 and rel(z, z_ref) < 1e-5
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    dS = torch.randn(S.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE) / 1e6
    xs = [x.requires_grad_(True) for x in xs + st]
    ref = [x.detach().double().requires_grad_(True) for x in xs]
    o, (S, _) = run(hla.triton_hadamard_attn, xs)
    o_ref, (S_ref, _) = run(naive_hadamard_attn, ref)
    grads = torch.autograd.grad((o.float() * do).sum() + (S * dS).sum(), xs)
    grads_ref = torch.autograd.grad((o_ref * do.double()).sum() + (S_ref * dS.double()).sum(), ref)
    for a, b in zip(grads, grads_ref):
        # bf16: the query gradient cancels large terms (a state of 1e6) through w = -sum(do * o), o rounded to bf16
        assert a.isfinite().all() and rel(a, b) < (2e-2 if dtype == torch.float16 else 5e-2)


def test_api_backend_triton_causal(hla):
    """``hadamard_attn(..., causal=True, backend="triton")`` runs the kernels and agrees with the naive path."""
    leaves = make(1, 13, 2, (4, 4), 16, 1, False)
    q, k, v = leaves[:2], leaves[2:4], leaves[4]
    assert hla.unsupported_reason(q, k, v, True) is None
    o, _ = hadamard_attn(q, k, v, causal=True, backend="triton")
    o_ref, _ = hadamard_attn([x.double() for x in q], [x.double() for x in k], v.double(), causal=True, backend="naive")
    assert rel(o, o_ref) < 1e-5


def test_chunk_custom_ops(hla):
    leaves = [x.detach() for x in make(1, 5, 1, (4, 4), 16, 1, True)]
    q, k, v, S0, z0 = leaves[:2], leaves[2:4], leaves[4], leaves[5], leaves[6]
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        torch.ops.hadamard_attn.chunk_fwd.default, (q, k, v, S0, z0, None, True, 1e-6, 16), test_utils=utils
    )
    o, S, z, den = torch.ops.hadamard_attn.chunk_fwd(q, k, v, S0, z0, None, True, 1e-6, 16)
    args = (q, k, v, o, den, S0, z0, None, torch.ones_like(o), torch.ones_like(S), torch.ones_like(z), True, 1e-6, 16)
    torch.library.opcheck(torch.ops.hadamard_attn.chunk_bwd.default, args, test_utils=utils)


def test_chunk_torch_compile_fullgraph(hla):
    """``torch.compile(fullgraph=True)`` traces through the causal path, forward and backward."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 4 * 4, generator=g).to(DEVICE).requires_grad_(True)
    x = torch.randn(1, 9, 16, generator=g).to(DEVICE)

    def f(x, w):
        feats = torch.nn.functional.elu(x @ w).add(1).view(1, 9, 1, 4, 4)  # [B, T, H, 4, r]
        q, k = (feats[..., 0, :], feats[..., 1, :]), (feats[..., 2, :], feats[..., 3, :])
        return hla.triton_hadamard_attn(q, k, x.view(1, 9, 1, 16), causal=True)[0]

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w)
    y_ref = f(x, w)
    assert rel(y, y_ref) < 1e-6
    (gw,) = torch.autograd.grad(y.square().sum(), [w])
    (gw_ref,) = torch.autograd.grad(y_ref.square().sum(), [w])
    assert rel(gw, gw_ref) < 1e-5
