"""MLP types, by `model.mlp_type` (one file each; registered where defined). PEER replaces the MLP of
the layers that model.use_peer and its placement select (megamem.config.layer_selection.peer_layers)."""
from ...config import mlp_type
from ...config.layer_selection import peer_layers
from .registry import MLP
from . import gelu, peer, swiglu  # noqa: F401  (register swiglu, gelu, gelu_tanh, peer)


def build_mlp(model_config, layer_idx: int):
    """The MLP of layer layer_idx (options may differ per layer: PEER layers get `peer`)."""
    name = "peer" if layer_idx in peer_layers(model_config) else mlp_type(model_config)
    return MLP.build(name, model_config, layer_idx)


__all__ = ["MLP", "build_mlp"]
