"""The pretrained base: where it is, its config, its identity, its weights (4-bit when asked).

Nothing here downloads unless training asks for the weights of a hub model: dry runs and
parameter counts use only a local folder or the local Hugging Face cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..config import ConfigError, MegamemConfig


def base_config(name: str, local_only: bool = False):
    """The base model's transformers config (from a folder, the HF cache, or — unless local_only — the hub)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=local_only)
    except (OSError, ValueError) as e:
        where = "is not a local folder nor in the local Hugging Face cache" if local_only else "could not be loaded"
        raise ConfigError(f"model.base_model_name '{name}' {where} ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None


def config_hash(name: str) -> str:
    """sha256 of the base's config.json, canonicalised (sorted keys, no transformers_version)."""
    from transformers.utils import cached_file

    path = os.path.join(name, "config.json") if os.path.isdir(name) else cached_file(name, "config.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        data.pop(volatile, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def weights_fingerprint(name: str, samples: int = 8, chunk: int = 1 << 16) -> Optional[str]:
    """sha256 over each safetensors weight file's name, size and `samples` evenly spaced chunks of its bytes:
    tells a base from its instruct twin (same config.json, other weights) without reading every weight.
    None when the base has no safetensors files."""
    try:
        files = weight_files(name)
    except (ConfigError, OSError):
        return None
    digest = hashlib.sha256()
    for path in files:
        size = os.path.getsize(path)
        digest.update(f"{os.path.basename(path)}:{size}".encode())
        with open(path, "rb") as f:
            for k in range(samples):
                f.seek(max(0, (size - chunk) * k // max(samples - 1, 1)))
                digest.update(f.read(chunk))
    return digest.hexdigest()


def base_identity(cfg: MegamemConfig) -> Dict[str, Optional[str]]:
    """What an adapter export records about its base, and what loading checks."""
    name = cfg.model.base_model_name
    return {"base_model_name": name, "base_config_sha256": config_hash(name),
            "base_weights_sha256": weights_fingerprint(name)}


def quantization_config(cfg: MegamemConfig):
    """bitsandbytes 4-bit (QLoRA) config, or None. Refuses, never falls back, where it cannot run."""
    if not cfg.model.load_in_4bit:
        return None
    if not torch.cuda.is_available():
        raise ConfigError("model.load_in_4bit needs a CUDA GPU (bitsandbytes 4-bit / QLoRA) and none is visible; "
                          "set model.load_in_4bit: false to load the base in full precision on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("model.load_in_4bit needs bitsandbytes: pip install 'megamem[gpu]' "
                          "(or set model.load_in_4bit: false)") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_base(cfg: MegamemConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The pretrained causal LM with its weights (ZeRO-0/1/2 and single-process use)."""
    from transformers import AutoModelForCausalLM

    quant = quantization_config(cfg)
    kwargs = {"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}} if quant else \
        {"dtype": dtype}
    try:
        return AutoModelForCausalLM.from_pretrained(cfg.model.base_model_name, **kwargs)
    except OSError as e:
        raise ConfigError(f"model.base_model_name '{cfg.model.base_model_name}': {str(e).splitlines()[0]}") from None


def empty_base(hf_config, dtype: Optional[torch.dtype] = None, skip_init: bool = False) -> nn.Module:
    """The base architecture from its config (meta-device counts, ZeRO-3 partitioned build).

    skip_init: leave weights uninitialised (they are loaded next); HF's init cannot run on
    ZeRO-3 partitions, which are empty on each rank.
    """
    import contextlib

    from transformers import AutoModelForCausalLM

    if skip_init:
        from transformers.initialization import no_init_weights
    with no_init_weights() if skip_init else contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype or torch.float32)


def weight_files(name: str):
    """Safetensors files of a local base folder (or the HF cache)."""
    from transformers.utils import cached_file

    folder = name if os.path.isdir(name) else os.path.dirname(cached_file(name, "config.json"))
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return sorted({os.path.join(folder, v) for v in json.load(f)["weight_map"].values()})
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        raise ConfigError(f"model.base_model_name '{name}': no model.safetensors in {folder} "
                          "(ZeRO-3 adapter runs read safetensors weights)")
    return [single]
