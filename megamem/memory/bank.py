"""Memory banks: N_m learnable latent tokens, stored in one of four ways.

Every bank's forward() returns the dense [num_tokens, dim] matrix that memory attention reads;
the model calls it once per forward pass per bank, however many layers share the bank.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ..config import MemoryConfig
from ..ops import seeded_normal_


class MemoryBank(nn.Module):
    """Full bank (N_m × memory_dim), or the reduced-dim bank (N_m × memory_rank)."""

    kind = "full"

    def __init__(self, num_tokens: int, dim: int, init_std: float):
        super().__init__()
        self.num_tokens, self.dim = num_tokens, dim
        self.memory = nn.Parameter(torch.empty(num_tokens, dim))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        seeded_normal_(self.memory, self.init_std, generator)

    def forward(self) -> torch.Tensor:
        return self.memory


class ReducedDimMemoryBank(MemoryBank):
    kind = "reduced_dim"


class FactorizedMemoryBank(nn.Module):
    """M = A·Bᵀ with A: N_m × r and B: memory_dim × r; N_m·r + d·r parameters instead of N_m·d."""

    kind = "factorized"

    def __init__(self, num_tokens: int, dim: int, rank: int, init_std: float):
        super().__init__()
        self.num_tokens, self.dim, self.rank = num_tokens, dim, rank
        self.A = nn.Parameter(torch.empty(num_tokens, rank))
        self.B = nn.Parameter(torch.empty(dim, rank))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        # entries of A·Bᵀ then have std init_std: var = r · σ_A² · σ_B²
        factor_std = math.sqrt(self.init_std / math.sqrt(self.rank))
        seeded_normal_(self.A, factor_std, generator)
        seeded_normal_(self.B, factor_std, generator)

    def forward(self) -> torch.Tensor:
        return self.A @ self.B.t()


def quantize_rows(x: torch.Tensor, bits: int):
    """Symmetric per-row quantisation → (codes, scales). 4-bit codes are packed two per byte."""
    qmax = 2 ** (bits - 1) - 1
    scales = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    q = torch.round(x / scales).clamp(-qmax, qmax).to(torch.int16)
    if bits == 8:
        return q.to(torch.int8), scales
    nib = (q + 8).to(torch.uint8)  # 1..15
    return nib[:, 0::2] | (nib[:, 1::2] << 4), scales


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        q = codes.to(scales.dtype)
    else:
        low = (codes & 0x0F).to(torch.int16) - 8
        high = (codes >> 4).to(torch.int16) - 8
        q = torch.stack((low, high), dim=-1).flatten(1).to(scales.dtype)
    return q * scales


class QuantizedMemoryBank(nn.Module):
    """Rows stored as int8 or packed int4 codes with one fp32 scale per row, dequantised on use.

    The codes are frozen buffers (rounding has no gradient); the per-row scales are trainable
    parameters. To train a bank fully and store it small, train a full bank and convert it
    with `QuantizedMemoryBank.from_float`.
    """

    kind = "quantized"

    def __init__(self, num_tokens: int, dim: int, bits: int, init_std: float):
        super().__init__()
        self.num_tokens, self.dim, self.bits, self.init_std = num_tokens, dim, bits, init_std
        codes, scales = quantize_rows(torch.randn(num_tokens, dim) * init_std, bits)
        self.register_buffer("codes", codes)
        self.scales = nn.Parameter(scales)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        rows = torch.randn(self.num_tokens, self.dim, generator=generator) if generator is not None else \
            torch.randn(self.num_tokens, self.dim, device=self.codes.device)
        codes, scales = quantize_rows(rows.to(self.codes.device) * self.init_std, self.bits)
        with torch.no_grad():
            self.codes.copy_(codes)
            self.scales.copy_(scales)

    @classmethod
    def from_float(cls, memory: torch.Tensor, bits: int) -> "QuantizedMemoryBank":
        bank = cls(memory.shape[0], memory.shape[1], bits, init_std=1.0)
        codes, scales = quantize_rows(memory.detach().float(), bits)
        bank.codes.copy_(codes)
        with torch.no_grad():
            bank.scales.copy_(scales)
        return bank

    def forward(self) -> torch.Tensor:
        return dequantize_rows(self.codes, self.scales, self.bits)


def row_parameter(bank: nn.Module) -> nn.Parameter:
    """The parameter with one row per bank row (full/reduced: the rows; factorized: A; quantized: the scales):
    a row whose slice of its gradient is non-zero received gradient."""
    return bank.A if isinstance(bank, FactorizedMemoryBank) else \
        bank.scales if isinstance(bank, QuantizedMemoryBank) else bank.memory


def bank_dim(cfg: MemoryConfig, hidden_dim: int) -> int:
    """Width of the rows memory attention reads (memory_rank for reduced-dim banks)."""
    if cfg.use_low_rank_memory and cfg.low_rank_mode == "reduced_dim":
        return cfg.memory_rank
    return cfg.memory_dim or hidden_dim


def build_bank(cfg: MemoryConfig, hidden_dim: int) -> nn.Module:
    n, dim, std = cfg.num_memory_tokens, bank_dim(cfg, hidden_dim), cfg.memory_init_std
    if cfg.quantize_memory:
        return QuantizedMemoryBank(n, dim, cfg.memory_quant_bits, std)
    if cfg.use_low_rank_memory and cfg.low_rank_mode == "factorized":
        return FactorizedMemoryBank(n, dim, cfg.memory_rank, std)
    if cfg.use_low_rank_memory:
        return ReducedDimMemoryBank(n, dim, std)
    return MemoryBank(n, dim, std)
