"""Two-layer GELU MLP (exact or tanh-approximated GELU)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import ModelConfig
from ...ops import Linear
from .registry import MLP


class GeluMLP(nn.Module):
    approximate = "none"

    def __init__(self, model: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.up_proj = Linear(model.hidden_dim, model.intermediate_dim, bias=False)
        self.down_proj = Linear(model.intermediate_dim, model.hidden_dim, bias=False)
        self.dropout = nn.Dropout(model.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate)))


MLP.register("gelu")(GeluMLP)


@MLP.register("gelu_tanh")
class GeluTanhMLP(GeluMLP):
    approximate = "tanh"
