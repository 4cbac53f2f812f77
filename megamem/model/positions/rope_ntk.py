"""NTK-aware scaled RoPE: a larger base stretches the low frequencies for contexts beyond the trained one.

static:  base' = base · factor^(d/(d−2)), d = head_dim (factor 1 is plain RoPE, bit for bit).
dynamic: transformers' rope_scaling "dynamic" (`_compute_dynamic_ntk_parameters`): with L = the
         forward's largest position + 1 and L0 = ntk_original_max_seq_len,
         base' = base · ((factor · max(L, L0) / L0) − (factor − 1))^(d/(d−2)).
         For L ≤ L0 base' = base computed in Python floats (transformers' init); for L > L0 in float32
         tensors from an int64 L, as transformers' forward computes it, so an exported Llama rotates
         bit for bit like megamem at any length.
Like transformers, a dynamic base changes with the length, so keys cached earlier keep the rotation
of their own step: KV-cache decoding equals a full forward only while L ≤ L0.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ...config import ModelConfig
from .registry import POSITIONS
from .rope import RotaryPositions, rope_inv_freq


def static_ntk_base(base: float, factor: float, head_dim: int) -> float:
    return base * factor ** (head_dim / (head_dim - 2))


def dynamic_ntk_base(base: float, factor: float, head_dim: int, seq_len: int, original: int) -> float:
    """transformers' formula, in the same Python-float order of operations (its value at init)."""
    seq_len = max(seq_len, original)
    return base * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))


def dynamic_ntk_inv_freq(base: float, factor: float, head_dim: int, seq_len: torch.Tensor, original: int) -> torch.Tensor:
    """The frequencies transformers' forward uses for seq_len (an int64 tensor there, so the ratio and the
    base are float32 tensors, not Python floats), op for op."""
    seq_len = torch.maximum(seq_len, torch.tensor(original, dtype=seq_len.dtype, device=seq_len.device))
    scaled = base * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=seq_len.device).float() / head_dim
    return 1.0 / (scaled ** exponents)


@POSITIONS.register("rope_ntk")
class NTKRotaryPositions(RotaryPositions):
    def __init__(self, model: ModelConfig):
        p = model.pos_encoding
        self.factor = float(p.ntk_factor) if p.ntk_factor is not None else 1.0
        self.dynamic = p.ntk_scaling == "dynamic"
        self.original = p.ntk_original_max_seq_len or model.max_seq_len
        super().__init__(model)
        self.reset_buffers()

    def base_for(self, seq_len: int) -> float:
        if self.dynamic:
            return dynamic_ntk_base(self.theta, self.factor, self.head_dim, seq_len, self.original)
        return static_ntk_base(self.theta, self.factor, self.head_dim)

    def reset_buffers(self) -> None:
        with torch.no_grad():
            self.inv_freq.copy_(rope_inv_freq(self.head_dim, self.base_for(self.original)))

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.dynamic and positions.numel():
            seq_len = positions.max().long() + 1  # a tensor, as in transformers' forward
            if int(seq_len) > self.original:
                inv_freq = dynamic_ntk_inv_freq(float(self.theta), self.factor, self.head_dim, seq_len, self.original)
                freqs = positions.float()[:, None] * inv_freq[None, :]
                emb = torch.cat((freqs, freqs), dim=-1)
                return emb.cos().to(dtype), emb.sin().to(dtype)
        return super().prepare(positions, dtype)
