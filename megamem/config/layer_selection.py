"""Which layers a placement selects: one policy for every per-layer part (memory, and the parts to come).

A part names a placement and its numbers with its own keys (memory: memory_layer_placement,
memory_layer_k, memory_layer_n, memory_layer_indices) and asks `select_layers`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

PLACEMENTS = ("all", "first_k", "last_k", "every_n", "custom", "none")


def select_layers(placement: str, num_layers: int, k: int = 0, n: int = 1,
                  indices: Optional[Sequence[int]] = None) -> List[int]:
    """Layer indices (0-based, sorted) that a placement selects among num_layers."""
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
