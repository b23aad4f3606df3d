"""The adapter that owns the new parameters: exact save/load round trip, atomic writes, clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from hadamard_attn.integrations import AdapterConfig, HLAAdapter
from hadamard_attn.integrations import adapter as adapter_module


def make(**config):
    torch.manual_seed(0)
    return HLAAdapter(AdapterConfig(**config), [3, 0], num_heads=4, head_dim=8, model_type="wan", num_kv_heads=2)


def test_structure():
    a = make(widths=(4, 2))
    assert a.layers == [0, 3] and set(a.maps) == {"0", "3"}
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    qs, ks = a.maps["3"](q, k)
    assert [x.shape for x in qs] == [(2, 5, 4, 4), (2, 5, 4, 2)]
    assert [x.shape for x in ks] == [(2, 5, 2, 4), (2, 5, 2, 2)]


@pytest.mark.parametrize("config", [{}, {"widths": (8, 4, 2), "feature_map": "mlp"}, {"shared_factors": True}])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_round_trip(tmp_path, config, dtype):
    a = make(**config).to(dtype)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p))  # not the initialisation
    path = a.save_pretrained(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    b = HLAAdapter.from_pretrained(tmp_path, model_type="wan")
    assert b.config == a.config and b.layers == a.layers and b.num_kv_heads == 2
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sb[name].dtype == dtype and torch.equal(sa[name], sb[name]), name
    assert all(p.requires_grad for p in b.parameters())


def test_save_is_atomic(tmp_path, monkeypatch):
    """A write that dies half way leaves the previous adapter intact and no temporary file behind."""
    a = make()
    a.save_pretrained(tmp_path)
    before = (tmp_path / adapter_module.ADAPTER_FILE).read_bytes()

    def dies(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter_module, "save_file", dies)
    with torch.no_grad():
        next(a.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        a.save_pretrained(tmp_path)
    assert (tmp_path / adapter_module.ADAPTER_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [adapter_module.ADAPTER_FILE]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no hla_adapter.safetensors"):
        HLAAdapter.from_pretrained(tmp_path)
    make().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="adapter for model type 'wan', not 'llama'"):
        HLAAdapter.from_pretrained(tmp_path, model_type="llama")


def test_config_errors():
    with pytest.raises(ValueError, match="eps"):
        AdapterConfig(eps=-1)
    with pytest.raises(ValueError, match="backend"):
        AdapterConfig(backend="flash")
    with pytest.raises(ValueError, match=r"widths\[1\]"):
        HLAAdapter(AdapterConfig(widths=(4, 3)), [0], 2, 8, "wan")
    with pytest.raises(ValueError, match="feature_map"):
        HLAAdapter(AdapterConfig(feature_map="cosine"), [0], 2, 8, "wan")
