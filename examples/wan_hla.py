"""Linearise a Wan2.1 video DiT with HLA: apply, attention transfer, save, load, remove (spec §5).

    PYTHONPATH=src python3 examples/wan_hla.py                       # tiny random Wan DiT, CPU, seconds
    PYTHONPATH=src python3 examples/wan_hla.py --model /path/to/Wan2.1-T2V-1.3B-Diffusers \\
        --device cuda --dtype bf16 --latent 21x30x52 --layers hybrid --steps 200 --out wan-hla

1. ``apply_hla`` switches the self-attention of the chosen blocks to HLA; the returned adapter owns the new
   parameters (fp32 feature maps), the transformer is untouched.
2. Stage 1, attention transfer: the model is frozen; one softmax forward records each converted block's
   attention input and output, and every HLA layer learns to reproduce its softmax output on those inputs
   (relative MSE), all layers at once.
3. ``save_pretrained`` / ``remove_hla`` / ``load_adapter``: the softmax model comes back bit for bit, the
   reloaded adapter gives the same HLA outputs bit for bit.
4. Stage 2 (a few steps here): fine-tune the whole model on its flow-matching objective.

The activations here are random latents and (unless ``--prompt-embeds``) random text embeddings; a real run
feeds VAE latents of videos noised by the flow-matching schedule and the T5 embeddings of their captions.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from hadamard_attn.integrations import AdapterConfig
from hadamard_attn.integrations.diffusers import HadamardWanAttnProcessor, apply_hla, load_adapter, remove_hla

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=64,
    freq_dim=32,
    ffn_dim=256,
    num_layers=6,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local Wan2.1/2.2 diffusers folder (or its transformer/); default: tiny random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="the transformer's dtype (maps stay fp32)")
    p.add_argument("--latent", default="3x8x8", help="latent frames x height x width (tokens: F * H/2 * W/2)")
    p.add_argument("--layers", default="all", help="'all', 'hybrid' (every third block keeps softmax) or 0,2,5")
    p.add_argument("--widths", default="32x32", help="factor widths, e.g. 32x32 or 64x4")
    p.add_argument("--steps", type=int, default=30, help="stage-1 steps")
    p.add_argument("--finetune-steps", type=int, default=2, help="stage-2 steps")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument(
        "--prompt-embeds", help="a .safetensors file whose tensor 'prompt_embeds' [N, L, text_dim] holds T5 embeddings"
    )
    p.add_argument("--out", help="adapter folder (default: a temporary one)")
    return p.parse_args()


def load_transformer(args: argparse.Namespace) -> WanTransformer3DModel:
    dtype = DTYPES[args.dtype]
    if args.model is None:
        torch.manual_seed(0)
        return WanTransformer3DModel(**TINY).to(args.device, dtype)
    try:
        model = WanTransformer3DModel.from_pretrained(args.model, subfolder="transformer", torch_dtype=dtype)
    except OSError:  # the transformer folder itself
        model = WanTransformer3DModel.from_pretrained(args.model, torch_dtype=dtype)
    return model.to(args.device)


def select_layers(spec: str, num_blocks: int) -> list[int] | None:
    if spec == "all":
        return None
    if spec == "hybrid":  # softmax anchors in blocks 0, 3, 6, ...: HLA in 2/3 of the blocks
        return [i for i in range(num_blocks) if i % 3]
    return [int(i) for i in spec.split(",")]


def sample_batch(model: WanTransformer3DModel, args: argparse.Namespace, text: torch.Tensor | None, B: int = 1):
    """Clean latents ``x0``, noise, timesteps ``t [B]``, noisy latents ``x_t`` and text embeddings ``[B, L, C]``."""
    cfg, dtype = model.config, DTYPES[args.dtype]
    frames, height, width = (int(n) for n in args.latent.split("x"))
    x0 = torch.randn(B, cfg.in_channels, frames, height, width, device=args.device)
    noise = torch.randn_like(x0)
    sigma = torch.rand(B, device=args.device)
    xt = (1 - sigma.view(B, 1, 1, 1, 1)) * x0 + sigma.view(B, 1, 1, 1, 1) * noise  # rectified flow
    if text is None:
        context = torch.randn(B, 512 if args.model else 16, cfg.text_dim, device=args.device)
    else:
        context = text[torch.randint(0, len(text), (B,))].to(args.device)
    return x0.to(dtype), noise.to(dtype), sigma * 1000, xt.to(dtype), context.to(dtype)


@contextmanager
def record_attn1(model: WanTransformer3DModel, layers: list[int]):
    """Record ``(hidden_states [B, T, dim], rotary_emb, output [B, T, dim])`` of each listed block's ``attn1``."""
    records, handles = {}, []
    for i in layers:

        def hook(module, args, output, i=i):
            records[i] = (args[0], args[3], output)

        handles.append(model.blocks[i].attn1.register_forward_hook(hook))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@contextmanager
