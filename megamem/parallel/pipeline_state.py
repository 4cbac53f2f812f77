"""Names: pipeline layers ↔ the plain MemoryTransformer state dict, and pipeline checkpoints → plain weights.

`layer_plan` is the one description of the cut both directions use: which plain prefixes each
pipeline layer's children carry, and which of its modules are shared with other layers (ties).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch

from ..config import MegamemConfig
from ..safe_load import torch_load_weights
from ..memory.placement import bank_assignment, memory_layers
from .buffers import persistent_buffers


def layer_plan(cfg: MegamemConfig) -> List[Dict[str, Any]]:
    """Per pipeline layer: kind, `names` {child: plain prefix}, `ties` {tie key: child path}."""
    m, mem = cfg.model, cfg.memory
    banks = bank_assignment(mem, memory_layers(mem, m.num_layers))
    plan = [{"kind": "embed", "names": {"tok_embeddings": "tok_embeddings", "pos_embeddings": "pos_embeddings"}}]
    for i in range(m.num_layers):
        names, ties = {"block": f"blocks.{i}"}, {}
        if i in banks:
            names["bank"] = f"banks.{banks[i]}"
            ties[f"bank{banks[i]}"] = "bank"
            if mem.use_chapters and mem.shared_router:
                ties["router"] = "block.memory.attn.router"
        plan.append({"kind": "block", "layer": i, "names": names, "ties": ties})
    if m.tie_embeddings:
        plan += [{"kind": "norm", "names": {"norm": "norm"}}, {"kind": "tied_head", "names": {}}]
    else:
        plan.append({"kind": "head", "names": {"norm": "norm", "lm_head": "lm_head"}})
    return plan


def plain_name(key: str, names: Dict[str, str]) -> str:
    """A pipeline layer's state-dict key → the plain MemoryTransformer key ("block.attn.x" → "blocks.3.attn.x")."""
    child, _, rest = key.partition(".")
    return f"{names[child]}.{rest}"


def to_plain_names(state: Dict[str, torch.Tensor], names: Dict[str, str]) -> Dict[str, torch.Tensor]:
    return {plain_name(k, names): v for k, v in state.items()}


def plain_aliases(cfg: MegamemConfig) -> Dict[str, str]:
    """Every plain state-dict key → the key exports use for that tensor (a shared router or a tied head
    appears under several names; exports keep the first, as named_parameters() does)."""
    from ..model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    first: Dict[int, str] = {}
    aliases = {n: first.setdefault(id(p), n) for n, p in model.named_parameters(remove_duplicate=False)}
    aliases.update({n: n for n, _ in persistent_buffers(model)})
    return aliases


def plain_key_names(cfg: MegamemConfig) -> List[str]:
    """Keys of a plain export (megamem.parallel.zero.gathered_state_dict): unique parameters + persistent buffers."""
    return list(dict.fromkeys(plain_aliases(cfg).values()))


def canonical_state(found: Dict[str, torch.Tensor], cfg: MegamemConfig, where: str) -> Dict[str, torch.Tensor]:
    from ..config import ConfigError

    keys = plain_key_names(cfg)
    missing = [k for k in keys if k not in found]
    if missing:
        raise ConfigError(f"{where}: pipeline layers lack {missing[:5]} (written by a different model config?)")
    return {k: found[k] for k in keys}


def plain_state_dict_from_checkpoint(ckpt_dir: str, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """A pipeline checkpoint → the plain MemoryTransformer state dict (export keys; fp32 as saved).

    ckpt_dir: the `checkpoints/` folder (tag given, or read from `latest`) or one checkpoint folder.
    Reads the checkpoint's config.yaml for the layer plan and each `layer_XX-model_states.pt` with
    torch.load(weights_only=True). Keys are those of a plain export: a tied lm_head.weight and the
    later names of a shared router are absent (they are the same tensors), so load it into a plain
    model with strict=False, or through training.init_from, which checks that.
    """
    import glob

    from ..config import ConfigError, load_config
    from .checkpoint_files import COMPLETE, resolve_resume

    if tag is None:
        if not any(os.path.isfile(os.path.join(ckpt_dir, f)) for f in (COMPLETE, "latest")):
            raise ConfigError(f"{ckpt_dir}: neither a checkpoint (no {COMPLETE} marker) nor a checkpoints folder "
                              "(no 'latest' file)")
        ckpt_dir, tag = resolve_resume(ckpt_dir, ckpt_dir)
    folder = os.path.join(ckpt_dir, tag)
    config_path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{folder}: no config.yaml (not a megamem checkpoint folder)")
    cfg = load_config(config_path)
    found: Dict[str, torch.Tensor] = {}
    for idx, entry in enumerate(layer_plan(cfg)):
        if not entry["names"]:
            continue  # the tied head: its weight is layer 0's embedding
        files = sorted(glob.glob(os.path.join(folder, f"layer_{idx:02d}-*model_states.pt")))
        if not files:
            raise ConfigError(f"{folder}: no layer_{idx:02d}-*model_states.pt; not a pipeline checkpoint of this "
                              f"config (a ZeRO checkpoint converts with megamem.hf / zero_to_fp32 instead)")
        state = torch_load_weights(files[0], map_location="cpu")
        found.update(to_plain_names(state, entry["names"]))
    return canonical_state(found, cfg, folder)
