"""Float8 training (training.mixed_precision: fp8) through torchao's float8 linear layers.

torchao's `convert_to_float8_training` swaps the chosen nn.Linear modules for Float8Linear: their three
matmuls (forward, input gradient, weight gradient) run in float8 with scales from the recipe
(`training.fp8_recipe`: tensorwise = one scale per tensor, rowwise = one per row), everything else —
weights, optimizer state, norms, attention, memory reads, PEER tables — stays in DeepSpeed's bf16.
float8 matmuls need CUDA compute capability ≥ 8.9 (Ada, Hopper and later); anywhere else fp8 is
refused before anything is built. torchao is imported only when a run converts (not a requirement).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch.nn as nn

MIN_CAPABILITY = (8, 9)
# kept in bf16: the LM head (logits precision, the common float8 practice) and the chapter routers (their
# scores are fp32 on purpose: float8 would flip top-k picks)
KEEP_NAMES = ("lm_head", "router")


def device_capability() -> Optional[Tuple[int, int]]:
    """(major, minor) of CUDA device 0, None without CUDA."""
    import torch

    return torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None


def float8_problem(capability: Optional[Tuple[int, int]], has_torchao: bool) -> Optional[str]:
    """Why fp8 cannot run here (one line), None if it can. capability: device_capability()."""
    if capability is None or tuple(capability) < MIN_CAPABILITY:
        found = "cpu" if capability is None else f"{capability[0]}.{capability[1]}"
        return (f"training.mixed_precision: fp8 needs CUDA compute capability ≥ 8.9 (found: {found}); "
                "use bf16")
    if not has_torchao:
        return "training.mixed_precision: fp8 needs torchao (pip install torchao); or use bf16"
    return None


def torchao_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def to_float8(module: nn.Module, fqn: str) -> bool:
    """Whether a module becomes Float8Linear: a plain linear layer whose widths are multiples of 16
    (float8 GEMMs need them), not the LM head nor a router."""
    if not isinstance(module, nn.Linear) or any(name in fqn.split(".") or fqn.endswith(name) for name in KEEP_NAMES):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_float8(model: nn.Module, recipe: str) -> int:
    """Swap the linear layers `to_float8` picks for torchao's Float8Linear; returns how many were swapped."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    before = sum(isinstance(m, nn.Linear) for m in model.modules())
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=to_float8)
    from torchao.float8.float8_linear import Float8Linear

    converted = sum(isinstance(m, Float8Linear) for m in model.modules())
    assert converted <= before
    return converted
