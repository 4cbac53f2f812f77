"""Checks of how a dense bank is read (memory.memory_top_k, memory_qk_norm, memory_qk_temperature)."""
from __future__ import annotations

from typing import List

from .schema import MegamemConfig


def validate_memory_read(cfg: MegamemConfig, problems: List[str]) -> None:
    mem = cfg.memory
    if mem.memory_top_k is not None:
        if mem.memory_top_k < 1:
            problems.append(f"memory.memory_top_k must be a positive number of rows (or null: every row), "
                            f"got {mem.memory_top_k}")
        elif mem.memory_top_k > mem.num_memory_tokens:
            problems.append(f"memory.memory_top_k ({mem.memory_top_k}) exceeds the bank's rows "
                            f"(memory.num_memory_tokens = {mem.num_memory_tokens}): use at most that, or null")
    if mem.memory_qk_temperature is not None:
        if not mem.memory_qk_norm:
            problems.append("memory.memory_qk_temperature is the initial temperature of memory_qk_norm: set "
                            "memory.memory_qk_norm: true, or remove it")
        elif not mem.memory_qk_temperature > 0:
            problems.append(f"memory.memory_qk_temperature must be > 0, got {mem.memory_qk_temperature}")
    if mem.use_chapters and (mem.memory_top_k is not None or mem.memory_qk_norm):
        problems.append("memory.memory_top_k / memory_qk_norm read a dense bank; chapters already read only their "
                        "routed rows (top_k_chapters): remove them, or set memory.use_chapters: false")
