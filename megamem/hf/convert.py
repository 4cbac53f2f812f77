"""Training outputs → Hugging Face model folders (conversion dispatch).

Sources: an exported folder (`output_dir/final`: model.safetensors + config.yaml + tokenizer/) or a
DeepSpeed checkpoint (`output_dir/checkpoints/stepN` or the checkpoints folder, any ZeRO stage,
pipeline or expert-parallel layout), all read by megamem.parallel.weights.read_weights, as data only.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from ..adapter import is_adapter_export
from ..config import ConfigError, MegamemConfig
from ..config.masking import causal_only_problem
from ..folders import SAVE_DTYPES as DTYPES
from ..folders import write_folder
from ..parallel.weights import read_weights
from .adapters import write_adapter_folder
from .folder import write_megamem_folder
from .native import NATIVE_FORMATS, write_native_folder

# auto: the native transformers family a model is exactly (Llama, DeepSeek-V3), else megamem's format
FORMATS = ("auto", *NATIVE_FORMATS, "megamem")


def read_source(path: str) -> Tuple[Dict[str, torch.Tensor], MegamemConfig, str]:
    """(megamem state dict, config, folder holding tokenizer/) from an export or a checkpoint of any layout."""
    return read_weights(path, "--checkpoint")


def save_tokenizer_and_generation(folder: str, cfg: MegamemConfig, tok_home: Optional[str]) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    GenerationConfig(bos_token_id=cfg.model.bos_token_id, eos_token_id=cfg.model.eos_token_id,
                     pad_token_id=cfg.model.pad_token_id).save_pretrained(folder)
    if tok_home is not None and os.path.isdir(os.path.join(tok_home, "tokenizer")):
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(tok_home, "tokenizer"))
        if cfg.training.training_mode == "pretraining":  # the model never saw a chat format: tools must not use one
            tokenizer.chat_template = None
        tokenizer.save_pretrained(folder)


def convert_to_hf(source: str, output: str, dtype: str = "fp32", force: bool = False,
                  routing_strategy: Optional[str] = None, max_shard_size: str = "5GB",
                  merge_lora: bool = False, hf_format: str = "auto") -> str:
    """Write a Hugging Face folder for a training output; returns the output path.

    hf_format auto: models that are exactly Llama or DeepSeek-V3 (the allow-lists of megamem.hf.llama
    and megamem.hf.deepseek_v3) become native LlamaForCausalLM / DeepseekV3ForCausalLM, every other
    megamem model a folder with remote code (megamem/hf/folder.py); llama, deepseek_v3: that native
    family or a refusal naming the first difference; megamem: always megamem's format.
    Adapter runs go through megamem/hf/adapters.py.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}; valid: {', '.join(DTYPES)}")
    if hf_format not in FORMATS:
        raise ConfigError(f"--format {hf_format}; valid: {', '.join(FORMATS)}")
    if hf_format != "auto" and is_adapter_export(source):
        raise ConfigError(f"--format {hf_format}: {source} is an adapter run, converted as base + adapter (or "
                          "--merge-lora); leave --format at auto")
    if is_adapter_export(source):
        write_folder(output, "hf", lambda tmp: write_adapter_folder(tmp, source, dtype, merge_lora), replace=force)
        return output
    if merge_lora:
        raise ConfigError(f"--merge-lora: {source} is not an adapter run (no adapter.json)")
    state, cfg, tok_home = read_source(source)
    bidirectional = causal_only_problem(cfg.model, "a Hugging Face causal LM folder (AutoModelForCausalLM)")
    if bidirectional:
        raise ConfigError(f"{source}: {bidirectional}")
    native = None
    if hf_format in NATIVE_FORMATS:
        native = NATIVE_FORMATS[hf_format]
        problems = native.incompatibilities(cfg)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ConfigError(f"--format {hf_format}: {source} is not exactly a {native.family} model: "
                              f"{problems[0]}{more}; convert with --format auto (megamem's format)")
    elif hf_format == "auto":
        native = next((f for f in NATIVE_FORMATS.values() if not f.incompatibilities(cfg)), None)

    def write(tmp: str) -> None:
        if native is not None:
            write_native_folder(tmp, native, state, cfg, dtype)
        else:
            write_megamem_folder(tmp, state, cfg, dtype, routing_strategy, max_shard_size)
        save_tokenizer_and_generation(tmp, cfg, tok_home)

    write_folder(output, "hf", write, replace=force)  # atomic; never replaces a folder megamem did not write
    return output
