"""Tiny randomly initialised HF causal LMs of each supported family, saved as local folders."""
from __future__ import annotations

import os

import torch

from conftest import tiny_config

VOCAB = 61
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),  # Qwen3: head_dim independent of width
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
}


def tiny_hf(family: str = "llama", seed: int = 0, layers: int = 3, **overrides):
    import transformers

    config_cls, model_cls, extra = FAMILY_CONFIGS[family]
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **{**extra, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).eval()


def saved_base(tmp_path, family: str = "llama", seed: int = 0, **overrides):
    """(folder, model): the tiny model saved like a hub checkpoint."""
    model = tiny_hf(family, seed, **overrides)
    path = os.path.join(str(tmp_path), f"{family}-{seed}")
    model.save_pretrained(path)
    return path, model


def adapter_config(base_path: str, *overrides: str):
    return tiny_config(f"model.base_model_name={base_path}", "memory.num_memory_tokens=8", "model.vocab_size=61",
                       *overrides)
