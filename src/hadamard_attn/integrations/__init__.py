"""Drop-in HLA for pretrained models. ``adapter`` is shared; ``diffusers`` and ``transformers`` need their extras."""

from .adapter import AdapterConfig, HLAAdapter

__all__ = ["AdapterConfig", "HLAAdapter"]
