"""Decoding state of one generation: memory state (banks, memory K/V, chapter routing) and the
preallocated self-attention key/value cache of megamem's own decoder."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch


class MemoryState:
    """What memory layers keep across the decoding steps of one generation.

    The banks do not change while decoding, so they are materialised by the prompt's forward and
    reused (`banks`), and so are each layer's memory K/V (`memory_kv`). Chapter layers keep their
    routing state (chosen chapters, their K/V, rolling window, re-route log) in `routing`.
    `length` is the number of tokens already decoded before the current forward.
    """

    def __init__(self):
        self.length = 0
        self.banks: Optional[List[Optional[torch.Tensor]]] = None
        self.memory_kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.routing: Dict[int, dict] = {}

    def memory(self, layer: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        return self.memory_kv.get(layer)

    def bank_tensors(self, banks) -> List[Optional[torch.Tensor]]:
        """Each bank materialised once per generation (the first forward), then reused."""
        if self.banks is None:
            self.banks = [bank() for bank in banks]
        return self.banks


class KVCache(MemoryState):
    """Self-attention K/V grow one step at a time; memory state as in MemoryState.

    Storage for `capacity` tokens is allocated up front (default: max_len) and doubled, up to
    max_len, when a step needs more (generate() callers that do not know the final length).
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device, dtype: torch.dtype, capacity: Optional[int] = None):
        super().__init__()
        shape = (batch, kv_heads, min(capacity or max_len, max_len), head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, kv_heads, S, hd] after the current length; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot append up to {end}")
        if end > self.keys[layer].shape[2]:
            self._grow(layer, min(max(end, 2 * self.keys[layer].shape[2]), self.max_len))
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def _grow(self, layer: int, capacity: int) -> None:
        for store in (self.keys, self.values):
            old = store[layer]
            store[layer] = old.new_empty(old.shape[:2] + (capacity,) + old.shape[3:])
            store[layer][:, :, :self.length] = old[:, :, :self.length]

    def advance(self, n: int) -> None:
        self.length += n
