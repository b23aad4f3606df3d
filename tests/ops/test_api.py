"""Bad input to ``hadamard_attn`` / ``hadamard_attn_step`` raises an error that names the argument."""

from __future__ import annotations

import pytest
import torch

from hadamard_attn import hadamard_attn, hadamard_attn_step

B, T, H, R, DV = 2, 5, 3, 4, 6


def good():
    q = [torch.rand(B, T, H, R), torch.rand(B, T, H, 2)]
    k = [torch.rand(B, T, H, R), torch.rand(B, T, H, 2)]
    return q, k, torch.randn(B, T, H, DV)


def state(N=B, M=R * 2, dtype=torch.float32):
    return torch.zeros(N, H, M, DV, dtype=dtype), torch.zeros(N, H, M, dtype=dtype)


def test_good_input_runs():
    q, k, v = good()
    o, st = hadamard_attn(q, k, v, initial_state=state(), output_final_state=True)
    assert o.shape == v.shape and st[0].shape == (B, H, 8, DV) and st[1].shape == (B, H, 8)
    o5, _ = hadamard_attn(torch.stack(q[:1] * 2, 3), torch.stack(k[:1] * 2, 3), v)  # the [B, T, H, P, R] form
    o_list, _ = hadamard_attn(q[:1] * 2, k[:1] * 2, v)
    torch.testing.assert_close(o5, o_list)


def swap(seq, i, x):
    out = list(seq)
    out[i] = x
    return out


