"""HLA in diffusers' Wan DiT: a tiny random ``WanTransformer3DModel``, no download."""

from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

from hadamard_attn.integrations import AdapterConfig, HLAAdapter  # noqa: E402
from hadamard_attn.integrations.diffusers import (  # noqa: E402
    HadamardWanAttnProcessor,
    apply_hla,
    load_adapter,
    remove_hla,
)
from hadamard_attn.testing import assert_close  # noqa: E402

H, D, LAYERS = 2, 16, 3
CONFIG = AdapterConfig(widths=(8, 4))


def make_model(dtype=torch.float32, seed=0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=H,
        attention_head_dim=D,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=LAYERS,
        rope_max_seq_len=32,
    )
    return model.to(dtype).eval()


def make_inputs(B=2, dtype=torch.float32, seed=1):
    """Latents ``[B, 4, 3, 6, 8]`` (36 tokens after the (1, 2, 2) patch), timesteps ``[B]``, text ``[B, 7, 16]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 3, 6, 8, generator=g).to(dtype)
    t = torch.randint(0, 1000, (B,), generator=g)
    text = torch.randn(B, 7, 16, generator=g).to(dtype)
    return x, t, text


def run(model, x, t, text) -> torch.Tensor:
    return model(x, t, text, return_dict=False)[0]


def perturb(adapter: HLAAdapter, seed=2) -> None:
    """Move the maps away from their initialisation, so round trips test trained weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g).to(p))


@pytest.mark.parametrize("layers", [None, [0, 2]])
def test_apply(layers):
    model = make_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = make_inputs()
    with torch.no_grad():
        ref = run(model, *inputs)
        adapter = apply_hla(model, layers, CONFIG)
        out = run(model, *inputs)
    converted = list(range(LAYERS)) if layers is None else layers
    assert adapter.layers == converted and sorted(adapter.maps, key=int) == [str(i) for i in converted]
    for i, block in enumerate(model.blocks):
        expected = HadamardWanAttnProcessor if i in converted else WanAttnProcessor
        assert type(block.attn1.processor) is expected, i
        assert type(block.attn2.processor) is WanAttnProcessor, i
    # the transformer's parameters and state dict are untouched; the maps are not submodules of it
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert out.shape == ref.shape == inputs[0].shape and torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-3  # HLA is in effect


def reference_attn1(attn, x, rotary_emb, kernel, maps=None, eps=1e-6):
    """Wan's self-attention written out by hand, with ``kernel`` "softmax" or "hla" (spec §1, quadratic form)."""
    B, T, _ = x.shape

    def rms_norm(y, norm):  # across heads
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    def rotate(y):  # complex multiplication of consecutive pairs
        cos, sin = rotary_emb  # [1, T, 1, D], each value repeated for its pair
        freqs = torch.complex(cos[..., 0::2], sin[..., 0::2])  # [1, T, 1, D/2]
        return torch.view_as_real(torch.view_as_complex(y.unflatten(-1, (-1, 2))) * freqs).flatten(-2)

    q = rotate(rms_norm(F.linear(x, attn.to_q.weight, attn.to_q.bias), attn.norm_q).view(B, T, H, D))
    k = rotate(rms_norm(F.linear(x, attn.to_k.weight, attn.to_k.bias), attn.norm_k).view(B, T, H, D))
    v = F.linear(x, attn.to_v.weight, attn.to_v.bias).view(B, T, H, D)
    if kernel == "softmax":
        weights = torch.einsum("bihd,bjhd->bhij", q, k).mul(D**-0.5).softmax(-1)  # [B, H, T, T]
    else:
        qs, ks = maps(q, k)
        A = torch.ones(B, H, T, T, dtype=x.dtype)
        for a, b in zip(qs, ks):
            A = A * torch.einsum("bihr,bjhr->bhij", a, b)  # Hadamard product of the factor similarities
        weights = A / (A.sum(-1, keepdim=True) + eps)
    o = torch.einsum("bhij,bjhd->bihd", weights, v).reshape(B, T, H * D)
    return F.linear(o, attn.to_out[0].weight, attn.to_out[0].bias)


