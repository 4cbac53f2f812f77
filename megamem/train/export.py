"""Consolidated weights of a finished run: `model.safetensors` + `config.yaml` (+ `tokenizer/`).

The folder loads back with `load_exported(path)` — safetensors only, no pickled code.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch

from ..config import ConfigError, dump_config, load_config

SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_model(state: Dict[str, torch.Tensor], cfg, tokenizer, path: str, step: int,
                 weights_name: str = "model.safetensors", metadata: Optional[Dict[str, Any]] = None,
                 extra_json: Optional[Dict[str, Any]] = None) -> None:
    """Write into `path.tmp`, then swap it in: a crash never leaves a half-written export.

    extra_json: {file name: JSON-able object} written beside the weights (adapter identity, ...).
    """
    from safetensors.torch import save_file

    from ..folders import write_folder

    def fill(tmp: str) -> None:
        meta = metadata if metadata is not None else {"format": "megamem", "step": step}
        save_file(state, os.path.join(tmp, weights_name), metadata={k: str(v) for k, v in meta.items()})
        for name, obj in (extra_json or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=1)
        with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(dump_config(cfg))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))

    write_folder(path, "adapter-export" if weights_name != "model.safetensors" else "export", fill, what="export")


def model_with_state(cfg, state: Dict[str, torch.Tensor], where: str, dtype: Optional[torch.dtype] = None):
    """The model of cfg holding `state` (every key must match; a tied lm_head may be absent), in eval mode."""
    from ..model import build_model

    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ConfigError(f"{where} does not match its config.yaml: missing {sorted(set(missing) - tied)[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return model.to(dtype or state["tok_embeddings.weight"].dtype).eval()


def load_exported(path: str, dtype: Optional[torch.dtype] = None):
    """(model, cfg, tokenizer or None) from an exported folder, or a megamem Hugging Face folder."""
    from ..hf.folder import is_megamem_folder, load_megamem_folder
    from ..safe_load import load_safetensors

    if os.path.isfile(os.path.join(path, "adapter.json")):  # an adapter run: its base + the adapter weights
        from ..adapter import load_adapter

        inside = next((p for p in (os.path.join(path, "base"), path)  # converted: the base's files travel along
                       if os.path.isfile(os.path.join(p, "config.json"))), None)
        return load_adapter(path, base_model_name=inside, dtype=dtype)
    if is_megamem_folder(path):
        return load_megamem_folder(path, dtype)
    from ..folders import check_stamp

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
