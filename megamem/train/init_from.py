"""training.init_from: start a run from saved weights only — how a run changes layout.

A pipeline checkpoint resumes exactly only on its own layout. To continue on another one (plain
data parallel, ZeRO, a different number of stages), start from its weights: optimizer state,
schedule and data position start fresh. Accepts an export folder (model.safetensors + config.yaml,
e.g. output_dir/final) or a pipeline checkpoint (megamem.parallel.pipeline_state.plain_state_dict_from_checkpoint).
"""
from __future__ import annotations

import os
from typing import Dict

import torch
import torch.nn as nn

from ..config import ConfigError


def read_plain_weights(path: str) -> Dict[str, torch.Tensor]:
    """Plain MemoryTransformer weights from an export folder or a pipeline checkpoint (no pickled code runs)."""
    weights = os.path.join(path, "model.safetensors")
    if os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, "adapter.json")):
            raise ConfigError(f"training.init_from: {path} is an adapter export; adapters start from their base model")
        from ..safe_load import load_safetensors as load_file

        return load_file(weights)
    if not os.path.isdir(path):
        raise ConfigError(f"training.init_from: {path} does not exist (give an export folder or a pipeline checkpoint)")
    from ..parallel.pipeline_state import plain_state_dict_from_checkpoint

    try:
        return plain_state_dict_from_checkpoint(path)
    except ConfigError as e:
        raise ConfigError(f"training.init_from: {e} (give an export folder with model.safetensors, or a pipeline "
                          "checkpoint)") from None


def check_shapes(expected: Dict[str, torch.Size], state: Dict[str, torch.Tensor], path: str) -> None:
    """One line naming the first tensor whose shape differs (load_state_dict would list them all)."""
    bad = [k for k, shape in expected.items() if k in state and tuple(state[k].shape) != tuple(shape)]
    if bad:
        k = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ConfigError(f"training.init_from: {path} does not fit this model config: {k} has shape "
                          f"{list(state[k].shape)} there, {list(expected[k])} here{more}")


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
    from ..parallel.pipeline_state import plain_aliases

    aliases = plain_aliases(cfg)  # a tied head or a shared router is loaded under its first name
    missing = sorted(k for k in missing if aliases.get(k, k) not in state)
    if unexpected or missing:
        raise ConfigError(f"training.init_from: {path} does not match this model config: missing "
                          f"{missing[:5]}, unexpected {sorted(unexpected)[:5]}")
