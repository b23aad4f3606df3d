"""The causal Triton kernels against the float64 quadratic reference, forward and every gradient.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by conftest
before the kernels are defined), with chunks of 16 tokens. Every output the kernels write is poisoned with NaN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]

from triton_checks import (  # noqa: E402
    DEVICE,
    check,
    check_half,
    check_long_history_dq,
    check_partial,
    make,
    rel,
    sixteen_bit_dots,
)

from hadamard_attn.ops import hadamard_attn  # noqa: E402
from hadamard_attn.ops.naive import naive_hadamard_attn  # noqa: E402


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
    check(hla, widths, Dv, B, T, H, normalize, init, causal=True)


@pytest.mark.parametrize("normalize, init", [(True, True), (False, False)])
def test_chunk_varlen(hla, normalize, init):
    # sequences of 1, 16 and 23 tokens: chunks restart at every sequence, the states stay per sequence
    check(hla, (4, 8), 16, 1, 40, 2, normalize, init, cu_seqlens=[0, 1, 17, 40], causal=True)


@pytest.mark.parametrize("used", ["o", "S", "z", "Sz"])
def test_chunk_partial_outputs(hla, used):
    # the outputs without a gradient reach the backward as None (no zeros materialised)
    check_partial(hla, used, causal=True)


@pytest.mark.parametrize("B, T, cu_seqlens", [(2, 37, None), (1, 40, [0, 1, 17, 40])])
def test_chunk_eps_zero(hla, B, T, cu_seqlens):
    # eps = 0 (allowed): rows past a sequence's end, in a short last chunk or before the next packed sequence, must
    # not turn 0 / 0 into NaN in the backward (they did in dk and dv when g was formed from do and den)
    check(hla, (4, 8), 16, B, T, 2, True, False, cu_seqlens=cu_seqlens, causal=True, eps=0.0)


@pytest.fixture
def segments(hla, monkeypatch):
    """State walks in segments of two chunks (``segment_chunks``; the GPU's 64 need sequences longer than 64
    chunks); yields the names of the kernels launched, to show that the carries ran."""
    chunk = sys.modules["hadamard_attn.ops.triton.chunk"]
    monkeypatch.setattr(chunk, "segment_chunks", lambda: 2)
    launched = []
    launch = chunk.launch

    def recorded(kernel, *args, **kwargs):
        launched.append(getattr(kernel, "base_fn", getattr(kernel, "fn", kernel)).__name__)
        launch(kernel, *args, **kwargs)

    monkeypatch.setattr(chunk, "launch", recorded)
    yield launched


@pytest.mark.parametrize(
    "widths, Dv, B, T, H, normalize, init",
    [
        ((4, 8), 32, 2, 101, 2, True, True),  # 7 chunks: 4 segments, the last of one short chunk; B = 2
        ((4, 4, 2), 16, 1, 64, 1, True, False),  # P = 3, 4 chunks exactly: 2 full segments
        ((16,), 16, 1, 48, 2, False, True),  # P = 1, unnormalised, 3 chunks: a full segment and a 1-chunk one
        ((4, 8), 16, 1, 600, 1, True, True),  # 38 chunks: 19 segments, two steps of the carries' scan (16 a step)
    ],
)
def test_chunk_segmented(hla, segments, widths, Dv, B, T, H, normalize, init):
    check(hla, widths, Dv, B, T, H, normalize, init, causal=True)
    assert segments.count("chunk_carry_kernel") == 2  # the forward's and the backward's


def test_chunk_segmented_short(hla, segments):
    # 2 chunks (one segment), dense and packed: no carries
    check(hla, (4, 8), 16, 2, 32, 2, True, True, causal=True)
    check(hla, (4, 8), 16, 1, 32, 2, True, True, cu_seqlens=[0, 7, 32], causal=True)
    assert "chunk_carry_kernel" not in segments


@pytest.mark.parametrize("segmented", [False, True])
@pytest.mark.parametrize("cu_seqlens", [None, [0, 5, 70]])
def test_chunk_without_final_state(hla, segments, monkeypatch, segmented, cu_seqlens):
    """``output_final_state=False`` (what a model calls): the output and its gradients against float64, from an
    initial state, whole walks and segmented ones (the carries then run without storing a final state), and no
    final state allocated: of ``[N, H, M, Dv]`` and ``[N, H, M]`` (N = 2 sequences, M = 32) only the initial state's
    gradient (the backward's)."""
    if not segmented:
        monkeypatch.setattr(sys.modules["hadamard_attn.ops.triton.chunk"], "segment_chunks", lambda: 64)
    chunk = sys.modules["hadamard_attn.ops.triton.chunk"]
    shapes = []
    poisoned = chunk.empty
    monkeypatch.setattr(chunk, "empty", lambda shape, *a: shapes.append(tuple(shape)) or poisoned(shape, *a))
    B, T = (2, 35) if cu_seqlens is None else (1, 70)
    check(hla, (4, 8), 16, B, T, 2, True, True, cu_seqlens=cu_seqlens, causal=True, final=False)
    assert ("chunk_carry_kernel" in segments) == segmented
    assert shapes.count((2, 2, 32, 16)) == shapes.count((2, 2, 32)) == 1, shapes


@pytest.mark.parametrize("normalize, init", [(True, True), (False, False)])
def test_chunk_segmented_varlen(hla, segments, normalize, init):
    # packed sequences of 1, 16, 83 and 100 tokens: 1, 1, 3 and 4 segments of two chunks of 16 (the grid has 4;
    # the shorter sequences store nothing for the segments they lack), the last ones short
    check(hla, (4, 8), 16, 1, 200, 2, normalize, init, cu_seqlens=[0, 1, 17, 100, 200], causal=True)
    assert segments.count("chunk_carry_kernel") == 2


@pytest.mark.parametrize("used", ["o", "S"])
def test_chunk_segmented_partial_outputs(hla, segments, monkeypatch, used):
    # segments of one chunk (21 tokens: 2 of them); the backward without dS, dz (only o used) starts its reverse
    # carries at 0
    monkeypatch.setattr(sys.modules["hadamard_attn.ops.triton.chunk"], "segment_chunks", lambda: 1)
    check_partial(hla, used, causal=True)
    assert "chunk_carry_kernel" in segments


def test_chunk_segmented_state_carried(hla, segments):
    # 101 tokens: 7 chunks in 4 segments; cut at 51: 4 chunks (2 segments), then 50 tokens from that state (2)
    test_chunk_state_carried(hla, 101, 51)
    assert segments.count("chunk_carry_kernel") == 3


def test_chunk_varlen_p3(hla):
    check(hla, (2, 4, 2), 16, 1, 21, 1, True, True, cu_seqlens=[0, 13, 21], causal=True)


def test_chunk_state_carried(hla, T=41, cut=19):
    """Two calls, the second starting from the first's final state, give the outputs and state of one call (the
    ``cut`` not at a chunk boundary)."""
    P = 2
    xs = [x.detach() for x in make(1, T, 2, (4, 4), 16, 1, False)]
    q, k, v = tuple(xs[:P]), tuple(xs[P : 2 * P]), xs[2 * P]
    o, st = hla.triton_hadamard_attn(q, k, v, True, True, 1e-6, None, True)
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
    leaves = make(1, 20, 1, (64, 16), 16, 1, True, dtype=dtype)
    xs = [(x.detach() * (8 if i < 4 else 1)).to(dtype) for i, x in enumerate(leaves[:5])]
    # bf16: the query gradient cancels large terms (a state of 1e6); 9e-3 with w recomputed in the gradient kernel
    # (1.5e-2 to 2.3e-2 with the prep kernel's w)
    tol = 2e-2 if dtype == torch.float16 else 1.5e-2
    check_half(hla, xs, [x.detach() * 1e6 for x in leaves[5:]], True, 1e6, tol)


def test_api_backend_triton_causal(hla):
    """``hadamard_attn(..., causal=True, backend="triton")`` runs the kernels and agrees with the naive path."""
    leaves = make(1, 13, 2, (4, 4), 16, 1, False)
    q, k, v = leaves[:2], leaves[2:4], leaves[4]
    assert hla.unsupported_reason(q, k, v, True) is None
    o, _ = hadamard_attn(q, k, v, causal=True, backend="triton")
    o_ref, _ = hadamard_attn([x.double() for x in q], [x.double() for x in k], v.double(), causal=True, backend="naive")
    assert rel(o, o_ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the forward also returns o's residual
def test_chunk_custom_ops(hla, dtype):
    leaves = [x.detach() for x in make(1, 5, 2, (4, 4), 16, 1, True)]
    q, k, v, S0, z0 = [x.to(dtype) for x in leaves[:2]], [x.to(dtype) for x in leaves[2:4]], *leaves[4:]
    v = v.to(dtype)
    utils = ("test_schema", "test_faketensor")
    for backward, final in ((False, True), (True, False), (True, True)):
        fwd_args = (q, k, v, S0, z0, None, True, 1e-6, 16, backward, final)
        torch.library.opcheck(torch.ops.hadamard_attn.chunk_fwd.default, fwd_args, test_utils=utils)
    o, S, z, den, res = torch.ops.hadamard_attn.chunk_fwd(q, k, v, S0, z0, None, True, 1e-6, 16, True, True)
    grads = torch.ones_like(o), torch.ones_like(S), torch.ones_like(z)
    for heads in (2, 1):  # all heads at once, one a pass
        args = (q, k, v, o, res, den, S0, z0, None, *grads, True, 1e-6, 16, heads)
        torch.library.opcheck(torch.ops.hadamard_attn.chunk_bwd.default, args, test_utils=utils)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunk_output_residual_restores_the_fp32_output(hla, dtype):
    """A 16-bit causal forward that a backward follows keeps ``o``'s rounding residual (``store_output``): ``o``
    plus it is the fp32 output (the backward's ``w = -sum(g * o)`` needs it: with the rounded ``o`` a P = 3 query
    gradient was off by 4.9e-2 on the H100); without a backward there is none."""
    leaves = make(2, 45, 2, (4, 8), 16, 1, False)
    (q, k), v = [[x.detach().to(dtype) for x in f] for f in (leaves[:2], leaves[2:4])], leaves[4].detach().to(dtype)
    fwd = sys.modules["hadamard_attn.ops.triton.chunk"]._chunk_fwd
    o, *_, res = fwd(q, k, v, None, None, None, True, 1e-6, 16, True, False)
    ref, _ = naive_hadamard_attn(*[[x.double() for x in f] for f in (q, k)], v.double(), True, True, 1e-6)
    assert res.dtype == o.dtype and res.shape == o.shape
    restored = o.double() + res.double()
    assert rel(restored, ref) < 3e-5 and rel(restored, ref) < rel(o, ref) / 50, (rel(restored, ref), rel(o, ref))
    assert fwd(q, k, v, None, None, None, True, 1e-6, 16, False, False)[-1].numel() == 0


@pytest.mark.parametrize("widths", [(16,), (4, 8), (2, 8), (8, 2), (4, 2, 4)])
def test_chunk_query_gradient_cancels_in_bf16(hla, monkeypatch, widths):
    """bf16 as the GPU runs it (16-bit dots), causal queries against a long history (an initial state of 2^12
    tokens): the queries' ``w`` is recomputed in the gradient kernel from the same rounded ``g hs^T``, ``g V^T``,
    ``phi . hz`` and ``A`` as the terms it cancels against; the query gradients stay within 1.1e-2 of float64, 1.5e-2
    for P = 3 (the prep kernel's ``w``, from the rounded output: 1.3e-2 to 2.1e-2, 4.1e-2 for (4, 2, 4))."""
    sixteen_bit_dots(monkeypatch, sys.modules["hadamard_attn.ops.triton.chunk"])
    check_long_history_dq(hla, widths, causal=True, tol=1.5e-2 if len(widths) == 3 else 1.1e-2)


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


# --- the GPU's parameters under the interpreter: chunks of 64 tokens and each kernel's GPU autotune configs


@pytest.fixture
def gpu_chunk(hla, monkeypatch):
    """The GPU's chunks of 64 (the backward's 32 for wide factors), each chunk kernel limited to one of its GPU
    configs (``set(i)``, default the first, which ``benchmarks/triton_gpu.py`` checks), and, under the interpreter,
    every load, store and atomic checked to stay inside one kernel argument (the interpreter does not fault on
    out-of-bounds addresses)."""
    chunk = sys.modules["hadamard_attn.ops.triton.chunk"]
    monkeypatch.setattr(chunk, "default_chunk_size", lambda: 64)
    kernels = chunk.KERNELS
    saved = [(kern.configs, kern.cache) for kern in kernels]

    def set_configs(i=0):
        for kern in kernels:
            kern.configs, kern.cache = chunk.gpu_configs(kern, i), {}

    set_configs()
    if DEVICE == "cpu":
        _check_bounds(monkeypatch)
    yield set_configs
    for kern, (configs, _) in zip(kernels, saved):
        kern.configs, kern.cache = configs, {}


def _check_bounds(monkeypatch):
    interp = pytest.importorskip("triton.runtime.interpreter")
    np = pytest.importorskip("numpy")
    builder, executor = interp.InterpreterBuilder, interp.GridExecutor
    ranges = []
    init_args = executor._init_args_hst

    def init(self, args_dev, kwargs):
        ranges[:] = [
            (a.untyped_storage().data_ptr(), a.untyped_storage().data_ptr() + a.untyped_storage().nbytes())
            for a in (*args_dev, *kwargs.values())
            if isinstance(a, torch.Tensor)
        ]
        return init_args(self, args_dev, kwargs)

    def check(ptrs, mask, itemsize, what):
        # a mask can be an int32 tensor (a & of a bool mask and a scalar condition): as a filter, not indices
        p = ptrs.data if mask is None else ptrs.data[np.broadcast_to(mask.data.astype(bool), ptrs.data.shape)]
        if p.size:
            lo, hi = int(p.min()), int(p.max()) + itemsize
            assert any(s <= lo and hi <= e for s, e in ranges), f"out-of-bounds {what}: [{lo}, {hi})"

    load, store, rmw = builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw

    def masked_load(self, ptrs, mask, other, *args):
        check(ptrs, mask, np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize, "load")
        return load(self, ptrs, mask, other, *args)

    def masked_store(self, ptrs, value, mask, *args):
        check(ptrs, mask, value.data.dtype.itemsize, "store")
        return store(self, ptrs, value, mask, *args)

    def atomic_rmw(self, op, ptrs, value, mask, *args):
        check(ptrs, mask, value.data.dtype.itemsize, "atomic")
        return rmw(self, op, ptrs, value, mask, *args)

    monkeypatch.setattr(executor, "_init_args_hst", init)
    monkeypatch.setattr(builder, "create_masked_load", masked_load)
    monkeypatch.setattr(builder, "create_masked_store", masked_store)
    monkeypatch.setattr(builder, "create_atomic_rmw", atomic_rmw)


def test_bounds_checker_catches(hla, gpu_chunk):
    """The bounds check of ``gpu_chunk`` does fire on an out-of-bounds load (so a silent pass means something)."""
    if DEVICE != "cpu":
        pytest.skip("interpreter only")
    import triton
    import triton.language as tl

    @triton.jit
    def shifted_copy(x, y, n):
        o = tl.arange(0, 16)
        tl.store(y + o, tl.load(x + o + n))

    x, y = torch.zeros(16), torch.zeros(16)
    shifted_copy[(1,)](x, y, 0)
    with pytest.raises(Exception, match="out-of-bounds load"):  # the interpreter wraps the AssertionError
        shifted_copy[(1,)](x, y, 1)


@pytest.mark.parametrize(
    "small, memory, expected",
    [(2**30, 0, (64, 32, 3)), (0, 2**40, (64, 32, 3)), (0, 2 * 2 * 8 * 128 * 16 * 4 * 2, (64, 32, 2)),
     (0, 2 * 2 * 8 * 128 * 16 * 4, (64, 32, 1)), (0, 2 * 2 * 4 * 128 * 16 * 4, (64, 64, 1)), (0, 2**10, (64, 64, 1))],
)  # fmt: skip
def test_chunk_hadamard_attn_triton_backward_plan(hla, monkeypatch, small, memory, expected):
    """In chunks of 64 (the GPU's), the backward of wide factors takes chunks of 32 for all heads at once
    (``backward_plan``) where its per-chunk states are under ``SMALL_STATES`` or take at most half the free memory;
    else as many heads a pass as fit at 32, else at 64. Here T = 250 (8 chunks of 32, 4 of 64), H = 3, M = 128,
    Dv = 16, fp32: one head's two state tensors take 2 x 8 x 128 x 16 x 4 bytes at 32."""
    chunk = sys.modules["hadamard_attn.ops.triton.chunk"]
    monkeypatch.setattr(chunk, "default_chunk_size", lambda: 64)
    monkeypatch.setattr(chunk, "SMALL_STATES", small)
    monkeypatch.setattr(chunk, "_free_memory", lambda device: memory)
    plans = []

    class Planned(Exception):
        pass

    def planned(*args):  # the plan only: no backward runs
        plans.append(args[-2:])
        raise Planned

    monkeypatch.setattr(chunk, "_chunk_bwd", planned)
    leaves = make(1, 250, 3, (32, 4), 16, 1, False)
    o, _ = chunk.chunk_hadamard_attn_triton(tuple(leaves[:2]), tuple(leaves[2:4]), leaves[4])
    with pytest.raises(Planned):
        o.sum().backward()
    assert plans == [expected[1:]]
    v = leaves[4]
    # other widths of M = 128: narrow factors keep 64 (their states at 64 fit), wide or P = 3 as above
    rule = [chunk.backward_plan(64, w, v, None)[0] for w in ((16, 8), (4, 32), (2, 4, 16))]
    assert rule == [64, expected[1], expected[1]]
    assert chunk.backward_plan(16, (64, 64), v, None)[0] == 16  # the interpreter's chunks: no change


@pytest.mark.parametrize("cu", [None, [0, 5, 6, 40]])
def test_chunk_backward_in_head_groups(hla, monkeypatch, cu):
    """A backward in passes of two heads, the last pass one (``backward_plan`` where the per-chunk states of all
    three heads do not fit): forward and every gradient against float64, with an initial state, through the final
    state, dense (B = 2) and packed."""
    chunk = sys.modules["hadamard_attn.ops.triton.chunk"]
    monkeypatch.setattr(chunk, "backward_plan", lambda C, widths, v, cu_seqlens: (C, 2))
    passes = []  # the heads of each call that runs them all at once (the passes)
    bwd = chunk._chunk_bwd

    def counted(*args):
        if args[-1] >= args[2].shape[2]:
            passes.append(args[2].shape[2])
        return bwd(*args)

    monkeypatch.setattr(chunk, "_chunk_bwd", counted)
    check(hla, (4, 8), 16, 2 if cu is None else 1, 40, 3, True, True, cu_seqlens=cu, causal=True)
    assert passes == [2, 1]


@pytest.mark.parametrize("T, init", [(37, False), (0, True)])
def test_chunk_bwd_head_passes_equal_all_heads(hla, T, init):
    """The backward in passes of one head gives what all heads at once give, bit for bit: bf16 inputs (``o``'s
    rounding residual saved), no final-state gradient; T = 0 with an initial state (only ``dS0`` is written)."""
    chunk = sys.modules["hadamard_attn.ops.triton.chunk"]
    leaves = [x.detach() for x in make(2, T, 3, (4, 8), 16, 2, init)]
    q, k = [x.bfloat16() for x in leaves[:2]], [x.bfloat16() for x in leaves[2:4]]
    v = leaves[4].bfloat16()
    S0, z0 = leaves[5:] if init else (None, None)
    o, S, z, den, res = chunk._chunk_fwd(q, k, v, S0, z0, None, True, 1e-6, 16, True, True)
    assert res.numel() == o.numel()
    do = torch.randn_like(o)
    dS = torch.randn_like(S) if init else None
    dz = torch.randn_like(z) if init else None
    whole, *passes = (
        chunk._chunk_bwd(q, k, v, o, res, den, S0, z0, None, do, dS, dz, True, 1e-6, 16, heads) for heads in (3, 2, 1)
    )
    flat = [[*dq, *dk, dv, dS0, dz0] for dq, dk, dv, dS0, dz0 in (whole, *passes)]
    for grads in flat[1:]:
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(flat[0], grads))
    assert all(not g.isnan().any() for g in flat[0])
    with pytest.raises(ValueError, match="heads: expected at least 1"):
        chunk._chunk_bwd(q, k, v, o, res, den, S0, z0, None, do, dS, dz, True, 1e-6, 16, 0)


def test_backward_plan_asks_the_device_only_when_needed(hla, monkeypatch):
    """The backward is planned when it runs (a forward, even with gradients on, does not ask the device for its
    memory); under torch.compile's tracing the plan never asks and runs large states for all heads at the forward's
    chunk size, as before."""
    chunk = sys.modules["hadamard_attn.ops.triton.chunk"]

    def asked(*args):
        raise AssertionError("asked")

    monkeypatch.setattr(chunk, "default_chunk_size", lambda: 64)
    leaves = make(1, 20, 3, (32, 4), 16, 1, False)
    with monkeypatch.context() as m:
        m.setattr(chunk, "backward_plan", asked)
        chunk.chunk_hadamard_attn_triton(tuple(leaves[:2]), tuple(leaves[2:4]), leaves[4])
    monkeypatch.setattr(chunk, "SMALL_STATES", 0)
    monkeypatch.setattr(chunk, "_free_memory", asked)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert chunk.backward_plan(64, (32, 4), leaves[4], None) == (64, 3)


def misaligned(x: torch.Tensor) -> torch.Tensor:
    """A leaf with ``x``'s values one element past a 16-byte boundary (another specialisation of every kernel)."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    return buf[1:].view(x.shape).copy_(x.detach()).requires_grad_(x.requires_grad)


@pytest.mark.skipif(DEVICE != "cuda", reason="launch keys take effect for compiled kernels only (not the interpreter)")
@pytest.mark.parametrize("causal", [True, False])
def test_launch_keys_match_the_binders_launches(hla, monkeypatch, causal):
    """On a GPU: calls launched by their keys give what launches through Triton's binder give, forward and every
    gradient, with an initial state, through the final state: bit for bit where the kernels are deterministic
    (causal), within fp32 rounding where the non-causal state build adds its token splits atomically. The calls
    alternate aligned inputs and misaligned copies of the same shapes, which a key must keep apart."""
    aligned = make(2, 300, 3, (16, 8), 64, 2, True)
    inputs = {"aligned": aligned, "misaligned": [misaligned(x) for x in aligned]}
    assert all(x.data_ptr() % 16 for x in inputs["misaligned"])

    def run(leaves):
        q, k, v, st = tuple(leaves[:2]), tuple(leaves[2:4]), leaves[4], tuple(leaves[5:])
        o, (S, z) = hla.triton_hadamard_attn(q, k, v, causal, True, 1e-6, st, True, None)
        return [o, S, z, *torch.autograd.grad(o.sum() + S.sum() + z.sum(), leaves)]

    order = ["aligned", "aligned", "misaligned", "misaligned", "aligned", "misaligned"]
    keyed = [(name, run(inputs[name])) for name in order]  # each input's first call records its keys
    for name in ("chunk", "parallel", "step"):
        module = sys.modules[f"hadamard_attn.ops.triton.{name}"]
        launch = module.launch
        monkeypatch.setattr(module, "launch", lambda *a, key=None, launch=launch, **kw: launch(*a, **kw))
    binder = {name: run(x) for name, x in inputs.items()}
    same = torch.equal if causal else (lambda a, b: rel(a, b) < 1e-6)
    for name, out in keyed:
        assert all(same(a, b) for a, b in zip(out, binder[name])), name


def test_chunk64_narrow_factor(hla, gpu_chunk):
    # the GPU's NaN case, smaller: widths (64, 4) (factor 2 padded to 16 in the similarities, factor blocks of 4
    # in the Khatri-Rao tiles), Dv = 128 in two Dv tiles, T = 2 chunks exactly, normalize, no initial state
    check(hla, (64, 4), 128, 1, 128, 2, True, False, causal=True)


def test_chunk64_varlen_ragged(hla, gpu_chunk):
    # the GPU's illegal-memory-access case, smaller: (16, 16), Dv = 128, normalize=False, two packed sequences
    # of 2 and 3 chunks whose last chunks are short (the rows beyond each sequence's end are masked)
    check(hla, (16, 16), 128, 1, 200, 2, False, False, cu_seqlens=[0, 70, 200], causal=True)


def test_chunk64_left_padding_final_state(hla, gpu_chunk):
    # the GPU's wrong-final-state case (a transformers prefill), smaller: B = 2, T = 4 chunks exactly, row 1
    # left-padded over a whole chunk and part of the next (zero keys and values), the final state and gradients
    real = torch.ones(2, 256, dtype=torch.bool)
    real[1, :100] = False
    check(hla, (16, 16), 64, 2, 256, 2, True, False, real=real, causal=True)


def test_segment_count(hla, monkeypatch):
    # on an H100 (132 SMs: walks of fewer than 264 programs are segmented), Dv = 128, segments of 64 chunks
    chunk = sys.modules["hadamard_attn.ops.triton.chunk"]
    monkeypatch.setattr(chunk, "_walk_programs_wanted", lambda device: 264)
    cpu = torch.device("cpu")

    def count(M, chunks=2048, H=12, B=1, T=131072, cu=None):
        return chunk.segment_count(chunk.sequences(cu, B, T, cpu), chunks, M, 128, H, cpu)

    assert count(256) == 32  # (16, 16), H = 12: 96 programs, 2048 chunks
    assert count(1024) == 1  # (32, 32): 384
    assert count(256, H=48) == 1  # 384
    assert count(256, B=2, chunks=64) == 1  # 64 chunks: whole
    assert count(256, B=2, chunks=65) == 2
    assert count(256, B=3, chunks=65) == 1  # 288 programs
    # packed: 2 sequences (192 programs), the longest of 1,563 chunks
    assert count(256, chunks=1563, cu=torch.tensor([0, 100000, 131072], dtype=torch.int32)) == 25


def test_launch_key(hla):
    """``_launch_key`` has what sets a dense batch's launches beyond the shapes: the segments, the pass, its flags
    (options that set keyword arguments), the inputs' dtype and 16-byte alignment; a packed batch has none (its
    grids follow ``cu_seqlens``)."""
    chunk = sys.modules["hadamard_attn.ops.triton.chunk"]
    cpu = torch.device("cpu")
    v = torch.empty(1, 64, 2, 16)
    seqs = chunk.sequences(None, 1, 64, cpu)
    whole = chunk.Segments(1, 0, 0, chunk.dummy(cpu))
    split = chunk.Segments(2, 2, 2, chunk.dummy(cpu))
    x = torch.empty(65)

    def key(segs=whole, pass_="fwd", *tensors, flags=(True, False)):
        return chunk._launch_key(pass_, seqs, segs, v, (16,), 16, flags, v, *tensors)

    assert key() == key() and key() != key(split) and key() != key(whole, "bwd") and key() != key(flags=(True, True))
    assert key(whole, "fwd", x[:64]) == key(whole, "fwd", x[:64].clone()) != key(whole, "fwd", x[1:])
    assert key(whole, "fwd", x[:64]) != key(whole, "fwd", x[:64].double()) != key(whole, "fwd", None)
    packed = chunk.sequences(torch.tensor([0, 30, 64], dtype=torch.int32), 1, 64, cpu)
    assert chunk._launch_key("fwd", packed, whole, v, (16,), 16, (True, False), v) is None


def test_segments_of_a_packed_batch(hla, segments):
    # sequences of 1, 16, 83 and 100 tokens in chunks of 16: 1, 1, 6 and 7 chunks; segments of 2 chunks: 1, 1, 3, 4
    chunk = sys.modules["hadamard_attn.ops.triton.chunk"]
    cpu = torch.device("cpu")
    seqs = chunk.sequences(torch.tensor([0, 1, 17, 100, 200], dtype=torch.int32), 1, 200, cpu)
    chunks = chunk._chunk_index(seqs, 16, cpu)
    assert (chunks.NT, chunks.most) == (15, 7)
    segs = chunk._segments(seqs, chunks, 32, 16, 2, cpu)
    assert (segs.NSEG, segs.SEG) == (4, 2) and segs.offsets.tolist() == [0, 1, 2, 5]
    assert segs.rows >= 9  # the rows the segments use


@pytest.mark.parametrize("widths, T, cu", [((16, 16), 300, None), ((4, 64), 200, None), ((16, 16), 330, [0, 70, 330])])
def test_chunk64_segmented(hla, gpu_chunk, segments, widths, T, cu):
    # the GPU's chunks in segments of two: (16, 16) 5 chunks of 64 (3 segments, the last chunk short); (4, 64) 4
    # chunks forward, 7 at the backward's 32 (4 segments); packed sequences of 2 and 5 chunks (1 and 3 segments);
    # an initial state, every access in bounds
    check(hla, widths, 64, 1, T, 2, True, True, cu_seqlens=cu, causal=True)
    assert segments.count("chunk_carry_kernel") == 2


def test_chunk64_segmented_gpu_carry_blocks(hla, gpu_chunk, segments, monkeypatch):
    # the carries in the GPU's blocks of 256 entries (the interpreter's are 1024): M = 512, so z spans two blocks;
    # 5 chunks of 64 in 3 segments, an initial state
    monkeypatch.setattr(sys.modules["hadamard_attn.ops.triton.chunk"], "interpreting", lambda: False)
    check(hla, (16, 32), 32, 1, 300, 1, True, True, causal=True)
    assert segments.count("chunk_carry_kernel") == 2


@pytest.mark.parametrize("config", [0, 1, 2, 3])
def test_chunk64_every_config(hla, gpu_chunk, config):
    # each of the GPU's autotune configs of the three kernels: B = 2 with an initial state, T = 2 chunks exactly
    gpu_chunk(config)
    check(hla, (4, 8), 32, 2, 128, 2, True, True, causal=True)


@pytest.fixture
def gpu_dtypes(hla, monkeypatch):
    """The GPU's 16-bit paths under the interpreter (``sixteen_bit_dots``; bf16 states for bf16 inputs)."""
    sixteen_bit_dots(monkeypatch, sys.modules["hadamard_attn.ops.triton.chunk"])


