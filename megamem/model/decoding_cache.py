"""Decoding state of one generation, per layer.

`DecodingCache` holds what every layer shares (tokens decoded so far, the materialised banks) and
one `LayerCache` per layer. A layer's attention keeps its keys/values there (`append_kv`; an
attention type with another cache form, e.g. latents, keeps its own tensors in `state`), and each
residual branch keeps its state under its own name in `state` (memory K/V, chapter routing, ...).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch


class LayerCache:
    """One layer's decoding state: self-attention K/V and each part's own state by name."""

    def __init__(self, owner: "DecodingCache"):
        self.owner = owner
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.state: Dict[str, Any] = {}

    @property
    def length(self) -> int:
        """Tokens decoded before the current forward (the same for every layer)."""
        return self.owner.length

    def append_kv(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, kv_heads, S, hd] after the current length; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.keys = self._store(self.keys, k, 2)
        self.values = self._store(self.values, v, 2)
        return self.keys[:, :, :end], self.values[:, :, :end]

    def append_state(self, name: str, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Store x (new tokens along dim) in state[name] after the current length, stored and grown like
        K/V; return everything stored so far (e.g. an attention type's latent cache)."""
        self.state[name] = self._store(self.state.get(name), x, dim)
        return self.state[name].narrow(dim, 0, self.length + x.shape[dim])

    def _store(self, buf: Optional[torch.Tensor], x: torch.Tensor, dim: int) -> torch.Tensor:
        """Write x at [length, length + n) along dim of buf, allocating or growing buf first.

        Storage for `capacity` tokens is allocated by the first call and doubled, up to max_len, when
        a step needs more (generate() callers that do not know the final length).
        """
        start, end = self.length, self.length + x.shape[dim]
        max_len = self.owner.max_len
        if max_len is not None and end > max_len:
            raise ValueError(f"KV cache holds {max_len} tokens; cannot append up to {end}")
        if buf is None:
            buf = self._resized(x, min(self.owner.capacity or max_len or end, max_len or end), dim)
        if end > buf.shape[dim]:
            grown = self._resized(buf, min(max(end, 2 * buf.shape[dim]), max_len or 2 * end), dim)
            grown.narrow(dim, 0, start).copy_(buf.narrow(dim, 0, start))
            buf = grown
        buf.narrow(dim, start, end - start).copy_(x)
        return buf

    def append_kv_window(self, k: torch.Tensor, v: torch.Tensor, window: int):
        """Sliding-window attention: a ring of `window` slots, position p in slot p % window, so memory
        stays flat however long the generation. Returns (keys, values, their absolute positions): the
        ring itself when nothing a query needs is overwritten (one new token, or no wrap yet), else the
        old ring's tokens followed by the new ones (a chunk may need keys the chunk itself overwrites).
        """
        start, S = self.length, k.shape[2]
        end = start + S
        if self.owner.max_len is not None and end > self.owner.max_len:
            raise ValueError(f"KV cache holds {self.owner.max_len} tokens; cannot append up to {end}")
        if self.keys is None:  # `window` slots; fewer when the cache never holds that many (max_len < window)
            slots = min(window, self.owner.max_len or window)
            self.keys = k.new_empty(k.shape[:2] + (slots,) + k.shape[3:])
            self.values = v.new_empty(v.shape[:2] + (slots,) + v.shape[3:])
        new_positions = torch.arange(start, end, device=k.device)
        if end <= window or S == 1:
            self._write_ring(k, v, new_positions, window)
            return self.keys[:, :, :min(end, window)], self.values[:, :, :min(end, window)], \
                self._ring_positions(end, window, k.device)
        held = min(start, window)
        keys = torch.cat((self.keys[:, :, :held], k), dim=2)
        values = torch.cat((self.values[:, :, :held], v), dim=2)
        positions = torch.cat((self._ring_positions(start, window, k.device), new_positions))
        self._write_ring(k, v, new_positions, window)
        return keys, values, positions

    def _write_ring(self, k, v, positions, window: int) -> None:
        keep = slice(max(0, k.shape[2] - window), None)  # only the last `window` new tokens survive
        slots = positions[keep] % window
        self.keys[:, :, slots] = k[:, :, keep]
        self.values[:, :, slots] = v[:, :, keep]

    @staticmethod
    def _ring_positions(end: int, window: int, device) -> torch.Tensor:
        """Positions held by slots 0..min(end, window)-1 after `end` tokens were written."""
        if end <= window:
            return torch.arange(end, device=device)
        slots = torch.arange(window, device=device)
        return end - window + (slots - end) % window

    @staticmethod
    def _resized(like: torch.Tensor, capacity: int, dim: int) -> torch.Tensor:
        shape = list(like.shape)
        shape[dim] = capacity
        return like.new_empty(shape)


class DecodingCache:
    """Shared decoding state plus one LayerCache per layer (created on first use).

    The banks do not change while decoding, so they are materialised by the prompt's forward and
    reused (`bank_tensors`). max_len (None = unbounded) caps the tokens; capacity is how many the
    K/V storage holds before it first grows (default max_len).
    """

    def __init__(self, max_len: Optional[int] = None, capacity: Optional[int] = None):
        self.length = 0
        self.max_len, self.capacity = max_len, capacity
        self.banks: Optional[List[Optional[torch.Tensor]]] = None
        self.layers: Dict[int, LayerCache] = {}

    def layer(self, index: int) -> LayerCache:
        if index not in self.layers:
            self.layers[index] = LayerCache(self)
        return self.layers[index]

    def bank_tensors(self, banks) -> List[Optional[torch.Tensor]]:
        """Each bank materialised once per generation (the first forward), then reused."""
        if self.banks is None:
            self.banks = [bank() for bank in banks]
        return self.banks

    def advance(self, n: int) -> None:
        self.length += n
