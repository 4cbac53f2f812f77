"""Model families: where a Hugging Face causal LM keeps its decoder layers, and its widths.

Injection needs only these facts, so supporting a new family is one `register_family` call:

    register_family("gemma", layers=lambda m: m.model.layers)

Families whose config uses other attribute names pass their own `dims`; `set_rope` is how a family
takes new rope parameters (model.pos_encoding.type rope_ntk), `set_window` a sliding window for every
layer (model.window_size), `rotary` its rotary module, whose output (cos, sin) pos_encoding.type hybrid
replaces through a forward hook (hybrid.py); None: the family refuses that key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch.nn as nn

from ..config import ConfigError


@dataclass(frozen=True)
class Dims:
    """What the memory branch needs to know about the base model."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    intermediate_size: int
    norm_eps: float
    initializer_range: float


def llama_dims(config) -> Dims:
    """Llama-style config names (Llama, SmolLM2, Mistral, Qwen2/2.5, Qwen3 all use them)."""
    heads = config.num_attention_heads
    return Dims(hidden_size=config.hidden_size, num_heads=heads,
                num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                num_layers=config.num_hidden_layers, intermediate_size=config.intermediate_size,
                norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)),
                initializer_range=float(getattr(config, "initializer_range", 0.02)))


def llama_set_rope(model: nn.Module, params: dict) -> None:
    """Llama-style: one rotary module at model.model.rotary_emb, built from config.rope_parameters.
    The parameters go into the config (so a saved base says how it rotates), then the module is rebuilt
    from it: its inv_freq is transformers' own for that rope type (a non-persistent buffer, no weights)."""
    config = model.config
    config.rope_parameters = {**config.rope_parameters, **params}
    config.validate_rope()
    old = model.model.rotary_emb
    model.model.rotary_emb = type(old)(config=config).to(old.inv_freq.device)


def llama_rotary(model: nn.Module) -> nn.Module:
    """Llama-style: the one rotary module every layer's rotation comes from, called as (x, position_ids) and
    returning (cos, sin) = (cos, sin)(position_ids·inv_freq)·attention_scaling in x's dtype."""
    return model.model.rotary_emb


def mistral_set_window(model: nn.Module, window: int) -> None:
    """Mistral reads config.sliding_window at every forward (attention, mask, DynamicCache's sliding layers)."""
    model.config.sliding_window = window


def qwen_set_window(model: nn.Module, window: int) -> None:
    """Qwen2/Qwen3 fix each layer's type when built: every layer becomes a sliding_attention layer, in the
    config (masks, DynamicCache) and in each attention module."""
    config = model.config
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, window, 0
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    model.model.has_sliding_layers = True
    for layer in model.model.layers:
        layer.self_attn.layer_type, layer.self_attn.sliding_window = "sliding_attention", window


@dataclass(frozen=True)
class Family:
    layers: Callable[[nn.Module], nn.ModuleList]  # the CausalLM → its decoder layers, in order
    dims: Callable[[object], Dims] = llama_dims  # its config → widths
    set_rope: Optional[Callable[[nn.Module, dict], None]] = llama_set_rope  # new rope_parameters → the model
    set_window: Optional[Callable[[nn.Module, int], None]] = None  # a sliding window on every layer
    rotary: Optional[Callable[[nn.Module], nn.Module]] = llama_rotary  # the CausalLM → its rotary module


FAMILIES: Dict[str, Family] = {}


def register_family(model_type: str, layers: Callable[[nn.Module], nn.ModuleList],
                    dims: Callable[[object], Dims] = llama_dims,
                    set_rope: Optional[Callable[[nn.Module, dict], None]] = llama_set_rope,
                    set_window: Optional[Callable[[nn.Module, int], None]] = None,
                    rotary: Optional[Callable[[nn.Module], nn.Module]] = llama_rotary) -> None:
    """Make memory injection available for HF models whose `config.model_type` is model_type."""
    FAMILIES[model_type] = Family(layers, dims, set_rope, set_window, rotary)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


register_family("llama", layers=_decoder_layers)  # transformers' Llama has no sliding window
register_family("mistral", layers=_decoder_layers, set_window=mistral_set_window)
register_family("qwen2", layers=_decoder_layers, set_window=qwen_set_window)
register_family("qwen3", layers=_decoder_layers, set_window=qwen_set_window)


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(f"model.base_model_name: model type '{model_type}' has no memory-injection support; "
                          f"supported: {', '.join(sorted(FAMILIES))} (megamem.adapter.register_family adds one)")
    return FAMILIES[model_type]