@pytest.mark.parametrize("segment", [64, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunk64_half_gpu_dtypes(hla, gpu_chunk, gpu_dtypes, segments, monkeypatch, dtype, segment):
    """The (64, 4) GPU case in 16 bits as the GPU runs it (16-bit dots, bf16 states): finite, close to float64;
    whole walks, and segments of one chunk (2 forward, 4 in the backward's chunks of 32: bf16 states plus fp32
    carries)."""
    monkeypatch.setattr(sys.modules["hadamard_attn.ops.triton.chunk"], "segment_chunks", lambda: segment)
    P, real = 2, torch.ones(1, 128, dtype=torch.bool)
    real[0, :40] = False  # zero keys and values: all-zero rows and columns in the intra-chunk blocks
    leaves = make(1, 128, 2, (64, 4), 128, 1, False, dtype=dtype, real=real)
    ref = [x.detach().double().requires_grad_(True) for x in leaves]

    def run(fn, t):
        return fn(tuple(t[:P]), tuple(t[P : 2 * P]), t[2 * P], True, True, 1e-6, None, True, None)

    o, (S, z) = run(hla.triton_hadamard_attn, leaves)
    o_ref, (S_ref, z_ref) = run(naive_hadamard_attn, ref)
    g = torch.Generator().manual_seed(1)
    do, dS, dz = (torch.randn(t.shape, generator=g).to(DEVICE) for t in (o, S, z))
    grads = torch.autograd.grad((o.float() * do).sum() + (S * dS).sum() + (z * dz).sum(), leaves)
    grads_ref = torch.autograd.grad(
        (o_ref * do.double()).sum() + (S_ref * dS.double()).sum() + (z_ref * dz.double()).sum(), ref
    )
    names = ["o", "S", "z", "dq0", "dq1", "dk0", "dk1", "dv"]
    for name, a, b in zip(names, (o, S, z, *grads), (o_ref, S_ref, z_ref, *grads_ref)):
        assert a.isfinite().all(), f"{name} not finite"
        assert rel(a, b) < 3e-2, f"{name}: {rel(a, b):.2e}"
    assert segments.count("chunk_carry_kernel") == (2 if segment == 1 else 0)


# --- Hopper: no wgmma with a register operand where ptxas < 13.3 would mis-schedule it (triton-lang/triton#9433)


def test_register_wgmma_hazard_needs_hopper_and_an_old_ptxas(monkeypatch):
    utils = sys.modules["hadamard_attn.ops.triton.utils"]
    cuda = torch.device("cuda")
    assert not utils.register_wgmma_hazard(torch.device("cpu"))
    monkeypatch.setattr(utils, "interpreting", lambda: False)
    for capability, ptxas, hazard in (
        ((9, 0), (12, 8), True),  # H100 with Triton 3.6's own ptxas
        ((9, 0), (13, 2), True),
        ((9, 0), (13, 3), False),
        ((9, 0), (13, 5), False),
        ((8, 0), (12, 8), False),  # A100: no wgmma
        ((10, 0), (12, 8), False),  # Blackwell: tcgen05
    ):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        monkeypatch.setattr(utils, "ptxas_version", lambda p=ptxas: p)
        assert utils.register_wgmma_hazard(cuda) is hazard, (capability, ptxas)


def test_ptxas_version_is_tritons():
    utils = sys.modules["hadamard_attn.ops.triton.utils"]
    assert utils.ptxas_version() >= (12, 0)


def test_safe_configs_keep_two_warps_only_under_the_hazard(monkeypatch):
    utils = sys.modules["hadamard_attn.ops.triton.utils"]
    chunk = sys.modules["hadamard_attn.ops.triton.chunk"]
    table = chunk._with_two_warps(chunk.BWD_CONFIGS)
    assert table == chunk.BWD_CONFIGS + tuple((c[0], 2, c[2]) for c in chunk.BWD_CONFIGS)
    configs = [triton.Config({"BM": c[0]}, num_warps=c[1], num_stages=c[2]) for c in table]
    named_args = {"x1": torch.empty(1), "T_SEQ": 5}
    for hazard, warps in ((True, {2}), (False, {c[1] for c in chunk.BWD_CONFIGS})):
        monkeypatch.setattr(utils, "register_wgmma_hazard", lambda d, h=hazard: h)
        monkeypatch.setattr(chunk, "register_wgmma_hazard", lambda d, h=hazard: h)
        kept = utils.safe_configs(configs, named_args)
        assert len(kept) == len(chunk.BWD_CONFIGS) and {c.num_warps for c in kept} == warps
        (first,) = chunk.gpu_configs(chunk.chunk_bwd_kernel, 0, torch.device("cpu"))
        assert (first.num_warps == 2) is hazard  # what benchmarks/triton_gpu.py checks on such a device


@pytest.mark.parametrize("warps, wgmma", [(2, False), (4, True)])
def test_two_warp_configs_compile_without_wgmma_for_hopper(warps, wgmma):
    """Compiled for sm_90 (no GPU needed): the num_warps = 2 form of every chunk kernel has no wgmma at all; the
    4-warp form (the control) has wgmma ops reading a register operand, those ptxas < 13.3 mis-schedules."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    script = Path(__file__).with_name("compile_sm90.py")
    out = subprocess.run([sys.executable, str(script), str(warps)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = json.loads(out.stdout.splitlines()[-1])
    with_dots = ("chunk_state_kernel", "chunk_state_bwd_kernel", "chunk_output_kernel", "chunk_bwd_kernel")
    assert {*with_dots, "chunk_carry_kernel"} <= set(counts), counts
    if wgmma:
        assert all(counts[name][0] > 0 for name in with_dots), counts
    else:
        assert all(register == shared == 0 for register, shared in counts.values()), counts
