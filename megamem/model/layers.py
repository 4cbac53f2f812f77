"""Norms (RMSNorm or LayerNorm), shared by blocks and branches."""
from __future__ import annotations

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 so bf16 activations keep their scale
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def make_norm(dim: int, eps: float, rms: bool) -> nn.Module:
    return RMSNorm(dim, eps) if rms else nn.LayerNorm(dim, eps=eps)
