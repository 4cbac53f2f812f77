"""Which layers a placement selects: one policy for every per-layer part (memory, PEER, and the parts to come).

A part names a placement and its numbers with its own keys (memory: memory_layer_placement,
memory_layer_k, memory_layer_n, memory_layer_indices; PEER: model.peer_layer_*) and asks `select_layers`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

PLACEMENTS = ("middle", "all", "first_k", "last_k", "every_n", "custom", "none")


def select_layers(placement: str, num_layers: int, k: int = 0, n: int = 1,
                  indices: Optional[Sequence[int]] = None) -> List[int]:
    """Layer indices (0-based, sorted) that a placement selects among num_layers."""
    if placement == "middle":  # the one middle layer (the PEER paper's choice: block 6 of 12)
        return [num_layers // 2] if num_layers > 0 else []
    if placement == "all":
        return list(range(num_layers))
    if placement == "first_k":
        return list(range(min(k, num_layers)))
    if placement == "last_k":
        return list(range(max(num_layers - k, 0), num_layers))
    if placement == "every_n":  # layers n-1, 2n-1, ...: every n-th layer, counting from 1
        return list(range(n - 1, num_layers, n))
    if placement == "custom":
        return sorted(indices or [])
    if placement == "none":
        return []
    raise ValueError(f"unknown layer placement '{placement}'; valid: {', '.join(PLACEMENTS)}")


def peer_placement(model) -> str:
    """PEER's placement: the key, else every layer from peer_start_layer on, else the middle layer."""
    if model.peer_layer_placement is not None:
        return model.peer_layer_placement
    return "last_k" if model.peer_start_layer is not None else "middle"


def peer_layers(model) -> List[int]:
    """Layers whose MLP is PEER (model.use_peer and its placement keys); empty without use_peer."""
    if not model.use_peer:
        return []
    placement, k = peer_placement(model), model.peer_layer_k
    if model.peer_layer_placement is None and model.peer_start_layer is not None:
        k = model.num_layers - model.peer_start_layer
    return select_layers(placement, model.num_layers, k, model.peer_layer_n, model.peer_layer_indices)


def attractor_layers(model) -> List[int]:
    """Layers with an attractor branch: model.attractor's inject_layers (all, last_N or a list); none without
    use_attractor or with attractor_inject: none."""
    a = model.attractor
    if not a.use_attractor or a.attractor_inject == "none":
        return []
    if isinstance(a.inject_layers, list):
        return select_layers("custom", model.num_layers, indices=a.inject_layers)
    return select_layers("last_k" if a.inject_layers == "last_N" else "all", model.num_layers, k=a.N_inject)
