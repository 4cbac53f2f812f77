"""Self-attention types, by `model.attention_type` (one file each; registered where defined)."""
from ..registry import Registry

ATTENTION = Registry("model.attention_type")

from . import mha  # noqa: E402,F401  (registers mha)
from .masks import document_mask  # noqa: E402
from .mha import flash_attention_usable  # noqa: E402


def build_attention(model_config, layer_idx: int):
    """The attention module of layer layer_idx (options may differ per layer)."""
    return ATTENTION.build(model_config.attention_type, model_config, layer_idx)


__all__ = ["ATTENTION", "build_attention", "document_mask", "flash_attention_usable"]
