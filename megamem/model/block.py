"""Pre-norm decoder block: attention and MLP from their registries, plus named residual-branch slots.

    x → x + attn(norm(x)) → [branches in slot after_attention] → x + mlp(norm(x)) → [branches in slot after_mlp]

Each registered branch (megamem.model.branches) that applies to this layer is held under its name
(`block.memory`); a branch that does not apply is None. A branch with `replaces_mlp` (memory layout C)
takes the MLP's place: the block then has no MLP (`block.mlp` and `block.mlp_norm` are None).

`compute_dtype` (None by default) runs the block under torch.autocast at that dtype and returns its output at the
input's dtype: how a progressive phase's frozen trunk held at bf16/fp16 runs inside an fp32 model
(megamem.train.trunk_precision).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from ..config import MemoryConfig, ModelConfig
from .attention import build_attention
from .branches import BRANCHES, ResidualBranch
from .branches.base import SLOTS
from .layers import make_norm
from .mlp import build_mlp


class Block(nn.Module):
    compute_dtype: Optional[torch.dtype] = None  # autocast dtype of this block's forward (None: as its inputs)

    def __init__(self, model: ModelConfig, mem: MemoryConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = make_norm(model.hidden_dim, model.norm_eps, model.use_rms_norm)
        self.attn = build_attention(model, layer_idx)
        built = {name: factory(model, mem, layer_idx) for name, factory in BRANCHES.entries.items()}
        replaced = any(b is not None and b.replaces_mlp for b in built.values())
        self.mlp_norm = None if replaced else make_norm(model.hidden_dim, model.norm_eps, model.use_rms_norm)
        self.mlp = None if replaced else build_mlp(model, layer_idx)
        self.slots: Dict[str, List[str]] = {slot: [] for slot in SLOTS}
        for name, branch in built.items():  # registered after the MLP: the module order (and init stream) as before
            setattr(self, name, branch)
            if branch is not None:
                self.slots[branch.slot].append(name)

    def branches(self) -> Iterator[Tuple[str, ResidualBranch]]:
        """(name, branch) of every branch this block holds."""
        for names in self.slots.values():
            for name in names:
                yield name, getattr(self, name)

    def _run_slot(self, slot: str, x: torch.Tensor, ctx) -> torch.Tensor:
        for name in self.slots[slot]:
            x = getattr(self, name).residual(x, ctx)
        return x

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """ctx: the forward's ForwardContext, at this block's layer (ctx.at(layer_idx))."""
        if self.compute_dtype is None:
            return self._forward(x, ctx)
        with torch.autocast(x.device.type, dtype=self.compute_dtype):
            return self._forward(x, ctx).to(x.dtype)

    def _forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx)
        x = self._run_slot("after_attention", x, ctx)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return self._run_slot("after_mlp", x, ctx)
