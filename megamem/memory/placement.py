"""Which layers read memory, and which bank each of them reads."""
from __future__ import annotations

from typing import Dict, List

from ..config import MemoryConfig
from ..config.layer_selection import select_layers


def memory_layers(cfg: MemoryConfig, num_layers: int) -> List[int]:
    """Layer indices (0-based) that get memory cross-attention."""
    if cfg.vanilla_mode or not cfg.use_memory_adapter:
        return []
    return select_layers(cfg.memory_layer_placement, num_layers, cfg.memory_layer_k, cfg.memory_layer_n,
                         cfg.memory_layer_indices)


def bank_assignment(cfg: MemoryConfig, layers: List[int]) -> Dict[int, int]:
    """Map each memory layer to a bank index.

    shared: one bank for all; per_layer: one bank each; every_k_layers: consecutive groups of
    memory_sharing_k memory layers share one bank.
    """
    if cfg.memory_sharing == "shared":
        return {layer: 0 for layer in layers}
    if cfg.memory_sharing == "per_layer":
        return {layer: i for i, layer in enumerate(layers)}
    return {layer: i // cfg.memory_sharing_k for i, layer in enumerate(layers)}


def num_banks(assignment: Dict[int, int]) -> int:
    return len(set(assignment.values()))
