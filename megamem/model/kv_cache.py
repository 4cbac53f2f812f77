"""Preallocated key/value cache for incremental decoding, plus per-layer memory K/V."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


class KVCache:
    """Self-attention K/V grow one step at a time; memory K/V are computed once per generate() call.

    Memory K/V do not depend on the sequence, so `memory_kv[layer]` is filled by the first
    forward and reused by every later token.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0  # tokens already stored (same for every layer once a forward completes)
        self.memory_kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        # chapters: per-layer routing state (chosen chapters, their K/V, rolling window, re-route log)
        self.routing: Dict[int, dict] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, kv_heads, S, hd] after the current length; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot append up to {end}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def memory(self, layer: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        return self.memory_kv.get(layer)
