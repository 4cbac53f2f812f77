"""Rotary position embeddings, rotate-half (the Llama/HF convention, so weights export unchanged)."""
from __future__ import annotations

from typing import Tuple

import torch

from ...config import ModelConfig, rope_base
from .registry import POSITIONS
from .base import PositionEncoding


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, head_dim]; cos/sin: [S, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@POSITIONS.register("rope")
class RotaryPositions(PositionEncoding):
    def __init__(self, model: ModelConfig):
        super().__init__()
        self.head_dim, self.theta = model.hidden_dim // model.num_heads, rope_base(model)
        self.register_buffer("inv_freq", rope_inv_freq(self.head_dim, self.theta), persistent=False)

    def reset_buffers(self) -> None:
        with torch.no_grad():
            self.inv_freq.copy_(rope_inv_freq(self.head_dim, self.theta))

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def rotate(self, q, k, state, ctx):
        cos, sin = state
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
