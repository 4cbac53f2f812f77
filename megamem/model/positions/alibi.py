"""ALiBi (Press et al., 2022): no embedding, an additive bias −slope_h·(i − j) for query i, key j.

Slopes: for n heads a power of two, slope_h = s^(h+1) with s = 2^(−8/n). Otherwise the slopes of the
closest power of two below n, then every other slope of 2·that power, until there are n (the paper's
reference implementation). On CUDA with flash-attn, `flash_alibi_slopes` hands the same slopes to
flash_attn_func, which computes the same bias inside the kernel.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from ...config import ModelConfig
from .registry import POSITIONS
from .base import PositionEncoding


def alibi_slopes(n: int) -> List[float]:
    def power_of_two(k: int) -> List[float]:
        start = 2 ** (-2 ** -(math.log2(k) - 3))
        return [start * start ** i for i in range(k)]

    if math.log2(n).is_integer():
        return power_of_two(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][:n - closest]


def key_positions(ctx, k_len: int) -> torch.Tensor:
    """Absolute positions of the keys: the cache's own (a sliding window's ring), else the k_len ending at
    the last query."""
    if getattr(ctx, "key_positions", None) is not None:
        return ctx.key_positions
    end = int(ctx.positions[-1]) + 1
    return torch.arange(end - k_len, end, device=ctx.positions.device)


@POSITIONS.register("alibi")
class ALiBiPositions(PositionEncoding):
    def __init__(self, model: ModelConfig):
        super().__init__()
        self.num_heads = model.num_heads
        self.register_buffer("slopes", torch.tensor(alibi_slopes(self.num_heads), dtype=torch.float32),
                             persistent=False)

    def reset_buffers(self) -> None:
        with torch.no_grad():
            self.slopes.copy_(torch.tensor(alibi_slopes(self.num_heads), dtype=torch.float32))

    def _apply(self, fn, *args, **kwargs):
        """Moves follow the model; a cast to half precision does not: slopes stay exact fp32 (flash-attn needs it)."""
        super()._apply(fn, *args, **kwargs)
        self.slopes = torch.tensor(alibi_slopes(self.num_heads), dtype=torch.float32, device=self.slopes.device)
        return self

    def flash_alibi_slopes(self) -> torch.Tensor:
        """fp32 [heads]: flash-attn's alibi_slopes (bias −slope·|i + k_len − q_len − j|, causal)."""
        return self.slopes

    def attention_bias(self, state, ctx, num_heads: int, q_len: int, k_len: int) -> Optional[torch.Tensor]:
        distance = ctx.positions[:, None] - key_positions(ctx, k_len)[None, :]  # i − j, [q_len, k_len]
        return -self.slopes[:, None, None] * distance.float()[None]  # fp32; the mask takes the query dtype
