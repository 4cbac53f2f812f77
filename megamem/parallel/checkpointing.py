"""Activation checkpointing, applied to a built model from outside.

The model's code has no checkpointing branch: `set_activation_checkpointing` wraps each block's
forward so that in training its activations are recomputed in backward instead of kept. The
recompute runs the block's submodules through their own hooks (ZeRO-3 gathers their weights again),
and module names stay as they are, so checkpoints and state dicts are unchanged. Adapter models use
transformers' checkpointing of the base's layers (their `gradient_checkpointing` switch).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


class _Checkpointed:
    """A block's forward that recomputes activations in backward while training."""

    def __init__(self, module: nn.Module):
        self.original = type(module).forward.__get__(module)
        self.module = module

    def __call__(self, *args, **kwargs):
        if self.module.training and torch.is_grad_enabled():
            return checkpoint(self.original, *args, use_reentrant=False, **kwargs)
        return self.original(*args, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), _Checkpointed)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Checkpoint every block of a megamem model (or switch an adapter's base checkpointing)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        model.gradient_checkpointing = enabled  # adapter models: transformers' own, per base layer
        return
    for block in blocks:
        if enabled and not is_checkpointed(block):
            block.forward = _Checkpointed(block)
        elif not enabled and is_checkpointed(block):
            del block.forward


def activation_checkpointing(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return bool(getattr(model, "gradient_checkpointing", False))
    return len(blocks) > 0 and all(is_checkpointed(b) for b in blocks)
