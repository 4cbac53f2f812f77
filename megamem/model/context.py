"""What one forward pass hands every block: positions, masks, the decoding cache, the banks.

Built once per forward by the model (`forward_context`), by each pipeline stage, and by the
adapter's hooks, so a block, its attention and its branches see the same thing in every layout.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from .attention.masks import causal_mask, document_mask, full_mask
from .decoding_cache import DecodingCache, LayerCache


@dataclass
class ForwardContext:
    positions: Optional[torch.Tensor] = None  # [S] absolute positions of this forward's tokens
    cache: Optional[DecodingCache] = None  # decoding state of a generation; None in training
    document_mask: Optional[torch.Tensor] = None  # [B, 1, S, S] bool, True = may attend (packed rows)
    encoding: Optional[nn.Module] = None  # the model's PositionEncoding: its hooks
    encoding_state: Any = None  # what encoding.prepare() computed once for this forward (e.g. cos/sin)
    banks: Dict[int, torch.Tensor] = field(default_factory=dict)  # materialised banks, by bank index
    layer: int = 0  # the block being run
    key_positions: Optional[torch.Tensor] = None  # set by a sliding window's attention: its keys' positions
    causal: bool = True  # model.attention_mode: causal (query i sees keys ≤ i) or bidirectional (every key)

    def at(self, layer: int) -> "ForwardContext":
        return dataclasses.replace(self, layer=layer)

    @property
    def past(self) -> int:
        """Tokens already in the cache before this forward."""
        return self.cache.length if self.cache is not None else 0

    def layer_cache(self) -> Optional[LayerCache]:
        return self.cache.layer(self.layer) if self.cache is not None else None

    def allowed(self, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
        """The bool mask (True = may attend) an explicit-mask kernel needs: the document mask, else causal or full."""
        if self.document_mask is not None:
            return self.document_mask
        return causal_mask(q_len, k_len, device) if self.causal else full_mask(q_len, k_len, device)


def forward_context(encoding: Optional[nn.Module], seq_len: int, device: torch.device, dtype: torch.dtype,
                    cache: Optional[DecodingCache] = None, document_ids: Optional[torch.Tensor] = None,
                    banks: Optional[Dict[int, torch.Tensor]] = None, causal: bool = True) -> ForwardContext:
    """The context of a forward over seq_len new tokens (positions continue after the cache).
    causal: false for bidirectional attention (model.attention_mode), which has no cache."""
    past = cache.length if cache is not None else 0
    positions = torch.arange(past, past + seq_len, device=device)
    state = encoding.prepare(positions, dtype) if encoding is not None else None
    mask = document_mask(document_ids, causal) if document_ids is not None else None
    return ForwardContext(positions=positions, cache=cache, document_mask=mask, encoding=encoding,
                          encoding_state=state, banks=banks if banks is not None else {}, causal=causal)
