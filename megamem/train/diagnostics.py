"""Memory diagnostics in the training loop: always on for models with memory, computed on logging steps only.

On a logging step every micro-batch's forward records, per memory layer, the branch's relative output
norm and its attention entropy (megamem.model.diagnostics), averaged over the micro-batches and the
ranks; after the last backward, before the optimizer step, the fraction of the layer's bank rows whose
gradient is non-zero is read through DeepSpeed's safe_get_full_grad (every ZeRO stage; under ZeRO-3
a collective gathering the bank's gradient, hence only on logging steps). Records carry
memory/L<i>/rel_norm, entropy, entropy_norm, rows_touched. Pipeline runs report them unavailable in
one line of the run log (DeepSpeed's pipeline schedule runs forward, backward and step in one call).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from ..config import MegamemConfig
from ..memory.placement import memory_layers
from ..model.diagnostics import bank_rows, forward_diagnostics, memory_branches, set_diagnostics, touched_fraction

PIPELINE_LINE = ("memory diagnostics: unavailable under the pipeline (DeepSpeed's schedule runs forward, backward "
                 "and step in one call); evaluate with scripts/eval.py --ablate-memory instead")


def full_grad(p: nn.Parameter) -> Optional[torch.Tensor]:
    """The parameter's whole gradient under any ZeRO stage (a collective under ZeRO-1/2/3: every rank calls)."""
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(p)


def touched(grad: Optional[torch.Tensor]) -> float:
    """Fraction of rows with a non-zero gradient (row-sparse gradients: their non-zero stored rows)."""
    if grad is None:
        return 0.0
    if grad.is_sparse:
        g = grad.coalesce()
        values = g.values().reshape(g.values().shape[0], -1)
        return g.indices()[0][(values != 0).any(1)].unique().numel() / grad.shape[0]
    return touched_fraction(grad)


class MemoryDiagnostics:
    def __init__(self, model: nn.Module, pipeline: bool, rank: int, cfg: Optional[MegamemConfig] = None):
        """cfg: tells a pipeline's rank 0 whether the model has memory (its own stage may hold none)."""
        self.model = model
        has_memory = bool(memory_branches(model)) or (
            pipeline and cfg is not None and bool(memory_layers(cfg.memory, cfg.model.num_layers)))
        self.enabled = has_memory and not pipeline
        self.rows = bank_rows(model) if self.enabled else {}
        self.sums: Dict[str, torch.Tensor] = {}
        self.count = 0
        if pipeline and has_memory and rank == 0:
            print(PIPELINE_LINE, flush=True)

    def begin(self, logging_step: bool) -> bool:
        """Switch the branches' recording on for a logging step's forwards."""
        on = self.enabled and logging_step
        self.sums, self.count = {}, 0
        if on:
            set_diagnostics(self.model, True)
        return on

    def after_forward(self) -> None:
        for layer, rec in forward_diagnostics(self.model).items():
            for name, value in rec.items():
                key = f"memory/L{layer}/{name}"
                self.sums[key] = self.sums.get(key, 0.0) + value.detach().float().cpu()
        self.count += 1

    def before_step(self) -> None:
        """After the step's last backward: rows of each layer's bank that received gradient."""
        grads = {id(p): touched(full_grad(p)) for p in {id(p): p for p in self.rows.values()}.values()}
        for layer, p in self.rows.items():
            self.sums[f"memory/L{layer}/rows_touched"] = torch.tensor(grads[id(p)]) * max(self.count, 1)

    def end(self, all_reduce: Callable[[torch.Tensor], torch.Tensor], world: int) -> Dict[str, float]:
        """Means over the step's micro-batches and the ranks; the branches stop recording."""
        set_diagnostics(self.model, False)
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        values = torch.stack([torch.as_tensor(self.sums[k]).float().reshape(()) for k in keys]) / max(self.count, 1)
        values = all_reduce(values) / world
        self.sums, self.count = {}, 0
        return dict(zip(keys, values.tolist()))
