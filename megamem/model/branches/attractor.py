"""The attractor state: a causal, decayed outer-product memory of the tokens before each position.

    C_t = α·C_{t−1} + u_t ⊗ e_t        u_t = W_u·norm(h_t) ∈ R^d_state, e_t = π-spiral e_n of position t (width D)

Position t reads C_{t−1} (its own document's earlier tokens only), by cross-attention over C's
d_state rows or as a residual read C_{t−1}·q_t. Training runs chunks of CHUNK tokens: inside a chunk
the closed form C_{t−1} = α^{t−t0}·C_{t0−1} + Σ_{t0≤s<t} α^{t−1−s} u_s ⊗ e_s is never materialised per
position (the reads are contracted through it exactly); the state carries from chunk to chunk, so
memory grows linearly in S. Decoding runs the same code with the state kept in the layer cache (O(1)
per token). Formulas: docs/positions.md#attractor-state-modelattractor.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import MemoryConfig, ModelConfig
from ...config.layer_selection import attractor_layers
from ...memory.cross_attention import MemoryCrossAttention
from ...ops import Linear
from ..layers import make_norm
from ..positions.spiral import irrational_fraction, spiral_embedding
from .base import ResidualBranch
from .registry import BRANCHES

CHUNK = 64  # tokens per training chunk: the parallel form inside, the recurrence between chunks
STATE = "attractor"  # its key in the layer cache's state


class AttractorBranch(ResidualBranch):
    """Reads C_{t−1} at every position; output projection zero at init (always_zero_init)."""

    slot = "after_attention"
    param_group = "memory"  # new, zero-initialised parameters: trained at memory_lr, like the memory branch
    always_zero_init = True  # starts as identity whatever memory.wo_init_zero says

    def __init__(self, model: ModelConfig):
        super().__init__()
        a = model.attractor
        self.policy, self.alpha_value = a.alpha_policy, a.alpha_value
        self.log_alpha_fixed = -a.c_value / model.max_seq_len if a.alpha_policy == "exp_c_over_N" \
            else math.log(a.alpha_value)
        self.width, self.d_state = model.hidden_dim, a.d_state or model.hidden_dim
        self.fraction = irrational_fraction(model.pos_encoding.irrational or "pi")
        self.inject = a.attractor_inject
        self.norm = make_norm(model.hidden_dim, model.norm_eps, model.use_rms_norm)
        self.u_proj = Linear(model.hidden_dim, self.d_state, bias=False)
        if self.inject == "cross_attn":  # C's rows (width D) are the bank of a memory cross-attention
            self.attn = MemoryCrossAttention(model.hidden_dim, self.width, model.num_heads, model.num_heads)
        else:  # residual: r_t = C_{t−1}·q_t, then W_o r_t
            self.q_proj = Linear(model.hidden_dim, self.width, bias=False)
            self.o_proj = Linear(self.d_state, model.hidden_dim, bias=False)
        if self.policy == "learned":
            self.alpha_logit = nn.Parameter(torch.empty(1))  # 1-D: DeepSpeed cannot broadcast a 0-d one
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Only the learned α's logit is this module's own: logit(alpha_value)."""
        if self.policy == "learned":
            with torch.no_grad():
                self.alpha_logit.fill_(math.log(self.alpha_value / (1 - self.alpha_value)))

    def output_layers(self) -> List[nn.Module]:
        return [self.attn.output_layer()] if self.inject == "cross_attn" else [self.o_proj]

    def log_alpha(self) -> torch.Tensor:
        """log α in float64 (a 0-d tensor; differentiable for the learned policy)."""
        if self.policy == "learned":
            return F.logsigmoid(self.alpha_logit.double()[0])
        return torch.tensor(self.log_alpha_fixed, dtype=torch.float64)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        h = self.norm(x)
        cache = ctx.layer_cache()
        state = cache.state.get(STATE) if cache is not None else None
        e = spiral_embedding(ctx.positions, self.fraction, self.width, h.dtype)
        log_alpha = self.log_alpha().to(h.device)
        same = ctx.document_mask[:, 0] if ctx.document_mask is not None else None  # [B, S, S]: causal, same doc
        outs = []
        for t0 in range(0, h.shape[1], CHUNK):
            t1 = min(t0 + CHUNK, h.shape[1])
            out, state = self._chunk(h[:, t0:t1], e[t0:t1], state, log_alpha, same, t0, t1)
            outs.append(out)
        if cache is not None:
            cache.state[STATE] = state
        return torch.cat(outs, dim=1)

    def _chunk(self, h, e, state: Optional[torch.Tensor], log_alpha, same, t0: int, t1: int):
        """Reads for tokens t0..t1−1 given the state before t0 ([B, d_state, D] or None); returns the reads
        and the state after t1−1."""
        B, c, _ = h.shape
        idx = torch.arange(c, device=h.device, dtype=torch.float64)
        lag = idx[:, None] - 1 - idx[None, :]  # t − 1 − s
        inside = torch.ones(B, c, c, dtype=torch.bool, device=h.device).tril(-1)  # s < t
        carry = torch.ones(B, c, dtype=torch.bool, device=h.device)  # t continues the state's document
        if same is not None:
            inside = inside & same[:, t0:t1, t0:t1]
            carry = same[:, t0:t1, t0 - 1] if t0 > 0 else carry
        w = torch.where(inside, torch.exp(lag.clamp(min=0) * log_alpha), 0).to(h.dtype)  # α^{t−1−s}
        cw = torch.where(carry, torch.exp(idx * log_alpha), 0).to(h.dtype)  # α^{t−t0} on C_{t0−1}
        u = self.u_proj(h)  # [B, c, d_state]
        read = self._cross if self.inject == "cross_attn" else self._residual
        out = read(h, e, u, w, cw, state)
        # C_{t1−1} = Σ_s α^{t1−1−s} u_s ⊗ e_s over the last token's document (+ the carried state)
        end_w = torch.exp((c - 1 - idx) * log_alpha).to(h.dtype).expand(B, c)
        if same is not None:
            end_w = end_w * same[:, t1 - 1, t0:t1]
        new = torch.einsum("bs,bsi,sd->bid", end_w, u, e)
        if state is not None:
            new = new + (cw[:, -1] * torch.exp(log_alpha).to(h.dtype))[:, None, None] * state
        return out, new

    def _residual(self, h, e, u, w, cw, state):
        """W_o·(C_{t−1}·q_t) with q_t = W_q h_t: Σ_s α^{t−1−s} (q_t·e_s) u_s + α^{t−t0}·C_{t0−1}·q_t."""
        q = self.q_proj(h)
        r = (q @ e.T * w) @ u
        if state is not None:
            r = r + cw[..., None] * (q @ state.transpose(1, 2))
        return self.o_proj(r)

    def _cross(self, h, e, u, w, cw, state):
        """Softmax attention of q_t over the rows C_{t−1}[i] (keys W_k·C[i], values W_v·C[i]), contracted
        through the closed form: K_t[i] = Σ_s α^{t−1−s} u_s[i]·W_k e_s + α^{t−t0}·W_k C_{t0−1}[i] (same for V)."""
        attn, (B, c, _) = self.attn, h.shape
        H, hd = attn.num_heads, attn.head_dim
        q = attn.q_proj(h).view(B, c, H, hd).transpose(1, 2) / math.sqrt(hd)  # [B, H, c, hd]
        ke = attn.k_proj(e).view(c, H, hd).transpose(0, 1)  # [H, c, hd]
        ve = attn.v_proj(e).view(c, H, hd).transpose(0, 1)
        wh = w[:, None]  # [B, 1, c, c]
        scores = (q @ ke.transpose(1, 2) * wh) @ u[:, None]  # [B, H, c, d_state]
        if state is not None:
            k0 = attn.k_proj(state).view(B, -1, H, hd).transpose(1, 2)  # [B, H, d_state, hd]
            scores = scores + cw[:, None, :, None] * (q @ k0.transpose(2, 3))
        p = scores.softmax(dim=-1)
        y = (p @ u[:, None].transpose(2, 3) * wh) @ ve  # [B, H, c, hd]
        if state is not None:
            v0 = attn.v_proj(state).view(B, -1, H, hd).transpose(1, 2)
            y = y + cw[:, None, :, None] * (p @ v0)
        return attn.o_proj(y.transpose(1, 2).reshape(B, c, H * hd))


@BRANCHES.register("attractor")
def attractor_branch(model: ModelConfig, mem: MemoryConfig, layer_idx: int) -> Optional[AttractorBranch]:
    """Layers chosen by model.attractor.inject_layers (layer_selection.attractor_layers) get one."""
    return AttractorBranch(model) if layer_idx in attractor_layers(model) else None
