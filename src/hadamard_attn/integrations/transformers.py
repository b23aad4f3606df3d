"""HLA for Hugging Face causal LMs (transformers 5.x): Llama, Mistral, Qwen2 and Qwen3 families.

``apply_hla(model, layers)`` swaps the self-attention of the chosen decoder layers for :class:`HLAAttention`, which
reuses the layer's own q/k/v/o projections, q/k norms (Qwen3) and the rotary embedding the model passes in, and
adds one :class:`FactorMaps` per layer, owned by the returned :class:`HLAAdapter`. The model's weights are never
modified and keep their state-dict names; the other layers keep softmax attention and their key/value cache.

Generation: for an HLA layer, the model's :class:`~transformers.DynamicCache` holds an :class:`HLACacheLayer`, the
fixed-size state ``(S [B, H, M, D], z [B, H, M])`` of every token seen, instead of growing keys and values; decoding
a token costs O(1) in the sequence length. ``model.generate()`` and manual decoding with ``cache=`` (or the older
name ``past_key_values=``) work unchanged.

Padding: the attention mask the model builds is honoured; padded tokens add nothing to the state (their key
features and values are zeroed), so a left-padded batch gives, at its real tokens, the logits of each sequence run
alone (with the position ids ``generate`` derives from the mask). Sequences packed into one row without a mask
(position ids restarting at 0) are not separated: the HLA layers see one sequence.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.nn as nn

try:
    import transformers  # noqa: F401  (imported first, so a missing package fails here and not in a submodule)
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
except ImportError as e:
    raise ImportError(
        f"hadamard_attn.integrations.transformers needs transformers 5.x ({e}): pip install hadamard-attn[transformers]"
    ) from e

from ..feature_maps import FactorMaps
from ..layers import apply_rotary
from ..ops import hadamard_attn, hadamard_attn_step
from .adapter import AdapterConfig, HLAAdapter, check_layers

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "AdapterConfig",
    "HLAAdapter",
    "HLAAttention",
    "HLACacheLayer",
    "apply_hla",
    "load_adapter",
    "remove_hla",
]

# Families whose attention is q/k/v/o projections, optional per-head q/k RMSNorm and rotate-half rotary embeddings
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

State = tuple[torch.Tensor, torch.Tensor]


class HLACacheLayer(CacheLayerMixin):
    """The cache of one HLA layer: the state ``(S [B, H, M, D], z [B, H, M])`` (fp32; fp64 for fp64 models) of
    every token seen so far, and their number.

    Its size does not depend on the number of tokens. It counts tokens as a :class:`DynamicLayer` does, so
    ``cache.get_seq_length()`` and the attention masks of the hybrid model's softmax layers are unchanged.
    The model's HLA layers install it in the cache they are given (see :meth:`HLAAttention.cache_layer`).
    """

    is_sliding = False
    # early_initialization builds layers from key/value shapes; the state is shaped by the feature maps
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()
        self.state: State | None = None
        self.cumulative_length = 0

    def lazy_initialization(self, S: torch.Tensor, z: torch.Tensor) -> None:
        self.device = S.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise NotImplementedError(
            "HLACacheLayer keeps a fixed-size HLA state, not keys and values; HLAAttention calls update_state"
        )

    def update_state(self, state: State, num_tokens: int) -> None:
        """Replace the state by ``state``, which includes ``num_tokens`` more tokens (padding included)."""
        if not self.is_initialized:
            self.lazy_initialization(*state)
        self.state = state
        self.cumulative_length += num_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    @property
    def is_croppable(self) -> bool:
        """A state cannot be rolled back (as for other linear attention caches): croppable only while empty."""
        return self.cumulative_length == 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise RuntimeError(
                "HLACacheLayer: an HLA state sums all its tokens and cannot drop the last ones (crop); "
                "assisted decoding and cache rollback need softmax layers"
            )

    def reset(self) -> None:
        self.state = None
        self.cumulative_length = 0
        self.is_initialized = False

    def _map_state(self, fn) -> None:
        if self.state is not None:
            self.state = (fn(self.state[0]), fn(self.state[1]))

    def offload(self) -> None:
        self._map_state(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._map_state(lambda t: t.to(self.device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_state(lambda t: t[indices])


def _real_tokens(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """Which of this call's ``T`` tokens are real (not padding): ``[B, T]`` bool, or None for no padding.

    ``attention_mask`` is what the model passes to its attention layers: None (no padding), a 2D ``[B, kv]`` 0/1
    mask (flash attention) or a 4D ``[B, 1, T, kv]`` mask, bool (sdpa) or additive float (eager), whose last T
    columns are this call's tokens. A real token attends to itself; a padded one is masked out as a key for every
    query, itself included, so the diagonal of the last ``T x T`` block tells them apart.
    """
    if attention_mask is None:
        return None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return attention_mask[:, -T:].bool()  # [B, T]
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        diag = attention_mask[:, 0, :, -T:].diagonal(dim1=-2, dim2=-1)  # [B, T]
        return diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min
    raise NotImplementedError(
        f"attention_mask: HLA layers read padding from None, a 2D mask or a 4D tensor mask, got "
        f"{type(attention_mask).__name__}; use attn_implementation='sdpa' or 'eager'"
    )


class HLAAttention(nn.Module):
    """HLA in place of a Llama/Qwen-style softmax self-attention module, with its forward signature.

    The children of the replaced module (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, and ``q_norm``,
    ``k_norm`` where it has them) are registered here under the same names, so the model's state-dict keys do not
    change; ``maps`` adds the layer's feature maps. The replaced module itself is kept, unregistered, as
    :attr:`softmax_attn` (the teacher for attention transfer; :func:`remove_hla` puts it back).

    Args:
        attn: the softmax attention module (has ``layer_idx``, ``head_dim`` and the projections above).
        maps: the layer's :class:`FactorMaps` (``num_heads`` query heads, ``num_kv_heads`` key heads).
        config: the adapter's :class:`AdapterConfig` (``normalize``, ``eps``, ``backend``).
        num_heads, num_kv_heads: query and key/value heads; grouped-query attention repeats the key features and
            values of each key/value head to its ``num_heads // num_kv_heads`` query heads, as ``repeat_kv`` does.
    """

    def __init__(
        self, attn: nn.Module, maps: FactorMaps, config: AdapterConfig, num_heads: int, num_kv_heads: int
    ) -> None:
        super().__init__()
        for name, child in attn.named_children():
            self.add_module(name, child)
        self.maps = maps
        self.config = config
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.qk_norm = hasattr(attn, "q_norm")
        # not a submodule: its children are registered above under their own names
        object.__setattr__(self, "softmax_attn", attn)

    def cache_layer(self, cache: Cache) -> HLACacheLayer:
        """This layer's :class:`HLACacheLayer` in ``cache``, installed in place of an empty dynamic layer."""
        layers, i = cache.layers, self.layer_idx
        if cache.layer_class_to_replicate is not None:  # a DynamicCache without config adds layers as they come
            while len(layers) < i:
                layers.append(cache.layer_class_to_replicate())
            if len(layers) == i:
                layers.append(HLACacheLayer())
        if i >= len(layers):
            raise ValueError(f"cache: has {len(layers)} layers, HLA layer {i} has no entry")
        layer = layers[i]
        if isinstance(layer, HLACacheLayer):
            return layer
        if isinstance(layer, DynamicLayer) and layer.get_seq_length() == 0:
            layers[i] = HLACacheLayer()
            return layers[i]
        held = " that already holds keys and values" if isinstance(layer, DynamicLayer) else ""
        raise TypeError(
            f"cache: layer {i} is HLA; its fixed-size state needs a DynamicCache, with an empty DynamicLayer or an "
            f"HLACacheLayer at index {i}, got a {type(layer).__name__}{held}"
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """Causal HLA over this call's tokens, after the tokens already in ``cache``.

        Args:
            hidden_states: ``[B, T, hidden_size]``.
            position_embeddings: ``(cos, sin)``, each ``[B, T, head_dim]``, from the model's rotary embedding.
            attention_mask: the model's mask for this layer (None, 2D or 4D); only its padding is used.
            cache: the model's cache (passed as ``past_key_values`` by earlier 5.x releases); None: no state kept.

        Returns:
            ``(out [B, T, hidden_size], None)``: HLA has no attention weights to return.
        """
        cache = cache if cache is not None else past_key_values
        B, T, _ = hidden_states.shape
        D, groups = self.head_dim, self.num_heads // self.num_kv_heads
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, D)  # [B, T, H, D]
        k = self.k_proj(hidden_states).view(B, T, self.num_kv_heads, D)  # [B, T, H_kv, D]
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, D)  # [B, T, H_kv, D]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        qs, ks = self.maps(q, k)  # P x [B, T, H, R_f], P x [B, T, H_kv, R_f]

        real = _real_tokens(attention_mask, T)
        if real is not None:
            # where, not a product: hidden states at padded positions may hold anything, even NaN
            keep = real[:, :, None, None]  # [B, T, 1, 1]
            ks = [torch.where(keep, f, 0) for f in ks]
            v = torch.where(keep, v, 0)
        ks = [f.repeat_interleave(groups, dim=2) for f in ks]  # P x [B, T, H, R_f]
        v = v.repeat_interleave(groups, dim=2)  # [B, T, H, D]

        layer = None if cache is None else self.cache_layer(cache)
        state = None if layer is None else layer.state
        cfg = self.config
        if layer is not None and T == 1:  # decode: O(1) in the number of tokens seen
            o, state = hadamard_attn_step(
                [f[:, 0] for f in qs], [f[:, 0] for f in ks], v[:, 0], state, normalize=cfg.normalize, eps=cfg.eps
            )
            o = o.unsqueeze(1)  # [B, 1, H, D]
        else:
            o, state = hadamard_attn(
                qs,
                ks,
                v,
                causal=True,
                normalize=cfg.normalize,
                eps=cfg.eps,
                initial_state=state,
                output_final_state=layer is not None,
                backend=cfg.backend,
            )  # o: [B, T, H, D]
        if layer is not None:
            layer.update_state(state, T)
        if real is not None:
            # padded queries read an empty state: 0 / 0 with eps = 0, which a later softmax layer's zero
            # attention weight would still turn into NaN for every real token
            o = torch.where(real[:, :, None, None], o, 0)
        return self.o_proj(o.reshape(B, T, self.num_heads * D)), None  # [B, T, hidden_size]


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "base_model", model)  # LlamaModel inside LlamaForCausalLM, or the model itself
    layers = getattr(base, "layers", None)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"model: HLA supports transformers causal LMs of types {SUPPORTED_MODEL_TYPES}, "
            f"got {type(model).__name__} (model_type {model_type!r})"
        )
    return layers


