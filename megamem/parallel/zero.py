"""Building the model for a ZeRO stage: under ZeRO-3 every parameter, banks included, is born partitioned."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from ..config import ConfigError, MegamemConfig
from ..safe_load import open_safetensors
from ..model import MemoryTransformer, build_model
from .buffers import persistent_buffers


def build_model_for_zero(cfg: MegamemConfig, ds_config: Dict[str, Any], zero_stage: int, seed: int) -> MemoryTransformer:
    """ZeRO-0/1/2: a plain model. ZeRO-3: built under deepspeed.zero.Init, so each rank allocates only
    1/world of each parameter (a 100k-token bank never exists whole on one rank at rest).

    Custom initialisation (normal init, zero-init memory outputs, bank init) then runs module by
    module on gathered parameters with rank 0's values broadcast, so ZeRO-3 starts from exactly
    the weights a 1-rank run with the same seed starts from: both re-seed right before the init, and
    both draw the memory's weights from `model.memory_generator(seed)` (fair twins: a vanilla model
    from the same seed has bitwise the same non-memory weights).
    """
    if cfg.model.base_model_name is not None:
        return build_adapter_for_zero(cfg, ds_config, zero_stage, seed)
    if zero_stage < 3:
        model = build_model(cfg)
        torch.manual_seed(seed)
        model.reset_parameters(seed)
        return model
    import deepspeed

    # no dtype argument: zero.Init then takes it from the config's bf16/fp16 flags. An explicit
    # dtype is overridden by bf16 on a CPU accelerator (deepspeed 0.19.8 operator precedence).
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build_model(cfg)
    # routed chapter attention reads its projection weights outside their own forward: tell ZeRO-3
    # to gather them whenever the chapter attention module runs
    from ..memory.chapters import ChapterMemoryAttention

    for module in model.modules():
        if isinstance(module, ChapterMemoryAttention):
            for child in module.children():
                for p in child.parameters():
                    deepspeed.zero.register_external_parameter(module, p)
        # other modules name the child weights they read directly (MLA's absorbed decoding: kv_b_proj)
        for p in getattr(module, "external_parameters", lambda: [])():
            deepspeed.zero.register_external_parameter(module, p)
    zero_ids, memory_ids, generator = model.zero_init_ids(), model.memory_module_ids(), model.memory_generator(seed)
    torch.manual_seed(seed)
    for module in model.modules():  # the order reset_parameters takes: memory from its own generator
        own = list(module.parameters(recurse=False))
        if own:
            with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                model.init_module(module, zero_ids, generator if id(module) in memory_ids else None)
    return model


def build_adapter_for_zero(cfg: MegamemConfig, ds_config: Dict[str, Any], zero_stage: int, seed: int) -> nn.Module:
    """Adapter models. ZeRO-3: the HF base is built from its config under deepspeed.zero.Init (born
    partitioned), then its pretrained weights are copied in one gathered parameter at a time; LoRA and
    memory are then added with the seeded init every stage uses, and DeepSpeed partitions them at
    initialize. So ZeRO-3 starts from the same weights as ZeRO-0/1/2.
    """
    from ..adapter import build_adapter_model

    if zero_stage < 3:
        return build_adapter_model(cfg, seed=seed)
    if cfg.model.load_in_4bit:
        raise ConfigError("model.load_in_4bit cannot be combined with ZeRO-3 (bitsandbytes 4-bit weights are not "
                          "partitioned); use ds_configs/zero2.json or turn load_in_4bit off")
    import deepspeed

    from ..adapter.base import base_config, empty_base, weight_files
    from ..adapter.build import check_against_base

    hf_config = base_config(cfg.model.base_model_name)
    check_against_base(cfg, hf_config)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        base = empty_base(hf_config, skip_init=True)
    params = dict(base.named_parameters())
    loaded = set()
    for path in weight_files(cfg.model.base_model_name):
        with open_safetensors(path) as f:
            for key in f.keys():
                if key not in params:
                    continue
                with deepspeed.zero.GatheredParameters([params[key]], modifier_rank=0):
                    if torch.distributed.get_rank() == 0:
                        params[key].data.copy_(f.get_tensor(key))
                loaded.add(key)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ConfigError(f"model.base_model_name '{cfg.model.base_model_name}': its safetensors lack {missing[:5]}")
    return build_adapter_model(cfg, seed=seed, base=base)


def gathered_state_dict(model: nn.Module, dtype: torch.dtype, rank: int,
                        names: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Full parameters and buffers on rank 0 (empty dict elsewhere), one parameter gathered at a time.

    names: only these parameters and buffers (adapter exports); default all.
    """
    import deepspeed

    keep = set(names) if names is not None else None
    out: Dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if keep is not None and name not in keep:
            continue
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if rank == 0:
                out[name] = p.detach().to(dtype if p.is_floating_point() else p.dtype).clone().contiguous()
    if rank == 0:
        for name, b in persistent_buffers(model):  # not scratch (PEER's expert counts) nor recomputed (RoPE)
            if keep is not None and name not in keep:
                continue
            out[name] = b.detach().clone().contiguous() if not b.is_floating_point() else b.detach().to(dtype).clone()
    return out


def local_numel(params: Iterable[nn.Parameter]) -> Iterator[int]:
    """Elements a rank stores for each parameter (its ZeRO-3 partition, or the whole tensor)."""
    for p in params:
        yield p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
