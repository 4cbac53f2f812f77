"""Memory cross-attention: queries from hidden states, keys/values from a memory bank."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from ..ops import Linear, sdpa
from .diagnostics import dense_entropy
from .sparse_read import QKNorm, top_k_read

if TYPE_CHECKING:  # the cache lives with the model; only its type is needed here
    from ..model.decoding_cache import LayerCache


class LowRankLinear(nn.Module):
    """x → up(down(x)) with a rank-r bottleneck."""

    def __init__(self, in_dim: int, out_dim: int, rank: int):
        super().__init__()
        self.down = Linear(in_dim, rank, bias=False)
        self.up = Linear(rank, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _projection(in_dim: int, out_dim: int, rank: Optional[int]) -> nn.Module:
    return LowRankLinear(in_dim, out_dim, rank) if rank else Linear(in_dim, out_dim, bias=False)


class MemoryCrossAttention(nn.Module):
    """Every token attends to all bank rows (no causal mask, no positions).

    The bank is projected to K/V once per call — not once per batch element: the batch is
    folded into the query length, so all sequences share one [1, kv_heads, N_m, head_dim] K/V.

    diagnose: switched on for a forward by megamem.model.diagnostics; the forward then leaves its
    attention entropy over the bank rows in `diag` (megamem.memory.diagnostics).
    """

    diagnose = False
    diag = None

    def __init__(self, dim: int, bank_dim: int, num_heads: int, num_kv_heads: int, dropout: float = 0.0,
                 projection_rank: Optional[int] = None, top_k: Optional[int] = None, qk_norm: bool = False,
                 qk_temperature: Optional[float] = None):
        super().__init__()
        self.top_k = top_k  # None: softmax over every row (memory.memory_top_k)
        self.qk_norm = QKNorm(num_heads, dim // num_heads, qk_temperature) if qk_norm else None
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.q_proj = _projection(dim, num_heads * self.head_dim, projection_rank)
        self.k_proj = _projection(bank_dim, num_kv_heads * self.head_dim, projection_rank)
        self.v_proj = _projection(bank_dim, num_kv_heads * self.head_dim, projection_rank)
        self.o_proj = _projection(num_heads * self.head_dim, dim, projection_rank)
        self.dropout = nn.Dropout(dropout)

    def output_layer(self) -> nn.Linear:
        """The last linear map of the branch: zeroed by wo_init_zero so the block starts without memory."""
        return self.o_proj.up if isinstance(self.o_proj, LowRankLinear) else self.o_proj

    def memory_kv(self, memory: torch.Tensor):
        N = memory.shape[0]
        k = self.k_proj(memory).view(1, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(memory).view(1, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return (QKNorm.normalise(k) if self.qk_norm is not None else k), v

    def forward(self, x: torch.Tensor, memory: Optional[torch.Tensor], cache: Optional["LayerCache"] = None) -> torch.Tensor:
        """cache: this layer's decoding state while generating; the bank's K/V are projected once per generation."""
        B, S, _ = x.shape
        H, hd = self.num_heads, self.head_dim
        kv = cache.state.get("memory_kv") if cache is not None else None
        if kv is None:
            kv = self.memory_kv(memory.to(x.dtype))
            if cache is not None:
                cache.state["memory_kv"] = kv
        k, v = kv
        q = self.q_proj(x).view(1, B * S, H, hd).transpose(1, 2)
        if self.qk_norm is not None:  # k is normalised when projected (memory_kv), once per bank
            q = self.qk_norm(q)
        scale = 1 / math.sqrt(hd)
        if self.diagnose:
            self.diag = dense_entropy(q, k, scale, self.top_k)
        if self.top_k is not None:
            y = top_k_read(q, k, v, self.top_k, scale)
        else:
            y = sdpa(q, k, v, enable_gqa=self.num_kv_heads != H)
        y = y.transpose(1, 2).reshape(B, S, H * hd)
        return self.dropout(self.o_proj(y))
