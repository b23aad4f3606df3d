"""HLA in a transformers causal LM: convert, stage-1 attention transfer, generate, save/load, remove.

    python examples/lm_hla.py                                   # tiny random Llama on CPU, a few seconds
    python examples/lm_hla.py --model /path/to/Qwen3-0.6B --layers 0,4,8,12,16,20 --steps 200 --device cuda

Stage 1 of linearising a pretrained model (spec §5): the model is frozen and only the feature maps train, so that
each HLA layer's output matches the output its softmax attention gives on the same input (the model's own
activations). Stage 2, a short next-token fine-tune of the whole model, is an ordinary training loop over
``model.parameters()``, which include the adapter's.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hadamard_attn.integrations.transformers import AdapterConfig, HLAAttention, apply_hla, load_adapter, remove_hla

TEXT = (
    "Linear attention keeps a fixed-size state instead of a cache that grows with every token. "
    "Hadamard linear attention multiplies several similarity matrices element-wise, which brings its weights "
    "closer to those of softmax attention while keeping the cost linear in the sequence length. "
)


def load_model(args) -> tuple[torch.nn.Module, AutoTokenizer | None]:
    """The pretrained model at ``args.model``, or a tiny random Llama (the same weights on every call)."""
    dtype = getattr(torch, args.dtype)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
        return model.eval(), AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        pad_token_id=0,
        eos_token_id=None,
        initializer_range=0.2,  # larger weights than the default 0.02: sharper attention, something to learn
    )
    return LlamaForCausalLM(config).to(args.device, dtype).eval(), None


def training_batch(tokenizer, vocab_size: int, batch: int, length: int, device: str) -> torch.Tensor:
    """``[batch, length]`` token ids: windows of TEXT, or random ids without a tokenizer."""
    if tokenizer is None:
        return torch.randint(1, vocab_size, (batch, length), device=device)
    ids = tokenizer(TEXT * (1 + length // 16), return_tensors="pt").input_ids[0]  # [N]
    starts = torch.randint(0, len(ids) - length, (batch,))
    return torch.stack([ids[s : s + length] for s in starts]).to(device)  # [batch, length]


def attention_transfer_step(model, input_ids: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
    """One stage-1 step: mean over HLA layers of ``MSE(HLA output, softmax output) / mean(softmax output^2)``, the
    relative error (layers differ in scale), on the same hidden states."""
    losses = []

    def match_softmax(module: HLAAttention, args, kwargs, output):
        with torch.no_grad():
            teacher, _ = module.softmax_attn(*args, **{**kwargs, "cache": None})  # [B, T, hidden]
        losses.append(F.mse_loss(output[0].float(), teacher.float()) / teacher.float().pow(2).mean())

    hooks = [
        m.register_forward_hook(match_softmax, with_kwargs=True) for m in model.modules() if isinstance(m, HLAAttention)
    ]
    try:
        model(input_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    loss = torch.stack(losses).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local pretrained checkpoint (Llama, Mistral, Qwen2, Qwen3); default: tiny")
    parser.add_argument("--layers", help="comma-separated decoder layers to convert (default: every other one)")
    parser.add_argument("--widths", default="16,16", help="feature width of each factor (default 16,16)")
    parser.add_argument("--steps", type=int, default=30, help="attention-transfer steps")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--length", type=int, default=64, help="training sequence length")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="model and adapter dtype (float32, bfloat16, ...)")
    args = parser.parse_args()

    model, tokenizer = load_model(args)
    num_layers = model.config.num_hidden_layers
    layers = [int(i) for i in args.layers.split(",")] if args.layers else list(range(0, num_layers, 2))
    if tokenizer is None:
        prompt = torch.randint(1, model.config.vocab_size, (2, 8), device=args.device)
        mask = torch.ones_like(prompt)
    else:
        tokenizer.padding_side = "left"  # HLA honours the padding mask; left padding for generation
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        batch = tokenizer(
            ["Linear attention", "The state of a linear attention layer"], return_tensors="pt", padding=True
        )
        prompt, mask = batch.input_ids.to(args.device), batch.attention_mask.to(args.device)
    with torch.no_grad():
        softmax_logits = model(prompt, attention_mask=mask).logits

    # 1. convert: layers `layers` become HLA, the others keep softmax and their KV cache
    config = AdapterConfig(widths=tuple(int(w) for w in args.widths.split(",")), feature_map="hedgehog")
    adapter = apply_hla(model, layers, config)
    num_params = sum(p.numel() for p in adapter.parameters())
    print(f"HLA in layers {adapter.layers} of {num_layers}; the adapter has {num_params} parameters")

    # 2. stage 1, attention transfer: the model frozen, only the feature maps train
    model.requires_grad_(False)
    adapter.requires_grad_(True)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=args.lr)
    model.train()
    for step in range(args.steps):
        ids = training_batch(tokenizer, model.config.vocab_size, 4, args.length, args.device)
        loss = attention_transfer_step(model, ids, optimizer)
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  attention-transfer relative MSE {loss:.4f}")
    model.eval()

    # 3. generate: HLA layers decode from a fixed-size state, O(1) per token
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=16, do_sample=False)
    print("generated:", tokenizer.batch_decode(out, skip_special_tokens=True) if tokenizer else out.tolist())

    # 4. save the adapter; load it into a fresh copy of the model: the same tokens
    with tempfile.TemporaryDirectory() as directory:
        path = adapter.save_pretrained(directory)
        fresh, _ = load_model(args)
        load_adapter(fresh, directory)
        with torch.no_grad():
            again = fresh.generate(prompt, attention_mask=mask, max_new_tokens=16, do_sample=False)
    print(f"saved {path.name}; reloaded model generates the same tokens: {torch.equal(again, out)}")

    # 5. remove: the original softmax attention, bit for bit
    remove_hla(model)
    with torch.no_grad():
        restored = torch.equal(model(prompt, attention_mask=mask).logits, softmax_logits)
    print(f"remove_hla restores the original logits bit for bit: {restored}")


if __name__ == "__main__":
    main()
