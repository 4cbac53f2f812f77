"""A progressive phase's frozen trunk held apart from the engine (training.quantization_type): bf16 / fp16
under an fp32 engine, or 4-bit (nf4 / fp4, QLoRA) under any.

Phase p's trunk is blocks 0 … p−1 (fusion_mode: frozen). Their frozen parameters are cast once, after
init_from's weights are loaded and LoRA is injected and before DeepSpeed sees the model, so they take half
the bytes. Each trunk block then runs under torch.autocast at that dtype (Block.compute_dtype): its matmuls
and attention compute in bf16/fp16 from the held weights, while the residual stream, the norms' statistics
and the block's output stay fp32 — an fp32 stack and an fp32 loss on top, fp32 memory banks read through
autocast's casts. What stays fp32 in the trunk: its LoRA adapters (they train: computed under the same
autocast, their weights, gradients and Adam state fp32), any parameter a trunk block shares with a trained
module, and the norms' weights (NORMS). Later frozen blocks (layerwise / blockwise) are not the trunk: fp32.

4-bit: the base layer under each trunk LoRA layer becomes a bitsandbytes Linear4bit (megamem.adapter.four_bit),
quantized on the device it will run on, computing at the engine's precision; no autocast (the layer casts
its input and output itself), and everything else in the trunk (norms, memory modules) stays as it is.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from ..config import MegamemConfig
from ..config.progressive import current_layers
from ..config.trunk_lora import four_bit_type, held_trunk_type
from ..model.layers import RMSNorm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPUTE = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # a 4-bit layer's compute dtype
# normalisation layers keep fp32 weights: they normalise in fp32, and CPU layer_norm / batch_norm refuse a weight
# of another dtype than their input (autocast leaves them alone there); a norm's weight is one row of numbers
NORMS = (RMSNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def trunk_dtype(cfg: MegamemConfig) -> Optional[torch.dtype]:
    """The dtype this run holds its trunk at apart from the engine's; None when it has none (phase 0, full runs)."""
    name, layers = held_trunk_type(cfg.training), current_layers(cfg.training)
    if name is None or layers is None or layers.start == 0:
        return None
    return DTYPES[name]


def _nbytes(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", p.numel()) * p.element_size()


def hold_trunk(model: nn.Module, cfg: MegamemConfig) -> Dict[str, int]:
    """Cast the trunk's frozen parameters to trunk_dtype(cfg) and run its blocks under autocast at it. Returns
    {"trunk_parameters", "trunk_bytes_fp32", "trunk_bytes"}: the elements cast and their bytes before and after."""
    dtype = trunk_dtype(cfg)
    out = {"trunk_parameters": 0, "trunk_bytes_fp32": 0, "trunk_bytes": 0}
    if four_bit_type(cfg.training) and current_layers(cfg.training).start > 0:
        return _store_4bit(model, cfg, out)
    if dtype is None:
        return out
    trunk = tuple(f"blocks.{i}." for i in range(current_layers(cfg.training).start))
    outside = _shared(model, trunk) | {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters()}
    cast = {id(p): p for n, p in model.named_parameters() if n.startswith(trunk) and not p.requires_grad
            and id(p) not in outside and p.is_floating_point()}
    for p in cast.values():
        out["trunk_parameters"] += getattr(p, "ds_numel", p.numel())
        out["trunk_bytes_fp32"] += _nbytes(p)
        _cast(p, dtype)
        out["trunk_bytes"] += _nbytes(p)
    for i in range(current_layers(cfg.training).start):
        model.blocks[i].compute_dtype = dtype
    return out


def _cast(p: nn.Parameter, dtype: torch.dtype) -> None:
    """In place: the same Parameter object (names, hooks and groups keep it), its storage at dtype. A ZeRO-3
    parameter holds its partition in ds_tensor; gathering rebuilds the whole weight at ds_tensor's dtype."""
    with torch.no_grad():
        if hasattr(p, "ds_tensor"):
            p.ds_tensor.data = p.ds_tensor.data.to(dtype)
            p.data = torch.empty(0, dtype=dtype, device=p.device)
        else:
            p.data = p.data.to(dtype)


def _shared(model: nn.Module, trunk: tuple) -> set:
    """ids of the parameters a module outside the trunk reaches too: they keep the engine's dtype."""
    return {id(p) for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith(trunk)}


def _store_4bit(model: nn.Module, cfg: MegamemConfig, out: Dict[str, int]) -> Dict[str, int]:
    """Every trunk LoRA layer's frozen, unshared nn.Linear base → a bitsandbytes Linear4bit (quantized on CUDA
    when there is one: the engine then runs it there)."""
    from peft.tuners.lora import LoraLayer

    from ..adapter.four_bit import packed_bytes, quantize_linear

    start = current_layers(cfg.training).start
    shared = _shared(model, tuple(f"blocks.{i}." for i in range(start)))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    compute = COMPUTE[cfg.training.mixed_precision]
    for block in model.blocks[:start]:
        for layer in [m for m in block.modules() if isinstance(m, LoraLayer)]:
            base = layer.base_layer
            if (not isinstance(base, nn.Linear) or hasattr(base.weight, "quant_state") or base.weight.requires_grad
                    or id(base.weight) in shared):
                continue
            out["trunk_parameters"] += base.weight.numel()
            out["trunk_bytes_fp32"] += _nbytes(base.weight)
            layer.base_layer = quantize_linear(base, cfg.training.quantization_type, compute, device)
            out["trunk_bytes"] += packed_bytes(layer.base_layer)
    return out
