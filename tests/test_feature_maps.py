"""The per-factor feature maps: shapes, widths, signs, exact values, errors and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hadamard_attn import (
    FEATURE_MAPS,
    AffineFeatureMap,
    HedgehogFeatureMap,
    MLPFeatureMap,
    make_feature_map,
)

H, D = 3, 8
# a valid width for every map with head dim D
WIDTHS = {"elu": D, "relu": D, "affine": D + 1, "hedgehog": 6, "mlp": 5}
LEARNABLE = ("hedgehog", "mlp")
NON_NEGATIVE = ("elu", "relu", "hedgehog", "mlp")


@pytest.mark.parametrize("name", FEATURE_MAPS)
@pytest.mark.parametrize("lead", [(2, 5), (2,), ()], ids=["BTHD", "BHD", "HD"])
def test_shapes(name, lead):
    fm = make_feature_map(name, H, D, WIDTHS[name])
    assert fm.width == WIDTHS[name]
    assert fm.signed == (name == "affine")
    out = fm(torch.randn(*lead, H, D))
    assert out.shape == (*lead, H, WIDTHS[name])


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(NON_NEGATIVE),
    x=arrays(np.float32, (2, 4, H, D), elements=st.floats(-1e4, 1e4, width=32)),
)
def test_non_negative(name, x):
    fm = make_feature_map(name, H, D, WIDTHS[name])
    out = fm(torch.from_numpy(x))
    assert torch.isfinite(out).all()
    assert (out >= 0).all()


@pytest.mark.parametrize("name", LEARNABLE)
def test_softmax_maps_sum_to_one(name):
    out = make_feature_map(name, H, D, WIDTHS[name])(100 * torch.randn(4, H, D))
    torch.testing.assert_close(out.sum(-1), torch.ones(4, H))


def test_affine_values():
    x = torch.tensor([[[1.0, -2.0, 0.0, 16.0]]])  # [1, H=1, D=4]
    out = AffineFeatureMap(1, 4, 5)(x)
    # D^(-1/4) = 1/sqrt(2)
    expected = torch.tensor([[[1.0, 2**-0.5, -(2**0.5), 0.0, 8 * 2**0.5]]])
    torch.testing.assert_close(out, expected)
    # <a(q), a(k)> = 1 + q.k / sqrt(D)
    q, k = torch.randn(2, 1, 4), torch.randn(2, 1, 4)
    fm = AffineFeatureMap(1, 4, 5)
    torch.testing.assert_close((fm(q) * fm(k)).sum(-1), 1 + (q * k).sum(-1) / 2)


def test_elu_relu_values():
    x = torch.tensor([[-1.0, 0.0, 2.0]])  # [H=1, D=3]
    torch.testing.assert_close(make_feature_map("elu", 1, 3, 3)(x), torch.tensor([[torch.e**-1, 1.0, 3.0]]))
    torch.testing.assert_close(make_feature_map("relu", 1, 3, 3)(x), torch.tensor([[0.0, 0.0, 2.0]]))


def test_hedgehog_init():
    fm = HedgehogFeatureMap(H, D, 6)
    assert fm.weight.shape == (H, D, 3)
    for w in fm.weight:  # [D, 3]: orthogonal columns of norm D^(-1/4)
        torch.testing.assert_close(w.T @ w, D**-0.5 * torch.eye(3))
    assert not torch.equal(fm.weight[0], fm.weight[1])


@pytest.mark.parametrize("name", LEARNABLE)
def test_per_head_weights(name):
    """Each parameter is per head: changing its head-1 slice changes head 1's features only."""
    fm = make_feature_map(name, H, D, WIDTHS[name])
    x = torch.randn(2, 5, H, D)
    for name, p in fm.named_parameters():
        before = fm(x)
        with torch.no_grad():
            p[1].add_(torch.randn_like(p[1]))
        after = fm(x)
        torch.testing.assert_close(after[:, :, [0, 2]], before[:, :, [0, 2]], msg=name)
        assert not torch.allclose(after[:, :, 1], before[:, :, 1]), name


def test_mlp_hidden():
    fm = MLPFeatureMap(H, D, 4, hidden=7)
    assert fm.w1.shape == (H, D, 7) and fm.w2.shape == (H, 7, 4)
    assert make_feature_map("mlp", H, D, 4).hidden == D


@pytest.mark.parametrize("name", FEATURE_MAPS)
def test_gradients(name):
    fm = make_feature_map(name, H, D, WIDTHS[name]).double()
    x = torch.randn(2, 5, H, D, dtype=torch.float64, requires_grad=True)
    (fm(x) * torch.randn(2, 5, H, WIDTHS[name], dtype=torch.float64)).sum().backward()
    assert x.grad.abs().sum() > 0
    params = list(fm.parameters())
    assert bool(params) == (name in LEARNABLE)
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name, width, match",
    [
        ("elu", D + 1, r"must be 8 for head_dim 8 .*fixed width.*'hedgehog' or 'mlp'"),
        ("relu", 4, r"must be 8 for head_dim 8 .*fixed width.*'hedgehog' or 'mlp'"),
        ("affine", D, r"must be 9 for head_dim 8 .*fixed width.*'hedgehog' or 'mlp'"),
        ("hedgehog", 5, r"must be even"),
        ("hedgehog", 0, r"must be even and >= 2"),
        ("mlp", 0, r"must be >= 1, got 0"),
    ],
)
def test_bad_width(name, width, match):
    with pytest.raises(ValueError, match=match):
        make_feature_map(name, H, D, width)


def test_bad_name():
    with pytest.raises(ValueError, match=r"must be one of \('elu', 'relu', 'affine', 'hedgehog', 'mlp'\), got 'gelu'"):
        make_feature_map("gelu", H, D, D)
