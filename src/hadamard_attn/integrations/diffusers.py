"""HLA for the Wan video DiTs of diffusers (Wan2.1 / Wan2.2 ``WanTransformer3DModel``).

Only self-attention (``blocks[i].attn1``) becomes HLA (spec §5); cross-attention to the text (and image) tokens
keeps softmax. The switch is an attention processor with the signature of diffusers' ``WanAttnProcessor``: the
block keeps its projections, q/k norms and rotary embedding, and every new parameter lives in an
:class:`HLAAdapter` that saves and loads on its own.

    adapter = apply_hla(pipe.transformer, layers=None, config=AdapterConfig(widths=(32, 32)))
    ...  # train adapter.parameters()
    adapter.save_pretrained("wan-hla")
    remove_hla(pipe.transformer)
    adapter = load_adapter(pipe.transformer, "wan-hla")
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn as nn

try:
    from diffusers.models.transformers.transformer_wan import WanAttention
except ImportError as e:  # diffusers missing, or older than the WanAttention/WanAttnProcessor refactor (0.35)
    raise ImportError(
        f"hadamard_attn.integrations.diffusers needs diffusers >= 0.35 ({e}); pip install hadamard-attn[diffusers]"
    ) from e

from ..feature_maps import FactorMaps
from ..ops import hadamard_attn
from .adapter import AdapterConfig, HLAAdapter, check_layers

__all__ = ["HadamardWanAttnProcessor", "apply_hla", "load_adapter", "remove_hla"]

MODEL_TYPE = "wan"


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs, exactly as ``WanAttnProcessor`` computes it.

    ``x [B, T, H, D]``; ``freqs_cos``, ``freqs_sin`` ``[1, T, 1, D]`` (each value repeated for its pair).
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, T, H, D/2] each
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class HadamardWanAttnProcessor:
    r"""Attention processor for the self-attention (``attn1``) of a Wan block: HLA in place of softmax.

    Computes q, k, v exactly as ``WanAttnProcessor`` does (projections, ``norm_q``/``norm_k`` across heads, the
    rotary embedding), maps q and k with the layer's :class:`FactorMaps` and runs non-causal
    :func:`hadamard_attn` instead of SDPA, then ``to_out``.

    The maps are held by reference, not registered: the transformer's ``state_dict`` is unchanged and the
    :class:`HLAAdapter` owns them. Maps in another dtype than the model (fp32 maps trained on a bf16 model) see q
    and k cast to their dtype; their features reach the HLA operator in the dtype of q.

    Args:
        maps: the layer's factor maps, ``[..., H, D] -> P x [..., H, R_f]``.
        config: the adapter's config; ``normalize``, ``eps`` and ``backend`` are read at every call.
        original: the processor this one replaced, restored by :func:`remove_hla` (None: a new
            ``WanAttnProcessor``).
    """

    # read and set by diffusers' ``set_attention_backend`` / ``enable_parallelism`` on every processor
    _attention_backend = None
    _parallel_config = None

    def __init__(self, maps: FactorMaps, config: AdapterConfig, original=None) -> None:
        self.maps = maps
        self.config = config
        self.original = original

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``hidden_states [B, T, dim]`` -> ``[B, T, dim]``; ``rotary_emb = (cos, sin)``, each ``[1, T, 1, D]``."""
        if encoder_hidden_states is not None or attn.is_cross_attention or attn.add_k_proj is not None:
            raise ValueError(
                "HadamardWanAttnProcessor is for self-attention (attn1) only; cross-attention to text or image "
                "tokens (attn2, I2V image context) keeps softmax"
            )
        if attention_mask is not None:
            raise ValueError("HadamardWanAttnProcessor: attention_mask is not supported (Wan's attn1 passes None)")
        if self._parallel_config is not None:
            raise NotImplementedError("HadamardWanAttnProcessor: context parallelism is not supported")

        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)  # [B, T, H * D] each
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        query = query.unflatten(2, (attn.heads, -1))  # [B, T, H, D]
        key = key.unflatten(2, (attn.heads, -1))  # [B, T, H, D]
        value = value.unflatten(2, (attn.heads, -1))  # [B, T, H, D]
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)

        qs, ks = self.maps(query, key)  # P x [B, T, H, R_f], in query's dtype

        hidden_states, _ = hadamard_attn(
            qs,
            ks,
            value,
            causal=False,
            normalize=self.config.normalize,
            eps=self.config.eps,
            backend=self.config.backend,
        )  # [B, T, H, D]
        hidden_states = hidden_states.flatten(2, 3).type_as(query)  # [B, T, H * D]

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def _self_attentions(transformer: nn.Module) -> list[WanAttention]:
    """``attn1`` of every block; raises a TypeError unless ``transformer`` is a Wan DiT."""
    blocks = getattr(transformer, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not all(
        isinstance(getattr(b, "attn1", None), WanAttention) for b in blocks
    ):
        raise TypeError(
            f"transformer: expected a Wan DiT (WanTransformer3DModel: blocks[i].attn1 is a WanAttention), "
            f"got {type(transformer).__name__}"
        )
    return [b.attn1 for b in blocks]


def _hla_layers(attns: list[WanAttention]) -> list[int]:
    return [i for i, a in enumerate(attns) if isinstance(a.processor, HadamardWanAttnProcessor)]


def _attach(transformer: nn.Module, adapter: HLAAdapter) -> HLAAdapter:
    """Check ``adapter`` against ``transformer`` and switch its layers' ``attn1`` to HLA."""
    attns = _self_attentions(transformer)
    done = _hla_layers(attns)
    if done:
        raise RuntimeError(f"transformer: HLA is already applied to blocks {done}; call remove_hla(transformer) first")
    check_layers(adapter.layers, len(attns), "block")
    adapter.config.check(adapter.head_dim, causal=False)
    attn = attns[adapter.layers[0]]
    head_dim = attn.inner_dim // attn.heads
    if (adapter.num_heads, adapter.head_dim) != (attn.heads, head_dim):
        raise ValueError(
            f"adapter: built for {adapter.num_heads} heads x {adapter.head_dim}, but the transformer's attention "
            f"has {attn.heads} heads x {head_dim}"
        )
    for i in adapter.layers:
        attn = attns[i]
        maps = adapter.maps[str(i)].to(attn.to_out[0].weight.device)  # the block's device (sharded models)
        attn.set_processor(HadamardWanAttnProcessor(maps, adapter.config, original=attn.processor))
    return adapter


def apply_hla(
    transformer: nn.Module, layers: Sequence[int] | None = None, config: AdapterConfig | None = None
) -> HLAAdapter:
    """Switch the self-attention of the chosen blocks of a Wan DiT to HLA.

    The transformer's own weights are never modified and its ``state_dict`` is unchanged; the new parameters
    (one :class:`FactorMaps` per converted block, fp32, on that block's device) live in the returned adapter.
    Train them with ``adapter.parameters()`` (and freeze the transformer for attention transfer, spec §5).

    Args:
        transformer: a ``WanTransformer3DModel`` (Wan2.1, Wan2.2; for Wan2.2 A14B convert both experts).
        layers: indices of the blocks to convert; None converts every block. Hybrid models keep softmax in the
            other blocks.
        config: widths, feature map, normalisation and backend of HLA; ``AdapterConfig()`` by default.

    Returns:
        the :class:`HLAAdapter` (``model_type="wan"``) that owns every new parameter.

    Raises:
        RuntimeError: HLA is already applied (call :func:`remove_hla` first).
    """
    config = AdapterConfig() if config is None else config
    attns = _self_attentions(transformer)
    layers = check_layers(layers, len(attns), "block")
    attn = attns[layers[0]]
    adapter = HLAAdapter(config, layers, attn.heads, attn.inner_dim // attn.heads, MODEL_TYPE)
    return _attach(transformer, adapter)


def load_adapter(transformer: nn.Module, directory: str | os.PathLike) -> HLAAdapter:
    """Rebuild the adapter saved by ``adapter.save_pretrained(directory)`` and apply it to ``transformer``.

    The maps keep the dtype they were saved in and go to each converted block's device.
    """
    _self_attentions(transformer)
    return _attach(transformer, HLAAdapter.from_pretrained(directory, model_type=MODEL_TYPE))


def remove_hla(transformer: nn.Module) -> list[int]:
    """Restore the original processors (the same objects) of every block switched to HLA.

    Returns:
        the indices of the restored blocks.

    Raises:
        ValueError: no block of ``transformer`` uses HLA.
    """
    attns = _self_attentions(transformer)
    layers = _hla_layers(attns)
    if not layers:
        raise ValueError("transformer: no block uses HLA; nothing to remove")
    for i in layers:
        original = attns[i].processor.original
        attns[i].set_processor(attns[i]._default_processor_cls() if original is None else original)
    return layers
