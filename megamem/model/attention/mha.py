"""Causal self-attention (MHA/GQA) through SDPA, or flash-attn on CUDA when it is installed."""
from __future__ import annotations

import importlib.util

import torch
import torch.nn as nn

from ...config import ModelConfig
from ...ops import Linear, sdpa
from .registry import ATTENTION
from .masks import additive_mask, causal_mask

_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def flash_attention_usable(x: torch.Tensor) -> bool:
    """flash-attn needs CUDA and half precision; everything else goes through SDPA."""
    return _HAS_FLASH_ATTN and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


@ATTENTION.register("mha", aliases=("standard", "gqa"))
class MultiHeadAttention(nn.Module):
    """Multi-head attention; num_kv_heads < num_heads makes it grouped-query. One fused qkv matmul."""

    def __init__(self, model: ModelConfig, layer_idx: int):
        super().__init__()
        dim = model.hidden_dim
        self.num_heads, self.num_kv_heads = model.num_heads, model.num_kv_heads or model.num_heads
        self.head_dim = dim // self.num_heads
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        self.qkv_proj = Linear(dim, (H + 2 * KV) * hd, bias=False)
        self.o_proj = Linear(H * hd, dim, bias=False)
        self.attention_dropout = model.attention_dropout
        self.resid_dropout = nn.Dropout(model.dropout)
        self.use_flash_attention = model.use_flash_attention
        # widths of the score (QKᵀ) and value (PV) products over all heads, for FLOP accounting
        self.qk_width = self.v_width = H * hd

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, S, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * hd, KV * hd, KV * hd], dim=-1)
        q = q.view(B, S, H, hd).transpose(1, 2)
        k = k.view(B, S, KV, hd).transpose(1, 2)
        v = v.view(B, S, KV, hd).transpose(1, 2)
        encoding = ctx.encoding
        if encoding is not None:
            q, k = encoding.rotate(q, k, ctx.encoding_state, ctx)
        past = ctx.past
        cache = ctx.layer_cache()
        if cache is not None:
            k, v = cache.append_kv(k, v)
        p = self.attention_dropout if self.training else 0.0
        bias = encoding.attention_bias(ctx.encoding_state, ctx, H, S, k.shape[2]) if encoding is not None else None
        gqa = KV != H
        if bias is not None or ctx.document_mask is not None:
            allowed = ctx.document_mask if ctx.document_mask is not None else causal_mask(S, k.shape[2], x.device)
            mask = allowed if bias is None else additive_mask(allowed, bias, q.dtype)
            y = sdpa(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)
        elif self.use_flash_attention and flash_attention_usable(x):
            from flash_attn import flash_attn_func  # guarded import: CUDA-only package

            # flash-attn aligns the causal mask bottom-right, which is what a KV cache needs
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, causal=True)
            return self.resid_dropout(self.o_proj(y.reshape(B, S, H * hd)))
        elif past == 0:
            y = sdpa(q, k, v, dropout_p=p, is_causal=S > 1, enable_gqa=gqa)
        elif S == 1:  # one new token sees every cached token
            y = sdpa(q, k, v, dropout_p=p, enable_gqa=gqa)
        else:  # several new tokens after a cached prefix: query i sees keys 0..past+i
            y = sdpa(q, k, v, attn_mask=causal_mask(S, k.shape[2], x.device), dropout_p=p, enable_gqa=gqa)
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, S, H * hd)))
