"""The causal LM loss, one implementation for the plain model, adapters and pipeline stages."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from logits[:, t]; label -100 is ignored.

    Shifts the labels, not the logits: no copy of the [B, S, V] logits (nor of their gradient).
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=-100)
