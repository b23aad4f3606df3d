"""The Triton kernels against the float64 quadratic reference, forward and every gradient.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set before the
kernels are defined), on tiny shapes. Every output the kernels write is poisoned with NaN before each run.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

pytest.importorskip("triton")

INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    # the kernels are defined (decorated) in interpreter mode only if the variable is set at import time
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("hadamard_attn.ops.triton", "hadamard_attn.ops.triton.parallel", "hadamard_attn.ops.triton.utils"):
        sys.modules.pop(_name, None)
    hla_triton = importlib.import_module("hadamard_attn.ops.triton")
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved
else:
    hla_triton = importlib.import_module("hadamard_attn.ops.triton")

from hadamard_attn.ops import hadamard_attn  # noqa: E402
from hadamard_attn.ops.naive import naive_hadamard_attn  # noqa: E402

tp = importlib.import_module("hadamard_attn.ops.triton.parallel")
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


@pytest.fixture(autouse=True)
def triton_env(monkeypatch):
    """Interpreter on (CPU), and every kernel output allocated full of NaN."""
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tp, "empty", poisoned)


@pytest.mark.parametrize(
    "widths, Dv, B, T, H, normalize, init",
    [
        ((4, 8), 32, 2, 37, 2, True, True),  # several feature tiles and Dv tiles, two sequences
        ((8,), 16, 1, 1, 1, False, False),  # T = 1; P = 1 padded to 16 features
        ((4, 4, 2), 16, 1, 23, 2, True, False),  # P = 3, one tile
        ((16, 4), 32, 3, 5, 1, False, True),  # unequal widths, B = 3, shorter than a block
        ((2, 8, 4), 16, 1, 19, 2, True, True),  # P = 3, factor 2 in blocks, factor 1 one index per tile
        ((32,), 16, 2, 17, 1, True, False),  # P = 1 in blocks
        ((4, 64), 16, 1, 9, 1, True, False),  # a wide inner factor: tiles of one index of factor 1
        ((4, 4), 64, 1, 6, 1, True, True),  # Dv = 64: two Dv tiles of 32 (Dv = 16 tests a tile capped at Dv)
    ],
)
def test_parallel(widths, Dv, B, T, H, normalize, init):
    check(hla_triton, widths, Dv, B, T, H, normalize, init, causal=False)


@pytest.mark.parametrize("normalize, init", [(True, True), (False, False)])
def test_parallel_varlen(normalize, init):
    # sequences of 1, 8 and 21 tokens; the first two share a block of tokens
    check(hla_triton, (4, 8), 16, 1, 30, 2, normalize, init, cu_seqlens=[0, 1, 9, 30], causal=False)


@pytest.mark.parametrize("causal", [False, True])
def test_strided_cu_seqlens(causal):
    """A strided ``cu_seqlens`` (every other entry of a longer one) gives what its contiguous copy gives."""
    leaves = make(1, 30, 2, (4, 8), 16, 1, False)
    q, k, v = tuple(leaves[:2]), tuple(leaves[2:4]), leaves[4]
    cu = torch.tensor([0, 0, 9, 9, 30, 30], dtype=torch.int32, device=DEVICE)[::2]
    a, _ = hadamard_attn(q, k, v, causal=causal, cu_seqlens=cu, backend="triton")
    b, _ = hadamard_attn(q, k, v, causal=causal, cu_seqlens=cu.contiguous(), backend="triton")
    assert not cu.is_contiguous() and torch.equal(a, b)


@pytest.mark.parametrize("used", ["o", "S", "z", "Sz", "oz"])
def test_parallel_partial_outputs(used):
    check_partial(hla_triton, used, causal=False)


@pytest.mark.parametrize("B, T, cu_seqlens", [(2, 37, None), (1, 30, [0, 1, 9, 30])])
def test_parallel_eps_zero(B, T, cu_seqlens):
    # eps = 0 (allowed): rows past a sequence's end stay out of every gradient (no 0 / 0)
    check(hla_triton, (4, 8), 16, B, T, 2, True, False, cu_seqlens=cu_seqlens, causal=False, eps=0.0)


def test_parallel_varlen_p3():
    check(hla_triton, (2, 4, 2), 16, 1, 20, 1, True, True, cu_seqlens=[0, 13, 20], causal=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("widths", [(4, 4), (2, 4, 2)])
def test_parallel_half(dtype, widths):
    """16-bit inputs with a state far beyond fp16's range (fp16 reads it through a per-head power-of-two scale):
    the output and the gradients come back in the input dtype, the state in fp32."""
    leaves, n = make(2, 11, 2, widths, 16, 2, True), 2 * len(widths) + 1
    xs = [x.detach().to(dtype) for x in leaves[:n]]
    check_half(hla_triton, xs, [x.detach() * 1e6 for x in leaves[n:]], False, 1e6, 2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parallel_half_gpu_dtypes(monkeypatch, dtype):
    """16 bits as the GPU runs them (16-bit dots), one query without features (den = 0, so g = do / eps): every
    gradient finite and close to float64 but that query's own dq, which is beyond fp16's range (not compared)."""
    sixteen_bit_dots(monkeypatch, tp)
    P = 2
    leaves = [x.detach() for x in make(1, 24, 2, (4, 4), 16, 1, False)]
    leaves[0][0, 5, 1] = 0  # token 5, head 1: a zero factor, so phi = 0
    leaves = [x.to(dtype).requires_grad_(True) for x in leaves]
    ref = [x.detach().double().requires_grad_(True) for x in leaves]

    def run(fn, t):
        return fn(tuple(t[:P]), tuple(t[P : 2 * P]), t[2 * P], False, True, 1e-6, None, False, None)[0]

    o, o_ref = run(hla_triton.triton_hadamard_attn, leaves), run(naive_hadamard_attn, ref)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad((o.float() * do).sum(), leaves)
    grads_ref = torch.autograd.grad((o_ref * do.double()).sum(), ref)
    keep = torch.ones(1, 24, 2, 1, dtype=torch.bool, device=DEVICE)
    keep[0, 5, 1] = False
    assert rel(o, o_ref) < 1e-2
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        if i < P:
            a, b = torch.where(keep, a, 0), b * keep
        assert a.isfinite().all(), f"gradient {i} not finite"
        assert rel(a, b) < 2e-2, f"gradient {i}: {rel(a, b):.2e}"


@pytest.mark.parametrize("widths", [(16,), (4, 8), (4, 2, 4)])
def test_parallel_fp16_long_history(monkeypatch, widths):
    """fp16 as the GPU runs it (16-bit dots) after a long history (an initial state of about 4e5 tokens): ``g = do /
    (den + eps)`` is far below fp16's normal range unless the query pass scales it with the state's range scale;
    every gradient stays within 2e-2 of float64 (it was 5e-2 to 0.7 for such states)."""
    sixteen_bit_dots(monkeypatch, tp)
    P = len(widths)
    leaves = [x.detach() for x in make(1, 40, 2, widths, 16, 1, True)]
    leaves[-2], leaves[-1] = leaves[-2] * 4e5, (leaves[-1] + 1) * 4e5
    leaves = [(x.to(torch.float16) if i <= 2 * P else x).requires_grad_(True) for i, x in enumerate(leaves)]
    ref = [x.detach().double().requires_grad_(True) for x in leaves]

    def run(fn, t):
        return fn(tuple(t[:P]), tuple(t[P : 2 * P]), t[2 * P], False, True, 1e-6, tuple(t[-2:]), True, None)

    (o, (_, z)), (o_ref, (_, z_ref)) = run(hla_triton.triton_hadamard_attn, leaves), run(naive_hadamard_attn, ref)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    dz = torch.randn(z.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE) / 4e5
    grads = torch.autograd.grad((o.float() * do).sum() + (z * dz).sum(), leaves)
    grads_ref = torch.autograd.grad((o_ref * do.double()).sum() + (z_ref * dz.double()).sum(), ref)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert a.isfinite().all() and rel(a, b) < 2e-2, f"gradient {i}: {rel(a, b):.2e}"


def test_parallel_fp16_query_with_tiny_denominator(monkeypatch):
    """fp16 as the GPU runs it (16-bit dots), one query whose features are nearly orthogonal to ``z`` (signed
    features, den about 3e-3): its ``w`` is beyond fp16's range. The state gradient's ``w`` columns are clamped, so
    ``dv`` stays exact and ``dk`` finite (an inf high part and -inf low part made every ``dk`` and ``dv`` of the head
    NaN); that query's own ``dq`` is beyond fp16's range (inf, as in float64 it is 7e6)."""
    sixteen_bit_dots(monkeypatch, tp)
    g = torch.Generator().manual_seed(0)
    q, k, v = (f(1, 24, 1, 16, generator=g) for f in (torch.rand, torch.rand, torch.randn))
    z = k[0, :, 0].sum(0)  # [16]
    u = torch.zeros(16)
    u[0], u[1] = z[1], -z[0]
    q[0, 5, 0] = u / u.norm() * 0.5 + z / z.norm() ** 2 * 3e-3
    leaves = [x.to(DEVICE, torch.float16).requires_grad_(True) for x in (q, k, v)]
    ref = [x.detach().double().requires_grad_(True) for x in leaves]
    o, _ = hla_triton.triton_hadamard_attn((leaves[0],), (leaves[1],), leaves[2], False, True, 1e-6, None, False, None)
    o_ref, _ = naive_hadamard_attn((ref[0],), (ref[1],), ref[2], False, True, 1e-6, None, False, None)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _, dk, dv = torch.autograd.grad((o.float() * do).sum(), leaves)
    _, _, dv_ref = torch.autograd.grad((o_ref * do.double()).sum(), ref)
    assert dk.isfinite().all() and dv.isfinite().all()
    assert rel(dv, dv_ref) < 5e-3, rel(dv, dv_ref)


@pytest.mark.parametrize("widths", [(16,), (4, 8), (2, 8), (8, 2), (4, 2, 4)])
def test_parallel_query_gradient_cancels_in_bf16(monkeypatch, widths):
    """bf16 as the GPU runs it (16-bit dots), queries against a long history (an initial state of 2^12 tokens):
    ``dphi(Q) = g S^T + w z^T`` is a small difference of two large terms, so ``w`` must come from the same rounded
    ``g S^T`` and ``phi . z`` as the ``z^T`` part, which keeps ``z`` to about 16 bits (``den_factor_grads``, two
    bf16 parts). The query gradients stay within 1e-2 of float64 (5e-3 to 7e-3); (2, 8), (8, 2) and (4, 2, 4)
    fail with ``z`` in one bf16 part (up to 3.8e-2) or with the forward's denominator in ``w`` (up to 4.1e-2)."""
    sixteen_bit_dots(monkeypatch, tp)
    check_long_history_dq(hla_triton, widths, causal=False, tol=1e-2)


