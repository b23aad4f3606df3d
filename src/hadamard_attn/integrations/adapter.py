"""The adapter: the module that owns every parameter HLA adds to a pretrained model, saved with safetensors.

``apply_hla`` of an integration (diffusers, transformers) builds one :class:`FactorMaps` per converted attention
layer and keeps them in an :class:`HLAAdapter`; the model's own weights are never modified. One file,
``hla_adapter.safetensors``, holds the weights and, in its metadata, everything needed to rebuild the adapter.
"""

from __future__ import annotations

import json
import operator
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..feature_maps import FactorMaps, check_factor_maps
from ..ops.api import check_backend, check_eps, check_flag

ADAPTER_FILE = "hla_adapter.safetensors"
FORMAT = "hadamard-attn-adapter/1"


@dataclass
class AdapterConfig:
    """How the converted attention layers compute HLA (the model fixes heads, head dim and causality).

    Args:
        widths: one feature width R_f per factor, e.g. ``(32, 32)`` or ``(64, 4)``.
        feature_map: a name in :data:`hadamard_attn.FEATURE_MAPS`; ``"hedgehog"`` (learnable) by default.
        shared_factors: one (query map, key map) pair for every factor, so ``A = S^P``.
        normalize, eps, backend: passed to :func:`hadamard_attn.hadamard_attn`.
    """

    widths: tuple[int, ...] = (32, 32)
    feature_map: str = "hedgehog"
    shared_factors: bool = False
    normalize: bool = True
    eps: float = 1e-6
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)
        check_flag(self.shared_factors, "shared_factors")
        check_flag(self.normalize, "normalize")
        check_eps(self.eps)
        check_backend(self.backend)

    def check(self, head_dim: int, causal: bool | None = None) -> None:
        """Validate the maps against the model's head dim and the backend against its mode (errors name the
        field)."""
        check_factor_maps(self.feature_map, head_dim, self.widths, self.shared_factors, self.normalize)
        check_backend(self.backend, causal)


def check_layers(layers: Iterable[int] | None, num_layers: int, kind: str) -> list[int]:
    """The sorted indices of the layers to convert (None: all ``num_layers``); errors name ``layers``.

    ``kind`` names a layer in messages (``"block"``, ``"decoder layer"``).
    """
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers: expected None or a sequence of {kind} indices, got {type(layers).__name__}")
    layers = list(layers)
    if not layers:
        raise ValueError(f"layers: needs at least one {kind} index (None converts all), got []")
    for i in layers:
        if isinstance(i, bool) or not hasattr(type(i), "__index__"):
            raise TypeError(f"layers: {kind} indices must be integers, got {i!r}")
        if not 0 <= operator.index(i) < num_layers:
            raise ValueError(f"layers: {kind} index {i} is out of range for a model of {num_layers} {kind}s")
    layers = [operator.index(i) for i in layers]
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers: repeated indices in {layers}")
    return sorted(layers)


class HLAAdapter(nn.Module):
    """Every new parameter of an HLA-converted model: ``maps[str(layer)]`` is that layer's :class:`FactorMaps`.

    Args:
        config: the :class:`AdapterConfig`.
        layers: indices of the converted attention layers (the others keep softmax).
        num_heads, head_dim: query heads of each layer; ``num_kv_heads`` key heads (grouped-query attention).
        model_type: which integration built it (``"wan"``, ``"llama"``, ...); checked on load.
    """

    def __init__(
        self,
        config: AdapterConfig,
        layers: list[int],
        num_heads: int,
        head_dim: int,
        model_type: str,
        num_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        config.check(head_dim)
        self.config = config
        self.layers = sorted(layers)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.model_type = model_type
        self.maps = nn.ModuleDict(
            {
                str(i): FactorMaps(
                    num_heads, head_dim, config.widths, config.feature_map, config.shared_factors, self.num_kv_heads
                )
                for i in self.layers
            }
        )

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "model_type": self.model_type,
            "layers": json.dumps(self.layers),
            "num_heads": str(self.num_heads),
            "num_kv_heads": str(self.num_kv_heads),
            "head_dim": str(self.head_dim),
            "config": json.dumps(asdict(self.config)),
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/hla_adapter.safetensors`` atomically and durably (a temporary file, fsync, a rename,
        fsync of the directory): a kill at any point leaves the previous file or the new one, never a torn one."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / ADAPTER_FILE
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".hla_adapter.", suffix=".tmp")
        os.close(fd)
        try:
            tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
            save_file(tensors, tmp, metadata=self.metadata())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the adapter private
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())  # the bytes reach the disk before the rename does
            os.replace(tmp, target)
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # and the rename itself
            finally:
                os.close(dir_fd)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model_type: str | None = None) -> HLAAdapter:
        """Rebuild the adapter saved in ``directory`` and load its weights (strict)."""
        path = Path(directory) / ADAPTER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"directory: no {ADAPTER_FILE} in {directory}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an HLA adapter (format {meta.get('format')!r}, expected {FORMAT!r})")
        if model_type is not None and meta["model_type"] != model_type:
            raise ValueError(f"{path}: adapter for model type {meta['model_type']!r}, not {model_type!r}")
        config = AdapterConfig(**json.loads(meta["config"]))
        adapter = cls(
            config,
            json.loads(meta["layers"]),
            int(meta["num_heads"]),
            int(meta["head_dim"]),
            meta["model_type"],
            int(meta["num_kv_heads"]),
        )
        # assign: the maps take the saved tensors as they are, dtype included
        adapter.load_state_dict(load_file(str(path)), assign=True)
        return adapter
