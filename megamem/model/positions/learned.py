"""Learned absolute position embeddings, added to the token embeddings."""
from __future__ import annotations

import torch
import torch.nn as nn

from ...config import ModelConfig
from .registry import POSITIONS
from .base import PositionEncoding


@POSITIONS.register("learned")
class LearnedPositions(nn.Embedding, PositionEncoding):
    """An nn.Embedding of max_seq_len rows (its weight is the checkpoint's `pos_embeddings.weight`)."""

    def __init__(self, model: ModelConfig):
        super().__init__(model.max_seq_len, model.hidden_dim)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + self(positions)