def test_launch_memoises_the_autotuners_choice(monkeypatch):
    """``launch`` runs the autotuner once per key and device, then launches its choice directly; new configs reset."""
    import triton
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"B": 16})], key=["N"])  # one config: no benchmarking on a CPU
    @triton.jit
    def fill(x, N, B: tl.constexpr):
        o = tl.program_id(0) * B + tl.arange(0, B)
        tl.store(x + o, o.to(tl.float32), mask=o < N)

    runs = []
    tuner_run = type(fill).run
    monkeypatch.setattr(type(fill), "run", lambda self, *a, **k: runs.append(1) or tuner_run(self, *a, **k))
    utils = sys.modules["hadamard_attn.ops.triton.utils"]
    for n in (40, 40, 40, 50, 50):
        x = torch.full((n,), float("nan"), device=DEVICE)
        utils.launch(fill, lambda meta, n=n: (triton.cdiv(n, meta["B"]),), x, N=n)
        assert torch.equal(x, torch.arange(n, dtype=torch.float32, device=DEVICE))
    assert len(runs) == 2  # one per key
    fill.configs = [triton.Config({"B": 32})]  # what tests do to pin a config
    x = torch.full((40,), float("nan"), device=DEVICE)
    utils.launch(fill, lambda meta: (triton.cdiv(40, meta["B"]),), x, N=40)
    assert len(runs) == 3 and torch.equal(x, torch.arange(40, dtype=torch.float32, device=DEVICE))


