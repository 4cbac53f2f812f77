"""Residual-branch slots of Block, by name (one file each; registered where defined).

A registered factory `(model_config, memory_config, layer_idx) → ResidualBranch or None` decides
whether layer layer_idx gets the branch; Block holds it under the registered name.
"""
from .registry import BRANCHES
from . import memory  # noqa: F401  (registers memory)
from . import attractor  # noqa: F401  (registers attractor)
from .base import ResidualBranch
from .memory import MemoryBranch

__all__ = ["BRANCHES", "MemoryBranch", "ResidualBranch"]
