"""Attention masks shared by attention types."""
from __future__ import annotations

from typing import Optional

import torch


def document_mask(document_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """[B, S] document ids → [B, 1, S, S] bool mask: inside one document, and causal unless bidirectional
    (built once per forward)."""
    S = document_ids.shape[1]
    same = document_ids[:, :, None] == document_ids[:, None, :]
    if causal:
        same = same & torch.ones(S, S, dtype=torch.bool, device=document_ids.device).tril()
    return same[:, None]


def full_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """[q_len, k_len] bool, all True: bidirectional attention (every query sees every key)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device)


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """[q_len, k_len] bool: query i (the i-th new token after k_len - q_len cached ones) sees keys 0..past+i."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def additive_mask(allowed: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = may attend) plus an additive bias → one float mask for SDPA."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))
    return out if bias is None else out + bias.to(dtype)


def window_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, window: int) -> torch.Tensor:
    """[q_len, k_len] bool: query at position i sees keys at positions j with i − window < j ≤ i."""
    distance = q_positions[:, None] - k_positions[None, :]
    return (distance >= 0) & (distance < window)
