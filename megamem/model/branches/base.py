"""The residual-branch protocol: what a part added to a block's residual stream provides."""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

SLOTS = ("after_attention", "after_mlp")


class ResidualBranch(nn.Module):
    """forward(x, ctx) → delta, the branch's contribution read from the stream x.

    - slot: where in the block it runs (after the attention or after the MLP).
    - param_group: its parameters' optimizer group (megamem.train.optim).
    - output_layers(): the layers identity-init zeroes (wo_init_zero), so the branch starts as a no-op;
      always_zero_init: zeroed whatever wo_init_zero says (a branch that must start as identity).
    - decoding state: kept in ctx.layer_cache().state under the branch's own keys.
    - residual(x, ctx): x + delta; a branch with more than one residual step overrides it.
    - replaces_mlp: the block then has no MLP of its own; the branch stands where it was.
    """

    slot = "after_attention"
    param_group = "memory"
    always_zero_init = False
    replaces_mlp = False

    def output_layers(self) -> List[nn.Module]:
        return []

    def residual(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return x + self(x, ctx)
