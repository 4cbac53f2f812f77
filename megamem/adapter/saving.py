"""Adapter exports: only what the run trained, plus the identity of the base it was trained on.

    final/adapter.safetensors   banks, memory branches, LoRA (and base weights only if the base trained)
    final/adapter.json          {"format": "megamem-adapter", "base_model_name", "base_config_sha256",
                                 "base_weights_sha256" (sampled bytes of its weight files), "step", ...}
    final/config.yaml           the run's config
    final/tokenizer/            when the run had one

`load_adapter` rebuilds the model on the base and refuses a base whose config.json or weights differ.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

from ..config import ConfigError, load_config
from ..folders import check_stamp, export_model
from ..safe_load import load_safetensors as load_file
from .base import base_identity, config_hash, weights_fingerprint

WEIGHTS, META = "adapter.safetensors", "adapter.json"


def export_adapter(state: Dict[str, torch.Tensor], cfg, tokenizer, path: str, step: int) -> None:
    """The adapter weights plus the identity of the base they were trained on, written atomically."""
    meta = {"format": "megamem-adapter", **base_identity(cfg), "step": step,
            "lora": cfg.memory.use_lora or cfg.memory.use_both_memory_and_lora,
            "base_weights_included": not cfg.model.freeze_base_model}
    export_model(state, cfg, tokenizer, path, step, weights_name=WEIGHTS, metadata=meta, extra_json={META: meta})


def save_adapter(model, cfg, path: str, tokenizer=None, step: int = 0) -> None:
    """Single-process save of an AdapterModel (training uses the gathered path in the trainer)."""
    names = set(model.export_names())
    state = {n: t.detach().clone().contiguous() for n, t in model.state_dict().items() if n in names}
    export_adapter(state, cfg, tokenizer, path, step)


def is_adapter_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META))


def load_adapter(path: str, base_model_name: Optional[str] = None, dtype: Optional[torch.dtype] = None):
    """(model, cfg, tokenizer or None). base_model_name: where the base is now, if it moved (same config)."""
    from .build import build_adapter_model

    if not is_adapter_export(path):
        raise ConfigError(f"{path}: no {META} (expected the final/ folder of an adapter run)")
    check_stamp(path)
    with open(os.path.join(path, META), encoding="utf-8") as f:
        meta = json.load(f)
    cfg = load_config(os.path.join(path, "config.yaml"))
    if base_model_name is not None:
        cfg.model.base_model_name = base_model_name
    base = cfg.model.base_model_name
    actual = config_hash(base)
    if actual != meta["base_config_sha256"]:
        raise ConfigError(f"{path} was trained on base '{meta['base_model_name']}' (config.json sha256 "
                          f"{meta['base_config_sha256'][:12]}), but '{base}' has a different config.json (sha256 "
                          f"{actual[:12]}); load it onto the base it was trained on")
    recorded = meta.get("base_weights_sha256")
    if recorded is not None:
        found = weights_fingerprint(base)
        if found is not None and found != recorded:
            raise ConfigError(f"{path} was trained on base '{meta['base_model_name']}', but the weights of '{base}' "
                              f"differ (same config.json, other weights: a base and its instruct version?); load it "
                              "onto the base it was trained on")
    model = build_adapter_model(cfg)
    state = load_file(os.path.join(path, WEIGHTS))
    expected = set(model.export_names())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ConfigError(f"{path}/{WEIGHTS} does not match its config.yaml: missing {missing[:5]}, unexpected {extra[:5]}")
    model.load_state_dict(state, strict=False)
    if dtype is not None:
        model = model.to(dtype)
    tokenizer = None
    if os.path.isdir(os.path.join(path, "tokenizer")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    return model.eval(), cfg, tokenizer