CASES = {
    "q batch": (lambda q, k, v: (swap(q, 0, torch.rand(1, T, H, R)), k, v), {}, ValueError, r"q\[0\]: leading dims"),
    "k length": (lambda q, k, v: (q, swap(k, 1, torch.rand(B, T + 1, H, 2)), v), {}, ValueError, r"k\[1\]: leading"),
    "k heads": (lambda q, k, v: (q, swap(k, 0, torch.rand(B, T, H + 1, R)), v), {}, ValueError, r"k\[0\]: leading"),
    "P mismatch": (lambda q, k, v: (q, k[:1], v), {}, ValueError, "same number of factors P"),
    "R mismatch": (lambda q, k, v: (q, swap(k, 1, torch.rand(B, T, H, 3)), v), {}, ValueError, r"q\[1\] and k\[1\]"),
    "q dtype": (lambda q, k, v: (swap(q, 0, q[0].double()), k, v), {}, TypeError, r"q\[0\]: dtype"),
    "v dtype": (lambda q, k, v: (q, k, v.to(torch.int32)), {}, TypeError, "v: dtype"),
    "device": (lambda q, k, v: (q, swap(k, 0, k[0].to("meta")), v), {}, ValueError, r"k\[0\]: device"),
    "q rank": (lambda q, k, v: (swap(q, 0, q[0][0]), k, v), {}, ValueError, r"q\[0\]: expected rank 4"),
    "q 5d rank": (lambda q, k, v: (torch.rand(B, T, H, R), k, v), {}, ValueError, "q: expected a tensor of rank 5"),
    "v rank": (lambda q, k, v: (q, k, v[0]), {}, ValueError, "v: expected rank 4"),
    "P = 0": (lambda q, k, v: ([], k, v), {}, ValueError, "q: the number of factors P must be >= 1"),
    "P = 0 (5d)": (lambda q, k, v: (torch.rand(B, T, H, 0, R), k, v), {}, ValueError, "q: the number of factors"),
    "R = 0": (
        lambda q, k, v: (swap(q, 1, torch.rand(B, T, H, 0)), swap(k, 1, torch.rand(B, T, H, 0)), v),
        {},
        ValueError,
        r"q\[1\]: factor width R_f must be >= 1",
    ),
    "q type": (lambda q, k, v: ("q", k, v), {}, TypeError, "q: expected a tensor or a sequence"),
    "T = 0": (
        lambda q, k, v: ([x[:, :0] for x in q], [x[:, :0] for x in k], v[:, :0]),
        {},
        ValueError,
        "T must be >= 1",
    ),
    "eps < 0": (lambda q, k, v: (q, k, v), {"eps": -1e-6}, ValueError, "eps: must be a finite number >= 0"),
    "eps nan": (lambda q, k, v: (q, k, v), {"eps": float("nan")}, ValueError, "eps"),
    "eps bool": (lambda q, k, v: (q, k, v), {"eps": True}, ValueError, "eps"),
    "causal str": (lambda q, k, v: (q, k, v), {"causal": "no"}, TypeError, "causal: expected a bool"),
    "normalize int": (lambda q, k, v: (q, k, v), {"normalize": 0}, TypeError, "normalize: expected a bool"),
    "final state str": (
        lambda q, k, v: (q, k, v),
        {"output_final_state": "yes"},
        TypeError,
        "output_final_state: expected a bool",
    ),
    "backend": (lambda q, k, v: (q, k, v), {"backend": "cuda"}, ValueError, "backend: must be one of"),
    "parallel causal": (lambda q, k, v: (q, k, v), {"backend": "parallel", "causal": True}, ValueError, "non-causal"),
    "chunk non-causal": (lambda q, k, v: (q, k, v), {"backend": "chunk"}, ValueError, "is a causal path"),
    "triton on cpu": (lambda q, k, v: (q, k, v), {"backend": "triton"}, ValueError, "backend='triton'"),
    "state shape": (lambda q, k, v: (q, k, v), {"initial_state": state(M=7)}, ValueError, r"initial_state\[0\] \(S\)"),
    "state N": (lambda q, k, v: (q, k, v), {"initial_state": state(N=1)}, ValueError, r"expected shape \(2, 3, 8, 6\)"),
    "state dtype": (
        lambda q, k, v: (q, k, v),
        {"initial_state": state(dtype=torch.bfloat16)},
        TypeError,
        "states are torch.float32",
    ),
    "state z": (
        lambda q, k, v: (q, k, v),
        {"initial_state": (state()[0], torch.zeros(B, H, 9))},
        ValueError,
        r"initial_state\[1\] \(z\)",
    ),
    "state type": (lambda q, k, v: (q, k, v), {"initial_state": state()[0]}, TypeError, "initial_state: expected a"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hadamard_attn_errors(case, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the Triton backend takes CPU tensors only under it
    make, kwargs, exc, match = CASES[case]
    with pytest.raises(exc, match=match):
        hadamard_attn(*make(*good()), **kwargs)


def packed():
    q, k, v = good()
    return [x[:1] for x in q], [x[:1] for x in k], v[:1]


@pytest.mark.parametrize(
    "cu,exc,match",
    [
        (torch.tensor([1, 3, 5]), ValueError, "must start at 0"),
        (torch.tensor([0, 3, 3, 5]), ValueError, "strictly increasing"),
        (torch.tensor([0, 4, 2, 5]), ValueError, "strictly increasing"),
        (torch.tensor([0, 3, 4]), ValueError, "must end at T = 5"),
        (torch.tensor([0, 3, 6]), ValueError, "must end at T = 5"),
        (torch.tensor([0.0, 5.0]), TypeError, "cu_seqlens: dtype must be int32 or int64"),
        (torch.tensor([[0, 5]]), ValueError, "cu_seqlens: expected a 1-D"),
        (torch.tensor([0]), ValueError, "at least two offsets"),
    ],
)
def test_cu_seqlens_errors(cu, exc, match):
    with pytest.raises(exc, match=match):
        hadamard_attn(*packed(), cu_seqlens=cu)


def test_cu_seqlens_needs_batch_one():
    with pytest.raises(ValueError, match="packed into batch size 1, got B = 2"):
        hadamard_attn(*good(), cu_seqlens=torch.tensor([0, 5]))


def test_cu_seqlens_state_is_per_sequence():
    with pytest.raises(ValueError, match=r"expected shape \(2, 3, 8, 6\)"):
        hadamard_attn(*packed(), cu_seqlens=torch.tensor([0, 2, 5]), initial_state=state(N=1))


def test_step_errors():
    q = [torch.rand(B, H, R)]
    k = [torch.rand(B, H, R)]
    v = torch.randn(B, H, DV)
    with pytest.raises(ValueError, match="v: expected rank 3"):
        hadamard_attn_step(q, k, v[None])
    with pytest.raises(ValueError, match=r"k\[0\]: leading dims"):
        hadamard_attn_step(q, [torch.rand(B, H + 1, R)], v)
    with pytest.raises(ValueError, match=r"state\[0\] \(S\): expected shape"):
        hadamard_attn_step(q, k, v, state(M=R + 1))
    with pytest.raises(ValueError, match="eps"):
        hadamard_attn_step(q, k, v, eps=-1.0)
