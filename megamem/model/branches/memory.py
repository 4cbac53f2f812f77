"""The memory branch: norm + cross-attention to a bank (+ layout B's second MLP).

Layout A: x → self-attn → memory → MLP
Layout B: x → self-attn → MLP → memory → MLP (a second MLP after the memory read)
Layout C: x → self-attn → memory (the memory read stands where the MLP was, as memory layers do in
          "Memory Layers at Scale", arXiv 2412.09764: the model cannot route what it stores around it)
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ...config import MemoryConfig, ModelConfig
from ...memory.bank import bank_dim
from ...memory.chapters import ChapterMemoryAttention
from ...memory.cross_attention import MemoryCrossAttention
from ...memory.placement import bank_assignment, memory_layers
from ..layers import make_norm
from ..mlp import build_mlp
from .registry import BRANCHES
from .base import ResidualBranch


class MemoryBranch(ResidualBranch):
    """Everything memory adds to a block; reads the bank `bank_index` from ctx.banks.

    diagnose: switched on for a forward by megamem.model.diagnostics; the forward then leaves
    ‖delta‖/‖x‖ (mean over tokens) in `diag_rel_norm`.
    """

    diagnose = False
    diag_rel_norm = None

    def __init__(self, model: ModelConfig, mem: MemoryConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.bank_index = bank_assignment(mem, memory_layers(mem, model.num_layers))[layer_idx]
        heads = mem.memory_num_heads or model.num_heads
        self.norm = make_norm(model.hidden_dim, model.norm_eps, model.use_rms_norm)
        args = (model.hidden_dim, bank_dim(mem, model.hidden_dim), heads, mem.memory_num_kv_heads or heads)
        rank = mem.projection_rank if mem.use_low_rank_projections else None
        if mem.use_chapters:  # routed chapters of the bank instead of the whole bank
            self.attn = ChapterMemoryAttention(*args, mem, mem.memory_dropout, rank)
        else:
            self.attn = MemoryCrossAttention(*args, mem.memory_dropout, rank, mem.memory_top_k, mem.memory_qk_norm,
                                             mem.memory_qk_temperature)
        if mem.memory_block_variant == "B":
            self.mlp_norm = make_norm(model.hidden_dim, model.norm_eps, model.use_rms_norm)
            self.mlp = build_mlp(model, layer_idx)
        else:
            self.mlp = None
        self.slot = "after_mlp" if mem.memory_block_variant == "B" else "after_attention"
        self.replaces_mlp = mem.memory_block_variant == "C"
        self.checkpointed = mem.memory_gradient_checkpointing

    def output_layers(self) -> List[nn.Linear]:
        """Layers zeroed by wo_init_zero, so the whole branch (layout B's MLP included) starts as identity."""
        return [self.attn.output_layer()] + ([self.mlp.down_proj] if self.mlp is not None else [])

    def _read(self, x, memory, cache):
        return self.attn(self.norm(x), memory, cache)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """The memory read (layout B's MLP is applied by residual(), after it)."""
        memory, cache = ctx.banks.get(self.bank_index), ctx.layer_cache()
        if self.checkpointed and self.training and torch.is_grad_enabled():
            delta = checkpoint(self._read, x, memory, cache, use_reentrant=False)
        else:
            delta = self._read(x, memory, cache)
        if self.diagnose:
            with torch.no_grad():
                self.diag_rel_norm = (delta.float().norm(dim=-1) / x.float().norm(dim=-1).clamp_min(1e-30)).mean()
        return delta

    def residual(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self(x, ctx)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


@BRANCHES.register("memory")
def memory_branch(model: ModelConfig, mem: MemoryConfig, layer_idx: int) -> Optional[MemoryBranch]:
    """Layers chosen by the memory placement keys read memory."""
    return MemoryBranch(model, mem, layer_idx) if layer_idx in memory_layers(mem, model.num_layers) else None