def test_processor_matches_reference():
    """On one block: the original processor equals the hand-written softmax attention, and HLA's processor the
    same code with the softmax weights replaced by HLA's."""
    model = make_model(torch.float64)
    x, t, text = make_inputs(dtype=torch.float64)
    rotary_emb = model.rope(x)
    attn = model.blocks[1].attn1
    hidden = torch.randn(2, rotary_emb[0].shape[1], H * D, dtype=torch.float64)
    with torch.no_grad():
        assert_close(
            "softmax", reference_attn1(attn, hidden, rotary_emb, "softmax"), attn(hidden, None, None, rotary_emb), 1e-12
        )
        adapter = apply_hla(model, [1], CONFIG).double()
        perturb(adapter)
        ref = reference_attn1(attn, hidden, rotary_emb, "hla", adapter.maps["1"], CONFIG.eps)
        assert_close("hla", ref, attn(hidden, None, None, rotary_emb), 1e-12)


@pytest.mark.parametrize("layers", [None, [1]])
def test_naive_vs_default(layers):
    """The quadratic reference and the default (fast) path agree: one block in float64, and the whole model
    (whose residual stream Wan keeps in fp32)."""
    model = make_model(torch.float64)
    inputs = make_inputs(dtype=torch.float64)
    adapter = apply_hla(model, layers, AdapterConfig(widths=(8, 4), backend="naive")).double()
    perturb(adapter)
    attn, rotary_emb = model.blocks[1].attn1, model.rope(inputs[0])
    hidden = torch.randn(2, rotary_emb[0].shape[1], H * D, dtype=torch.float64)
    with torch.no_grad():
        ref, ref_block = run(model, *inputs), attn(hidden, None, None, rotary_emb)
        adapter.config.backend = "auto"  # the processors read the config at every call
        out, out_block = run(model, *inputs), attn(hidden, None, None, rotary_emb)
    assert_close("block", ref_block, out_block, 1e-12)
    assert not torch.equal(ref_block, out_block)  # two different paths really ran
    assert_close("output", ref, out, 1e-6)


def test_gradients():
    model = make_model()
    inputs = make_inputs()
    adapter = apply_hla(model, [0, 2], CONFIG)

    # stage 1 (attention transfer): the transformer is frozen, only the adapter learns
    model.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    run(model, *inputs).pow(2).mean().backward()
    assert all(p.grad is None for p in model.parameters())
    for name, p in adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    # stage 2 (fine-tune): gradients reach the transformer, through the maps into q and k of HLA blocks
    model.requires_grad_(True)
    adapter.zero_grad(set_to_none=True)
    run(model, *inputs).pow(2).mean().backward()
    for name in ("to_q.weight", "to_k.weight", "norm_q.weight"):
        grad = model.blocks[0].attn1.get_parameter(name).grad
        assert grad is not None and grad.abs().max() > 0, name
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in adapter.parameters())