def softmax_processors(model: WanTransformer3DModel):
    """Run the converted blocks with their original softmax processors for the duration of the block."""
    hla = {
        i: b.attn1.processor
        for i, b in enumerate(model.blocks)
        if isinstance(b.attn1.processor, HadamardWanAttnProcessor)
    }
    for i, proc in hla.items():
        model.blocks[i].attn1.set_processor(proc.original)
    try:
        yield
    finally:
        for i, proc in hla.items():
            model.blocks[i].attn1.set_processor(proc)


def attention_transfer(model, adapter, args, text) -> None:
    """Stage 1: the model frozen, every HLA layer fits its softmax layer's output on the softmax model's inputs."""
    model.requires_grad_(False)
    opt = torch.optim.AdamW(adapter.parameters(), lr=args.lr)
    for step in range(args.steps):
        _, _, t, xt, context = sample_batch(model, args, text)
        with torch.no_grad(), softmax_processors(model), record_attn1(model, adapter.layers) as records:
            model(xt, t, context, return_dict=False)
        losses = []
        for i, (hidden, rotary_emb, target) in records.items():
            attn = model.blocks[i].attn1
            out = attn.processor(attn, hidden, None, None, rotary_emb)  # [B, T, dim], through layer i's maps
            loss = F.mse_loss(out.float(), target.float()) / target.float().var()
            loss.backward()  # one layer's graph at a time
            losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(
                f"stage 1 step {step:4d}: relative MSE per layer, mean {sum(losses) / len(losses):.4f}, "
                f"worst {max(losses):.4f}"
            )


def finetune(model, adapter, args, text) -> None:
    """Stage 2: the whole model (and the maps) on the flow-matching objective, velocity ``noise - x0``."""
    model.requires_grad_(True)
    opt = torch.optim.AdamW([*model.parameters(), *adapter.parameters()], lr=1e-5)
    for step in range(args.finetune_steps):
        x0, noise, t, xt, context = sample_batch(model, args, text)
        pred = model(xt, t, context, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), (noise - x0).float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"stage 2 step {step}: flow-matching loss {loss.item():.4f}")


def main() -> None:
    args = parse_args()
    model = load_transformer(args)
    text = None if args.prompt_embeds is None else load_file(args.prompt_embeds)["prompt_embeds"]
    layers = select_layers(args.layers, len(model.blocks))
    config = AdapterConfig(widths=tuple(int(w) for w in args.widths.split("x")))

    torch.manual_seed(1)
    _, _, t, xt, context = sample_batch(model, args, text)
    with torch.no_grad():
        softmax_out = model(xt, t, context, return_dict=False)[0]

    # 1. HLA in the chosen blocks
    adapter = apply_hla(model, layers, config)
    n = sum(p.numel() for p in adapter.parameters())
    tokens = math.prod(s // p for s, p in zip(xt.shape[2:], model.config.patch_size))
    print(
        f"HLA in blocks {adapter.layers} of {len(model.blocks)}, widths {config.widths}: {n:,} new parameters, "
        f"{tokens} tokens"
    )

    # 2. stage 1: attention transfer
    attention_transfer(model, adapter, args, text)
    with torch.no_grad():
        hla_out = model(xt, t, context, return_dict=False)[0]
    rel = (hla_out.float() - softmax_out.float()).norm() / softmax_out.float().norm()
    print(f"model output, HLA vs softmax: relative error {rel:.4f}")

    # 3. save, remove (softmax is back, bit for bit), load (the same HLA outputs, bit for bit)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out or tmp
        path = adapter.save_pretrained(out_dir)
        print(f"saved {path} ({path.stat().st_size / 2**20:.2f} MiB)")
        remove_hla(model)
        with torch.no_grad():
            assert torch.equal(model(xt, t, context, return_dict=False)[0], softmax_out)
        adapter = load_adapter(model, out_dir)
    with torch.no_grad():
        assert torch.equal(model(xt, t, context, return_dict=False)[0], hla_out)
    print("remove_hla restored the softmax outputs and load_adapter the HLA outputs, bit for bit")

    # 4. stage 2: a short fine-tune of everything (save the transformer too afterwards: it has changed)
    finetune(model, adapter, args, text)


if __name__ == "__main__":
    main()
