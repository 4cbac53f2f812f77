"""One reader of a trained model's weights, whatever form they were saved in.

    output_dir/final                   an export: model.safetensors + config.yaml (+ tokenizer/)
    output_dir/checkpoints[/stepN]     a checkpoint of any layout: ZeRO-0 (whole weights in the model
                                       states), ZeRO-1/2/3 (partitions merged by DeepSpeed's zero_to_fp32),
                                       pipeline stages (one file per layer), and the chapter banks trained
                                       outside the engine (expert-parallel shards, row-sparse updates)

training.init_from, the Hugging Face converter and evaluation all read through `read_weights`, so
each accepts every source the others accept. Everything is read as data (safetensors, or torch.load
with weights_only); no pickled code runs.
"""
from __future__ import annotations

import os
from typing import Dict, Tuple

import torch

from ..config import ConfigError, MegamemConfig, load_config
from ..folders import check_stamp
from ..safe_load import load_safetensors, torch_load_weights
from .checkpoint_files import COMPLETE, banks_from_checkpoint, resolve_resume, safe_torch_load
from .pipeline_state import plain_state_dict_from_checkpoint

SOURCES = ("an export folder (output_dir/final), a checkpoints folder (output_dir/checkpoints) or one checkpoint "
           "(output_dir/checkpoints/stepN)")


def is_pipeline_checkpoint(folder: str) -> bool:
    """DeepSpeed's pipeline engine saves one file per layer: layer_XX-model_states.pt."""
    return os.path.isdir(folder) and any(n.startswith("layer_") and n.endswith("-model_states.pt")
                                         for n in os.listdir(folder))


def read_weights(path: str, what: str) -> Tuple[Dict[str, torch.Tensor], MegamemConfig, str]:
    """(plain MemoryTransformer state dict, its config, the folder holding tokenizer/) of `path`.

    what: the setting or flag that named the path (training.init_from, --checkpoint), for messages.
    """
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        check_stamp(path)
        return (load_safetensors(os.path.join(path, "model.safetensors")), load_config(os.path.join(path, "config.yaml")),
                path)
    if not os.path.isdir(path):
        raise ConfigError(f"{what}: {path} does not exist (expected {SOURCES})")
    if not any(os.path.isfile(os.path.join(path, f)) for f in (COMPLETE, "latest")):
        raise ConfigError(f"{what}: {path}: neither an export folder (no model.safetensors), nor a checkpoint (no "
                          f"{COMPLETE} marker), nor a checkpoints folder (no 'latest' file); expected {SOURCES}")
    try:
        ckpt_dir, tag = resolve_resume(path, path)
    except ConfigError as e:
        raise ConfigError(f"{what}: {path}: not a complete megamem checkpoint "
                          f"({str(e).replace('training.resume_from_checkpoint: ', '')})") from None
    folder = os.path.join(ckpt_dir, tag)
    config = os.path.join(folder, "config.yaml")
    if not os.path.isfile(config):
        raise ConfigError(f"{what}: {folder}: no config.yaml (not a megamem checkpoint folder)")
    if is_pipeline_checkpoint(folder):
        return plain_state_dict_from_checkpoint(ckpt_dir, tag), load_config(config), folder
    if not any("zero_pp_rank_" in n for n in os.listdir(folder)):  # ZeRO-0: whole weights in the model states
        state = torch_load_weights(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu")["module"]
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with safe_torch_load():
            state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
        # ZeRO-1/2 rebuild only what the optimizer holds; frozen parameters (a progressive phase's trunk) are whole
        # in the module states on those stages (never updated, so exact). ZeRO-3 writes per-rank files instead.
        states = os.path.join(folder, "mp_rank_00_model_states.pt")
        if os.path.isfile(states):
            module = torch_load_weights(states, map_location="cpu")["module"]
            state.update({k: v.float() if v.is_floating_point() else v for k, v in module.items()
                          if k not in state and v.numel() > 0})
    # banks trained outside the engine (expert-parallel shards, row-sparse updates) live in their own files
    state.update(banks_from_checkpoint(folder))
    cfg = load_config(config)
    if cfg.model.base_model_name is None:  # from-scratch LoRA (memory.use_lora, training.qlora_enabled): plain
        from ..adapter.four_bit import dequantize_state
        from ..adapter.lora import checkpoint_scalings, merge_lora_state

        state = dequantize_state(state)  # a 4-bit trunk's packed base weights
        state = merge_lora_state(state, checkpoint_scalings(state, cfg))
    return state, cfg, folder


def check_shapes(expected: Dict[str, torch.Size], state: Dict[str, torch.Tensor], path: str) -> None:
    """One line naming the first tensor whose shape differs (load_state_dict would list them all)."""
    bad = [k for k, shape in expected.items() if k in state and tuple(state[k].shape) != tuple(shape)]
    if bad:
        k = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ConfigError(f"training.init_from: {path} does not fit this model config: {k} has shape "
                          f"{list(state[k].shape)} there, {list(expected[k])} here{more}")