def test_bf16_model_fp32_maps():
    """A bf16 model with trainable fp32 maps: bf16 activations, fp32 gradients, close to the fp32 model."""
    model = make_model()
    inputs = make_inputs()
    adapter = apply_hla(model, None, CONFIG)
    perturb(adapter)
    with torch.no_grad():
        ref = run(model, *inputs)
    model.to(torch.bfloat16).requires_grad_(False)
    x, t, text = inputs
    out = run(model, x.bfloat16(), t, text.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_close("bf16 output", ref, out, 5e-2)
    out.float().pow(2).mean().backward()
    for name, p in adapter.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all(), name


def test_save_load(tmp_path):
    model = make_model()
    fresh = copy.deepcopy(model)
    inputs = make_inputs()
    adapter = apply_hla(model, [2, 0], CONFIG)
    perturb(adapter)
    with torch.no_grad():
        ref = run(model, *inputs)
    adapter.save_pretrained(tmp_path)

    loaded = load_adapter(fresh, tmp_path)  # a model that never had HLA
    assert loaded.layers == [0, 2] and loaded.config == adapter.config
    with torch.no_grad():
        assert torch.equal(run(fresh, *inputs), ref)

    remove_hla(model)  # the same model, converted again
    load_adapter(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(run(model, *inputs), ref)


def test_remove_restores():
    model = make_model()
    inputs = make_inputs()
    originals = [b.attn1.processor for b in model.blocks]
    with torch.no_grad():
        ref = run(model, *inputs)
        perturb(apply_hla(model, [1, 2], CONFIG))
        assert not torch.equal(run(model, *inputs), ref)
        assert remove_hla(model) == [1, 2]
        out = run(model, *inputs)
    assert all(b.attn1.processor is p for b, p in zip(model.blocks, originals))
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="no block uses HLA"):
        remove_hla(model)


def test_cfg_batch():
    """Classifier-free guidance: one latent with the prompt and the empty prompt in a batch of 2; each sample of
    the batch equals its own run (HLA's state must not mix the batch)."""
    model = make_model(torch.float64)
    x, t, text = make_inputs(B=1, dtype=torch.float64)
    apply_hla(model, [0, 1], CONFIG).double()
    batch = (x.expand(2, -1, -1, -1, -1), t.expand(2), torch.cat([text, torch.zeros_like(text)]))
    with torch.no_grad():
        out = run(model, *batch)
        cond, uncond = run(model, x, t, text), run(model, x, t, torch.zeros_like(text))
    assert_close("cond", cond[0], out[0], 1e-10)
    assert_close("uncond", uncond[0], out[1], 1e-10)
    assert (cond - uncond).abs().max() > 1e-3


def test_fused_projections():
    """``fuse_qkv_projections`` (one ``to_qkv`` matmul) gives the same HLA outputs."""
    model = make_model(torch.float64)
    inputs = make_inputs(dtype=torch.float64)
    perturb(apply_hla(model, [0, 2], CONFIG).double())
    with torch.no_grad():
        ref = run(model, *inputs)
        model.fuse_qkv_projections()
        assert model.blocks[0].attn1.fused_projections
        out = run(model, *inputs)
    assert_close("fused", ref, out, 1e-6)


@pytest.mark.parametrize(
    "layers, error, match",
    [
        ([3], ValueError, "out of range"),
        ([-1], ValueError, "out of range"),
        ([0, 0], ValueError, "repeated"),
        ([], ValueError, "at least one"),
        ("0", TypeError, "sequence"),
        ([1.0], TypeError, "integers"),
        ([True], TypeError, "integers"),
    ],
)
def test_bad_layers(layers, error, match):
    model = make_model()
    with pytest.raises(error, match=f"layers: .*{match}"):
        apply_hla(model, layers, CONFIG)
    assert all(type(b.attn1.processor) is WanAttnProcessor for b in model.blocks)


def test_errors(tmp_path):
    model = make_model()
    with pytest.raises(TypeError, match="expected a Wan DiT"):
        apply_hla(torch.nn.Linear(2, 2))

    adapter = apply_hla(model, [1], CONFIG)
    with pytest.raises(RuntimeError, match=r"already applied to blocks \[1\]"):
        apply_hla(model, [0], CONFIG)
    adapter.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="already applied"):
        load_adapter(model, tmp_path)

    attn2 = model.blocks[0].attn2
    attn2.set_processor(HadamardWanAttnProcessor(adapter.maps["1"], adapter.config))
    hidden, text = torch.randn(1, 5, H * D), torch.randn(1, 4, H * D)
    with pytest.raises(ValueError, match="self-attention"):
        attn2(hidden, text)
    attn1 = model.blocks[1].attn1
    with pytest.raises(ValueError, match="attention_mask"):
        attn1(hidden, None, torch.ones(1, 1, 5, 5, dtype=torch.bool))

    # an adapter for another model: other heads, or a block the model does not have
    other = HLAAdapter(CONFIG, [0], num_heads=4, head_dim=8, model_type="wan")
    other.save_pretrained(tmp_path / "heads")
    with pytest.raises(ValueError, match="4 heads x 8"):
        load_adapter(make_model(), tmp_path / "heads")
    HLAAdapter(CONFIG, [5], num_heads=H, head_dim=D, model_type="wan").save_pretrained(tmp_path / "blocks")
    with pytest.raises(ValueError, match="out of range"):
        load_adapter(make_model(), tmp_path / "blocks")
    HLAAdapter(CONFIG, [0], num_heads=H, head_dim=D, model_type="llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="model type 'llama'"):
        load_adapter(make_model(), tmp_path / "llama")


def test_import_error_names_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers.models.transformers.transformer_wan", None)
    monkeypatch.delitem(sys.modules, "hadamard_attn.integrations.diffusers")
    with pytest.raises(ImportError, match=r"pip install hadamard-attn\[diffusers\]"):
        importlib.import_module("hadamard_attn.integrations.diffusers")
