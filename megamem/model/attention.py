"""Causal self-attention (MHA/GQA) through SDPA, or flash-attn on CUDA when it is installed."""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn as nn

from ..ops import Linear, sdpa
from .kv_cache import KVCache
from .layers import apply_rotary

_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def flash_attention_usable(x: torch.Tensor) -> bool:
    """flash-attn needs CUDA and half precision; everything else goes through SDPA."""
    return _HAS_FLASH_ATTN and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] document ids → [B, 1, S, S] bool mask: causal and inside one document (built once per forward)."""
    S = document_ids.shape[1]
    same = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(S, S, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal)[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, attention_dropout: float = 0.0,
                 dropout: float = 0.0, use_flash_attention: bool = True):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.qkv_proj = Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=False)
        self.o_proj = Linear(num_heads * self.head_dim, dim, bias=False)
        self.attention_dropout = attention_dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.use_flash_attention = use_flash_attention

    def forward(self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                cache: Optional[KVCache] = None, layer: int = 0,
                document_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """document_mask: [B, 1, S, S] bool (True = may attend), from document_mask(); None = plain causal."""
        B, S, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * hd, KV * hd, KV * hd], dim=-1)
        q = q.view(B, S, H, hd).transpose(1, 2)
        k = k.view(B, S, KV, hd).transpose(1, 2)
        v = v.view(B, S, KV, hd).transpose(1, 2)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
        p = self.attention_dropout if self.training else 0.0
        if document_mask is not None:  # packed documents: block-diagonal causal mask through SDPA
            y = sdpa(q, k, v, attn_mask=document_mask, dropout_p=p,
                     enable_gqa=KV != H).transpose(1, 2).reshape(B, S, H * hd)
        elif self.use_flash_attention and flash_attention_usable(x):
            from flash_attn import flash_attn_func  # guarded import: CUDA-only package

            # flash-attn aligns the causal mask bottom-right, which is what a KV cache needs
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, causal=True)
            y = y.reshape(B, S, H * hd)
        else:
            y = self._sdpa(q, k, v, past, p).transpose(1, 2).reshape(B, S, H * hd)
        return self.resid_dropout(self.o_proj(y))

    def _sdpa(self, q, k, v, past: int, p: float) -> torch.Tensor:
        S, T = q.shape[2], k.shape[2]
        gqa = self.num_kv_heads != self.num_heads
        if past == 0:
            return sdpa(q, k, v, dropout_p=p, is_causal=S > 1, enable_gqa=gqa)
        if S == 1:  # one new token sees every cached token
            return sdpa(q, k, v, dropout_p=p, enable_gqa=gqa)
        # several new tokens after a cached prefix: query i sees keys 0..past+i
        mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(diagonal=past)
        return sdpa(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)
