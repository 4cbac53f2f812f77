"""The parallel layout a resolved DeepSpeed config describes: its ZeRO stage and pipeline stages.

Read by the builders here (pipeline stages) and by training (megamem.train.ds_config resolves the
config and re-exports these), so the parallel layer never reads the DeepSpeed config through train.
"""
from __future__ import annotations

from typing import Any, Dict


def zero_stage(ds: Dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def pipeline_stages(ds: Dict[str, Any]) -> int:
    """Stages of a resolved config (1 = no pipeline)."""
    stages = ds.get("pipeline", {}).get("stages", 1)
    return stages if isinstance(stages, int) else 1