def test_launch_compiled_matches_triton():
    """Compiled for sm_90 (no GPU needed): ``launch_compiled`` launches the kernel Triton compiled for the same
    specialisation with Triton's grid and arguments, compiles anew for a misaligned tensor, an integer 1 or another
    num_warps, and leaves launches with a profiler's hook to Triton; a keyed launch seen before skips the binder
    (``tests/ops/launch_sm90.py``)."""
    import json
    import subprocess
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    script = Path(__file__).with_name("launch_sm90.py")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    checks = json.loads(out.stdout.splitlines()[-1])
    assert len(checks) == 12 and all(checks.values()), checks


def test_autotuning_keys_are_plain_values(monkeypatch):
    """Every autotuned kernel's ``key`` holds plain values: Triton's disk cache of autotuning results writes them as
    JSON once a key is tuned (a ``tl.dtype`` in a key raised at the first call of every key on the GPU, where the
    cache is on; the interpreter has none, so the values are checked here)."""
    import json

    from hadamard_attn import hadamard_attn_step

    utils = sys.modules["hadamard_attn.ops.triton.utils"]
    keys = {}

    def recording(kernel, grid, *args, **kwargs):
        if hasattr(kernel, "keys"):  # autotuned
            keys[kernel.base_fn.__name__] = [kwargs[k] for k in kernel.keys]
        return utils.launch(kernel, grid, *args, **kwargs)

    modules = [sys.modules[f"hadamard_attn.ops.triton.{m}"] for m in ("parallel", "chunk", "step")]
    for module in modules:
        monkeypatch.setattr(module, "launch", recording)
    for causal in (False, True):
        leaves = make(1, 5, 1, (4, 4), 16, 1, False)
        o, _ = hadamard_attn(leaves[:2], leaves[2:4], leaves[4], causal=causal, backend="triton")
        o.sum().backward()
    with torch.no_grad():
        hadamard_attn_step([x[:, 0] for x in leaves[:2]], [x[:, 0] for x in leaves[2:4]], leaves[4][:, 0], None,
                           backend="triton")  # fmt: skip
    autotuned = {k.base_fn.__name__ for m in modules for k in vars(m).values() if hasattr(k, "cache_results")}
    assert set(keys) == autotuned and len(autotuned) == 8
    for name, key in keys.items():
        try:
            json.dumps(key)
        except TypeError as e:
            pytest.fail(f"{name}: autotuning key {key} is not JSON: {e}")


