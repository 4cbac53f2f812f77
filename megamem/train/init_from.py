"""training.init_from: start a run from saved weights only — how a run changes layout.

A checkpoint resumes exactly only on its own layout. To continue on another one (plain data
parallel, ZeRO, expert parallel, a different number of pipeline stages), start from its weights:
optimizer state, schedule and data position start fresh. Accepts every source the Hugging Face
converter accepts (megamem.parallel.weights.read_weights): an export folder, or a checkpoint of any
ZeRO stage, pipeline or expert-parallel layout.
"""
from __future__ import annotations

import fnmatch
import os
from typing import Dict, Iterator, List, Set, Tuple

import torch
import torch.nn as nn

from ..config import ConfigError
from ..parallel.pipeline_state import plain_aliases
from ..parallel.weights import check_shapes, read_weights  # noqa: F401 (check_shapes re-exported)


def read_plain_weights(path: str) -> Dict[str, torch.Tensor]:
    """Plain MemoryTransformer weights from an export folder or any checkpoint (no pickled code runs)."""
    if os.path.isfile(os.path.join(path, "adapter.json")):
        raise ConfigError(f"training.init_from: {path} is an adapter export; adapters start from their base model")
    return read_weights(path, "training.init_from")[0]


def init_from(model: nn.Module, cfg, zero_stage: int) -> None:
    """Load training.init_from into a plain model (ZeRO-0/1/2), a ZeRO-3 model (born partitioned: each
    parameter is gathered, written, and partitioned again, one at a time) or a pipeline module, before
    deepspeed.initialize."""
    path = cfg.training.init_from
    if cfg.model.base_model_name is not None:
        raise ConfigError("training.init_from: adapter runs start from model.base_model_name; remove init_from")
    state = read_plain_weights(path)
    new = declared_new(cfg, state, path)
    if hasattr(model, "load_plain_state_dict"):  # a pipeline: each stage takes its layers
        model.load_plain_state_dict(state, path, new)
    else:
        tensors = dict(model.state_dict(keep_vars=True))  # parameters (ZeRO-3: their partitions) and buffers
        check_shapes({k: getattr(v, "ds_shape", v.shape) for k, v in tensors.items()}, state, path)
        aliases = plain_aliases(cfg)  # a tied head or a shared router is loaded under its first name
        missing = sorted(k for k in tensors if aliases.get(k, k) not in state and k not in new)
        unexpected = sorted(set(state) - set(tensors))
        if unexpected or missing:
            hint = " (a model that adds parameters declares them in training.init_from_new)" if missing else ""
            raise ConfigError(f"training.init_from: {path} does not match this model config: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}{hint}")
        for name, tensor in tensors.items():
            source = state.get(aliases.get(name, name), state.get(name))
            if source is not None:
                _write(tensor, lambda t, s=source: t.copy_(s), zero_stage)
    if cfg.training.init_from_new_init == "identity":
        for p in new_output_layers(model, new):
            _write(p, torch.Tensor.zero_, zero_stage)
    if cfg.training.init_from_new_init == "zeros":
        named = list(plain_named_parameters(model))
        loaded = {id(p) for name, p in named if name not in new}  # a shared module reached by a loaded name stays
        for name, p in named:
            if name in new and id(p) not in loaded:
                _write(p, torch.Tensor.zero_, zero_stage)


def _write(tensor: torch.Tensor, fill, zero_stage: int) -> None:
    """fill(tensor) in place; a ZeRO-3 parameter is gathered for it and rank 0's result partitioned again."""
    with torch.no_grad():
        if zero_stage >= 3 and hasattr(tensor, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
                fill(tensor.data)
        else:
            fill(tensor.data)


def new_output_layers(model: nn.Module, new: Set[str]) -> List[nn.Parameter]:
    """init_from_new_init: identity: every new block keeps the model's init, its residual branches' output
    layers (attention o_proj, MLP down_proj, branch outputs such as memory W_o) at zero: the block is the
    identity and still trains (each output layer gets a gradient on the first step). Returns the weights
    and biases to zero."""
    if hasattr(model, "load_plain_state_dict"):
        raise ConfigError("training.init_from_new_init: identity is not supported with pipeline parallelism; "
                          "use a ZeRO layout")
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out: List[nn.Parameter] = []
    for block in model.blocks:
        if not all(names[id(p)] in new for p in block.parameters()):
            continue  # a block the source holds (its new memory branch, if any, starts at zero by wo_init_zero)
        down = getattr(block.mlp, "down_proj", None)
        if down is None and block.mlp is not None:
            raise ConfigError(f"training.init_from_new_init: identity needs an MLP with down_proj; layer "
                              f"{block.layer_idx} has {type(block.mlp).__name__} (use init_from_new_init: zeros)")
        branch_outputs = [m for _, b in block.branches() for m in b.output_layers()]
        for module in [block.attn.o_proj] + ([down] if down is not None else []) + branch_outputs:
            out += [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
    return out


def declared_new(cfg, state: Dict[str, torch.Tensor], path: str) -> Set[str]:
    """Plain names of the weights training.init_from_new declares (growth), checked against the source:
    each pattern must match a parameter of this model, and none may match weights the source holds."""
    patterns = cfg.training.init_from_new or []
    if not patterns:
        return set()
    from ..model import build_model

    with torch.device("meta"):
        names = list(build_model(cfg).state_dict(keep_vars=True))  # parameters and persistent buffers
    new: Set[str] = set()
    for pattern in patterns:
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            raise ConfigError(f"training.init_from_new: '{pattern}' matches no parameter of this model "
                              f"(names look like {', '.join(sorted(names)[:3])}, ...)")
        held = sorted(hits & set(state))
        if held:
            raise ConfigError(f"training.init_from_new: '{pattern}' matches {held[:3]}, which {path} holds: they "
                              "load from it; declare only parameters the source lacks")
        new |= hits
    return new


def plain_named_parameters(model: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """(plain MemoryTransformer name, parameter): a pipeline stage's names mapped back."""
    if hasattr(model, "plain_named_parameters"):
        return model.plain_named_parameters()
    return model.named_parameters(remove_duplicate=False)
