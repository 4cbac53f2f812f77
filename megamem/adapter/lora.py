"""LoRA on the base model through peft, injected in place (no PeftModel wrapper).

In place keeps the base's module names, so the memory hooks, ZeRO-3 weight loading and the
adapter export all address the same parameters with or without LoRA. LoRA goes in before the
memory branches exist, so `lora_targets` such as q_proj never match memory cross-attention.
"""
from __future__ import annotations

from typing import List

import torch.nn as nn

from ..config import ConfigError, MemoryConfig


def lora_config(mem: MemoryConfig):
    from peft import LoraConfig

    return LoraConfig(r=mem.lora_rank, lora_alpha=mem.lora_alpha, lora_dropout=mem.lora_dropout,
                      target_modules=list(mem.lora_targets), bias="none", task_type="CAUSAL_LM")


def apply_lora(base: nn.Module, mem: MemoryConfig) -> nn.Module:
    from peft import inject_adapter_in_model

    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    missing = [t for t in mem.lora_targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"memory.lora_targets {missing} name no module of the base model; "
                          f"its linear layers are {linear}")
    return inject_adapter_in_model(lora_config(mem), base)


def is_lora_name(name: str) -> bool:
    return "lora_" in name


def lora_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for n, p in model.named_parameters() if is_lora_name(n)]
