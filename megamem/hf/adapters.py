"""Adapter runs as Hugging Face folders.

- `merge_lora`: a LoRA-only run (no memory adapter) becomes the base model with the LoRA deltas
  merged into its weights: a plain folder of the base's architecture (no megamem, no peft needed).
- otherwise: base + adapter — the base's own files (config.json, weights, tokenizer) next to the
  adapter export (adapter.safetensors, adapter.json, config.yaml). `AutoModelForCausalLM` loads the
  base from it; megamem's `load_exported(folder)` loads base + memory/LoRA (the folder is its own
  base, checked by config hash as always).
"""
from __future__ import annotations

import os
import shutil

import torch

from ..adapter.saving import META, WEIGHTS, load_adapter
from ..config import ConfigError, load_config
from ..folders import SAVE_DTYPES
from ..safe_load import load_safetensors, open_safetensors


def base_folder(name: str) -> str:
    """The local folder of a base model: a folder path, or its snapshot in the HF cache (no download)."""
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any miss means the same thing here
        raise ConfigError(f"model.base_model_name '{name}' is neither a folder nor in the local Hugging Face cache "
                          f"({type(e).__name__}); download it first") from None


BASE = "base"  # the base model's own files inside a converted base + adapter folder


def merged_lora_base(model):
    """The adapter model's base with every LoRA layer merged into its base weights (peft's merge)."""
    from peft.tuners.lora import LoraLayer

    base = model.base
    for name, module in list(base.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent) if parent else base, child, module.get_base_layer())
    return base


def write_adapter_folder(folder: str, source: str, dtype: str, merge_lora: bool) -> None:
    """A run without memory adapters → a plain folder of the base's architecture holding the trained weights
    (LoRA merged, a trained base as trained); with memory → base + adapter (see copy_base_and_adapter)."""
    model, cfg, tokenizer = load_adapter(source, dtype=torch.float32)
    lora = cfg.memory.use_lora or cfg.memory.use_both_memory_and_lora
    if merge_lora and model.has_injections:
        raise ConfigError(f"--merge-lora: {source} has memory adapters (or an attractor / spiral or hybrid gate), which cannot "
                          "be merged into the base; convert without --merge-lora (base + adapter)")
    if merge_lora and not lora:
        raise ConfigError(f"--merge-lora: {source} has no LoRA weights")
    if not model.has_injections and (merge_lora or not lora):  # LoRA merged, or a finetuned base: plain folder
        merged_lora_base(model).to(SAVE_DTYPES[dtype]).save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        return
    copy_base_and_adapter(folder, source, SAVE_DTYPES[dtype])


def copy_base_and_adapter(folder: str, source: str, dtype: torch.dtype) -> None:
    """The base's files in `base/`, the adapter export (its weights in dtype) at the top.

    No config.json at the top: transformers' auto classes refuse the folder instead of silently
    loading the base without its memory; megamem.hf.load.load_exported loads all of it."""
    from safetensors.torch import save_file

    home = base_folder(load_config(os.path.join(source, "config.yaml")).model.base_model_name)
    os.makedirs(os.path.join(folder, BASE))
    for name in os.listdir(home):
        if os.path.isfile(os.path.join(home, name)) and not name.startswith("."):
            shutil.copyfile(os.path.join(home, name), os.path.join(folder, BASE, name))
    for name in (META, "config.yaml"):
        shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
    if os.path.isdir(os.path.join(source, "tokenizer")):
        shutil.copytree(os.path.join(source, "tokenizer"), os.path.join(folder, "tokenizer"))
    with open_safetensors(os.path.join(source, WEIGHTS)) as f:
        meta = f.metadata()
    state = load_safetensors(os.path.join(source, WEIGHTS))
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
              os.path.join(folder, WEIGHTS), metadata=meta)
