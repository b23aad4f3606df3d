"""The transformers integration on a GPU: a random Llama with HLA in some of its layers (hybrid), checked and timed.

    PYTHONPATH=src python3 benchmarks/lm_gpu.py [--device cuda] [--layers 0,1,3] [--widths 16x16]
        [--prefill 256] [--decode 44] [--pad 50] [--generate 64] [--first-config]

Random weights (hidden 512, 8 query / 2 key-value heads of 64, 4 layers), batch 2 with row 1 left-padded by
``--pad`` tokens, HLA layers with Hedgehog maps, the rest softmax with their usual key/value cache.

1. backends: the default path (``backend="auto"``: the causal Triton kernels on CUDA) against the torch ``chunk``
   path with the same weights, fp32: logits of a full forward and every gradient of a loss on them (the adapter's
   maps and the model's own weights), relative RMS;
2. the cache: prefill of ``--prefill`` tokens, then ``--decode`` single-token steps (the Triton decode step on
   CUDA) against full forwards over the same prefixes, fp32 and bf16;
3. greedy ``generate`` of ``--generate`` tokens in bf16: ms per token.

Exits non-zero when a check fails (fp32 within 1e-4, bf16 within 6e-2). ``--first-config`` runs every causal and
non-causal kernel with its first autotuning candidate (what ``triton_gpu.py``'s check runs): the causal kernels'
autotuning takes minutes per dtype in a fresh process; the generate timing then uses that candidate too.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from hadamard_attn.integrations import AdapterConfig
from hadamard_attn.integrations.transformers import apply_hla
from hadamard_attn.testing import rel_rms

TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2}


def build(device, dtype, layers, widths, backend) -> LlamaForCausalLM:
    """The random model with HLA in ``layers``; the same weights for every call (fixed seeds)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=None, initializer_range=0.1,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    apply_hla(model, layers, AdapterConfig(widths=widths, backend=backend))
    return model.to(device, dtype)


def inputs(device, T: int, pad: int):
    """Token ids ``[2, T]``, the attention mask (row 1 left-padded by ``pad``) and the positions."""
    ids = torch.randint(1, 1000, (2, T), generator=torch.Generator().manual_seed(2)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def check_backends(device, layers, widths, T, pad) -> bool:
    """fp32 logits and gradients: the default backend against the torch ``chunk`` path."""
    ids, mask, pos = inputs(device, T, pad)
    results = []
    for backend in ("auto", "chunk"):
        model = build(device, torch.float32, layers, widths, backend)
        logits = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        loss = (logits * mask[..., None]).square().mean()
        names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
        results.append((logits.detach(), torch.autograd.grad(loss, params), names))
    (logits, grads, names), (logits_ref, grads_ref, _) = results
    errs = {"logits": rel_rms(logits_ref, logits)}
    errs.update((n, rel_rms(b, a)) for n, a, b in zip(names, grads, grads_ref) if b.abs().max() > 0)
    worst = max(errs, key=errs.get)
    ok = all(e < TOL[torch.float32] for e in errs.values())
    print(
        f"  {'ok ' if ok else 'BAD'} fp32 default backend vs torch chunk: logits {errs['logits']:.1e}, "
        f"{len(errs) - 1} gradients, worst {worst} {errs[worst]:.1e}"
    )
    return ok


def check_cache(device, dtype, layers, widths, prefill, decode, pad) -> bool:
    """Prefill then decode through the cache, against full forwards over the same prefixes."""
    model = build(device, dtype, layers, widths, "auto").eval()
    ids, mask, pos = inputs(device, prefill + decode, pad)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()
        cache = DynamicCache(config=model.config)
        p = slice(0, prefill)
        out = model(ids[:, p], attention_mask=mask[:, p], position_ids=pos[:, p], past_key_values=cache, use_cache=True)
        errs = [rel_rms(full[:, p], out.logits.float())]
        for t in range(prefill, prefill + decode):
            out = model(
                ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                past_key_values=cache, use_cache=True,
            )  # fmt: skip
            errs.append(rel_rms(full[:, t], out.logits[:, 0].float()))
    ok = max(errs) < TOL[dtype]
    print(
        f"  {'ok ' if ok else 'BAD'} {str(dtype)[6:]} cache: prefill {errs[0]:.1e}, "
        f"{decode} decode steps at most {max(errs[1:], default=0.0):.1e}"
    )
    return ok


def time_generate(device, layers, widths, prefill, n) -> None:
    model = build(device, torch.bfloat16, layers, widths, "auto").eval()
    ids = inputs(device, prefill, 0)[0][:1]
    model.generate(ids, max_new_tokens=n, do_sample=False)  # warm-up, as long as the timed run (compiles, autotunes)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / n * 1e3
    print(f"  bf16 greedy generate: {out.shape[1] - prefill} tokens, {ms:.2f} ms/token")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", default="0,1,3", help="HLA layers (the others keep softmax)")
    p.add_argument("--widths", default="16x16")
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--decode", type=int, default=44)
    p.add_argument("--pad", type=int, default=50)
    p.add_argument("--generate", type=int, default=64)
    p.add_argument("--first-config", action="store_true", help="no autotuning: each kernel's first candidate")
    a = p.parse_args()
    device = torch.device(a.device)
    layers = [int(i) for i in a.layers.split(",")]
    widths = tuple(int(r) for r in a.widths.split("x"))
    import transformers

    if a.first_config:
        from triton_gpu import pin_configs

        pin_configs(0, device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"Llama, HLA in layers {layers}, widths {widths}, batch 2 (row 1 left-padded by {a.pad})")
    ok = check_backends(device, layers, widths, a.prefill, a.pad)
    for dtype in (torch.float32, torch.bfloat16):
        ok &= check_cache(device, dtype, layers, widths, a.prefill, a.decode, a.pad)
    time_generate(device, layers, widths, a.prefill, a.generate)
    print(f"checks {'PASSED' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
