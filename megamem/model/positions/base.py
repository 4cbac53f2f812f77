"""The position-encoding protocol: three hooks, each a no-op by default."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn as nn


class PositionEncoding(nn.Module):
    """What an encoding may do to a forward; the model calls every hook, the defaults change nothing.

    - prepare(positions, dtype): computed once per forward and handed to the other hooks (e.g. RoPE's
      cos/sin tables), so blocks and pipeline stages never recompute it per layer.
    - embed(x, positions): added to the token embeddings (learned absolute positions).
    - rotate(q, k, state, ctx): applied to queries and keys ([B, heads, S, head_dim]) before the cache.
    - attention_bias(state, ctx, heads, q_len, k_len): an additive [heads or 1, q_len, k_len] bias.
    - reset_buffers(): recompute non-persistent buffers (after loading on the meta device).
    """

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> Any:
        return None

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor, state: Any, ctx) -> Tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def attention_bias(self, state: Any, ctx, num_heads: int, q_len: int, k_len: int) -> Optional[torch.Tensor]:
        return None

    def reset_buffers(self) -> None:
        pass
