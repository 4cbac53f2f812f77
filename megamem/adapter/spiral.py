"""model.pos_encoding.type pi_spiral on a pretrained base: g·e_n added to its token embeddings.

From scratch the spiral e_n (megamem/model/positions/spiral.py, exact phases) is the model's only
position signal. A pretrained base already rotates by RoPE, so here the base keeps its RoPE and a
forward hook on its input embeddings adds g·e_n, g a learned scalar gate initialised at 0: a fresh
adapter computes exactly what the base computes, and training opens the gate (∂L/∂g = Σ ∂L/∂x_n·e_n).
n is the absolute position (after the HF cache while decoding). docs/positions.md#on-pretrained-models-adapter-runs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..model.positions.spiral import irrational_fraction, spiral_embedding


class SpiralGate(nn.Module):
    """The gate g (1 element: DeepSpeed cannot broadcast a 0-d parameter) and the spiral's irrational."""

    def __init__(self, width: int, irrational: str):
        super().__init__()
        self.width, self.fraction = width, irrational_fraction(irrational)
        self.gate = nn.Parameter(torch.zeros(1))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gate.zero_()

    def forward(self, x: torch.Tensor, past: int) -> torch.Tensor:
        """x [B, S, D] embeddings of the tokens at positions past … past + S − 1 → x + g·e_n."""
        positions = torch.arange(past, past + x.shape[1], device=x.device)
        e = spiral_embedding(positions, self.fraction, self.width, torch.float64)
        return x + (self.gate.double() * e).to(x.dtype)


def embedding_hook(spiral: SpiralGate, past: Callable[[], int]):
    """A forward hook for the base's input embeddings; past() gives the tokens already cached."""
    def hook(module, args, output):
        return spiral(output, past())
    return hook
