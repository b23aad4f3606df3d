"""The HLA layer in float64: fast paths against the naive path (output and every gradient), decode, state, varlen,
rotary embedding and config errors."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from hadamard_attn import FEATURE_MAPS, HadamardAttention, HLAConfig, apply_rotary, hadamard_attn, layers
from hadamard_attn.feature_maps import FixedFeatureMap
from hadamard_attn.testing import assert_close

DIM, H, D = 16, 2, 8
TOL = 1e-10


def make_layer(seed: int = 0, **kwargs) -> HadamardAttention:
    """A float64 layer whose parameters are all perturbed from their init (norm weights away from 1, ...)."""
    torch.manual_seed(seed)
    layer = HadamardAttention(HLAConfig(**{"dim": DIM, "num_heads": H, **kwargs})).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def clone(layer: HadamardAttention, **changes) -> HadamardAttention:
    """The same weights under a changed config (e.g. another backend)."""
    other = HadamardAttention(replace(layer.config, **changes)).double()
    other.load_state_dict(layer.state_dict())
    return other


def rotary(T: int, B: int | None = None, base: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama-style ``(cos, sin)``, ``[T, D]``, or ``[B, T, D]`` with the positions of batch b shifted by b."""
    pos = torch.arange(T, dtype=torch.float64)
    if B is not None:
        pos = pos + torch.arange(B, dtype=torch.float64)[:, None]  # [B, T]
    inv_freq = base ** -(torch.arange(0, D, 2, dtype=torch.float64) / D)  # [D/2]
    angles = pos[..., None] * inv_freq  # [..., T, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [..., T, D]
    return angles.cos(), angles.sin()


def output_and_grads(layer: HadamardAttention, x: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    """The output and the gradients of a random linear loss w.r.t. x and every parameter."""
    x = x.detach().requires_grad_()
    out = layer(x, **kwargs)
    names, params = zip(*layer.named_parameters())
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * cot).sum(), (x, *params))
    return {"out": out, "dx": grads[0], **{f"d{n}": g for n, g in zip(names, grads[1:])}}


def fit_widths(feature_map: str, widths: tuple[int, ...]) -> tuple[int, ...]:
    """Fixed maps have one width: keep P, replace the widths."""
    cls = FEATURE_MAPS[feature_map]
    return tuple(cls.fixed_width(D) for _ in widths) if issubclass(cls, FixedFeatureMap) else widths


CASES = [  # widths, shared_factors, normalize, qk_norm
    ((6,), False, True, True),
    ((4, 2), False, True, False),
    ((4, 4), True, False, True),
    ((2, 4, 2), False, True, True),
    ((2, 2, 2), True, True, True),
]


@pytest.mark.parametrize("widths, shared, normalize, qk_norm", CASES)
@pytest.mark.parametrize("causal", [False, True], ids=["parallel", "chunk"])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_layer_vs_naive(feature_map, causal, widths, shared, normalize, qk_norm):
    widths = fit_widths(feature_map, widths)
    normalize = normalize and not (FEATURE_MAPS[feature_map].signed and len(widths) % 2)
    layer = make_layer(
        feature_map=feature_map,
        widths=widths,
        shared_factors=shared,
        causal=causal,
        normalize=normalize,
        qk_norm=qk_norm,
        bias=True,
        backend="chunk" if causal else "parallel",
    )
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    rope = rotary(9)
    ref = output_and_grads(clone(layer, backend="naive"), x, rotary_emb=rope)
    got = output_and_grads(layer, x, rotary_emb=rope)
    assert ref.keys() == got.keys()
    assert len(got) == 2 + len(list(layer.parameters()))
    for name in ref:
        assert_close(name, ref[name], got[name], TOL)


@pytest.mark.parametrize("shared", [False, True])
def test_matches_definition(shared):
    """A = S_1 * S_2 from the layer's own (query map, key map) pairs; shared factors give A = S^2."""
    layer = make_layer(widths=(4, 4), shared_factors=shared, causal=True)
    assert len(layer.maps.q_maps) == len(layer.maps.k_maps) == (1 if shared else 2)
    B, T = 2, 6
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    q = layer.q_norm(layer.q_proj(x).view(B, T, H, D))
    k = layer.k_norm(layer.k_proj(x).view(B, T, H, D))
    v = layer.v_proj(x).view(B, T, H, D)
    sims = [torch.einsum("bihr,bjhr->bhij", qm(q), km(k)) for qm, km in zip(layer.maps.q_maps, layer.maps.k_maps)]
    A = sims[0] ** 2 if shared else sims[0] * sims[1]  # [B, H, T, T]
    A = A.tril()
    o = torch.einsum("bhij,bjhd->bihd", A, v) / (A.sum(-1).transpose(1, 2)[..., None] + layer.config.eps)
    assert_close("out", layer.o_proj(o.reshape(B, T, H * D)), layer(x), TOL)


