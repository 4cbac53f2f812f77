"""training.init_from: start a run from saved weights only — how a run changes layout.

A checkpoint resumes exactly only on its own layout. To continue on another one (plain data
parallel, ZeRO, expert parallel, a different number of pipeline stages), start from its weights:
optimizer state, schedule and data position start fresh. Accepts every source the Hugging Face
converter accepts (megamem.parallel.weights.read_weights): an export folder, or a checkpoint of any
ZeRO stage, pipeline or expert-parallel layout.
"""
from __future__ import annotations

import os
from typing import Dict

import torch
import torch.nn as nn

from ..config import ConfigError
from ..parallel.pipeline_state import plain_aliases
from ..parallel.weights import check_shapes, read_weights  # noqa: F401 (check_shapes re-exported)


def read_plain_weights(path: str) -> Dict[str, torch.Tensor]:
    """Plain MemoryTransformer weights from an export folder or any checkpoint (no pickled code runs)."""
    if os.path.isfile(os.path.join(path, "adapter.json")):
        raise ConfigError(f"training.init_from: {path} is an adapter export; adapters start from their base model")
    return read_weights(path, "training.init_from")[0]


def init_from(model: nn.Module, cfg, zero_stage: int) -> None:
    """Load training.init_from into a plain model (ZeRO-0/1/2) or a pipeline module, before deepspeed.initialize."""
    path = cfg.training.init_from
    if zero_stage >= 3:
        raise ConfigError("training.init_from is not supported with ZeRO-3 yet; start with ZeRO-0/1/2 or a pipeline")
    if cfg.model.base_model_name is not None:
        raise ConfigError("training.init_from: adapter runs start from model.base_model_name; remove init_from")
    state = read_plain_weights(path)
    if hasattr(model, "load_plain_state_dict"):  # a pipeline: each stage takes its layers
        model.load_plain_state_dict(state, path)
        return
    check_shapes({k: v.shape for k, v in model.state_dict().items()}, state, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases = plain_aliases(cfg)  # a tied head or a shared router is loaded under its first name
    missing = sorted(k for k in missing if aliases.get(k, k) not in state)
    if unexpected or missing:
        raise ConfigError(f"training.init_from: {path} does not match this model config: missing "
                          f"{missing[:5]}, unexpected {sorted(unexpected)[:5]}")
