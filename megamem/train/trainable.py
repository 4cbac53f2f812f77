"""The training policy — LoRA and which parameters train — applied to a built model before DeepSpeed.

One entry point, `apply_training_policy`, called by the Trainer for every layout after the model
(and training.init_from's weights) exist and before `deepspeed.initialize`, and by the dry run.
Adapter models get LoRA from their builder (before the memory branches exist); from-scratch models
get it here, on their own Linear modules outside the memory branches. requires_grad then follows
megamem.config.trainable's policy, and megamem.train.optim leaves frozen parameters out.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from ..adapter.build import parameter_parts, set_trainable
from ..adapter.lora import apply_lora, is_lora_name, lora_scalings, merge_lora_state
from ..config import ConfigError, MegamemConfig
from ..config.trainable import lora_enabled
from .trunk_lora import add_trunk_lora, train_trunk_lora, trunk_adapters
from .trunk_precision import hold_trunk


def memory_module_names(model: nn.Module) -> list:
    """Names of the modules whose parameters are all memory parameters (banks, memory branches)."""
    memory = {id(p) for p in model.memory_parameters()}
    return [n for n, m in model.named_modules()
            if n and any(True for _ in m.parameters()) and all(id(p) in memory for p in m.parameters())]


def has_lora(model: nn.Module) -> bool:
    return any(is_lora_name(n) for n, _ in model.named_parameters())


def add_lora(model: nn.Module, cfg: MegamemConfig, seed: Optional[int] = None) -> nn.Module:
    """LoRA on a from-scratch model's non-memory Linear modules (lora_B starts at zero: the forward is
    unchanged). With a seed, lora_A is the same on every rank."""
    if seed is not None:
        torch.manual_seed(seed + 2)
    return apply_lora(model, cfg.memory, skip=memory_module_names(model), what="the from-scratch model (memory "
                      "modules excluded)")


def apply_training_policy(model: nn.Module, cfg: MegamemConfig, seed: Optional[int] = None) -> Dict[str, int]:
    """LoRA (from-scratch models, when memory.use_lora) and requires_grad from the trainable policy; a progressive
    phase's frozen trunk then cast to training.quantization_type (megamem.train.trunk_precision).

    Returns {"trainable", "frozen", "lora"} element counts and hold_trunk's {"trunk_parameters",
    "trunk_bytes_fp32", "trunk_bytes"}. Refuses a policy that leaves nothing to train.
    """
    from_scratch = cfg.model.base_model_name is None
    if from_scratch and lora_enabled(cfg) and not has_lora(model):
        add_lora(model, cfg, seed)
    trunk_lora = from_scratch and bool(trunk_adapters(cfg)) and not has_lora(model)
    if trunk_lora:  # a progressive phase's trunk (training.qlora_enabled): megamem.train.trunk_lora
        add_trunk_lora(model, cfg, memory_module_names(model), seed)
    set_trainable(model, cfg)  # the adapter builder ran it already; globs and from-scratch parts need it here
    if trunk_lora:
        train_trunk_lora(model)
    freeze_norm_statistics(model)
    unique = {id(p): p for p in model.parameters()}.values()
    count = lambda ps: sum(getattr(p, "ds_numel", p.numel()) for p in ps)  # noqa: E731 - ZeRO-3: whole size
    counts = {"trainable": count(p for p in unique if p.requires_grad),
              "frozen": count(p for p in unique if not p.requires_grad),
              "lora": count(p for n, p in model.named_parameters() if is_lora_name(n))}
    if counts["trainable"] == 0:
        names = [n for n, _ in parameter_parts(model)]
        raise ConfigError(f"nothing trains: training.trainable / frozen and the mode keys freeze all {len(names)} "
                          "parameters; widen training.trainable or narrow training.frozen")
    if _banks_frozen(model, cfg):
        raise ConfigError("training.trainable / frozen freeze memory banks that train outside the DeepSpeed engine "
                          "(parallel.ep_size > 1 or memory.sparse_bank_grad); train the banks or turn those off")
    if from_scratch:
        counts.update(hold_trunk(model, cfg))
    return counts


def _eval_mode(module: nn.Module, args) -> None:
    module.training = False


def freeze_norm_statistics(model: nn.Module) -> int:
    """BatchNorm layers whose weights are all frozen (a progressive trunk's PEER query norms, training.frozen)
    keep their running statistics frozen too: every forward normalises with them, as in eval, and never updates
    them, so a frozen block is bitwise unchanged, buffers included. Returns how many were frozen."""
    frozen = 0
    for module in model.modules():
        params = list(module.parameters())
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats and params \
                and not any(p.requires_grad for p in params) and not getattr(module, "_megamem_frozen_stats", False):
            module.register_forward_pre_hook(_eval_mode)
            module._megamem_frozen_stats = True
            frozen += 1
    return frozen


def _banks_frozen(model: nn.Module, cfg: MegamemConfig) -> bool:
    from .chapter_banks import banks_outside_engine

    return banks_outside_engine(cfg) and any(not p.requires_grad for p in model.banks.parameters())


def plain_state(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """A from-scratch model's gathered state with its LoRA merged (the export every reader loads); as is without.
    A 4-bit trunk's base weights are dequantized first (float32, what the layers compute with)."""
    from ..adapter.four_bit import dequantize_state, packed_state

    if any(hasattr(p, "quant_state") for p in model.parameters()):
        state = dequantize_state({**state, **packed_state(model)})
    scalings = lora_scalings(model)
    return merge_lora_state(state, scalings) if scalings else state


def policy_problem(cfg: MegamemConfig, pipelined: bool) -> Optional[str]:
    """Layouts the policy does not run on, with the fix; None if it does."""
    from_scratch_lora = cfg.model.base_model_name is None and lora_enabled(cfg)
    t = cfg.training
    if pipelined and (t.trainable is not None or t.frozen is not None or from_scratch_lora):
        what = "training.trainable" if t.trainable is not None else "training.frozen" if t.frozen is not None \
            else "memory.use_lora"
        return (f"{what} is not supported with pipeline parallelism (stages are cut before parameters could be "
                f"selected by name): use a ZeRO layout (ds_configs/zero1.json … zero3.json), or remove {what}")
    return None
