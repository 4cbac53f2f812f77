"""The LM losses, one implementation for the plain model, adapters and pipeline stages.

Which one a model trains with follows model.attention_mode (`lm_loss`): a causal model predicts the
next token, a bidirectional one (masked denoising) the token at each labelled (masked) position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from logits[:, t]; label -100 is ignored.

    Shifts the labels, not the logits: no copy of the [B, S, V] logits (nor of their gradient).
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=-100)


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t] from logits[:, t] (no shift): the masked-denoising loss,
    whose labels are -100 everywhere but the masked positions."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


LOSSES = {"causal": causal_lm_loss, "bidirectional": masked_lm_loss}  # by model.attention_mode


def lm_loss(attention_mode: str):
    return LOSSES[attention_mode]
