"""Chapter banks trained outside the DeepSpeed engine: expert-parallel shards and row-sparse updates.

With `parallel.ep_size > 1` each rank holds its chapters of every bank (megamem.parallel.expert);
with `memory.sparse_bank_grad` the banks get row-sparse gradients. Either way the banks are left
out of the engine's optimizer (ZeRO flattens every gradient of its parameters into dense buffers,
and DeepSpeed's MoE checkpoints only hold `deepspeed_moe.experts` modules) and are updated by one
`RowSparseAdamW` that reduces their gradients as the engine would (replicas over the data-parallel
group, shards over their expert-data-parallel group, both averaged by the data-parallel size) and
clips them by their own joint norm with training.max_grad_norm. Its learning rate follows the
engine's schedule (memory_lr × the schedule's factor of the step).

Checkpoints: each rank writes `chapter_banks_rank{r}.safetensors` (its bank tensors and their
Adam state, tensors only) into the checkpoint folder before the COMPLETE marker; the engine's own
files then hold a stale copy of the banks, which `load` overwrites. Exports gather full banks.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..config import ConfigError, MegamemConfig
from .sparse_adamw import outside_engine_problem


def banks_outside_engine(cfg: MegamemConfig) -> bool:
    return cfg.memory.use_chapters and (cfg.parallel.ep_size > 1 or cfg.memory.sparse_bank_grad)


def layout_problem(cfg: MegamemConfig, stage: int, world_size: int, pipelined: bool) -> Optional[str]:
    """Why this run cannot train its chapter banks outside the engine, with the fix; None if it can."""
    if not banks_outside_engine(cfg):
        return None
    ep = cfg.parallel.ep_size
    what = f"parallel.ep_size = {ep}" if ep > 1 else "memory.sparse_bank_grad: true"
    off = "parallel.ep_size: 1" if ep > 1 else "memory.sparse_bank_grad: false"
    if world_size % ep:
        return f"{what}: the world size ({world_size}) must be a multiple of ep_size"
    return outside_engine_problem(what, off, "banks", stage, cfg, pipelined, " (see the Chapters section)")


class ChapterBanks:
    """The banks of a chapter model when they train outside the engine (see the module docstring)."""

    def __init__(self, model: nn.Module, cfg: MegamemConfig, rank: int):
        from ..parallel.expert import apply_expert_parallel
        from .sparse_adamw import sparse_bank_optimizer

        self.model, self.cfg, self.rank, self.ep = model, cfg, rank, cfg.parallel.ep_size
        if self.ep > 1:
            apply_expert_parallel(model, self.ep, engine_experts=False)
        t = cfg.training
        self.optimizer = sparse_bank_optimizer(model, lr=t.memory_lr, weight_decay=t.weight_decay if t.bank_weight_decay
                                               else 0.0, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                                               max_grad_norm=t.max_grad_norm)

    def param_ids(self) -> set:
        return {id(p) for p in self.model.banks.parameters()}

    def step(self, lr_factor: float) -> None:
        """One update of the banks at memory_lr × lr_factor (the engine's schedule of this step)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.training.memory_lr * lr_factor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ----------------------------------------------------------- checkpoints
    def _file(self, path: str) -> str:
        return os.path.join(path, f"chapter_banks_rank{self.rank}.safetensors")

    def save(self, path: str) -> None:
        """This rank's banks (shards) and their optimizer state, written atomically."""
        from safetensors.torch import save_file

        tensors = {}
        for name, p in self.model.banks.named_parameters():
            tensors[f"param.{name}"] = p.detach().contiguous()
            for key, value in self.optimizer.state.get(p, {}).items():
                tensors[f"state.{name}.{key}"] = value.detach().contiguous()
        tmp = self._file(path) + ".tmp"
        save_file(tensors, tmp, metadata={"ep_size": str(self.ep)})
        os.replace(tmp, self._file(path))

    def load(self, path: str) -> None:
        from ..safe_load import open_safetensors

        file = self._file(path)
        if not os.path.isfile(file):
            raise ConfigError(f"checkpoint {path} has no {os.path.basename(file)}: it was written by a run whose banks "
                              "trained inside the engine (ep_size 1, sparse_bank_grad false); resume with that layout")
        with open_safetensors(file) as f:
            saved_ep = int(f.metadata().get("ep_size", 1))
            if saved_ep != self.ep:
                raise ConfigError(f"{file} holds chapter shards of ep_size {saved_ep}; this run has parallel.ep_size "
                                  f"{self.ep}. Resume with the same ep_size")
            for name, p in self.model.banks.named_parameters():
                value = f.get_tensor(f"param.{name}")
                if value.shape != p.shape:
                    raise ConfigError(f"{file}: param.{name} has shape {tuple(value.shape)}, "
                                      f"the model {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(value)
                keys = [k for k in f.keys() if k.startswith(f"state.{name}.")]
                self.optimizer.state[p] = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in keys}

    # ---------------------------------------------------------------- export
    def full_banks(self, state: Dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Replace each bank shard in an exported state dict (rank 0's) with the whole bank.

        Collective over the expert-parallel group; a no-op without shards.
        """
        if self.ep == 1:
            return
        from ..comm import all_gather
        from ..parallel.expert import expert_parallel_group

        group = expert_parallel_group(self.ep)
        for name, p in self.model.banks.named_parameters():
            parts = all_gather(p.detach(), group=group)
            if self.rank == 0:
                state[f"banks.{name}"] = torch.cat(parts).to(dtype).contiguous()
