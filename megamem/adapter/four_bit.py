"""Frozen base weights stored in 4 bits (NF4 / FP4, bitsandbytes): QLoRA's storage for a progressive trunk.

A LoRA layer's frozen `base_layer` (nn.Linear) is replaced by a bitsandbytes `Linear4bit` holding the same
weight quantized blockwise (64 values a block, each an index into the 16-value NF4 or FP4 code, times the
block's absmax; the absmaxes quantized again, QLoRA's double quantization). Its forward dequantizes and
multiplies at `compute_dtype`, casting its output back to the input's dtype; the adapters stay where peft put
them. Saved states hold the packed uint8 weight plus its quant-state tensors (`<name>.weight.absmax`, …):
`load_packed` lets load_state_dict (a DeepSpeed resume) take them back, `dequantize_state` turns them into the
float32 weights they stand for (exports, training.init_from, the Hugging Face converter), without bitsandbytes.
"""
from __future__ import annotations

import json
from typing import Dict

import torch
import torch.nn as nn

_STATS = ".quant_state.bitsandbytes__"  # the key that marks a packed weight's quant state


def quantize_linear(base: nn.Linear, quant_type: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A Linear4bit holding `base`'s weight in 4 bits on `device` (quantized there); `base`'s bias object kept."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=False, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type=quant_type, device="meta")
    layer.weight = bnb.nn.Params4bit(base.weight.detach().to("cpu"), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=True, module=layer)
    layer.bias = base.bias  # frozen with the trunk (megamem's linear layers have none)
    # bitsandbytes repacks a CPU layer's weight in place for no-grad eval calls on AVX-512-BF16 machines; the
    # weight must stay what checkpoints and the trunk's checks see
    layer.support_avx512bf16_for_cpu = False
    layer.register_load_state_dict_pre_hook(load_packed)
    layer.train(base.training)
    return layer.to(device)  # Params4bit quantizes on its first move


def load_packed(module: nn.Module, state: Dict[str, torch.Tensor], prefix: str, *args) -> None:
    """load_state_dict pre-hook: a saved packed weight comes with its quant state; take that into the layer."""
    from bitsandbytes.functional import QuantState

    key = prefix + "weight."
    stats = {k[len(key):]: state.pop(k) for k in [k for k in state if k.startswith(key)]}
    if stats:
        module.weight.quant_state = QuantState.from_dict(stats, device=module.weight.device)


def packed_weights(state: Dict[str, torch.Tensor]) -> list:
    """The names of the packed 4-bit weights in a saved state."""
    return sorted(k.split(_STATS)[0] for k in state if _STATS in k)


def dequantize_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A saved state with packed 4-bit weights → the same state with each as the float32 weight it stands for
    (the quant-state keys dropped); a state without any is returned as is. Read from the saved tensors alone,
    so a 4-bit checkpoint is read without bitsandbytes (and without its CPU kernels, which in 0.50 dequantize
    wrongly when a layer's input width is not a multiple of the 64-value block)."""
    names = packed_weights(state)
    out = dict(state)
    for name in names:
        stats = {k[len(name) + 1:]: out.pop(k) for k in [k for k in out if k.startswith(name + ".")]}
        out[name] = _dequantize(out[name], stats).float()
    return out


def _dequantize(packed: torch.Tensor, stats: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Two 4-bit codes a byte (high nibble first), each an index into quant_map, times its block's absmax; with
    double quantization the absmaxes are 8-bit codes into nested_quant_map times their block's nested_absmax,
    plus nested_offset (bitsandbytes' QuantState.as_dict(packed=True) layout)."""
    meta_key = next(k for k in stats if k.startswith(_STATS[1:]))
    meta = json.loads(bytes(stats[meta_key].tolist()).decode())
    codes = packed.to("cpu").flatten().to(torch.uint8).long()  # a reader that widened it: exact small integers
    codes = torch.stack([codes >> 4, codes & 15], 1).flatten()
    absmax = stats["absmax"].to("cpu")
    if "nested_absmax" in stats:
        nested = stats["nested_absmax"].double().repeat_interleave(meta["nested_blocksize"])[:absmax.numel()]
        absmax = stats["nested_quant_map"].double()[absmax.long()] * nested + meta["nested_offset"]
    numel = torch.Size(meta["shape"]).numel()
    blocks = stats["quant_map"].double()[codes].reshape(-1, meta["blocksize"]) * absmax.double()[:, None]
    return blocks.flatten()[:numel].reshape(meta["shape"])


def packed_bytes(layer: nn.Module) -> int:
    """Bytes a Linear4bit holds for its weight: the packed values and every quant-state tensor."""
    weight = layer.weight
    stats = weight.quant_state.as_dict(packed=True).values() if weight.quant_state is not None else ()
    return weight.numel() * weight.element_size() + sum(t.numel() * t.element_size() for t in stats)


def packed_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Each Linear4bit's packed weight and quant-state tensors, under the model's names, as a saved state has them."""
    import bitsandbytes as bnb

    out: Dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            out[f"{name}.weight"] = module.weight.detach().clone()
            out.update({f"{name}.weight.{k}": v.detach().clone()
                        for k, v in module.weight.quant_state.as_dict(packed=True).items()})
    return out
