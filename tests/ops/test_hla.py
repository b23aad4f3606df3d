"""Every torch path of ``hadamard_attn`` against the float64 quadratic reference, forward and every gradient."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hadamard_attn import hadamard_attn, hadamard_attn_step
from hadamard_attn.ops import chunk_hadamard_attn, naive_hadamard_attn, parallel_hadamard_attn
from hadamard_attn.testing import assert_close, random_inputs, random_state

H, DV = 2, 5
WIDTHS = [(16,), (4, 4), (16, 4), (1, 4), (4, 4, 4), (4, 1, 16)]
SHAPES = [(1, 1), (2, 37), (1, 300)]  # (B, T)
NAMES = ("o", "S", "z")


def outputs_and_grads(fn, leaves, seed=0):
    """Run ``fn() -> (o, (S, z))`` and return ``[o, S, z, *d(loss)/d(leaves)]`` for a random linear loss."""
    o, (S, z) = fn()
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in (o, S, z)]
    loss = sum((t * c).sum() for t, c in zip((o, S, z), cot))
    return [o, S, z, *torch.autograd.grad(loss, leaves)]


def leaf_names(P, with_state):
    names = [f"dq{f}" for f in range(P)] + [f"dk{f}" for f in range(P)] + ["dv"]
    return names + (["dS0", "dz0"] if with_state else [])


def compare(ref, out, names, tol):
    # float64: an absolute floor of 1e-12 for quantities near zero next to O(1) terms (hypothesis found dq of a
    # width-1 factor at RMS 1e-5 with a 2.4e-14 rounding difference, T = 2)
    for name, r, x in zip(names, ref, out, strict=True):
        assert_close(name, r, x, tol, atol=1e-12 if r.dtype == torch.float64 else 0.0)


def check_against_naive(backend, B, T, widths, causal, normalize, with_state, seed, tol=1e-10, **kw):
    g = torch.Generator().manual_seed(seed)
    q, k, v = random_inputs(B, T, H, widths, DV, generator=g)
    state = random_state(B, H, math.prod(widths), DV, generator=g) if with_state else None
    leaves = [*q, *k, v, *(state or ())]

    def run(path):
        return hadamard_attn(
            q,
            k,
            v,
            causal=causal,
            normalize=normalize,
            initial_state=state,
            output_final_state=True,
            backend=path,
            **kw,
        )

    ref = outputs_and_grads(lambda: run("naive"), leaves)
    out = outputs_and_grads(lambda: run(backend), leaves)
    compare(ref, out, NAMES + tuple(leaf_names(len(widths), with_state)), tol)


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("widths", WIDTHS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_parallel(B, T, widths, normalize, with_state):
    check_against_naive("parallel", B, T, widths, False, normalize, with_state, seed=T)


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("widths", WIDTHS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk(B, T, widths, normalize, with_state):
    check_against_naive("chunk", B, T, widths, True, normalize, with_state, seed=T)


@pytest.mark.parametrize("B,T", [(1, 1), (2, 37)])
@pytest.mark.parametrize("widths", WIDTHS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_recurrent(B, T, widths, normalize, with_state):
    check_against_naive("recurrent", B, T, widths, True, normalize, with_state, seed=T)


@pytest.mark.parametrize("tile", [1, 7, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_tile_sizes(tile, causal):
    """Tiles and chunks smaller than T, several blocks of chunks, a ragged last chunk and block, chunks of one
    token."""
    g = torch.Generator().manual_seed(tile)
    widths = (4, 3, 2)
    q, k, v = random_inputs(2, 37, H, widths, DV, generator=g)
    state = random_state(2, H, 24, DV, generator=g)
    leaves = [*q, *k, v, *state]
    ref = outputs_and_grads(lambda: naive_hadamard_attn(tuple(q), tuple(k), v, causal, True, 1e-6, state, True), leaves)
    if causal:
        out = outputs_and_grads(
            lambda: chunk_hadamard_attn(
                tuple(q), tuple(k), v, True, 1e-6, state, True, chunk_size=tile, block_size=3 * tile
            ),
            leaves,
        )
    else:
        out = outputs_and_grads(
            lambda: parallel_hadamard_attn(tuple(q), tuple(k), v, True, 1e-6, state, True, block_size=tile), leaves
        )
    compare(ref, out, NAMES + tuple(leaf_names(3, True)), 1e-10)


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 80),
    widths=st.lists(st.sampled_from([1, 2, 4, 16]), min_size=1, max_size=3).filter(lambda w: math.prod(w) <= 256),
    causal=st.booleans(),
    normalize=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_auto_matches_naive(B, T, widths, causal, normalize, seed):
    """Random shapes through backend='auto' (the torch paths on CPU), forward and gradients."""
    check_against_naive("auto", B, T, tuple(widths), causal, normalize, False, seed)


def test_naive_definition():
    """The reference itself against the definition written as loops over (i, j)."""
    g = torch.Generator().manual_seed(0)
    widths = (3, 2, 4)
    q, k, v = random_inputs(1, 6, 1, widths, 2, generator=g)
    for causal in (False, True):
        o, _ = naive_hadamard_attn(tuple(q), tuple(k), v, causal, True, 0.0)
        for i in range(6):
            js = range(i + 1) if causal else range(6)
            a = [math.prod((q[f][0, i, 0] @ k[f][0, j, 0]).item() for f in range(3)) for j in js]
            expect = sum(w * v[0, j, 0] for w, j in zip(a, js)) / sum(a)
            torch.testing.assert_close(o[0, i, 0], expect, rtol=1e-12, atol=1e-12)


def test_shared_factors_are_a_power():
    """P identical factors give A = S^P: with P = 1 on the squared similarity the outputs agree."""
    g = torch.Generator().manual_seed(1)
    q, k, v = random_inputs(1, 9, 2, (3,), 4, generator=g)
    o2, _ = hadamard_attn([q[0]] * 2, [k[0]] * 2, v, backend="parallel")
    sim = torch.einsum("bihr,bjhr->bhij", q[0], k[0]) ** 2
    expect = torch.einsum("bhij,bjhd->bihd", sim, v) / (sim.sum(-1).transpose(1, 2)[..., None] + 1e-6)
    torch.testing.assert_close(o2, expect)


@pytest.mark.parametrize("backend", ["chunk", "recurrent"])
@pytest.mark.parametrize("split", [1, 17, 36])
def test_state_carry_causal(backend, split):
    """Two causal calls with the state carried equal one call: outputs, final state and gradients."""
    g = torch.Generator().manual_seed(split)
    widths = (4, 2)
    q, k, v = random_inputs(2, 37, H, widths, DV, generator=g)
    state = random_state(2, H, 8, DV, generator=g)
    leaves = [*q, *k, v, *state]

    def one():
        return hadamard_attn(q, k, v, causal=True, initial_state=state, output_final_state=True, backend=backend)

    def two():
        o1, mid = hadamard_attn(
            [x[:, :split] for x in q],
            [x[:, :split] for x in k],
            v[:, :split],
            causal=True,
            initial_state=state,
            output_final_state=True,
            backend=backend,
        )
        o2, end = hadamard_attn(
            [x[:, split:] for x in q],
            [x[:, split:] for x in k],
            v[:, split:],
            causal=True,
            initial_state=mid,
            output_final_state=True,
            backend=backend,
        )
        return torch.cat([o1, o2], dim=1), end

    compare(outputs_and_grads(one, leaves), outputs_and_grads(two, leaves), NAMES + tuple(leaf_names(2, True)), 1e-10)


def test_state_carry_noncausal():
    """Non-causal: a state built from earlier keys, read by later queries, equals attending to all keys."""
    g = torch.Generator().manual_seed(3)
    widths = (2, 4)
    q, k, v = random_inputs(2, 30, H, widths, DV, generator=g)
    full, _ = hadamard_attn(q, k, v, backend="naive")
    _, mid = hadamard_attn(
        [x[:, :11] for x in q], [x[:, :11] for x in k], v[:, :11], output_final_state=True, backend="parallel"
    )
    rest, _ = hadamard_attn(
        [x[:, 11:] for x in q], [x[:, 11:] for x in k], v[:, 11:], initial_state=mid, backend="parallel"
    )
    assert_close("o", full[:, 11:], rest, 1e-12)


@pytest.mark.parametrize("widths", [(4,), (4, 2), (2, 3, 2)])
@pytest.mark.parametrize("normalize", [True, False])
def test_step(widths, normalize):
    """Decode steps from a prefix state equal the chunked causal output, token for token."""
    g = torch.Generator().manual_seed(len(widths))
    q, k, v = random_inputs(2, 20, H, widths, DV, generator=g)
    ref, ref_state = hadamard_attn(q, k, v, causal=True, normalize=normalize, output_final_state=True, backend="naive")
    _, state = hadamard_attn(
        [x[:, :5] for x in q],
        [x[:, :5] for x in k],
        v[:, :5],
        causal=True,
        normalize=normalize,
        output_final_state=True,
        backend="chunk",
    )
    for t in range(5, 20):
        o, state = hadamard_attn_step([x[:, t] for x in q], [x[:, t] for x in k], v[:, t], state, normalize=normalize)
        assert_close(f"o[{t}]", ref[:, t], o, 1e-12)
    assert_close("S", ref_state[0], state[0], 1e-12)
    assert_close("z", ref_state[1], state[1], 1e-12)


def test_step_from_empty_state():
    g = torch.Generator().manual_seed(5)
    q, k, v = random_inputs(1, 1, H, (3, 3), DV, generator=g)
    ref, _ = hadamard_attn(q, k, v, causal=True, backend="naive")
    o, (S, z) = hadamard_attn_step([x[:, 0] for x in q], [x[:, 0] for x in k], v[:, 0])
    assert_close("o", ref[:, 0], o, 1e-12)
    assert S.shape == (1, H, 9, DV) and z.shape == (1, H, 9)


@pytest.mark.parametrize("backend,causal", [("parallel", False), ("chunk", True), ("recurrent", True)])
@pytest.mark.parametrize("with_state", [False, True])
def test_varlen(backend, causal, with_state):
    """Packed sequences (cu_seqlens) equal the reference's block-diagonal masking and separate calls."""
    g = torch.Generator().manual_seed(7)
    lengths = [1, 17, 19, 23]
    cu = torch.tensor([0, 1, 18, 37, 60])
    widths = (4, 3)
    q, k, v = random_inputs(1, 60, H, widths, DV, generator=g)
    state = random_state(len(lengths), H, 12, DV, generator=g) if with_state else None
    leaves = [*q, *k, v, *(state or ())]

    def run(path):
        return hadamard_attn(
            q, k, v, causal=causal, initial_state=state, output_final_state=True, cu_seqlens=cu, backend=path
        )

    ref = outputs_and_grads(lambda: run("naive"), leaves)
    out = outputs_and_grads(lambda: run(backend), leaves)
    compare(ref, out, NAMES + tuple(leaf_names(2, with_state)), 1e-10)

    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        init = None if state is None else (state[0][n : n + 1], state[1][n : n + 1])
        o, (S, z) = hadamard_attn(
            [x[:, s:e] for x in q],
            [x[:, s:e] for x in k],
            v[:, s:e],
            causal=causal,
            initial_state=init,
            output_final_state=True,
            backend="naive",
        )
        assert_close(f"o[seq {n}]", o, out[0][:, s:e], 1e-10)
        assert_close(f"S[seq {n}]", S, out[1][n : n + 1], 1e-10)
        assert_close(f"z[seq {n}]", z, out[2][n : n + 1], 1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend,causal", [("parallel", False), ("chunk", True)])
def test_low_precision(dtype, backend, causal):
    """bf16/fp16 inputs: output in the input dtype, state in fp32, within the rounding of the dtype."""
    g = torch.Generator().manual_seed(11)
    widths = (16, 4)
    q, k, v = random_inputs(2, 150, H, widths, 32, dtype=dtype, generator=g)
    leaves = [*q, *k, v]

    def run(path, cast):
        return hadamard_attn(
            [cast(x) for x in q], [cast(x) for x in k], cast(v), causal=causal, output_final_state=True, backend=path
        )

    ref = outputs_and_grads(lambda: run("naive", lambda x: x.double()), leaves)
    out = outputs_and_grads(lambda: run(backend, lambda x: x), leaves)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32 and out[2].dtype == torch.float32
    assert all(d.dtype == dtype for d in out[3:])
    compare(ref, out, NAMES + tuple(leaf_names(2, False)), 1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend,causal", [("parallel", False), ("chunk", True)])
def test_long_low_precision(dtype, backend, causal):
    """At T = 131072 the sums exceed the fp16 range by far: fp32 states keep outputs and gradients finite and
    equal to the fp32 computation on the same inputs."""
    T = 131072
    g = torch.Generator().manual_seed(13)
    q, k, v = random_inputs(1, T, 1, (8, 8), 16, dtype=dtype, generator=g)
    leaves = [*q, *k, v]

    def run(cast):
        # features in [0, 4): exact in both dtypes, and z grows to about T * 4
        return hadamard_attn(
            [4 * cast(x) for x in q],
            [4 * cast(x) for x in k],
            cast(v),
            causal=causal,
            output_final_state=True,
            backend=backend,
        )

    out = outputs_and_grads(lambda: run(lambda x: x), leaves)
    assert out[2].min() > 4 * 65504  # every entry of z is far beyond the fp16 range
    ref = outputs_and_grads(lambda: run(lambda x: x.float()), leaves)
    compare(ref, out, NAMES + tuple(leaf_names(2, False)), 1e-2)


@pytest.mark.parametrize("backend,causal", [("parallel", False), ("chunk", True)])
def test_eps_zero(backend, causal):
    """eps = 0 is allowed: with a ragged last chunk the padding must not turn 0/0 into NaN gradients."""
    check_against_naive(backend, 2, 37, (4, 2), causal, True, True, seed=17, eps=0.0)


def test_double_backward():
    """``chunk`` recomputes from its inputs, so second derivatives match the reference; ``parallel`` refuses them
    (``once_differentiable``) instead of silently dropping the part that flows through its saved state."""
    g = torch.Generator().manual_seed(19)
    q, k, v = random_inputs(1, 9, 1, (3, 2), 4, generator=g)
    leaves = [*q, *k, v]

    def first(backend, causal):
        o, _ = hadamard_attn(q, k, v, causal=causal, backend=backend)
        (dq0,) = torch.autograd.grad(o.pow(2).sum(), q[0], create_graph=True)
        return dq0

    def second(backend, causal):
        return torch.autograd.grad(first(backend, causal).pow(2).sum(), leaves)

    for name, r, x in zip(leaf_names(2, False), second("naive", True), second("chunk", True)):
        assert_close(f"d2 {name}", r, x, 1e-10)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        first("parallel", False).pow(2).sum().backward()
