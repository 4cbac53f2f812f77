"""MLP types, by `model.mlp_type` (one file each; registered where defined)."""
from ...config import mlp_type
from .registry import MLP
from . import gelu, swiglu  # noqa: F401  (register swiglu, gelu, gelu_tanh)


def build_mlp(model_config, layer_idx: int):
    """The MLP of layer layer_idx (options may differ per layer)."""
    return MLP.build(mlp_type(model_config), model_config, layer_idx)


__all__ = ["MLP", "build_mlp"]
