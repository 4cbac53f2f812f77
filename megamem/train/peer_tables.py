"""PEER expert tables trained outside the DeepSpeed engine with row-sparse gradients.

With `model.peer_config.sparse_tables` each PEER layer's `expert_down` / `expert_up` get row-sparse
gradients (the chosen rows only; megamem.memory.sparse_rows.gather_rows). ZeRO flattens every gradient
of its optimizer's parameters into dense buffers, so the tables are left out of the engine's optimizer
(as row-sparse chapter banks are: megamem.train.chapter_banks) and one `RowSparseAdamW` updates them at
each accumulation boundary: no weight decay, learning_rate × the engine's schedule factor, gradients
summed over the data-parallel group (all-gather of rows) and divided by its size, clipped by their own
joint norm with training.max_grad_norm. The tables are replicated on every rank.

Checkpoints: rank 0 writes `peer_tables.safetensors` (tables, Adam moments and step) into the checkpoint
folder before the COMPLETE marker; every rank reads it on resume.
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import ConfigError, MegamemConfig
from ..model.mlp.peer import peer_modules
from .sparse_adamw import RowSparseAdamW, outside_engine_problem

FILE = "peer_tables.safetensors"


def tables_outside_engine(cfg: MegamemConfig) -> bool:
    return cfg.model.use_peer and cfg.model.peer_config.sparse_tables


def layout_problem(cfg: MegamemConfig, stage: int, pipelined: bool) -> Optional[str]:
    """Why this run cannot train PEER tables row-sparse outside the engine, with the fix; None if it can."""
    if not tables_outside_engine(cfg):
        return None
    what, off = "model.peer_config.sparse_tables: true", "model.peer_config.sparse_tables: false"
    return outside_engine_problem(what, off, "expert tables", stage, cfg, pipelined, "")


def table_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Every PEER layer's expert_down and expert_up, in layer order."""
    layers = peer_modules(model)
    return [p for i in sorted(layers) for p in layers[i].no_weight_decay_parameters() if p.requires_grad]


class PeerTables:
    """The expert tables of a sparse_tables PEER model and their RowSparseAdamW (see the module docstring)."""

    def __init__(self, model: nn.Module, cfg: MegamemConfig, rank: int):
        self.model, self.cfg, self.rank = model, cfg, rank
        t = cfg.training
        self.lr = t.learning_rate if t.learning_rate is not None else t.memory_lr
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.params = table_parameters(model)
        ids = {id(p) for p in self.params}
        self.names = [n for n, p in model.named_parameters() if id(p) in ids]
        self.optimizer = RowSparseAdamW(self.params, lr=self.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                                        weight_decay=0.0, block_rows=1, group=dist.group.WORLD if world > 1 else None,
                                        world=world, max_grad_norm=t.max_grad_norm)

    def param_ids(self) -> set:
        return {id(p) for p in self.params}

    def step(self, lr_factor: float) -> None:
        """One update of the tables at learning_rate × lr_factor (the engine's schedule of this step)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * lr_factor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, path: str) -> None:
        """The tables and their optimizer state (rank 0: they are replicated), written atomically."""
        if self.rank != 0:
            return
        from safetensors.torch import save_file

        tensors = {}
        for name, p in zip(self.names, self.params):
            tensors[f"param.{name}"] = p.detach().contiguous()
            for key, value in self.optimizer.state.get(p, {}).items():
                tensors[f"state.{name}.{key}"] = value.detach().contiguous()
        tmp = os.path.join(path, FILE + ".tmp")
        save_file(tensors, tmp)
        os.replace(tmp, os.path.join(path, FILE))

    def load(self, path: str) -> None:
        from ..safe_load import open_safetensors

        file = os.path.join(path, FILE)
        if not os.path.isfile(file):
            raise ConfigError(f"checkpoint {path} has no {FILE}: it was written with model.peer_config.sparse_tables: "
                              "false; resume with that setting")
        with open_safetensors(file) as f:
            for name, p in zip(self.names, self.params):
                value = f.get_tensor(f"param.{name}")
                if value.shape != p.shape:
                    raise ConfigError(f"{file}: param.{name} has shape {tuple(value.shape)}, the model {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(value)
                keys = [k for k in f.keys() if k.startswith(f"state.{name}.")]
                self.optimizer.state[p] = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in keys}