def _hla_layers(layers: nn.ModuleList) -> list[int]:
    return [i for i, layer in enumerate(layers) if isinstance(layer.self_attn, HLAAttention)]


def _install(model: nn.Module, adapter: HLAAdapter) -> HLAAdapter:
    layers = _decoder_layers(model)
    applied = _hla_layers(layers)
    if applied:
        raise RuntimeError(f"model: layers {applied} already use HLA; call remove_hla(model) first")
    check_layers(adapter.layers, len(layers), "decoder layer")
    config = model.config.get_text_config(decoder=True)
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = layers[0].self_attn.head_dim
    got = (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim)
    if got != (num_heads, num_kv_heads, head_dim):
        raise ValueError(
            f"adapter: built for (num_heads, num_kv_heads, head_dim) = {got}, the model has "
            f"{(num_heads, num_kv_heads, head_dim)}"
        )
    adapter.config.check(head_dim, causal=True)
    for i in adapter.layers:
        attn = layers[i].self_attn
        maps = adapter.maps[str(i)].to(attn.q_proj.weight.device)  # the layer's device (sharded models)
        layers[i].self_attn = HLAAttention(attn, maps, adapter.config, num_heads, num_kv_heads)
    return adapter


def apply_hla(model: nn.Module, layers: Iterable[int] | None = None, config: AdapterConfig | None = None) -> HLAAdapter:
    """Switch the self-attention of the decoder layers ``layers`` (None: all) of ``model`` to causal HLA.

    Args:
        model: a causal LM of a type in :data:`SUPPORTED_MODEL_TYPES` (``LlamaForCausalLM``, ``Qwen3Model``, ...).
        layers: decoder layer indices, ``0 <= i < num_hidden_layers``, no repeats; the others keep softmax
            attention (a hybrid model) and their key/value cache.
        config: the :class:`AdapterConfig` (widths, feature map, ...); default ``AdapterConfig()``.

    Returns:
        The :class:`HLAAdapter` that owns every new parameter, each map on its layer's device, in fp32 (maps
        compute in their own dtype and hand the features over in the model's). Its maps are also registered
        inside the model (``...self_attn.maps``), so ``model.to()``, ``model.train()`` and ``model.parameters()``
        include them.

    Raises:
        ValueError, TypeError: bad ``layers``, unsupported model, or maps that do not fit the head dim.
        RuntimeError: the model already has HLA layers (call :func:`remove_hla` first).
    """
    decoder_layers = _decoder_layers(model)
    layers = check_layers(layers, len(decoder_layers), "decoder layer")
    text_config = model.config.get_text_config(decoder=True)
    num_heads = text_config.num_attention_heads
    adapter = HLAAdapter(
        AdapterConfig() if config is None else config,
        layers,
        num_heads,
        decoder_layers[0].self_attn.head_dim,
        text_config.model_type,
        getattr(text_config, "num_key_value_heads", None) or num_heads,
    )
    return _install(model, adapter)


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> HLAAdapter:
    """Apply the adapter saved by ``adapter.save_pretrained(directory)`` to ``model`` (its layers, config and
    weights); the model must be of the same type and attention shape. Returns the loaded :class:`HLAAdapter`."""
    _decoder_layers(model)
    adapter = HLAAdapter.from_pretrained(directory, model_type=model.config.get_text_config(decoder=True).model_type)
    return _install(model, adapter)


def remove_hla(model: nn.Module) -> None:
    """Put the original softmax attention modules back in every HLA layer of ``model``.

    The model's weights were shared, not copied, so its outputs are those it had before :func:`apply_hla` (bit for
    bit, unless its own weights were trained meanwhile). Raises ValueError if ``model`` has no HLA layer.
    """
    layers = _decoder_layers(model)
    applied = _hla_layers(layers)
    if not applied:
        raise ValueError("model: has no HLA layers to remove")
    for i in applied:
        hla = layers[i].self_attn
        layers[i].self_attn = hla.softmax_attn.train(hla.training)  # it missed model.train()/eval() meanwhile
