"""The attractor state (model.attractor) injected into a pretrained base, reusing the from-scratch branch.

megamem/model/branches/attractor.py's AttractorBranch, built for the base's widths, runs in the same
decoder-layer forward hook as the memory branch: on a selected layer the hook returns y + attractor(y),
y the layer's output (after the memory branch when the layer has both). From scratch the branch sits
between attention and MLP; a hook sees only a layer's output, so here it reads the layer's output.
Its output projection starts at zero, so a fresh adapter computes exactly what the base computes.
Positions of e_t continue after the HF cache while decoding; C lives in megamem's DecodingState.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn

from ..config import ConfigError, MegamemConfig, ModelConfig
from ..config.layer_selection import attractor_layers
from ..model.branches.attractor import attractor_branch


def attractor_model_config(branch_config: ModelConfig, cfg: MegamemConfig) -> ModelConfig:
    """The base's widths (branch_config) with the run's attractor keys; N of exp_c_over_N is model.max_seq_len."""
    return dataclasses.replace(branch_config, attractor=cfg.model.attractor, max_seq_len=cfg.model.max_seq_len,
                               pos_encoding=cfg.model.pos_encoding)


def build_attractors(model: ModelConfig, cfg: MegamemConfig) -> nn.ModuleDict:
    """One AttractorBranch per layer inject_layers picks (none without use_attractor), keyed by layer."""
    return nn.ModuleDict({str(i): attractor_branch(model, cfg.memory, i) for i in attractor_layers(model)})


def check_attention_mask(attention_mask: Optional[torch.Tensor]) -> None:
    """Padded positions would enter C (the branch sees every token of a row): refused, never silently mixed in."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ConfigError("model.attractor on an adapter model: an attention_mask with padded positions would put "
                          "the padding into the attractor state; pass unpadded rows (or no attention_mask)")
