"""model.pos_encoding.type hybrid on a pretrained base, identity-initialised through a learned gate g.

From scratch (megamem/model/positions/hybrid.py) position n rotates q/k by RoPE at (1 − w(n))·n·θ_i and adds
w(n)·e_n to its embedding, w(n) = σ((n − K)/W). A pretrained base would lose its rotation above K, so here
w(n) is scaled by a learned scalar gate g initialised at 0:

- angle (1 − g·w(n))·n·θ_i, θ_i the base rotary's inv_freq, its attention_scaling kept: a forward hook on the
  family's rotary module (families.py `rotary`) returns (cos, sin) rebuilt from its position_ids, differentiable
  in g (the hook runs outside the module's forward);
- g·w(n)·e_n added to the hidden states entering the first decoder layer (the token embeddings), by a forward
  pre-hook there that reads the same position_ids.

g = 0 is the base bit for bit; g = 1 is the from-scratch definition bit for bit. n is position_ids, which HF
continues after its cache while decoding, and each token's encoding depends on its own position only, so the
KV cache stays exact. docs/positions.md#on-pretrained-models-adapter-runs.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from ..model.positions.hybrid import hybrid_weight
from ..model.positions.spiral import irrational_fraction, spiral_embedding


class HybridGate(nn.Module):
    """The gate g (1 element, like SpiralGate) with K, W and the spiral's irrational. Its forward gives g·w(n):
    the gate is read only inside it, so ZeRO-3 gathers it there (module call) like any parameter."""

    def __init__(self, width: int, irrational: str, K: int, W: int):
        super().__init__()
        self.width, self.fraction, self.K, self.W = width, irrational_fraction(irrational), K, W
        self.gate = nn.Parameter(torch.zeros(1))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gate.zero_()

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """g·w(n) in float64, shaped like position_ids (exactly w(n) at g = 1, exactly 0 at g = 0)."""
        return self.gate.double() * hybrid_weight(position_ids, self.K, self.W)


def rotary_tables(position_ids: torch.Tensor, gw: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                  dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) at the angle (1 − g·w(n))·n·θ_i, computed as transformers' rotary forward computes n·θ_i
    (float32 position times float32 inv_freq) from the scaled position (1 − g·w(n))·n rounded once to float32,
    like megamem's from-scratch HybridPositions.prepare."""
    scaled = (position_ids.double() * (1.0 - gw)).float()
    freqs = scaled[..., None] * inv_freq.to(device=scaled.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotary_hook(hybrid: HybridGate):
    """Forward hook (with_kwargs) on the base's rotary module: its (cos, sin) → the gated hybrid's.
    Llama and Mistral pass position_ids by keyword, Qwen2/Qwen3 by position."""
    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        position_ids = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
        return rotary_tables(position_ids, hybrid(position_ids), module.inv_freq, module.attention_scaling, x.dtype)
    return hook


def spiral_term(hybrid: HybridGate, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """x + g·w(n)·e_n (e_n the exact spiral of width D in float64, cast once to x's dtype)."""
    gw = hybrid(position_ids)
    if hybrid.W == 0 and int(position_ids.max()) < hybrid.K:
        return x  # a hard switch with every position below K: w(n) = 0, nothing to add (as from scratch)
    e = spiral_embedding(position_ids.reshape(-1), hybrid.fraction, hybrid.width, torch.float64)
    return x + (gw[..., None] * e.view(*position_ids.shape, hybrid.width)).to(x.dtype)


def embedding_pre_hook(hybrid: HybridGate):
    """Forward pre-hook (with_kwargs) on the first decoder layer: its input hidden states (the token
    embeddings) get g·w(n)·e_n, n from the position_ids the decoder passes to every layer."""
    def hook(module, args, kwargs):
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise RuntimeError("pos_encoding.type hybrid: the base's first decoder layer got no position_ids; "
                               "its family's decoder must pass them (megamem.adapter.register_family)")
        if args:
            return (spiral_term(hybrid, args[0], position_ids),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": spiral_term(hybrid, kwargs["hidden_states"], position_ids)}
    return hook
