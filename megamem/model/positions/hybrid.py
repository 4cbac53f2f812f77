"""Hybrid: RoPE for positions below hybrid_K, the π-Spiral embedding above, blended per position.

With w(n) = σ((n − K)/W) (W = transition_width; W = 0: w(n) = 1 if n ≥ K else 0), position n
- rotates its query and key by RoPE at the angle (1 − w(n))·n·θ_i (a rotation, so norms are kept;
  far above K the rotation fades to the identity),
- adds w(n)·e_n to its token embedding, e_n the spiral embedding (spiral.py).
Each token's encoding depends on its own position only, so the model stays causal and KV-cacheable.
With W = 0 every position below K is exactly RoPE (the angle is n·θ_i, the embedding adds 0).
"""
from __future__ import annotations

from typing import Tuple

import torch

from ...config import ModelConfig
from .registry import POSITIONS
from .rope import RotaryPositions
from .spiral import irrational_fraction, spiral_embedding


def hybrid_weight(positions: torch.Tensor, K: int, W: int) -> torch.Tensor:
    """w(n) in float64 (exact 0/1 for W = 0)."""
    n = positions.double()
    return (n >= K).double() if W == 0 else torch.sigmoid((n - K) / W)


@POSITIONS.register("hybrid")
class HybridPositions(RotaryPositions):
    def __init__(self, model: ModelConfig):
        super().__init__(model)
        p = model.pos_encoding
        self.K = p.hybrid_K if p.hybrid_K is not None else 8000
        self.W = p.transition_width if p.transition_width is not None else 1000
        self.dim = model.hidden_dim
        self.fraction = irrational_fraction(p.irrational or "pi")

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        scaled = (positions.double() * (1.0 - hybrid_weight(positions, self.K, self.W))).float()
        return super().prepare(scaled, dtype)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        w = hybrid_weight(positions, self.K, self.W)
        if not bool((w > 0).any()):
            return x  # every position below K with a hard switch: RoPE alone
        return x + (w[:, None] * spiral_embedding(positions, self.fraction, self.dim, torch.float64)).to(x.dtype)
