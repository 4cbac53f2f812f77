"""Training outputs → Hugging Face model folders (conversion dispatch).

Sources: an exported folder (`output_dir/final`: model.safetensors + config.yaml + tokenizer/) or a
DeepSpeed checkpoint (`output_dir/checkpoints/stepN` or the checkpoints folder, any ZeRO stage),
whose partitions are merged by DeepSpeed's zero_to_fp32 and read as data only.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from ..config import ConfigError, MegamemConfig, load_config
from ..folders import write_folder
from .llama import llama_config, llama_incompatibilities, to_llama_state_dict

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_source(path: str) -> Tuple[Dict[str, torch.Tensor], MegamemConfig, str]:
    """(megamem state dict, config, folder holding tokenizer/) from an export or a checkpoint."""
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        from ..safe_load import load_safetensors

        return load_safetensors(os.path.join(path, "model.safetensors")), load_config(os.path.join(path, "config.yaml")), path
    from ..train.checkpoint import resolve_resume, safe_torch_load

    if not os.path.isdir(path):
        raise ConfigError(f"--checkpoint {path} does not exist (expected output_dir/final, output_dir/checkpoints "
                          "or output_dir/checkpoints/stepN)")
    try:
        ckpt_dir, tag = resolve_resume(path, path)
    except ConfigError as e:
        raise ConfigError(f"{path}: neither an exported folder (model.safetensors) nor a complete megamem checkpoint "
                          f"({str(e).replace('training.resume_from_checkpoint: ', '')})") from None
    config = os.path.join(ckpt_dir, tag, "config.yaml")
    if _is_pipeline_checkpoint(os.path.join(ckpt_dir, tag)):
        return read_pipeline_checkpoint(ckpt_dir, tag), load_config(config), os.path.join(ckpt_dir, tag)
    if not os.path.isfile(config):
        raise ConfigError(f"{path}: neither an exported folder (model.safetensors) nor a megamem checkpoint "
                          "(stepN/config.yaml)")
    folder = os.path.join(ckpt_dir, tag)
    from ..train.chapter_banks import banks_from_checkpoint

    if not any("zero_pp_rank_" in n for n in os.listdir(folder)):  # ZeRO-0: whole weights in the model states
        from ..safe_load import torch_load_weights

        state = torch_load_weights(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu")["module"]
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with safe_torch_load():
            state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    # banks trained outside the engine (expert-parallel shards, row-sparse updates) live in their own files
    state.update(banks_from_checkpoint(folder))
    cfg = load_config(config)
    from ..adapter.lora import checkpoint_scalings, merge_lora_state

    return merge_lora_state(state, checkpoint_scalings(state, cfg.memory)), cfg, folder  # from-scratch LoRA: merged


def _is_pipeline_checkpoint(folder: str) -> bool:
    """DeepSpeed's pipeline engine saves one file per layer: layer_XX-model_states.pt."""
    return os.path.isdir(folder) and any(n.startswith("layer_") and n.endswith("-model_states.pt")
                                         for n in os.listdir(folder))


def read_pipeline_checkpoint(ckpt_dir: str, tag: str) -> Dict[str, torch.Tensor]:
    """The one place pipeline checkpoints are read (megamem.parallel owns their layout)."""
    from ..parallel.pipeline_state import plain_state_dict_from_checkpoint

    return plain_state_dict_from_checkpoint(ckpt_dir, tag)


def save_tokenizer_and_generation(folder: str, cfg: MegamemConfig, tok_home: Optional[str]) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    GenerationConfig(bos_token_id=cfg.model.bos_token_id, eos_token_id=cfg.model.eos_token_id,
                     pad_token_id=cfg.model.pad_token_id).save_pretrained(folder)
    if tok_home is not None and os.path.isdir(os.path.join(tok_home, "tokenizer")):
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(tok_home, "tokenizer"))
        if cfg.training.training_mode == "pretraining":  # the model never saw a chat format: tools must not use one
            tokenizer.chat_template = None
        tokenizer.save_pretrained(folder)


def write_llama_folder(folder: str, state: Dict[str, torch.Tensor], cfg: MegamemConfig, dtype: str) -> None:
    from transformers import LlamaForCausalLM

    llama_state = to_llama_state_dict(state, cfg)  # refuses models that are not Llama-shaped
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(cfg))
    target = DTYPES[dtype]
    for name in progress(list(llama_state), "convert"):
        llama_state[name] = llama_state[name].to(target)
    model.load_state_dict(llama_state, strict=False, assign=True)
    if cfg.model.tie_embeddings:
        model.tie_weights()
    model.save_pretrained(folder, safe_serialization=True)


def progress(items, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=os.environ.get("MEGAMEM_NO_PROGRESS") == "1")


def convert_to_hf(source: str, output: str, dtype: str = "fp32", force: bool = False,
                  routing_strategy: Optional[str] = None, max_shard_size: str = "5GB",
                  merge_lora: bool = False) -> str:
    """Write a Hugging Face folder for a training output; returns the output path.

    Llama-shaped vanilla models become native LlamaForCausalLM; every other megamem model a folder
    with remote code (megamem/hf/folder.py); adapter runs go through megamem/hf/adapters.py.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}; valid: {', '.join(DTYPES)}")
    from ..adapter import is_adapter_export

    if is_adapter_export(source):
        from .adapters import write_adapter_folder

        write_folder(output, "hf", lambda tmp: write_adapter_folder(tmp, source, dtype, merge_lora), replace=force)
        return output
    if merge_lora:
        raise ConfigError(f"--merge-lora: {source} is not an adapter run (no adapter.json)")
    state, cfg, tok_home = read_source(source)

    def write(tmp: str) -> None:
        if not llama_incompatibilities(cfg):
            write_llama_folder(tmp, state, cfg, dtype)
        else:
            from .folder import write_megamem_folder

            write_megamem_folder(tmp, state, cfg, dtype, routing_strategy, max_shard_size)
        save_tokenizer_and_generation(tmp, cfg, tok_home)

    write_folder(output, "hf", write, replace=force)  # atomic; never replaces a folder megamem did not write
    return output
