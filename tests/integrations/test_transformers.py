"""HLA in transformers causal LMs: cache decoding, generate, hybrid layers, padding, gradients, save/load/remove.

Tiny random float64 models of four families (all with grouped-query attention; Mistral with a sliding-window mask,
Qwen2 with biased projections, Qwen3 with q/k norms), so that a leak of one padded token or a wrong state shows far
above rounding.
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    StaticCache,
)

from hadamard_attn import hadamard_attn  # noqa: E402
from hadamard_attn.integrations.transformers import (  # noqa: E402
    AdapterConfig,
    HLAAdapter,
    HLAAttention,
    HLACacheLayer,
    apply_hla,
    load_adapter,
    remove_hla,
)
from hadamard_attn.testing import assert_close  # noqa: E402

VOCAB = 61
TOL = 1e-10  # float64
GEN_TOL = 1e-6  # generate returns float32 logits
# transformers' eager attention takes its softmax in float32 (`softmax(..., dtype=torch.float32)`) whatever the
# model's dtype: a float64 model with softmax layers agrees only to float32 rounding there, and which rounding depends
# on the CPU's vector width (AVX2 ~6e-8 relative, AVX-512 exact; ATEN_CPU_CAPABILITY=avx2 shows it)
EAGER_SOFTMAX_TOL = 1e-6
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,  # generation never stops early, so token sequences compare position by position
)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, head_dim=8)),  # sliding-window mask
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),  # q/k/v biases
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=8)),  # q/k RMSNorm
}
ALL, HYBRID = None, [0, 2]  # HYBRID: layer 1 keeps softmax and its key/value cache
SMALL = AdapterConfig(widths=(4, 6))  # hedgehog, P = 2, M = 24


def make_model(family: str, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    model.config._attn_implementation = attn_implementation
    return model.double().eval()


def make_hla(family: str, layers=ALL, config: AdapterConfig = SMALL, **kwargs):
    model = make_model(family, **kwargs)
    torch.manual_seed(1)
    adapter = apply_hla(model, layers, config)
    assert all(p.dtype == torch.float32 for p in adapter.parameters())  # fp32 maps, whatever the model's dtype
    return model, adapter.double()  # float64 tests: maps in float64 too


def tokens(B: int, T: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids ``generate`` derives from a 2D padding mask."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
@pytest.mark.parametrize("layers", [ALL, HYBRID], ids=["all", "hybrid"])
@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_decoding(family, layers):
    """Prefill, then one token at a time through the cache: the logits of the full-sequence forward, with a
    fixed-size state in the HLA layers and a growing key/value cache in the softmax layer."""
    model, adapter = make_hla(family, layers)
    ids = tokens(2, 11)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits  # [B, T, V]
        cache = DynamicCache(config=model.config)
        out = model(ids[:, :6], cache=cache, use_cache=True)
        assert_close("prefill", full[:, :6], out.logits, TOL)
        sizes = None
        for t in range(6, 11):
            out = model(ids[:, t : t + 1], past_key_values=out.cache, use_cache=True)  # the older name works too
            assert_close(f"token {t}", full[:, t], out.logits[:, 0], TOL)
            hla = [layer for layer in cache.layers if isinstance(layer, HLACacheLayer)]
            assert len(hla) == len(adapter.layers)
            step_sizes = [tuple(layer.state[0].shape) for layer in hla]
            assert sizes is None or step_sizes == sizes  # O(1): the state does not grow
            sizes = step_sizes
    assert sizes == [(2, 4, 24, 8)] * len(adapter.layers)  # [B, H, M, D]
    assert cache.get_seq_length() == 11
    if layers is HYBRID:
        assert cache.layers[1].keys.shape == (2, 2, 11, 8)  # softmax layer: [B, H_kv, T, D]


@pytest.mark.parametrize("layers", [ALL, HYBRID], ids=["all", "hybrid"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_greedy(family, layers):
    """``generate`` (cache, O(1) decode) gives the tokens of step-by-step argmax over full forwards."""
    model, _ = make_hla(family, layers)
    ids = tokens(2, 5)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
        expected = ids
        for step in range(8):
            logits = model(expected, use_cache=False).logits[:, -1]  # [B, V]
            assert_close(f"step {step}", logits, out.logits[step], GEN_TOL)
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
    assert out.sequences.shape == (2, 13)
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_sampling(family):
    """Sampling, three samples per prompt: the logits ``generate`` saw at every step are those of a full forward
    over the sampled sequence."""
    model, _ = make_hla(family, HYBRID)
    ids = tokens(2, 5)
    torch.manual_seed(3)
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=6,
            do_sample=True,
            num_return_sequences=3,
            top_k=None,
            top_p=None,
            temperature=1.0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full = model(out.sequences, use_cache=False).logits  # [6, 11, V]
    assert out.sequences.shape == (6, 11)
    assert torch.equal(out.sequences[:, :5], ids.repeat_interleave(3, dim=0))
    for step, logits in enumerate(out.logits):
        assert_close(f"step {step}", full[:, 4 + step], logits, GEN_TOL)


def test_generate_beam_search():
    """Beam search reorders the cache between steps: the beams and their scores are those of a run without it."""
    model, _ = make_hla("llama", HYBRID)
    ids = tokens(2, 5)
    kwargs = dict(
        max_new_tokens=6, num_beams=3, num_return_sequences=2, output_scores=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert_close("scores", uncached.sequences_scores, cached.sequences_scores, GEN_TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_matches_definition(family):
    """One HLA layer against its definition, built from the model's own functions: the family's q/k norm and
    ``apply_rotary_pos_emb``, ``repeat_kv`` for the key features and values, the quadratic reference operator."""
    model, adapter = make_hla(family, [1])
    attn = model.model.layers[1].self_attn
    modeling = sys.modules[type(attn.softmax_attn).__module__]
    B, T, H, H_kv, D = 2, 7, 4, 2, 8
    x = torch.randn(B, T, 32, dtype=torch.float64)
    cos, sin = model.model.rotary_emb(x, torch.arange(T)[None].expand(B, -1))  # [B, T, D]
    with torch.no_grad():
        out, weights = attn(x, (cos, sin), None)
        q = attn.q_proj(x).view(B, T, H, D)
        k = attn.k_proj(x).view(B, T, H_kv, D)
        if family == "qwen3":
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = modeling.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [B, H(_kv), T, D]
        qs, ks = adapter.maps["1"](q.transpose(1, 2), k.transpose(1, 2))  # P x [B, T, H(_kv), R_f]
        ks = [modeling.repeat_kv(f.transpose(1, 2), H // H_kv).transpose(1, 2) for f in ks]  # P x [B, T, H, R_f]
        v = modeling.repeat_kv(attn.v_proj(x).view(B, T, H_kv, D).transpose(1, 2), H // H_kv).transpose(1, 2)
        o, _ = hadamard_attn(qs, ks, v, causal=True, backend="naive")  # [B, T, H, D]
        expected = attn.o_proj(o.reshape(B, T, H * D))
    assert weights is None
    assert_close("layer", expected, out, TOL)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_naive_backend(family):
    """The quadratic reference (``backend="naive"``) gives the logits of the default chunked path, padding
    included; both differ from softmax."""
    ids = tokens(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kwargs = dict(attention_mask=mask, position_ids=positions(mask), use_cache=False)
    logits = {}
    with torch.no_grad():
        softmax = make_model(family)(ids, **kwargs).logits
        for backend in ("auto", "naive"):
            model, _ = make_hla(family, config=AdapterConfig(widths=(4, 6), backend=backend))
            logits[backend] = model(ids, **kwargs).logits
    assert_close("naive", logits["naive"], logits["auto"], TOL)
    assert (logits["auto"] - softmax).abs().max() > 1e3 * TOL * softmax.abs().max()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("layers", [ALL, HYBRID], ids=["all", "hybrid"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_left_padding(family, layers, attn_implementation, eps):
    """A left-padded batch gives, at the real tokens, the logits of each sequence run alone, in a full forward and
    in ``generate`` (tokens and the logits of every step). With eps = 0 a padded query reads 0 / 0: it must not
    reach the real tokens through a later softmax layer."""
    config = AdapterConfig(widths=SMALL.widths, eps=eps)
    model, _ = make_hla(family, layers, config, attn_implementation=attn_implementation)
    tol = EAGER_SOFTMAX_TOL if attn_implementation == "eager" and layers is not ALL else TOL
    lengths = [9, 4, 6]
    ids = tokens(3, 9)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, 9 - n :] = 1
    ids = ids.masked_fill(mask == 0, 0)  # pad id
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
        gen = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=5,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        for b, n in enumerate(lengths):
            alone_ids = ids[b : b + 1, 9 - n :]
            alone = model(alone_ids, use_cache=False).logits
            assert_close(f"sequence {b}", alone[0], batch[b, 9 - n :], tol)
            ref = model.generate(
                alone_ids, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
            assert torch.equal(gen.sequences[b, 9 - n :], ref.sequences[0])
            for step in range(5):
                assert_close(f"sequence {b} step {step}", ref.logits[step][0], gen.logits[step][b], GEN_TOL)


def test_gradients():
    """Frozen model: the loss reaches every adapter parameter and nothing else; unfrozen, the projections too."""
    model, adapter = make_hla("qwen3", HYBRID)
    model.train()
    ids = tokens(2, 12)
    model.requires_grad_(False)
    adapter.requires_grad_(True)
    model(ids, labels=ids, use_cache=False).loss.backward()
    ours = {id(p) for p in adapter.parameters()}
    for name, p in model.named_parameters():
        if id(p) in ours:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert len(ours) == 2 * 2 * len(adapter.layers)  # hedgehog: q and k map per factor per layer
    assert all(any(p is q for q in model.parameters()) for p in adapter.parameters())  # registered in the model

    model.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids, use_cache=False).loss.backward()
    attn = model.model.layers[0].self_attn
    for p in (attn.q_proj.weight, attn.k_proj.weight, attn.q_norm.weight, attn.v_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_save_load(tmp_path, family):
    """``save_pretrained`` then ``load_adapter`` into a fresh copy of the model: same weights, same logits.

    A float64 adapter comes back float64 (``from_pretrained`` keeps the saved dtype).
    """
    model = make_model(family)
    torch.manual_seed(1)
    adapter = apply_hla(model, HYBRID, AdapterConfig(widths=(4, 2), feature_map="mlp")).double()
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))  # not the initialisation
    adapter.save_pretrained(tmp_path)
    fresh = make_model(family)
    loaded = load_adapter(fresh, tmp_path)
    assert isinstance(loaded, HLAAdapter)
    assert loaded.layers == [0, 2] and loaded.config == adapter.config
    assert all(p.dtype == torch.float64 for p in loaded.parameters())  # the saved dtype
    for name, t in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    ids = tokens(2, 7)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="adapter for model type 'qwen3'" if family == "qwen3" else "'llama'"):
        load_adapter(make_model("qwen2"), tmp_path)


def test_remove_restores():
    """``remove_hla`` puts the original modules back: outputs bit for bit, state-dict keys unchanged; while HLA is
    applied the original weights keep their names and the maps are added under ``self_attn.maps``."""
    model = make_model("qwen3")
    ids = tokens(2, 8)
    originals = [layer.self_attn for layer in model.model.layers]
    keys = set(model.state_dict())
    with torch.no_grad():
        before = model(ids).logits
        adapter = apply_hla(model, HYBRID, SMALL)
        assert isinstance(model.model.layers[0].self_attn, HLAAttention)
        assert model.model.layers[0].self_attn.softmax_attn is originals[0]
        with_hla = model(ids).logits
        applied_keys = set(model.state_dict())
        assert keys <= applied_keys
        assert applied_keys - keys == {
            f"model.layers.{i}.self_attn.maps.{k}" for i in (0, 2) for k in adapter.maps["0"].state_dict()
        }
        model.train()
        remove_hla(model)
        assert all(m.training for m in model.modules())  # the restored modules follow the model's mode
        after = model.eval()(ids).logits
    assert not torch.allclose(with_hla, before)
    assert torch.equal(after, before)
    assert [layer.self_attn for layer in model.model.layers] == originals
    assert set(model.state_dict()) == keys


def test_errors(tmp_path):
    model = make_model("llama")
    for layers, error, match in [
        ([3], ValueError, "index 3 is out of range for a model of 3 decoder layers"),
        ([-1], ValueError, "index -1 is out of range"),
        ([0, 2, 0], ValueError, "repeated"),
        ([], ValueError, "at least one"),
        (["1"], TypeError, "integer"),
        ([True], TypeError, "integer"),
    ]:
        with pytest.raises(error, match=match):
            apply_hla(model, layers, SMALL)
    assert not any(isinstance(layer.self_attn, HLAAttention) for layer in model.model.layers)
    with pytest.raises(ValueError, match="no HLA layers"):
        remove_hla(model)
    with pytest.raises(ValueError, match=r"widths\[0\]"):
        apply_hla(model, None, AdapterConfig(widths=(3,)))  # hedgehog needs even widths

    apply_hla(model, [1], SMALL)
    with pytest.raises(RuntimeError, match=r"layers \[1\] already use HLA"):
        apply_hla(model, [0], SMALL)
    with pytest.raises(TypeError, match="needs a DynamicCache.*got a StaticLayer"):
        model(tokens(1, 4), cache=StaticCache(config=model.config, max_cache_len=16), use_cache=True)
    with torch.no_grad():
        softmax_cache = make_model("llama")(tokens(1, 4), use_cache=True).cache  # filled by softmax attention
    with pytest.raises(TypeError, match="got a DynamicLayer that already holds keys and values"):
        model(tokens(1, 1), cache=softmax_cache, use_cache=True)
    with pytest.raises(ValueError, match="supports transformers causal LMs"):
        apply_hla(torch.nn.Linear(2, 2))

    wider = LlamaForCausalLM(LlamaConfig(**{**COMMON, "num_key_value_heads": 4}))
    HLAAdapter(SMALL, [0], 4, 8, "llama", 2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"built for \(num_heads, num_kv_heads, head_dim\) = \(4, 2, 8\)"):
        load_adapter(wider, tmp_path)


def test_cache_batch_operations():
    """``reorder_cache`` (beam search), ``batch_select_indices`` and ``batch_repeat_interleave`` move the HLA states
    with the softmax layer's keys and values: decoding goes on as for the reordered sequences."""
    model, _ = make_hla("llama", HYBRID)
    ids = tokens(2, 8)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        model(ids[:, :5], cache=cache, use_cache=True)
        cache.reorder_cache(torch.tensor([1, 0]))
        out = model(ids[[1, 0], 5:6], cache=cache, use_cache=True).logits
        assert_close("reorder", full[[1, 0], 5], out[:, 0], TOL)
        cache.batch_select_indices(torch.tensor([1]))  # sequence 0
        out = model(ids[:1, 6:7], cache=cache, use_cache=True).logits
        assert_close("select", full[:1, 6], out[:, 0], TOL)
        cache.batch_repeat_interleave(2)
        out = model(ids[[0, 0], 7:8], cache=cache, use_cache=True).logits
        assert_close("repeat", full[[0, 0], 7], out[:, 0], TOL)


def test_cache_cannot_roll_back():
    model, _ = make_hla("llama", HYBRID)
    cache = DynamicCache(config=model.config)
    assert cache.is_croppable
    with torch.no_grad():
        model(tokens(1, 4), cache=cache, use_cache=True)
    assert not cache.is_croppable
    cache.crop(0)  # nothing to remove
    with pytest.raises(RuntimeError, match="cannot drop the last ones"):
        cache.crop(-1)


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "hadamard_attn.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install hadamard-attn\[transformers\]"):
        importlib.import_module("hadamard_attn.integrations.transformers")


def test_example(monkeypatch, capsys):
    """examples/lm_hla.py runs (tiny model, 3 steps): reload gives the same tokens, remove the same logits."""
    example = Path(__file__).parents[2] / "examples" / "lm_hla.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--steps", "3", "--length", "16"])
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    assert "reloaded model generates the same tokens: True" in out
    assert "restores the original logits bit for bit: True" in out