@pytest.mark.parametrize("feature_map", ["hedgehog", "mlp", "elu"])
def test_decode(feature_map):
    """T tokens one at a time with the carried state equal the full causal forward."""
    widths = fit_widths(feature_map, (4, 2))
    layer = make_layer(feature_map=feature_map, widths=widths, causal=True)
    B, T, M = 2, 7, math.prod(widths)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    cos, sin = rotary(T)
    full, full_state = layer(x, rotary_emb=(cos, sin), output_state=True)
    state, outs = None, []
    for t in range(T):
        o, state = layer(x[:, t : t + 1], rotary_emb=(cos[t : t + 1], sin[t : t + 1]), state=state, output_state=True)
        outs.append(o)
    assert_close("out", full, torch.cat(outs, dim=1), TOL)
    assert state[0].shape == (B, H, M, D) and state[1].shape == (B, H, M)
    for name, a, b in zip(("S", "z"), full_state, state):
        assert_close(name, a, b, TOL)


def test_state_carried():
    """A prefix then the rest, with the state carried, equals one call (causal)."""
    layer = make_layer(widths=(4, 6), causal=True)
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    cos, sin = rotary(11)
    full, full_state = layer(x, rotary_emb=(cos, sin), output_state=True)
    first, state = layer(x[:, :4], rotary_emb=(cos[:4], sin[:4]), output_state=True)
    rest, state = layer(x[:, 4:], rotary_emb=(cos[4:], sin[4:]), state=state, output_state=True)
    assert_close("out", full, torch.cat([first, rest], dim=1), TOL)
    for name, a, b in zip(("S", "z"), full_state, state):
        assert_close(name, a, b, TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen(causal):
    """Sequences packed into B = 1 with cu_seqlens equal separate calls, outputs and states."""
    layer = make_layer(widths=(2, 4, 2), causal=causal)
    lengths = [3, 6, 1]
    xs = [torch.randn(1, n, DIM, dtype=torch.float64) for n in lengths]
    ropes = [rotary(n) for n in lengths]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    packed_rope = tuple(torch.cat(parts) for parts in zip(*ropes))  # positions restart per sequence
    out, state = layer(torch.cat(xs, dim=1), rotary_emb=packed_rope, output_state=True, cu_seqlens=cu_seqlens)
    sep = [layer(x, rotary_emb=rope, output_state=True) for x, rope in zip(xs, ropes)]
    assert_close("out", torch.cat([o for o, _ in sep], dim=1), out, TOL)
    assert_close("S", torch.cat([s[0] for _, s in sep]), state[0], TOL)
    assert_close("z", torch.cat([s[1] for _, s in sep]), state[1], TOL)


def test_rotary_relative():
    """With the affine map (<a(q), b(k)> = 1 + q.k / sqrt(D)) only relative positions matter: rotary of q and k."""
    layer = make_layer(feature_map="affine", widths=(D + 1, D + 1), causal=True)
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    cos, sin = rotary(11)
    assert_close("shifted", layer(x, rotary_emb=(cos[:6], sin[:6])), layer(x, rotary_emb=(cos[5:], sin[5:])), TOL)


def test_rotary():
    layer = make_layer()
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    plain = layer(x)
    identity = (torch.ones(5, D, dtype=torch.float64), torch.zeros(5, D, dtype=torch.float64))
    assert_close("identity rotary", plain, layer(x, rotary_emb=identity), TOL)
    rotated = layer(x, rotary_emb=rotary(5))
    assert (rotated - plain).abs().max() > 1e-3
    # [B, T, D] rotary: batch b gets its own positions
    cos, sin = rotary(5, B=2)
    per_batch = layer(x, rotary_emb=(cos, sin))
    assert_close("batch 0", rotated[:1], per_batch[:1], TOL)
    assert_close("batch 1", layer(x[1:], rotary_emb=(cos[1], sin[1])), per_batch[1:], TOL)


def test_apply_rotary():
    """Rotate-half: pairs (i, i + D/2) turn by their angle, so q.k after rotation depends on m - n only."""
    q, k = torch.randn(2, D, dtype=torch.float64), torch.randn(2, D, dtype=torch.float64)
    cos, sin = rotary(8)

    def rot(x, pos):  # x [D] at position pos -> [1, 1, 1, D]
        return apply_rotary(x[None, None, None], cos[pos : pos + 1], sin[pos : pos + 1])

    # by hand, one pair: (x_0, x_{D/2}) -> (x_0 cos - x_{D/2} sin, x_{D/2} cos + x_0 sin)
    c, s, r = cos[3, 0], sin[3, 0], rot(q[0], 3)[0, 0, 0]
    torch.testing.assert_close(r[0], q[0, 0] * c - q[0, D // 2] * s)
    torch.testing.assert_close(r[D // 2], q[0, D // 2] * c + q[0, 0] * s)
    torch.testing.assert_close((rot(q[0], 5) * rot(k[0], 2)).sum(), (rot(q[0], 4) * rot(k[0], 1)).sum())
    assert not torch.allclose((rot(q[0], 5) * rot(k[0], 2)).sum(), (q[0] * k[0]).sum())


def test_explicit_head_dim():
    layer = make_layer(num_heads=3, head_dim=5, feature_map="mlp", widths=[3, 2])
    assert layer.config.widths == (3, 2)
    assert [m.width for m in layer.maps.q_maps] == [m.width for m in layer.maps.k_maps] == [3, 2]
    assert layer.q_proj.out_features == 15 and layer.o_proj.in_features == 15
    out, (S, z) = layer(torch.randn(2, 4, DIM, dtype=torch.float64), output_state=True)
    assert out.shape == (2, 4, DIM) and S.shape == (2, 3, 6, 5) and z.shape == (2, 3, 6)
    assert HLAConfig(dim=DIM, num_heads=H).head_dim == DIM // H


def test_qk_norm_off():
    layer = make_layer(qk_norm=False, bias=True)
    names = {n for n, _ in layer.named_parameters()}
    assert not any("norm" in n for n in names)
    assert {"q_proj.bias", "o_proj.bias"} <= names


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=10, num_heads=4), r"dim: 10 is not divisible by num_heads 4"),
        (dict(dim=0, num_heads=1), r"dim: must be >= 1"),
        (dict(dim=8, num_heads=0), r"num_heads: must be >= 1"),
        (dict(dim=8, num_heads=2, head_dim=0), r"head_dim: must be >= 1"),
        (dict(dim=8, num_heads=2, widths=()), r"widths: needs at least one"),
        (dict(dim=8, num_heads=2, widths=(4, 0), feature_map="mlp"), r"widths\[1\]: .*must be >= 1, got 0"),
        (dict(dim=8, num_heads=2, widths=(4, -2), feature_map="mlp"), r"widths\[1\]: .*must be >= 1, got -2"),
        (dict(dim=8, num_heads=2, widths=(4, 3)), r"widths\[1\]: with feature_map='hedgehog' .*must be even"),
        (dict(dim=8, num_heads=2, widths=(8, 4), feature_map="elu"), r"widths\[0\]: .*must be 4 for head_dim 4"),
        (dict(dim=8, num_heads=2, widths=(4,), feature_map="affine"), r"widths\[0\]: .*must be 5 .*'hedgehog'"),
        (dict(dim=8, num_heads=2, feature_map="gelu"), r"feature_map: must be one of \('elu', 'relu', 'affine'"),
        (dict(dim=8, num_heads=2, widths=(4, 2), shared_factors=True), r"shared_factors: needs equal widths"),
        (
            dict(dim=8, num_heads=2, widths=(5, 5, 5), feature_map="affine"),
            r"feature_map='affine' is signed: .*P = len\(widths\) = 3 and normalize=True",
        ),
        (dict(dim=8, num_heads=2, eps=-1e-6), r"eps: must be a finite number >= 0"),
        (dict(dim=8, num_heads=2, eps=float("nan")), r"eps: must be a finite number >= 0"),
        (dict(dim=8, num_heads=2, causal="no"), r"causal: expected a bool"),
        (dict(dim=8, num_heads=2, backend="cuda"), r"backend: must be one of"),
        (dict(dim=8, num_heads=2, backend="parallel", causal=True), r"backend='parallel' is the non-causal path"),
        (dict(dim=8, num_heads=2, backend="chunk"), r"backend='chunk' is a causal path"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        HLAConfig(**kwargs)


def test_affine_allowed():
    """The signed map is fine with an even P, or with an odd P when not normalised."""
    HLAConfig(dim=8, num_heads=2, widths=(5, 5), feature_map="affine")
    HLAConfig(dim=8, num_heads=2, widths=(5,), feature_map="affine", normalize=False)
    out = make_layer(widths=(9, 9), feature_map="affine")(torch.randn(1, 3, DIM, dtype=torch.float64))
    assert torch.isfinite(out).all()


def test_config_passed_to_operator(monkeypatch):
    """The layer hands causal, normalize, eps and backend to the operator (else naive vs fast compares a path
    with itself)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return hadamard_attn(*args, **kwargs)

    monkeypatch.setattr(layers, "hadamard_attn", spy)
    layer = make_layer(causal=True, normalize=False, eps=1e-3, backend="recurrent")
    layer(torch.randn(1, 3, DIM, dtype=torch.float64))
    assert len(calls) == 1
    assert {k: calls[0][k] for k in ("causal", "normalize", "eps", "backend")} == dict(
        causal=True, normalize=False, eps=1e-3, backend="recurrent"
    )


def test_rotary_errors():
    x = torch.randn(2, 6, 3, 4)
    cos = torch.ones(6, 4)
    for bad in (torch.ones(1, 4), torch.ones(4), torch.ones(6, 2), torch.ones(3, 6, 4)):
        with pytest.raises(ValueError, match="rotary_emb: cos must be"):
            apply_rotary(x, bad, cos)
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rotary(torch.randn(2, 6, 3, 5), torch.ones(6, 5), torch.ones(6, 5))