def test_api_backend_triton():
    """``hadamard_attn(..., backend="triton")`` runs the kernels and agrees with the naive path."""
    leaves = make(1, 13, 2, (4, 4), 16, 1, False)
    q, k, v = leaves[:2], leaves[2:4], leaves[4]
    o, _ = hadamard_attn(q, k, v, backend="triton")
    o_ref, _ = hadamard_attn([x.double() for x in q], [x.double() for x in k], v.double(), backend="naive")
    assert rel(o, o_ref) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_api_backend_triton_strided_inputs(causal):
    """Factors given as one ``[B, T, H, P, R]`` tensor (strided views of it) and a transposed ``v``: the output and
    every gradient against float64 (the non-causal backward read the saved views as if contiguous)."""
    g = torch.Generator().manual_seed(3)
    q, k = (torch.rand(2, 11, 2, 2, 4, generator=g).to(DEVICE).requires_grad_(True) for _ in range(2))
    v = torch.randn(2, 2, 11, 16, generator=g).to(DEVICE).requires_grad_(True)
    do = torch.randn(2, 11, 2, 16, generator=g).to(DEVICE)
    outs = []
    for backend, dtype in (("triton", torch.float32), ("naive", torch.float64)):
        xs = [x.to(dtype) for x in (q, k, v)]
        o, _ = hadamard_attn(xs[0], xs[1], xs[2].transpose(1, 2), causal=causal, backend=backend)
        outs.append((o, *torch.autograd.grad(o, (q, k, v), do.to(dtype))))
    for name, a, b in zip(("o", "dq", "dk", "dv"), *outs):
        assert rel(a, b) < 1e-5, f"{name}: {rel(a, b):.2e}"


def _inputs(widths=(4, 4), Dv=16, dtype=torch.float32, device=DEVICE):
    q = tuple(torch.rand(1, 3, 1, r, dtype=dtype, device=device) for r in widths)
    return q, q, torch.randn(1, 3, 1, Dv, dtype=dtype, device=device)


@pytest.mark.parametrize(
    "widths, Dv, dtype, causal, match",
    [
        ((4, 4), 16, torch.float64, False, "float64"),
        ((2, 2, 2, 2), 16, torch.float32, False, "P <= 3"),
        ((3, 4), 16, torch.float32, False, "powers of two"),
        ((128,), 16, torch.float32, False, "powers of two up to 64"),
        ((64, 64, 2), 16, torch.float32, False, "M = R_1"),
        ((4, 4), 48, torch.float32, False, "Dv"),
        ((4, 4), 8, torch.float32, False, "Dv"),
    ],
)
def test_unsupported_reason(widths, Dv, dtype, causal, match):
    q, k, v = _inputs(widths, Dv, dtype)
    reason = hla_triton.unsupported_reason(q, k, v, causal)
    assert reason is not None and match in reason
    with pytest.raises(ValueError, match="backend='triton'"):
        hadamard_attn(q, k, v, causal=causal, backend="triton")


