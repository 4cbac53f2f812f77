"""Training outputs → Hugging Face model folders.

Sources: an exported folder (`output_dir/final`: model.safetensors + config.yaml + tokenizer/) or a
DeepSpeed checkpoint (`output_dir/checkpoints/stepN` or the checkpoints folder, any ZeRO stage),
whose partitions are merged by DeepSpeed's zero_to_fp32 and read as data only.
"""
from __future__ import annotations

import os
import shutil
from typing import Dict, Tuple

import torch

from ..config import ConfigError, MegamemConfig, load_config
from .llama import llama_config, to_llama_state_dict

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_source(path: str) -> Tuple[Dict[str, torch.Tensor], MegamemConfig, str]:
    """(megamem state dict, config, folder holding tokenizer/) from an export or a checkpoint."""
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        from safetensors.torch import load_file

        return load_file(os.path.join(path, "model.safetensors")), load_config(os.path.join(path, "config.yaml")), path
    from ..train.checkpoint import resolve_resume, safe_torch_load

    ckpt_dir, tag = resolve_resume(path, path)
    config = os.path.join(ckpt_dir, tag, "config.yaml")
    if not os.path.isfile(config):
        raise ConfigError(f"{path}: neither an exported folder (model.safetensors) nor a megamem checkpoint "
                          "(stepN/config.yaml)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with safe_torch_load():
        state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    return state, load_config(config), os.path.join(ckpt_dir, tag)


def convert_to_hf(source: str, output: str, dtype: str = "fp32", force: bool = False) -> str:
    """Write a native LlamaForCausalLM folder for a vanilla model; returns the output path."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, LlamaForCausalLM

    if os.path.isdir(output) and os.listdir(output) and not force:
        raise ConfigError(f"--output {output} exists and is not empty; pass --force to replace it")
    state, cfg, tok_home = read_source(source)
    llama_state = to_llama_state_dict(state, cfg)  # refuses models that are not Llama-shaped
    hf_cfg = llama_config(cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_cfg)
    target = DTYPES[dtype]
    for name in tqdm(list(llama_state), desc="convert", disable=os.environ.get("MEGAMEM_NO_PROGRESS") == "1"):
        llama_state[name] = llama_state[name].to(target)
    model.load_state_dict(llama_state, strict=False, assign=True)
    if cfg.model.tie_embeddings:
        model.tie_weights()
    tmp = f"{output}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    GenerationConfig(bos_token_id=cfg.model.bos_token_id, eos_token_id=cfg.model.eos_token_id,
                     pad_token_id=cfg.model.pad_token_id).save_pretrained(tmp)
    if os.path.isdir(os.path.join(tok_home, "tokenizer")):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(os.path.join(tok_home, "tokenizer")).save_pretrained(tmp)
    shutil.rmtree(output, ignore_errors=True)
    os.replace(tmp, output)
    return output
