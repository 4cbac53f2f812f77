"""The buffers a model's state dict holds: registered persistent (non-persistent ones are scratch or recomputed)."""
from __future__ import annotations

from typing import Iterator, Tuple

import torch
import torch.nn as nn


def persistent_buffers(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, buffer) like named_buffers(), less buffers registered persistent=False (RoPE frequencies,
    ALiBi slopes, PEER's per-forward expert counts): exactly the buffers model.state_dict() saves."""
    seen = set()
    for prefix, module in model.named_modules():
        for name, b in module._buffers.items():
            if b is None or name in module._non_persistent_buffers_set or id(b) in seen:
                continue
            seen.add(id(b))
            yield (f"{prefix}.{name}" if prefix else name), b
