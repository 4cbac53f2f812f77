"""LoRA on a progressive phase's frozen trunk (training.qlora_enabled; Stack-Wise's "dual LoRA"), through peft.

Phase p's trunk is blocks 0 … p−1. Each trunk stack's attention and MLP linear layers (memory modules
excluded) get a peft adapter `stack` (rank/alpha from megamem.config.trunk_lora.stack_rank_alpha for
the stack) and, with progressive.progressive_qlora, a second adapter `progressive`; both are active, so
a layer computes W x + Σ_adapters (alpha/r)·B A x. lora_B starts at zero (the forward is unchanged) and
lora_A is the same on every rank (seeded). The adapters train (requires_grad) while their base weights
stay frozen; megamem.train.optim puts them in the `trunk_lora` group. Exports merge them
(megamem.adapter.lora.merge_lora_state), so the next phase starts from plain weights and fresh adapters.
"""
from __future__ import annotations

import warnings
from typing import Iterable, List, Optional

import torch
import torch.nn as nn

from ..adapter.lora import is_lora_name
from ..config import MegamemConfig
from ..config.progressive import current_layers
from ..config.trunk_lora import PROGRESSIVE, STACK, adapter_rank_alpha, trunk_lora_on


def trunk_adapters(cfg: MegamemConfig) -> List[str]:
    """The adapter names every trunk stack carries in this run (none outside a phase with LoRA on the trunk)."""
    t = cfg.training
    layers = current_layers(t)
    if not trunk_lora_on(t) or layers is None or layers.start == 0:
        return []
    return [STACK, PROGRESSIVE] if t.progressive.progressive_qlora else [STACK]


def add_trunk_lora(model: nn.Module, cfg: MegamemConfig, skip: Iterable[str] = (), seed: Optional[int] = None) -> int:
    """Inject the trunk's adapters into blocks 0 … phase−1 (their Linear modules outside `skip`, the memory
    modules). Returns the number of adapted linear layers."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    adapters, t = trunk_adapters(cfg), cfg.training
    if not adapters:
        return 0
    if seed is not None:
        torch.manual_seed(seed + 3)
    skip = tuple(skip)
    skipped = lambda n: any(n == s or n.startswith(s + ".") for s in skip)  # noqa: E731
    adapted = 0
    for layer in range(current_layers(t).start):
        prefix = f"blocks.{layer}."
        # whole module names from the root: peft matches a target by name suffix
        targets = [n for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Linear)
                   and not skipped(n)]
        for name in adapters:
            rank, alpha = adapter_rank_alpha(t, name, layer)
            config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
            with warnings.catch_warnings():  # one injection per stack and adapter is the design, not a slip
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                inject_adapter_in_model(config, model, adapter_name=name)
        adapted += len(targets)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter(adapters)  # both active: the layer adds every adapter's B A x
    return adapted


def train_trunk_lora(model: nn.Module) -> None:
    """The adapters train whatever the phase's freezing globs (blocks.<trunk>.*) matched."""
    for name, p in model.named_parameters():
        if is_lora_name(name):
            p.requires_grad_(True)
