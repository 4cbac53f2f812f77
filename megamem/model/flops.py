"""FLOP accounting shared by every model kind (megamem's own and adapters on HF bases).

The definition of model FLOPs per token lives in megamem.train.metrics.flops_per_token; these are
its pieces, here so that adapter models (below the train layer) count the same way.
"""
from __future__ import annotations

import torch


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter (a ZeRO-3 rank holds a shard of it locally)."""
    return getattr(p, "ds_numel", p.numel())


def weight_flops(params, skip=()) -> float:
    """Matmul FLOPs per token of the given weights in one training step: 2 (forward) + 2 (gradient of the
    input) + 2 (gradient of the weight, trainable weights only) per weight element."""
    skip_ids = {id(p) for p in skip}
    unique = {id(p): p for p in params if id(p) not in skip_ids}.values()
    return sum((6 if p.requires_grad else 4) * full_numel(p) for p in unique)


def memory_rows_read(mem) -> int:
    """Bank rows each token attends to: the whole bank, or with chapters only the chapters it reads."""
    if not mem.use_chapters:
        return mem.num_memory_tokens
    per_chapter = mem.tokens_per_chapter or mem.num_memory_tokens // mem.num_chapters
    return (mem.top_k_chapters + mem.num_shared_chapters) * per_chapter
