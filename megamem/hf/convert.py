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
from ..folders import progress, write_folder
from ..parallel.weights import read_weights
from .adapters import write_adapter_folder
from .folder import write_megamem_folder
from .llama import llama_config, llama_incompatibilities, to_llama_state_dict

FORMATS = ("auto", "llama", "megamem")  # auto: native Llama for models that are exactly Llama, else megamem's


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


def write_llama_folder(folder: str, state: Dict[str, torch.Tensor], cfg: MegamemConfig, dtype: str) -> None:
    from transformers import LlamaForCausalLM

    llama_state = to_llama_state_dict(state, cfg)  # refuses models that are not exactly Llama
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(cfg))
    target = DTYPES[dtype]
    for name in progress(list(llama_state), "convert"):
        llama_state[name] = llama_state[name].to(target)
    model.load_state_dict(llama_state, strict=False, assign=True)
    if cfg.model.tie_embeddings:
        model.tie_weights()
    model.save_pretrained(folder, safe_serialization=True)


def convert_to_hf(source: str, output: str, dtype: str = "fp32", force: bool = False,
                  routing_strategy: Optional[str] = None, max_shard_size: str = "5GB",
                  merge_lora: bool = False, hf_format: str = "auto") -> str:
    """Write a Hugging Face folder for a training output; returns the output path.

    hf_format auto: models that are exactly Llama (megamem.hf.llama's allow-list) become native
    LlamaForCausalLM, every other megamem model a folder with remote code (megamem/hf/folder.py);
    llama: native Llama or a refusal naming the first difference; megamem: always megamem's format.
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
    problems = llama_incompatibilities(cfg)
    if hf_format == "llama" and problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"--format llama: {source} is not exactly a Llama model: {problems[0]}{more}; "
                          "convert with --format auto (megamem's format)")
    as_llama = hf_format == "llama" or (hf_format == "auto" and not problems)

    def write(tmp: str) -> None:
        if as_llama:
            write_llama_folder(tmp, state, cfg, dtype)
        else:
            write_megamem_folder(tmp, state, cfg, dtype, routing_strategy, max_shard_size)
        save_tokenizer_and_generation(tmp, cfg, tok_home)

    write_folder(output, "hf", write, replace=force)  # atomic; never replaces a folder megamem did not write
    return output
