"""Native transformers formats a megamem model may export as (one line each), and their writer.

Each entry: the family's name in messages, why a config is not exactly that family (an allow-list),
its transformers config and the renamed state dict. `--format auto` takes the first family a model
is exactly, else megamem's remote-code format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

from ..config import MegamemConfig
from ..folders import SAVE_DTYPES, progress
from .deepseek_v3 import deepseek_v3_config, deepseek_v3_incompatibilities, to_deepseek_v3_state_dict
from .llama import llama_config, llama_incompatibilities, to_llama_state_dict


@dataclass(frozen=True)
class NativeFormat:
    family: str  # in messages: "Llama", "DeepSeek-V3"
    model_class: str  # transformers class name
    incompatibilities: Callable[[MegamemConfig], List[str]]
    hf_config: Callable[[MegamemConfig], object]
    state_dict: Callable[[Dict[str, torch.Tensor], MegamemConfig], Dict[str, torch.Tensor]]


NATIVE_FORMATS = {
    "llama": NativeFormat("Llama", "LlamaForCausalLM", llama_incompatibilities, llama_config, to_llama_state_dict),
    "deepseek_v3": NativeFormat("DeepSeek-V3", "DeepseekV3ForCausalLM", deepseek_v3_incompatibilities,
                                deepseek_v3_config, to_deepseek_v3_state_dict),
}


def write_native_folder(folder: str, fmt: NativeFormat, state: Dict[str, torch.Tensor], cfg: MegamemConfig,
                        dtype: str) -> None:
    """Save the native transformers model holding `state` (refused unless the config is exactly fmt's family)."""
    import transformers

    native_state = fmt.state_dict(state, cfg)
    with torch.device("meta"):
        model = getattr(transformers, fmt.model_class)(fmt.hf_config(cfg))
    target = SAVE_DTYPES[dtype]
    for name in progress(list(native_state), "convert"):
        native_state[name] = native_state[name].to(target)
    missing, unexpected = model.load_state_dict(native_state, strict=False, assign=True)
    tied = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
    if unexpected or set(missing) - tied:  # the renaming and the transformers class disagree: never save half
        raise RuntimeError(f"{fmt.model_class}: missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")
    if cfg.model.tie_embeddings:
        model.tie_weights()
    model.save_pretrained(folder, safe_serialization=True)
