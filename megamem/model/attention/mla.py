"""Multi-head latent attention (MLA): keys and values come from one small per-token latent.

Per token: c = RMSNorm(W_DKV x) of width kv_lora_rank, plus one rotated key part k_rope
(qk_rope_head_dim) shared by every head. Head i's key is [W_UK_i c ; k_rope], its value W_UV_i c
(W_UK, W_UV: the rows of kv_b_proj). Queries: [q_nope_i ; RoPE(q_rope_i)], through an optional
low-rank q_a_proj → RMSNorm → q_b_proj. Scores are scaled by (qk_nope_head_dim + qk_rope_head_dim)^-1/2
in every form.

Decoding caches only [c ; k_rope] per token (kv_lora_rank + qk_rope_head_dim values). A forward
without cached tokens (training, a prompt) runs the naive form: per-head K/V expanded from the
latent. Forwards after cached tokens run the absorbed form: q_nope_i·W_UK_i scores the latent
directly, the weighted latent goes through W_UV_i, then o_proj — W_UK and W_UV sliced from the live
kv_b_proj weight on every call, so an optimizer step between two forwards is always seen.

MLA rotates its own rope part (base mla_config.rope_theta, else model.rope_theta) when
pos_encoding.type is rope; with learned or none positions nothing is rotated. An encoding's
attention-bias hook is applied; an encoding that rotates at the model's head width is refused.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ...config import ConfigError, ModelConfig, position_type
from ...ops import Linear, sdpa
from ..layers import RMSNorm
from ..positions import POSITIONS, PositionEncoding
from ..positions.rope import apply_rotary, rope_inv_freq
from .masks import additive_mask
from .registry import ATTENTION

CACHE_KEY = "mla_latent"  # LayerCache.state entry: [B, tokens, kv_lora_rank + qk_rope_head_dim]


def _rotation(model: ModelConfig) -> bool:
    """Whether MLA rotates its rope part; refuses encodings that would rotate full-width q/k heads."""
    name = position_type(model)
    if name == "rope":
        return True
    if POSITIONS.get(name).rotate is not PositionEncoding.rotate:
        raise ConfigError(f"model.pos_encoding.type: '{name}' rotates queries/keys at the model's head width, which "
                          "attention_type mla does not have; use rope (MLA's decoupled RoPE), learned or none")
    return False


@ATTENTION.register("mla")
class MultiHeadLatentAttention(nn.Module):
    def __init__(self, model: ModelConfig, layer_idx: int):
        super().__init__()
        c, dim, H = model.mla_config, model.hidden_dim, model.num_heads
        self.num_heads = H
        self.nope, self.rope, self.v_dim, self.latent = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
                                                         c.kv_lora_rank)
        qk = self.nope + self.rope
        self.q_lora_rank = c.q_lora_rank or 0
        if self.q_lora_rank:
            self.q_a_proj = Linear(dim, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, model.norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, H * qk, bias=False)
        else:
            self.q_proj = Linear(dim, H * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(dim, self.latent + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.latent, model.norm_eps)
        self.kv_b_proj = Linear(self.latent, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, dim, bias=False)
        self.scale = qk ** -0.5
        self.rotate = _rotation(model)
        self.theta = c.rope_theta or model.rope_theta
        self.attention_dropout = model.attention_dropout
        self.resid_dropout = nn.Dropout(model.dropout)
        # widths of the score (QKᵀ) and value (PV) products over all heads, for FLOP accounting
        self.qk_width, self.v_width = H * qk, H * self.v_dim

    def external_parameters(self):
        """Weights read outside their own module's forward (absorbed form): ZeRO-3 gathers them for this one."""
        return [self.kv_b_proj.weight]

    def _rope_tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos/sin [S, qk_rope_head_dim] (rotate-half), computed per call: no buffer to restore after loading."""
        inv_freq = rope_inv_freq(self.rope, self.theta).to(positions.device)
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        B, S, _ = x.shape
        return q.view(B, S, self.num_heads, self.nope + self.rope).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx, absorbed: Optional[bool] = None) -> torch.Tensor:
        """absorbed: None = naive without cached tokens, absorbed after them (True/False force a form)."""
        B, S, _ = x.shape
        q_nope, q_rope = self.queries(x).split([self.nope, self.rope], dim=-1)
        c, k_rope = self.kv_a_proj_with_mqa(x).split([self.latent, self.rope], dim=-1)
        c = self.kv_a_layernorm(c)
        if self.rotate:
            cos, sin = self._rope_tables(ctx.positions, x.dtype)
            q_rope, k_rope = apply_rotary(q_rope, cos, sin), apply_rotary(k_rope, cos, sin)
        latent = torch.cat([c, k_rope], dim=-1)  # [B, S, kv_lora_rank + qk_rope_head_dim]
        cache = ctx.layer_cache()
        if cache is not None:
            latent = cache.append_state(CACHE_KEY, latent)
        past = ctx.past
        T = latent.shape[1]
        encoding = ctx.encoding
        bias = encoding.attention_bias(ctx.encoding_state, ctx, self.num_heads, S, T) if encoding is not None else None
        allowed = ctx.document_mask
        if allowed is None and (bias is not None or (past > 0 and S > 1)):
            allowed = ctx.allowed(S, T, x.device)
        mask = allowed if bias is None else additive_mask(allowed, bias, q_rope.dtype)
        is_causal = mask is None and past == 0 and S > 1 and ctx.causal
        p = self.attention_dropout if self.training else 0.0
        if absorbed if absorbed is not None else past > 0:
            y = self._absorbed(q_nope, q_rope, latent, mask, is_causal, p)
        else:
            y = self._naive(q_nope, q_rope, latent, mask, is_causal, p)
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, S, self.num_heads * self.v_dim)))

    def _naive(self, q_nope, q_rope, latent, mask, is_causal, p) -> torch.Tensor:
        """Per-head keys [k_nope_i ; k_rope] and values expanded from the latent; → [B, H, S, v_head_dim]."""
        B, T, _ = latent.shape
        H = self.num_heads
        c, k_rope = latent.split([self.latent, self.rope], dim=-1)
        kv = self.kv_b_proj(c).view(B, T, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None].expand(B, H, T, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return sdpa(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal, scale=self.scale)

    def _absorbed(self, q_nope, q_rope, latent, mask, is_causal, p) -> torch.Tensor:
        """Scores against the latent itself (one key/value head for all heads); → [B, H, S, v_head_dim]."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.latent)  # live weight
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]
        q = torch.cat([torch.einsum("bhsn,hnc->bhsc", q_nope, w_uk.to(q_nope.dtype)), q_rope], dim=-1)
        kv = latent[:, None]  # [B, 1, T, kv_lora_rank + qk_rope_head_dim]
        o = sdpa(q, kv, kv[..., :self.latent], attn_mask=mask, dropout_p=p, is_causal=is_causal, scale=self.scale,
                 enable_gqa=True)  # [B, H, S, kv_lora_rank]
        return torch.einsum("bhsc,hvc->bhsv", o, w_uv.to(o.dtype))
