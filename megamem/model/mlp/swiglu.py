"""Gated MLP (SwiGLU), the Llama MLP."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import ModelConfig
from ...ops import Linear
from .registry import MLP


@MLP.register("swiglu")
class SwiGLU(nn.Module):
    """Gate and up projections are one fused matmul."""

    def __init__(self, model: ModelConfig, layer_idx: int = 0):
        super().__init__()
        dim, hidden = model.hidden_dim, model.intermediate_dim
        self.gate_up_proj = Linear(dim, 2 * hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(model.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.dropout(self.down_proj(F.silu(gate) * up))
