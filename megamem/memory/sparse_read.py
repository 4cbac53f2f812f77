"""Sharp reads of a dense bank: top-k rows per query, and normalised queries/keys with a learned temperature.

A softmax over thousands of rows starts (and, measured, stays) uniform: each row receives 1/N of the
gradient, under Adam's epsilon, and the read is one near-constant vector the model learns to ignore
(docs/diagnostics.md). Reading only each query head's k best-scoring rows (as product-key memories
do) gives each read row a 1/k share of the gradient and makes a read a lookup. Normalising q and k
(RMS, per head) with a learned per-head temperature lets logits grow sharp without the projections'
scale having to.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

QK_NORM_EPS = 1e-6


class QKNorm(nn.Module):
    """q, k → RMS-normalised per head; a read's logits are temperature · cos(q, k), one learned temperature per head
    (stored as its log). Initialised at `temperature` (memory.memory_qk_temperature; None: √head_dim, the spread
    1/√hd·q·k has for unit entries)."""

    def __init__(self, num_heads: int, head_dim: int, temperature: Optional[float] = None):
        super().__init__()
        self.head_dim = head_dim
        self.initial = math.log(temperature) if temperature else 0.5 * math.log(head_dim)
        self.log_temperature = nn.Parameter(torch.full((num_heads,), self.initial))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.log_temperature.fill_(self.initial)

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=QK_NORM_EPS)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q [1, H, n, hd] → normalised and scaled so that q·k/√hd = temperature · cos(q, k) for a normalised k.

        The temperature is read inside this module's forward, where ZeRO-3 has gathered it."""
        scale = (self.log_temperature.exp() / math.sqrt(self.head_dim)).view(-1, 1, 1)
        return self.normalise(q) * scale.to(q.dtype)


def top_k_read(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, top_k: int, scale: float) -> torch.Tensor:
    """q [1, H, n, hd], k/v [1, KV, N, hd] → [1, H, n, hd]: each query head's softmax over its top_k rows only.

    The rows are chosen from dense logits computed without autograd; the chosen rows' logits are then
    recomputed from their gathered keys, so the backward touches [H, n, top_k] entries, not [H, n, N]: rows
    outside the top_k get no weight and no gradient, and memory grows with top_k, not with N.
    """
    H, KV = q.shape[1], k.shape[1]
    group = H // KV
    keys = k[0].repeat_interleave(group, 0) if group > 1 else k[0]  # [H, N, hd]
    values = v[0].repeat_interleave(group, 0) if group > 1 else v[0]
    qs = q[0] * scale
    with torch.no_grad():
        rows = torch.matmul(qs, keys.transpose(1, 2)).topk(min(top_k, keys.shape[1]), dim=-1).indices  # [H, n, k]
    n, kk, hd = rows.shape[1], rows.shape[2], keys.shape[-1]
    flat = rows.reshape(H, n * kk, 1).expand(-1, -1, hd)
    picked_k = keys.gather(1, flat).view(H, n, kk, hd)
    picked_v = values.gather(1, flat).view(H, n, kk, hd)
    logits = torch.einsum("hnd,hnkd->hnk", qs, picked_k)
    weights = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
    return torch.einsum("hnk,hnkd->hnd", weights, picked_v).unsqueeze(0)
