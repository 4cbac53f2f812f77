"""The optimiser of row-sparse banks: a lazy AdamW that reduces sparse gradients across ranks.

memory.sparse_rows makes the bank gradient row-sparse (single-process autograd); this module, on the
training side, sums those rows over the ranks holding replicas (all-gather of rows), clips them and
updates only the touched rows. `sparse_bank_optimizer` wires it to a model's banks with the groups
DeepSpeed would reduce over (data-parallel replicas, or expert-parallel shards: megamem.parallel.expert).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..comm import all_gather, all_gather_counts, all_reduce
from ..memory.chapters import tokens_per_chapter


def coalesced(grad: torch.Tensor) -> torch.Tensor:
    """A row-sparse gradient with sorted, unique rows. autograd hands a leaf its first sparse gradient rebuilt
    without the coalesced flag its producer set (megamem's gathers emit sorted unique rows), and coalesce() would
    then sort and copy every value row (1.4 s of an 11 s step at 1M rows): rows already strictly increasing are
    only marked so; repeats (a bank read twice, gradients summed) are summed by coalesce()."""
    if grad.is_coalesced():
        return grad
    idx = grad._indices()
    if idx.shape[0] == 1 and bool((idx[0, 1:] > idx[0, :-1]).all()):
        return torch.sparse_coo_tensor(idx, grad._values(), grad.shape, check_invariants=False, is_coalesced=True)
    return grad.coalesce()


class RowSparseAdamW(torch.optim.Optimizer):
    """AdamW that updates only the rows present in a sparse gradient (lazy Adam).

    Rows absent from a step's gradient are untouched: no weight decay, their Adam moments keep
    their last values, and bias correction uses the parameter's global step (as torch's
    SparseAdam). Dense gradients get the ordinary AdamW update of every row. Touched rows are
    gathered in blocks of `block_rows` (a chapter), updated by torch's fused AdamW kernel, and
    written back. With `group` (a process group), sparse gradients are summed across its ranks
    (all-gather of rows); with `world`, sparse gradients are divided by it (the data-parallel size):
    replicas of a bank pass both, expert-parallel shards (gradients already summed over all ranks'
    tokens by the all-to-all) pass their expert-data-parallel group and the data-parallel size.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, block_rows: int = 1, group=None, world: Optional[int] = None,
                 max_grad_norm: float = 0.0, shard_group=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, block_rows=block_rows))
        self.process_group, self.world = group, world
        self.max_grad_norm, self.shard_group = max_grad_norm, shard_group

    def _reduce(self, grad: torch.Tensor) -> torch.Tensor:
        if not grad.is_sparse:
            return all_reduce(grad, group=self.process_group)
        idx, val = grad.indices(), grad.values()
        counts = all_gather_counts(idx.shape[1], group=self.process_group)
        top = max(counts)
        pad_i = idx.new_zeros(1, top)
        pad_i[:, :idx.shape[1]] = idx
        pad_v = val.new_zeros((top,) + val.shape[1:])
        pad_v[:idx.shape[1]] = val
        all_i, all_v = all_gather(pad_i, group=self.process_group), all_gather(pad_v, group=self.process_group)
        idx = torch.cat([i[:, :c] for i, c in zip(all_i, counts)], 1)
        val = torch.cat([v[:c] for v, c in zip(all_v, counts)])
        return torch.sparse_coo_tensor(idx, val, grad.shape, check_invariants=False).coalesce()

    @staticmethod
    def _adamw(p, g, m, v, step, group):
        """torch's fused AdamW on tensors p (lists, or one tensor), all at the parameter's step."""
        if isinstance(p, torch.Tensor):
            p, g, m, v = [p], [g], [m], [v]
        b1, b2 = group["betas"]
        torch._fused_adamw_(p, g, m, v, [], [step] * len(p), lr=group["lr"], beta1=b1, beta2=b2,
                            weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=False)

    def _gradients(self):
        """(param, group, reduced gradient) of every parameter with a gradient, clipped by their joint norm."""
        items = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = coalesced(p.grad) if p.grad.is_sparse else p.grad
                if self.process_group is not None:
                    grad = self._reduce(grad)
                if self.world:  # data-parallel mean (expert shards: summed over all ranks' tokens)
                    grad = grad * (1.0 / self.world)
                items.append((p, group, grad))
        if self.max_grad_norm > 0 and items:
            sq = sum((g.values() if g.is_sparse else g).float().pow(2).sum() for _, _, g in items)
            if self.shard_group is not None:  # shards of one bank live on the ranks of this group
                all_reduce(sq, group=self.shard_group)
            factor = self.max_grad_norm / (sq.sqrt() + 1e-6)
            if factor < 1:
                items = [(p, group, g * factor.to(g.dtype)) for p, group, g in items]
        return items

    @torch.no_grad()
    def step(self, closure=None):
        for p, group, grad in self._gradients():
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            state["step"] += 1
            m, v = state["exp_avg"], state["exp_avg_sq"]
            if not grad.is_sparse:
                self._adamw(p, grad, m, v, state["step"], group)
                continue
            rows, g = grad.indices()[0], grad.values()
            B = group["block_rows"]
            if B > 1 and rows.numel() % B == 0 and bool((rows.view(-1, B) == rows.view(-1, B)[:, :1]
                                                         + torch.arange(B)).all()) and bool((rows[::B] % B == 0).all()):
                # whole chapters: the fused kernel updates each chapter's block in place (no gather/scatter)
                blocks = (rows[::B] // B).tolist()
                pv, mv, vv = (t.view(-1, B, t.shape[-1]) for t in (p, m, v))
                gv = g.view(-1, B, g.shape[-1])
                self._adamw([pv[c] for c in blocks], list(gv.unbind(0)), [mv[c] for c in blocks],
                            [vv[c] for c in blocks], state["step"], group)
                continue
            pv, mv, vv = (t.view(t.shape[0], -1) for t in (p, m, v))
            ps, ms, vs = pv.index_select(0, rows), mv.index_select(0, rows), vv.index_select(0, rows)
            self._adamw([ps], [g.contiguous()], [ms], [vs], state["step"], group)
            pv.index_copy_(0, rows, ps)
            mv.index_copy_(0, rows, ms)
            vv.index_copy_(0, rows, vs)
        return None


def sparse_bank_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                          eps: float = 1e-8, max_grad_norm: float = 0.0) -> RowSparseAdamW:
    """Lazy AdamW for the banks of a sparse_bank_grad model, stepped after `engine.step()`.

    Gradients are reduced like DeepSpeed reduces them: replicated banks over the data-parallel
    group, expert shards over their expert-data-parallel group; both divided by the data-parallel size.
    max_grad_norm > 0 clips the bank gradients by their joint norm (whole banks, shards included).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    ep = getattr(model, "chapter_ep_size", 1)
    if ep > 1:  # imports DeepSpeed's MoE: only for expert-parallel runs
        from ..parallel.expert import expert_data_parallel_group, expert_parallel_group
    group = None if world == 1 else (dist.group.WORLD if ep == 1 else expert_data_parallel_group(ep))
    return RowSparseAdamW(model.banks.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                          block_rows=tokens_per_chapter(model.memory_config), group=group, world=world,
                          max_grad_norm=max_grad_norm, shard_group=expert_parallel_group(ep) if ep > 1 else None)


def outside_engine_problem(what: str, off: str, params: str, stage: int, cfg, pipelined: bool,
                           why_stage: str) -> Optional[str]:
    """Why parameters updated by RowSparseAdamW outside the DeepSpeed engine (chapter banks, PEER tables)
    cannot be here, with the fix; None if they can. params: what they are ("banks", "tables")."""
    if stage not in (1, 2):
        return (f"{what} trains the {params} outside the DeepSpeed engine{why_stage}, which needs ZeRO stage 1 "
                f"or 2 (ZeRO-0 reduces and clips every parameter's gradient itself, ZeRO-3 partitions the {params}); "
                f"this config has stage {stage}: use ds_configs/zero1.json or zero2.json, or set {off}")
    if cfg.training.mixed_precision != "no":
        return (f"{what} updates the {params} with megamem's row-sparse AdamW, which keeps no fp32 master copy: "
                f"set training.mixed_precision: no, or {off}")
    if cfg.training.optimizer == "sgd":
        return f"{what} updates the {params} with AdamW: set training.optimizer to adamw or adam, or {off}"
    if pipelined:
        return f"{what} is not supported with pipeline parallelism: set {off}"
    return None
