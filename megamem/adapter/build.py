"""Building an adapter model from a config: base → LoRA (peft) → memory branches → trainable set.

Modes (validated in megamem.config.validate):
  memory only   use_memory_adapter: true,  use_lora: false           banks + branches train
  LoRA only     use_memory_adapter: false, use_lora: true            LoRA weights train
  both          use_both_memory_and_lora: true                       memory and LoRA train
  vanilla       vanilla_mode: true, freeze_base_model: false          the base itself trains
freeze_base_model: false additionally trains the base weights (at training.base_model_lr) in any mode;
training.trainable / training.frozen narrow the set (megamem.config.trainable).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn

from ..config import ConfigError, MegamemConfig, memory_problems
from ..config.trainable import lora_enabled, trainable_policy
from ..config.validate_attractor import validate_attractor
from ..model import build_model
from .base import load_base
from .families import family_of
from .lora import apply_lora, is_lora_name
from .model import AdapterModel
from .positions import apply_positions, position_problems


def check_against_base(cfg: MegamemConfig, hf_config) -> None:
    """Memory and position keys that depend on the base's widths, depth and RoPE, checked against its real config."""
    dims = family_of(hf_config).dims(hf_config)
    model = dataclasses.replace(cfg.model, hidden_dim=dims.hidden_size, num_heads=dims.num_heads,
                                num_kv_heads=dims.num_kv_heads, num_layers=dims.num_layers,
                                intermediate_dim=dims.intermediate_size, vocab_size=hf_config.vocab_size,
                                bos_token_id=None, eos_token_id=None, pad_token_id=None)
    problems = memory_problems(dataclasses.replace(cfg, model=model)) + position_problems(cfg, hf_config)
    validate_attractor(dataclasses.replace(model, base_model_name=None), problems)  # its layers in the base's depth
    if problems:
        raise ConfigError(f"base model '{cfg.model.base_model_name}' ({hf_config.model_type}, "
                          f"{dims.num_layers} layers, hidden {dims.hidden_size}, {dims.num_heads} heads): "
                          + "; ".join(problems))


def parameter_parts(model: nn.Module):
    """(name, part) of every parameter: memory (the model's memory_parameters), lora, or base."""
    memory = {id(p) for p in model.memory_parameters()}
    return [(n, "memory" if id(p) in memory else "lora" if is_lora_name(n) else "base")
            for n, p in model.named_parameters()]


def set_trainable(model: nn.Module, cfg: MegamemConfig) -> None:
    """requires_grad from the config's trainable policy (megamem.config.trainable); the mode keys are its presets.
    Integer (quantised) base weights never train."""
    chosen = trainable_policy(cfg).select(parameter_parts(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen and p.is_floating_point())


def build_adapter_model(cfg: MegamemConfig, seed: Optional[int] = None, base: Optional[nn.Module] = None) -> AdapterModel:
    """The adapted model. base: an already built HF model (ZeRO-3 partitioned, meta device); default loads it.

    With a seed, LoRA and memory initialisation are reproducible (every rank builds the same weights).
    """
    if base is None:
        from .base import base_config

        check_against_base(cfg, base_config(cfg.model.base_model_name))
        base = load_base(cfg)
    else:
        check_against_base(cfg, base.config)
    apply_positions(base, cfg)
    if seed is not None:
        torch.manual_seed(seed)
    if lora_enabled(cfg):
        base = apply_lora(base, cfg.memory)
    model = AdapterModel(base, cfg)
    if seed is not None:
        torch.manual_seed(seed + 1)
    model.reset_parameters()
    set_trainable(model, cfg)
    return model


def build_any_model(cfg: MegamemConfig) -> nn.Module:
    """The model of any validated config: an adapter model (model.base_model_name) or megamem's own."""
    if cfg.model.base_model_name is not None:
        return build_adapter_model(cfg)
    return build_model(cfg)
