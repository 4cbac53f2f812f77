"""One loader for every form a trained model takes, for inference and evaluation.

    output_dir/final (export)        MemoryTransformer (or an adapter model) from model.safetensors
    output_dir/checkpoints[/stepN]   the same, ZeRO partitions merged (read as data only)
    a Hugging Face folder            megamem (model_type megamem), native Llama, or base + adapter

`Loaded.hf` is always something with transformers' generate(); `Loaded.megamem` is the megamem
module when there is one (chapter statistics, packed-document masks).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..config import ConfigError
from ..folders import check_stamp


@dataclass
class Loaded:
    hf: Any  # transformers-style causal LM: forward(input_ids).logits, generate()
    tokenizer: Any  # or None
    cfg: Any = None  # megamem config when the source has one
    megamem: Optional[torch.nn.Module] = None  # MemoryTransformer / AdapterModel when there is one


def _tokenizer(folder: str):
    """The tokenizer saved in folder (tokenizer_config.json), or None."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder) if os.path.isfile(os.path.join(folder, "tokenizer_config.json")) \
        else None


def _refuse_bidirectional(cfg, path: str) -> None:
    """Inference and evaluation sample and score causal LMs (generate(), perplexity, NIAH/RULER, lm-eval)."""
    from ..config.masking import causal_only_problem

    problem = causal_only_problem(cfg.model, "inference and evaluation (generation, causal perplexity)")
    if problem:
        raise ConfigError(f"{path}: {problem}")


def load_any(path: str, dtype: Optional[torch.dtype] = None, routing_strategy: Optional[str] = None) -> Loaded:
    from ..hf.folder import is_megamem_folder
    from ..hf.modeling import MegamemForCausalLM
    from ..hf.load import load_exported, model_with_state

    if not os.path.exists(path):
        raise ConfigError(f"--model {path} does not exist (expected output_dir/final, a checkpoint, or a Hugging Face "
                          "folder)")
    check_stamp(path)  # every folder megamem writes records its format: a newer megamem's is refused
    adapter = os.path.isfile(os.path.join(path, "adapter.json"))
    kwargs = {"routing_strategy_inference": routing_strategy} if routing_strategy else {}
    if is_megamem_folder(path):
        hf = MegamemForCausalLM.from_pretrained(path, dtype=dtype or "auto", **kwargs).eval()
        return Loaded(hf, _tokenizer(path), hf.config.megamem_config(), hf.model)
    if os.path.isfile(os.path.join(path, "config.json")) and not adapter:
        from transformers import AutoModelForCausalLM

        if routing_strategy:
            raise ConfigError(f"--routing-strategy: {path} is not a megamem model (no chapter routing)")
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").eval()
        return Loaded(hf, _tokenizer(path))
    if adapter or os.path.isfile(os.path.join(path, "model.safetensors")):
        model, cfg, tokenizer = load_exported(path, dtype)
    else:
        from ..parallel.weights import read_weights

        state, cfg, tok_home = read_weights(path, "--model")
        model, tokenizer = model_with_state(cfg, state, path, dtype), _tokenizer(os.path.join(tok_home, "tokenizer"))
    _refuse_bidirectional(cfg, path)
    if adapter:
        if routing_strategy:
            raise ConfigError("--routing-strategy: adapter models have no chapter routing")
        return Loaded(model.base, tokenizer, cfg, model)
    return Loaded(MegamemForCausalLM.from_megamem(model, cfg, **kwargs).eval(), tokenizer, cfg, model)
