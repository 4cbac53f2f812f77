"""The two kernels the model is made of — GEMMs and attention — on the fastest exact path per device.

A CPU without native bf16 GEMMs (oneDNN reports none: e.g. AVX2-only x86) runs bf16 matmuls and
attention 5–30× slower than fp32. There, bf16 inputs are widened to fp32 (exact), computed in fp32
and the output rounded to bf16: the arithmetic of a bf16 kernel with fp32 accumulation, which is
what bf16 kernels do anyway. Storage, activations between layers and gradients stay bf16.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else True


def widen(x: torch.Tensor) -> bool:
    """True when x should be computed on in fp32 (bf16 on a CPU without bf16 GEMMs)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not cpu_has_native_bf16()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if widen(x):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose forward takes `linear`'s path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention, widened like `linear` where bf16 kernels are slow."""
    if widen(q):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def seeded_normal_(t: torch.Tensor, std: float, generator: "torch.Generator | None" = None) -> torch.Tensor:
    """normal(0, std) in place; with a generator, drawn on the CPU from it (the same values on every device and
    without advancing torch's global stream: memory init draws from its own generator)."""
    if generator is None:
        return torch.nn.init.normal_(t, std=std)
    with torch.no_grad():
        return t.copy_(torch.randn(t.shape, generator=generator) * std)
