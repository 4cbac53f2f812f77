"""Parameter groups, optimizer and learning-rate schedule, all from the YAML's training section."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR
from transformers.optimization import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from ..adapter.lora import is_lora_name
from ..config import TrainingConfig
from ..config.progressive import current_layers
from ..config.trunk_lora import trunk_lora_lr, trunk_lora_on


def full_ndim(p: torch.Tensor) -> int:
    """Dimensions of the whole parameter: under ZeRO-3 the local tensor is a flat (or empty) shard,
    its real shape is `ds_shape`."""
    return len(getattr(p, "ds_shape", p.shape))


def parameter_groups(model: nn.Module, t: TrainingConfig, exclude: Iterable[nn.Parameter] = ()) -> List[Dict]:
    """Named groups: memory (memory_lr), lora (lora_lr) and base — the rest: learning_rate
    (default memory_lr) from scratch, base_model_lr for a pretrained base. A progressive phase's block
    (training.phase) is its own group, current_block (current_block_lr, default the base rate), and LoRA on its frozen
    trunk (training.qlora_enabled) the group trunk_lora (qlora_lr, no weight decay). Frozen parameters and
    `exclude` (banks updated outside the engine) are left out.

    No weight decay on 1-D parameters (norms, biases, quantised-bank scales) and, unless
    training.bank_weight_decay, on memory banks: decay would pull unread bank rows to zero. Nor on
    what a module names in `no_weight_decay_parameters()` (PEER's expert tables, for the same reason).
    """
    banks = {id(p) for bank in getattr(model, "banks", []) for p in bank.parameters()}
    sparse = {id(p) for m in model.modules() if hasattr(m, "no_weight_decay_parameters")
              for p in m.no_weight_decay_parameters()}
    memory = {id(p) for p in model.memory_parameters()} if hasattr(model, "memory_parameters") else set()
    lora = {id(p) for n, p in model.named_parameters() if is_lora_name(n)}  # adapter and from-scratch LoRA
    pretrained = hasattr(model, "lora_parameters")  # an adapter model: "base" is the pretrained model
    base_lr = t.base_model_lr if pretrained else t.learning_rate if t.learning_rate is not None else t.memory_lr
    lrs = {"memory": t.memory_lr, "lora": t.lora_lr, "base": base_lr, "trunk_lora": trunk_lora_lr(t),
           "current_block": t.current_block_lr if t.current_block_lr is not None else base_lr}
    trunk_lora = trunk_lora_on(t) and current_layers(t) is not None  # a phase's trunk LoRA: its own group, no decay
    current = tuple(f"blocks.{i}." for i in current_layers(t) or ())  # a progressive phase's block
    groups: Dict[str, Dict] = {}
    seen = {id(p) for p in exclude}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        part = "current_block" if current and name.startswith(current) else \
            "memory" if id(p) in memory else ("trunk_lora" if trunk_lora else "lora") if id(p) in lora else "base"
        no_decay = full_ndim(p) < 2 or (id(p) in banks and not t.bank_weight_decay) or id(p) in sparse
        key = f"{part}{'_no_decay' if no_decay and part != 'trunk_lora' else ''}"
        no_decay = no_decay or part == "trunk_lora"
        group = groups.setdefault(key, {"name": key, "params": [], "param_names": [], "lr": lrs[part],
                                        "weight_decay": 0.0 if no_decay else t.weight_decay})
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())


def build_optimizer(groups: List[Dict], t: TrainingConfig) -> torch.optim.Optimizer:
    """torch optimizers, fused where supported (5-10x faster than foreach on CPU; no JIT-compiled ops)."""
    clean = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    if t.optimizer in ("adamw", "adam"):
        cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        return cls(clean, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, fused=True)
    return torch.optim.SGD(clean, momentum=0.9)


def warmup_steps(t: TrainingConfig, total_steps: int) -> int:
    return math.ceil(t.warmup_ratio * total_steps) if t.warmup_ratio is not None else t.warmup_steps


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainingConfig, total_steps: int) -> LambdaLR:
    """Linear warmup, then cosine / linear to min_lr_ratio, constant, or WSD (stable, then decay)."""
    warm = min(warmup_steps(t, total_steps), total_steps)
    if t.scheduler == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warm, total_steps, min_lr_rate=t.min_lr_ratio)
    if t.scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warm)
    # linear, and wsd (warmup → stable → linear decay from decay_start_ratio; transformers' WSD warms
    # up from min_lr_ratio instead of 0, unlike the other schedules)
    decay_start = max(int(t.decay_start_ratio * total_steps), warm) if t.scheduler == "wsd" else warm

    def linear_decay(step: int) -> float:
        if step < warm:
            return step / max(warm, 1)
        frac = min(max(step - decay_start, 0) / max(total_steps - decay_start, 1), 1.0)
        return 1.0 - (1.0 - t.min_lr_ratio) * frac

    return LambdaLR(optimizer, linear_decay)