def test_unsupported_reason_device(monkeypatch):
    q, k, v = _inputs(device="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert hla_triton.unsupported_reason(q, k, v, False) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "CUDA" in hla_triton.unsupported_reason(q, k, v, False)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_hadamard_attn_asks_unsupported_reason_once(backend, monkeypatch):
    """``hadamard_attn`` asks ``unsupported_reason`` once a call (host time); a direct ``triton_hadamard_attn``
    call asks it itself."""
    q, k, v = _inputs()
    if backend == "auto" and not v.is_cuda:
        pytest.skip("backend='auto' takes the Triton kernels for CUDA tensors only")
    asked = []
    reason = hla_triton.unsupported_reason
    monkeypatch.setattr(hla_triton, "unsupported_reason", lambda *a: asked.append(1) or reason(*a))
    o, _ = hadamard_attn(q, k, v, backend=backend)
    assert len(asked) == 1 and torch.isfinite(o).all()
    hla_triton.triton_hadamard_attn(q, k, v)
    assert len(asked) == 2


class TinyHLA(torch.nn.Module):
    """A projection to two factors of non-negative features, HLA, an output projection."""

    def __init__(self, d=16, r=4):
        super().__init__()
        self.qk = torch.nn.Linear(d, 4 * r)
        self.v = torch.nn.Linear(d, d)
        self.out = torch.nn.Linear(d, d)
        self.r = r

    def forward(self, x):  # [B, T, d]
        B, T, _ = x.shape
        f = torch.nn.functional.elu(self.qk(x)).add(1).view(B, T, 1, 4, self.r)  # [B, T, H, 4, r]
        q, k = (f[..., 0, :], f[..., 1, :]), (f[..., 2, :], f[..., 3, :])
        o, _ = hla_triton.triton_hadamard_attn(q, k, self.v(x).view(B, T, 1, -1))
        return self.out(o.flatten(2))


def test_torch_compile_fullgraph():
    """The kernels run as custom ops: ``torch.compile(fullgraph=True)`` traces through, forward and backward."""
    torch.manual_seed(0)
    model = TinyHLA().to(DEVICE)
    x = torch.randn(2, 9, 16, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y, y_ref = compiled(x), model(x)
    assert rel(y, y_ref) < 1e-6
    g = torch.autograd.grad(y.square().sum(), list(model.parameters()))
    g_ref = torch.autograd.grad(y_ref.square().sum(), list(model.parameters()))
    for a, b in zip(g, g_ref):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_custom_op_registered(dtype):
    leaves = make(1, 5, 1, (4, 4), 16, 1, True)
    q, k, v, S0, z0 = [x.detach() for x in leaves[:2]], [x.detach() for x in leaves[2:4]], *leaves[4:]
    q, k, v = [x.to(dtype) for x in q], [x.to(dtype) for x in k], v.detach().to(dtype)
    utils = ("test_schema", "test_faketensor")
    fwd_args = (q, k, v, S0.detach(), z0.detach(), None, True, 1e-6)
    torch.library.opcheck(torch.ops.hadamard_attn.parallel_fwd.default, fwd_args, test_utils=utils)
    o, S, z, den = torch.ops.hadamard_attn.parallel_fwd(*fwd_args)
    for dS, dz in ((torch.ones_like(S), torch.ones_like(z)), (None, None)):  # None: an unused final state
        args = (q, k, v, den, S, z, torch.ones_like(o), dS, dz, None, True, 1e-6)
        torch.library.opcheck(torch.ops.hadamard_attn.parallel_bwd.default, args, test_utils=utils)


def test_unsupported_reason_int32(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    v = torch.zeros(1, 1, 1, 16).expand(1, 2**27, 1, 16)  # 2**31 elements, no memory
    q = (torch.zeros(1, 1, 1, 4).expand(1, 2**27, 1, 4),) * 2
    assert "int32" in hla_triton.unsupported_reason(q, q, v, False)


def test_fake_tensor_tracing_sees_the_custom_ops():
    """Under ``FakeTensorMode`` (as in ``make_fx`` and export) the Triton paths run their custom ops' fake
    implementations, not the kernels: shapes and dtypes come out right, forward and backward, causal or not."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hadamard_attn import hadamard_attn, hadamard_attn_step

    with FakeTensorMode():
        q = [torch.rand(2, 9, 3, 4, requires_grad=True) for _ in range(2)]
        k = [torch.rand(2, 9, 3, 4, requires_grad=True) for _ in range(2)]
        v = torch.randn(2, 9, 3, 16, requires_grad=True)
        for causal in (False, True):
            o, (S, z) = hadamard_attn(q, k, v, causal=causal, output_final_state=True, backend="triton")
            assert o.shape == v.shape and S.shape == (2, 3, 16, 16) and z.shape == (2, 3, 16)
            grads = torch.autograd.grad(o.sum(), [*q, *k, v])
            assert [g.shape for g in grads] == [x.shape for x in (*q, *k, v)]
        with torch.no_grad():
            o, (S, z) = hadamard_attn_step([x[:, 0] for x in q], [x[:, 0] for x in k], v[:, 0], backend="triton")
        assert o.shape == (2, 3, 16) and S.dtype == torch.float32
