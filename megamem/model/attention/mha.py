"""Causal self-attention (MHA/GQA) through SDPA, or flash-attn on CUDA when it is installed."""
from __future__ import annotations

import dataclasses
import importlib.util

import torch
import torch.nn as nn

from ...config import ModelConfig
from ...ops import Linear, sdpa
from ..positions.base import PositionEncoding as PositionEncodingBase
from .registry import ATTENTION
from .masks import additive_mask, causal_mask, window_mask

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
        self.window_size = model.window_size
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
        p = self.attention_dropout if self.training else 0.0
        if self.window_size is not None:
            return self._windowed(x, q, k, v, ctx, p)
        past = ctx.past
        cache = ctx.layer_cache()
        if cache is not None:
            k, v = cache.append_kv(k, v)
        slopes = getattr(encoding, "flash_alibi_slopes", None)
        if slopes is not None and ctx.document_mask is None and self.use_flash_attention and flash_attention_usable(x):
            return self._flash(q, k, v, p, alibi_slopes=slopes())
        bias = encoding.attention_bias(ctx.encoding_state, ctx, H, S, k.shape[2]) if encoding is not None else None
        gqa = KV != H
        if bias is not None or ctx.document_mask is not None:
            allowed = ctx.allowed(S, k.shape[2], x.device)
            mask = allowed if bias is None else additive_mask(allowed, bias, q.dtype)
            y = sdpa(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)
        elif self.use_flash_attention and flash_attention_usable(x):
            return self._flash(q, k, v, p, causal=ctx.causal)
        elif past == 0:
            y = sdpa(q, k, v, dropout_p=p, is_causal=S > 1 and ctx.causal, enable_gqa=gqa)
        elif S == 1:  # one new token sees every cached token
            y = sdpa(q, k, v, dropout_p=p, enable_gqa=gqa)
        else:  # several new tokens after a cached prefix: query i sees keys 0..past+i
            y = sdpa(q, k, v, attn_mask=causal_mask(S, k.shape[2], x.device), dropout_p=p, enable_gqa=gqa)
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, S, H * hd)))

    def _flash(self, q, k, v, p, causal: bool = True, **options):
        """flash-attn, causal (aligned bottom-right, which is what a KV cache needs) unless bidirectional
        (causal false: no cache, model.attention_mode); options: alibi_slopes
        (fp32 [heads]: bias −slope·(i − j)), window_size ((window − 1, 0): keys i − window < j ≤ i)."""
        from flash_attn import flash_attn_func  # guarded import: CUDA-only package

        B, H, S, hd = q.shape
        y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, causal=causal,
                            **options)
        return self.resid_dropout(self.o_proj(y.reshape(B, S, H * hd)))

    def _windowed(self, x, q, k, v, ctx, p):
        """Sliding-window attention: query i sees keys i − window < j ≤ i (and its document's only);
        decoding keeps a ring of window keys per layer (LayerCache.append_kv_window)."""
        B, H, S, hd = q.shape
        cache, encoding = ctx.layer_cache(), ctx.encoding
        if cache is not None:
            k, v, key_positions = cache.append_kv_window(k, v, self.window_size)
        else:
            key_positions = ctx.positions
        slopes = getattr(encoding, "flash_alibi_slopes", None)
        no_bias = encoding is None or type(encoding).attention_bias is PositionEncodingBase.attention_bias
        if cache is None and ctx.document_mask is None and self.use_flash_attention and flash_attention_usable(x) \
                and (no_bias or slopes is not None):
            return self._flash(q, k, v, p, window_size=(self.window_size - 1, 0),
                               alibi_slopes=None if slopes is None else slopes())
        allowed = window_mask(ctx.positions, key_positions, self.window_size)
        if ctx.document_mask is not None:
            allowed = ctx.document_mask & allowed
        bias = None
        if encoding is not None:
            bias = encoding.attention_bias(ctx.encoding_state, dataclasses.replace(ctx, key_positions=key_positions),
                                           H, S, k.shape[2])
        mask = allowed if bias is None else additive_mask(allowed, bias, q.dtype)
        y = sdpa(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=self.num_kv_heads != H)
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, S, H * hd)))
