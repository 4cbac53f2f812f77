"""Any megamem export folder back as a megamem model: a plain export, a megamem Hugging Face folder,
or an adapter export (its base + the adapter weights).

It lives in the hf layer because one of the forms it reads is megamem's Hugging Face folder;
exports are written lower down (megamem.folders.export_model), so adapters and training need
nothing from here.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from ..adapter import build_any_model, load_adapter
from ..config import ConfigError, load_config
from ..folders import check_stamp
from ..safe_load import load_safetensors
from .folder import is_megamem_folder, load_megamem_folder


def model_with_state(cfg, state: Dict[str, torch.Tensor], where: str, dtype: Optional[torch.dtype] = None):
    """The model of cfg holding `state` (every key must match; a tied lm_head may be absent), in eval mode."""
    model = build_any_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ConfigError(f"{where} does not match its config.yaml: missing {sorted(set(missing) - tied)[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return model.to(dtype or state["tok_embeddings.weight"].dtype).eval()


def load_exported(path: str, dtype: Optional[torch.dtype] = None):
    """(model, cfg, tokenizer or None) from an exported folder, or a megamem Hugging Face folder."""
    if os.path.isfile(os.path.join(path, "adapter.json")):  # an adapter run: its base + the adapter weights
        inside = next((p for p in (os.path.join(path, "base"), path)  # converted: the base's files travel along
                       if os.path.isfile(os.path.join(p, "config.json"))), None)
        return load_adapter(path, base_model_name=inside, dtype=dtype)
    if is_megamem_folder(path):
        return load_megamem_folder(path, dtype)
    check_stamp(path)
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise ConfigError(f"{path}: no model.safetensors (expected a folder written at the end of training, "
                          "e.g. outputs/<run>/final)")
    cfg = load_config(os.path.join(path, "config.yaml"))
    model = model_with_state(cfg, load_safetensors(weights), weights, dtype)
    tokenizer = None
    if os.path.isdir(os.path.join(path, "tokenizer")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    return model, cfg, tokenizer
