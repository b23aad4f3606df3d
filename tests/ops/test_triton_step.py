"""``hadamard_attn_step(..., backend="triton")``: the decode-step kernel against the float64 quadratic reference.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by conftest).
Every output it writes is poisoned with NaN first.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

pytest.importorskip("triton")

from triton_checks import DEVICE, rel  # noqa: E402

from hadamard_attn import hadamard_attn, hadamard_attn_step  # noqa: E402
from hadamard_attn.testing import random_inputs, random_state  # noqa: E402


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    import hadamard_attn.ops.triton  # noqa: F401

    def nan(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(sys.modules["hadamard_attn.ops.triton.step"], "empty", nan)


@pytest.mark.parametrize(
    "widths, Dv, B, H",
    [
        ((16,), 32, 2, 2),  # P = 1
        ((4, 4), 16, 1, 3),  # M = 16
        ((2, 4), 32, 2, 1),  # M = 8 < 16: factor 1 padded in the tile
        ((64, 4), 32, 1, 2),  # asymmetric, M = 256: several M tiles
        ((8, 2, 4), 64, 2, 2),  # P = 3, Dv over several tiles of the interpreter's BV
    ],
)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("from_state", [True, False])
def test_step_triton(widths, Dv, B, H, normalize, from_state):
    """Steps from a random state (or none) equal the causal float64 output, token for token, and the final state."""
    T = 5
    g = torch.Generator().manual_seed(sum(widths) + Dv)
    q, k, v = random_inputs(B, T, H, widths, Dv, dtype=torch.float32, generator=g)
    q, k, v = [x.detach().to(DEVICE) for x in q], [x.detach().to(DEVICE) for x in k], v.detach().to(DEVICE)
    init = None
    if from_state:
        init = tuple(x.detach().float().to(DEVICE) for x in random_state(B, H, math.prod(widths), Dv, generator=g))
    ref, ref_state = hadamard_attn(
        [x.double() for x in q],
        [x.double() for x in k],
        v.double(),
        causal=True,
        normalize=normalize,
        initial_state=None if init is None else tuple(x.double() for x in init),
        output_final_state=True,
        backend="naive",
    )
    state = init
    for t in range(T):
        before = None if state is None else tuple(x.clone() for x in state)
        o, new = hadamard_attn_step(
            [x[:, t] for x in q], [x[:, t] for x in k], v[:, t], state, normalize=normalize, backend="triton"
        )
        assert o.dtype == v.dtype and new[0].dtype == new[1].dtype == torch.float32
        assert rel(o, ref[:, t]) < 1e-5, f"o[{t}]: {rel(o, ref[:, t]):.2e}"
        if state is not None:  # a new state; the old one is left as it was
            assert torch.equal(state[0], before[0]) and torch.equal(state[1], before[1])
        state = new
    assert rel(state[0], ref_state[0]) < 1e-5 and rel(state[1], ref_state[1]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_step_triton_half(dtype):
    """16-bit inputs: fp32 state, output in the input dtype, within 1e-2 of float64."""
    g = torch.Generator().manual_seed(3)
    q, k, v = random_inputs(2, 1, 2, (4, 8), 32, dtype=torch.float32, generator=g)
    S, z = (x.detach().float().to(DEVICE) for x in random_state(2, 2, 32, 32, generator=g))
    q, k, v = (
        [x.detach().to(DEVICE, dtype) for x in q],
        [x.detach().to(DEVICE, dtype) for x in k],
        v.detach().to(DEVICE, dtype),
    )
    o, (S2, z2) = hadamard_attn_step([x[:, 0] for x in q], [x[:, 0] for x in k], v[:, 0], (S, z), backend="triton")
    ref, _ = hadamard_attn_step(
        [x[:, 0].double() for x in q], [x[:, 0].double() for x in k], v[:, 0].double(), (S.double(), z.double())
    )
    assert o.dtype == dtype and S2.dtype == z2.dtype == torch.float32
    assert rel(o, ref) < 1e-2


def test_step_backends():
    """``triton`` refuses inputs that need gradients (the kernel has no backward) and unknown backends are refused
    by name; on CPU ``auto`` is the differentiable torch step."""
    g = torch.Generator().manual_seed(4)
    q, k, v = random_inputs(1, 1, 2, (4, 4), 16, dtype=torch.float32, generator=g)
    q, k, v = [x[:, 0] for x in q], [x[:, 0] for x in k], v[:, 0]
    o, _ = hadamard_attn_step(q, k, v)
    (dv,) = torch.autograd.grad(o.sum(), v)
    assert torch.isfinite(dv).all()
    with pytest.raises(ValueError, match="backend='triton': the Triton step has no backward"):
        hadamard_attn_step(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="backend: expected one of"):
        hadamard_attn_step(q, k, v, backend="chunk")
    with torch.no_grad():
        o2, _ = hadamard_attn_step(q, k, v, backend="triton")
    assert rel(o2, o.detach()) < 1e-5


def test_step_path_choice():
    """How ``auto`` and ``triton`` resolve, for every combination of device, gradients and kernel support."""
    from hadamard_attn.ops.api import _step_path

    def takes():
        return None

    def refuses():
        return "widths"

    for cuda in (False, True):
        for needs_grad in (False, True):
            for reason in (takes, refuses):
                fast = cuda and not needs_grad and reason is takes
                assert _step_path("auto", cuda, needs_grad, reason) == ("triton" if fast else "recurrent")
                assert _step_path("recurrent", cuda, needs_grad, reason) == "recurrent"
                if needs_grad or reason is refuses:
                    with pytest.raises(ValueError, match="backend='triton': (the Triton step has no backward|widths)"):
                        _step_path("triton", cuda, needs_grad, reason)
                else:
                    assert _step_path("triton", cuda, needs_grad, reason) == "triton"


def test_step_custom_op_and_compile():
    """The kernel runs as the custom op ``hadamard_attn::step`` (schema and fake implementation checked), and a
    compiled decode loop over ``hadamard_attn_step(backend="triton")`` traces through it without a graph break."""
    g = torch.Generator().manual_seed(6)
    q, k, v = random_inputs(2, 3, 2, (4, 4), 16, dtype=torch.float32, generator=g)
    q, k, v = [x.detach().to(DEVICE) for x in q], [x.detach().to(DEVICE) for x in k], v.detach().to(DEVICE)
    S, z = (x.detach().float().to(DEVICE) for x in random_state(2, 2, 16, 16, generator=g))
    args = ([x[:, 0] for x in q], [x[:, 0] for x in k], v[:, 0], S, z, True, 1e-6)
    torch.library.opcheck(torch.ops.hadamard_attn.step.default, args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(
        torch.ops.hadamard_attn.step.default, (*args[:3], None, None, False, 1e-6), test_utils=("test_faketensor",)
    )

    def decode(q, k, v, S, z):
        state, outs = (S, z), []
        for t in range(v.shape[1]):
            o, state = hadamard_attn_step([x[:, t] for x in q], [x[:, t] for x in k], v[:, t], state, backend="triton")
            outs.append(o)
        return torch.stack(outs, 1), state

    with torch.no_grad():
        o, (S1, z1) = torch.compile(decode, fullgraph=True, backend="aot_eager")(q, k, v, S, z)
        o_ref, (S_ref, z_ref) = decode(q, k, v, S, z)
    assert rel(o, o_ref) < 1e-6 and rel(S1, S_ref) < 1e-6 and rel(z1, z_ref) < 1e-6
