"""LoRA through peft, injected in place (no PeftModel wrapper), for adapter and from-scratch models.

In place keeps the model's module names, so the memory hooks, ZeRO-3 weight loading and the
adapter export all address the same parameters with or without LoRA. Memory modules never get
LoRA: adapter runs inject before the memory branches exist; from-scratch models (whose memory
cross-attention also has q_proj / o_proj) pass the memory modules in `skip`. These helpers sit at
the adapter layer so both the adapter builder and megamem.train (from-scratch runs) use them.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from ..config import ConfigError, MemoryConfig


def lora_config(mem: MemoryConfig, targets: Optional[List[str]] = None):
    from peft import LoraConfig

    return LoraConfig(r=mem.lora_rank, lora_alpha=mem.lora_alpha, lora_dropout=mem.lora_dropout,
                      target_modules=list(targets if targets is not None else mem.lora_targets), bias="none",
                      task_type="CAUSAL_LM")


def apply_lora(model: nn.Module, mem: MemoryConfig, skip: Iterable[str] = (), what: str = "the base model") -> nn.Module:
    """Inject LoRA into the Linear modules named by `memory.lora_targets` (last name component), except
    the modules named in `skip` and their children."""
    from peft import inject_adapter_in_model

    skip = tuple(skip)
    skipped = lambda n: any(n == s or n.startswith(s + ".") for s in skip)  # noqa: E731
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not skipped(n)}
    found = {n.rsplit(".", 1)[-1] for n in linear}
    missing = [t for t in mem.lora_targets if t not in found]
    if missing:
        raise ConfigError(f"memory.lora_targets {missing} name no module of {what}; its linear layers are "
                          f"{sorted(found)}")
    if not skip:
        return inject_adapter_in_model(lora_config(mem), model)
    # whole module names: peft matches a target by name suffix, which would reach memory modules too
    targets = [n for n in linear if n.rsplit(".", 1)[-1] in mem.lora_targets]
    return inject_adapter_in_model(lora_config(mem, targets), model)


def is_lora_name(name: str) -> bool:
    return "lora_" in name


def lora_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for n, p in model.named_parameters() if is_lora_name(n)]


def lora_scalings(model: nn.Module) -> Dict[str, Dict[str, float]]:
    """{module name: {adapter: alpha/r}} of every LoRA layer (what `merge_lora_state` multiplies B·A by)."""
    from peft.tuners.lora import LoraLayer

    return {n: dict(m.scaling) for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def checkpoint_scalings(state: Dict[str, torch.Tensor], cfg) -> Dict[str, Dict[str, float]]:
    """The LoRA layers of a saved state (from its key names) with each adapter's alpha/r, for readers without
    the model: `default` from memory.lora_*, a progressive trunk's `stack` / `progressive` from training.*."""
    from ..config.trunk_lora import adapter_rank_alpha

    out: Dict[str, Dict[str, float]] = {}
    for key in state:
        module, sep, rest = key.partition(".lora_A.")
        if not sep or not rest.endswith(".weight"):
            continue
        adapter = rest[:-len(".weight")]
        if adapter == "default":
            scale = cfg.memory.lora_alpha / cfg.memory.lora_rank
        else:
            rank, alpha = adapter_rank_alpha(cfg.training, adapter, int(module.split(".")[1]))
            scale = alpha / rank
        out.setdefault(module, {})[adapter] = scale
    return out


def merge_lora_state(state: Dict[str, torch.Tensor], scalings: Dict[str, Dict[str, float]]) -> Dict[str, torch.Tensor]:
    """A state dict of an in-place LoRA model → the plain model's (W + Σ_adapters scaling·B·A under the module's
    own name, computed in fp32, stored in the wider of W's and the adapters' dtypes — a bf16 trunk's W with fp32
    adapters merges to fp32; LoRA keys dropped). Works on gathered ZeRO-3 states."""
    out = dict(state)
    for name, scales in scalings.items():
        base = out.pop(f"{name}.base_layer.weight")
        merged, dtype = base.float(), base.dtype
        for adapter, scale in scales.items():
            a, b = out.pop(f"{name}.lora_A.{adapter}.weight"), out.pop(f"{name}.lora_B.{adapter}.weight")
            merged = merged + scale * (b.float() @ a.float())
            dtype = torch.promote_types(dtype, a.dtype)
        out[f"{name}.weight"] = merged.to(dtype)
        if f"{name}.base_layer.bias" in out:
            out[f"{name}.bias"] = out.pop(f"{name}.base_layer.bias")
    return out
