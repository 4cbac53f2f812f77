"""Pre-norm decoder block with an optional memory slot.

Layout A: x → self-attn → memory → MLP
Layout B: x → self-attn → MLP → memory → MLP (a second MLP after the memory read)
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import MemoryConfig, ModelConfig
from ..memory.chapters import ChapterMemoryAttention
from ..memory.cross_attention import MemoryCrossAttention
from .attention import CausalSelfAttention
from .kv_cache import KVCache
from .layers import make_mlp, make_norm


class MemoryBranch(nn.Module):
    """Norm + memory cross-attention (+ the extra MLP of layout B): everything memory adds to a block."""

    def __init__(self, model: ModelConfig, mem: MemoryConfig, bank_dim: int):
        super().__init__()
        heads = mem.memory_num_heads or model.num_heads
        self.norm = make_norm(model.hidden_dim, model.norm_eps, model.use_rms_norm)
        args = (model.hidden_dim, bank_dim, heads, mem.memory_num_kv_heads or heads)
        rank = mem.projection_rank if mem.use_low_rank_projections else None
        if mem.use_chapters:  # routed chapters of the bank instead of the whole bank
            self.attn = ChapterMemoryAttention(*args, mem, mem.memory_dropout, rank)
        else:
            self.attn = MemoryCrossAttention(*args, mem.memory_dropout, rank)
        if mem.memory_block_variant == "B":
            self.mlp_norm = make_norm(model.hidden_dim, model.norm_eps, model.use_rms_norm)
            self.mlp = make_mlp(model.hidden_dim, model.intermediate_dim, model.hidden_activation, model.dropout)
        else:
            self.mlp = None
        self.checkpointed = mem.memory_gradient_checkpointing

    def output_layers(self) -> List[nn.Linear]:
        """Layers zeroed by wo_init_zero, so the whole branch (layout B's MLP included) starts as identity."""
        return [self.attn.output_layer()] + ([self.mlp.down_proj] if self.mlp is not None else [])

    def _read(self, x, memory, cache, layer):
        return self.attn(self.norm(x), memory, cache, layer)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, cache: Optional[KVCache], layer: int) -> torch.Tensor:
        if self.checkpointed and self.training and torch.is_grad_enabled():
            x = x + checkpoint(self._read, x, memory, cache, layer, use_reentrant=False)
        else:
            x = x + self._read(x, memory, cache, layer)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


class Block(nn.Module):
    def __init__(self, model: ModelConfig, mem: MemoryConfig, bank_dim: Optional[int]):
        super().__init__()
        self.attn_norm = make_norm(model.hidden_dim, model.norm_eps, model.use_rms_norm)
        self.attn = CausalSelfAttention(model.hidden_dim, model.num_heads, model.num_kv_heads or model.num_heads,
                                        model.attention_dropout, model.dropout, model.use_flash_attention)
        self.mlp_norm = make_norm(model.hidden_dim, model.norm_eps, model.use_rms_norm)
        self.mlp = make_mlp(model.hidden_dim, model.intermediate_dim, model.hidden_activation, model.dropout)
        self.memory = MemoryBranch(model, mem, bank_dim) if bank_dim is not None else None
        self.layout = mem.memory_block_variant

    def forward(self, x: torch.Tensor, cos, sin, memory: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, layer: int = 0, document_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, document_mask)
        if self.memory is not None and self.layout == "A":
            x = self.memory(x, memory, cache, layer)
        x = x + self.mlp(self.mlp_norm(x))
        if self.memory is not None and self.layout == "B":
            x = self.memory(x, memory, cache, layer)
        return x
