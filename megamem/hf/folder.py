"""Megamem models as Hugging Face folders (remote code), and back.

    config.json              MegamemHFConfig: the megamem model/memory sections + auto_map
    configuration_megamem.py / modeling_megamem.py   thin remote-code entries importing the megamem package
    model.safetensors        megamem's state dict with a `model.` prefix (sharded + index when large)
    generation_config.json, tokenizer files

The model code is not copied into the folder: it stays defined once, in the installed megamem
package, so a folder never runs a stale copy of it; loading without megamem installed fails with
"pip install megamem".
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Optional

import torch

from ..config import ConfigError
from ..folders import SAVE_DTYPES, check_stamp, progress
from ..model import build_model

REMOTE_FILES = ("configuration_megamem.py", "modeling_megamem.py")
AUTO_MAP = {"AutoConfig": "configuration_megamem.MegamemConfig",
            "AutoModelForCausalLM": "modeling_megamem.MegamemForCausalLM"}


def expected_keys(cfg) -> set:
    """Every state-dict key of the model a config describes (built on the meta device)."""
    with torch.device("meta"):
        return set(build_model(cfg).state_dict())


def to_hf_state_dict(state: Dict[str, torch.Tensor], cfg, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """`model.`-prefixed tensors in dtype (integer codes of quantized banks stay integers).

    A tied lm_head is left out (transformers re-ties it); a tensor reachable under two names (a
    shared router) is stored under each, as copies, so every name loads.
    """
    tied = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
    want = expected_keys(cfg)
    missing, extra = sorted(want - set(state) - tied), sorted(set(state) - want)
    if missing or extra:
        raise ConfigError(f"the weights do not match their config.yaml: missing {missing[:5]}, unexpected {extra[:5]}")
    out, seen = {}, set()
    for name in progress(sorted(want - tied), "convert"):
        t = state[name].detach()
        t = t.to(dtype) if t.is_floating_point() else t
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out["model." + name] = t.clone().contiguous() if key in seen else t.contiguous()
        seen.add(key)
    return out


def write_megamem_folder(folder: str, state: Dict[str, torch.Tensor], cfg, dtype: str,
                         routing_strategy: Optional[str] = None, max_shard_size: str = "5GB") -> None:
    """Write the HF files of a megamem model into an existing (empty) folder."""
    from huggingface_hub import save_torch_state_dict

    from .configuration import MegamemHFConfig

    config = MegamemHFConfig.from_megamem(cfg, routing_strategy_inference=routing_strategy, auto_map=AUTO_MAP,
                                          architectures=["MegamemForCausalLM"], dtype=SAVE_DTYPES[dtype])
    config.megamem_config()  # refuses a bad routing strategy before anything is written
    save_torch_state_dict(to_hf_state_dict(state, cfg, SAVE_DTYPES[dtype]), folder, max_shard_size=max_shard_size)
    config.save_pretrained(folder)
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote")
    for name in REMOTE_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(folder, name))


def is_megamem_folder(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    with open(cfg, encoding="utf-8") as f:
        return json.load(f).get("model_type") == "megamem"


def load_megamem_folder(path: str, dtype: Optional[torch.dtype] = None):
    """(MemoryTransformer, megamem config, tokenizer or None) from an exported HF folder, to train on."""
    from .modeling import MegamemForCausalLM

    if not is_megamem_folder(path):
        raise ConfigError(f"{path}: not a megamem Hugging Face folder (config.json with model_type 'megamem')")
    check_stamp(path)
    hf = MegamemForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    tokenizer = None
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    return hf.model.eval(), hf.config.megamem_config(), tokenizer
