"""Self-attention types, by `model.attention_type` (one file each; registered where defined)."""
from .registry import ATTENTION
from . import mha, mla  # noqa: F401  (register mha, mla)
from .masks import document_mask
from .mha import flash_attention_usable


def build_attention(model_config, layer_idx: int):
    """The attention module of layer layer_idx (options may differ per layer)."""
    return ATTENTION.build(model_config.attention_type, model_config, layer_idx)


__all__ = ["ATTENTION", "build_attention", "document_mask", "flash_attention_usable"]
