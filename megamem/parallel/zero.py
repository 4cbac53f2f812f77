"""Building the model for a ZeRO stage: under ZeRO-3 every parameter, banks included, is born partitioned."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator

import torch
import torch.nn as nn

from ..config import MegamemConfig
from ..model import MemoryTransformer, build_model


def build_model_for_zero(cfg: MegamemConfig, ds_config: Dict[str, Any], zero_stage: int, seed: int) -> MemoryTransformer:
    """ZeRO-0/1/2: a plain model. ZeRO-3: built under deepspeed.zero.Init, so each rank allocates only
    1/world of each parameter (a 100k-token bank never exists whole on one rank at rest).

    Custom initialisation (normal init, zero-init memory outputs, bank init) then runs module by
    module on gathered parameters with rank 0's values broadcast, so ZeRO-3 starts from exactly
    the weights a 1-rank run with the same seed starts from: both re-seed right before the init.
    """
    if zero_stage < 3:
        model = build_model(cfg)
        torch.manual_seed(seed)
        model.reset_parameters()
        return model
    import deepspeed

    # no dtype argument: zero.Init then takes it from the config's bf16/fp16 flags. An explicit
    # dtype is overridden by bf16 on a CPU accelerator (deepspeed 0.19.8 operator precedence).
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build_model(cfg)
    zero_ids = model.zero_init_ids()
    torch.manual_seed(seed)
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own:
            with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                model.init_module(module, zero_ids)
    return model


def gathered_state_dict(model: nn.Module, dtype: torch.dtype, rank: int) -> Dict[str, torch.Tensor]:
    """Full parameters and buffers on rank 0 (empty dict elsewhere), one parameter gathered at a time."""
    import deepspeed

    out: Dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if rank == 0:
                out[name] = p.detach().to(dtype).clone().contiguous()
    if rank == 0:
        for name, b in model.named_buffers():
            if name.endswith("inv_freq"):
                continue  # recomputed from the config
            out[name] = b.detach().clone().contiguous() if not b.is_floating_point() else b.detach().to(dtype).clone()
    return out


def local_numel(params: Iterable[nn.Parameter]) -> Iterator[int]:
    """Elements a rank stores for each parameter (its ZeRO-3 partition, or the whole tensor)."""
    for p in params:
        yield p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
