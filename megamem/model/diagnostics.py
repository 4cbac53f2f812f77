"""Is the memory used? Per-layer diagnostics of the memory branches, switched on for chosen forwards.

    with diagnosing(model):          # every MemoryBranch (plain model, adapter, pipeline stage) records
        model(ids)
    forward_diagnostics(model)       # {layer: {"rel_norm", "entropy", "entropy_norm"}} of that forward

- rel_norm: ‖delta‖/‖x‖ of the branch's output against the residual stream it reads, mean over tokens;
- entropy: attention entropy (nats) over the bank rows each token reads, and entropy_norm =
  entropy / log(rows read); estimated from a few query positions (megamem.memory.diagnostics).
Off (the default), the branches compute nothing extra.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn as nn

from ..memory.bank import row_parameter
from .branches.memory import MemoryBranch


def memory_branches(model: nn.Module) -> List[Tuple[int, MemoryBranch]]:
    """(layer index, branch) of every memory branch the module holds, by layer."""
    found = {m.layer_idx: m for m in model.modules() if isinstance(m, MemoryBranch)}
    return sorted(found.items())


def set_diagnostics(model: nn.Module, on: bool) -> None:
    for _, branch in memory_branches(model):
        branch.diagnose = branch.attn.diagnose = on
        if on:
            branch.diag_rel_norm = branch.attn.diag = None


@contextmanager
def diagnosing(model: nn.Module) -> Iterator[None]:
    """Memory branches record their diagnostics for the forwards inside."""
    set_diagnostics(model, True)
    try:
        yield
    finally:
        set_diagnostics(model, False)


def forward_diagnostics(model: nn.Module) -> Dict[int, Dict[str, torch.Tensor]]:
    """What the last diagnosed forward recorded, per memory layer (an entropy the path cannot estimate,
    e.g. expert-parallel chapter shards, is absent)."""
    out = {}
    for layer, branch in memory_branches(model):
        rec = {}
        if branch.diag_rel_norm is not None:
            rec["rel_norm"] = branch.diag_rel_norm
        if branch.attn.diag is not None:
            rec.update(branch.attn.diag)
        if rec:
            out[layer] = rec
    return out


def touched_fraction(grad: torch.Tensor) -> float:
    """Fraction of rows (first dim) with any non-zero gradient entry."""
    return (grad.reshape(grad.shape[0], -1) != 0).any(1).float().mean().item()


def bank_rows(model: nn.Module) -> Dict[int, nn.Parameter]:
    """Per memory layer, the row parameter of the bank it reads (megamem.memory.bank.row_parameter)."""
    banks = getattr(model, "banks", None)
    if banks is None:
        return {}
    return {layer: row_parameter(banks[branch.bank_index]) for layer, branch in memory_branches(model)}
