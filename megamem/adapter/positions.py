"""model.pos_encoding and model.window_size on a pretrained base, through the family's hooks (families.py).

The base keeps its own attention; only its rotary frequencies change, set through transformers'
`rope_parameters` by the family's `set_rope` hook (families.py), so HF generate() and the KV cache
rotate exactly as the unmodified transformers model built with those parameters would:

- static:  {rope_type: default, rope_theta: θ·s^(d/(d−2))} — megamem's `static_ntk_base`, θ the base's
  rope_theta, d its rotary head dim, s = ntk_factor: the from-scratch rope_ntk frequencies exactly
  (s = 1 leaves the base bit for bit).
- dynamic: {rope_type: dynamic, factor: s}: transformers' dynamic NTK with L0 = the base's
  max_position_embeddings (megamem's from-scratch formula with ntk_original_max_seq_len = L0).

model.window_size w: the family's `set_window` makes every layer a transformers sliding-window layer
(query i sees keys i − w < j ≤ i, megamem's rule; DynamicCache keeps w keys per layer).

pos_encoding.type pi_spiral and hybrid add gated branches instead (spiral.py, hybrid.py).
Formulas and what stays refused on adapter runs: docs/positions.md#on-pretrained-models-adapter-runs.
"""
from __future__ import annotations

from typing import List, Optional

import torch.nn as nn

from ..config import MegamemConfig
from ..config.aliases import position_type
from ..model.positions.rope_ntk import static_ntk_base
from .families import FAMILIES


def _rope(hf_config) -> dict:
    return getattr(hf_config, "rope_parameters", None) or {}


def rotary_dim(hf_config) -> int:
    """The rotated width d of a head (transformers' rule: head_dim × partial_rotary_factor)."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return int(head_dim * _rope(hf_config).get("partial_rotary_factor", 1.0))


def position_problems(cfg: MegamemConfig, hf_config) -> List[str]:
    """Position keys checked against the base: window_size needs the family's hook, pi_spiral and hybrid an even
    width, hybrid the family's rotary module, rope_ntk plain RoPE. θ is always the base's rope_theta
    (model.rope_theta, like the widths, is the base's)."""
    family, problems = FAMILIES.get(hf_config.model_type), []
    if cfg.model.window_size is not None and family is not None and family.set_window is None:
        supported = ", ".join(sorted(n for n, f in FAMILIES.items() if f.set_window is not None))
        problems.append(f"model.window_size: model type '{hf_config.model_type}' has no sliding-window attention in "
                        f"transformers (supported: {supported}); set window_size: null")
    kind = position_type(cfg.model)
    if kind in ("pi_spiral", "hybrid") and hf_config.hidden_size % 2:
        problems.append(f"model.pos_encoding.type {kind} needs an even hidden size; the base's is "
                        f"{hf_config.hidden_size}: use pos_encoding.type rope")
    if kind == "hybrid" and family is not None and family.rotary is None:
        problems.append(f"model.pos_encoding.type hybrid: model type '{hf_config.model_type}' has no rotary hook "
                        "(megamem.adapter.register_family(..., rotary=...)); use pos_encoding.type rope or pi_spiral")
    if kind == "rope_ntk":
        problems += _ntk_problems(cfg, hf_config, family)
    return problems


def _ntk_problems(cfg: MegamemConfig, hf_config, family) -> List[str]:
    p, rope, problems = cfg.model.pos_encoding, _rope(hf_config), []
    theta, kind = rope.get("rope_theta"), rope.get("rope_type", "default")
    if family is not None and family.set_rope is None:
        problems.append(f"model.pos_encoding.type rope_ntk: model type '{hf_config.model_type}' has no rope hook "
                        "(megamem.adapter.register_family(..., set_rope=...)); use pos_encoding.type rope")
    if kind != "default" or theta is None:
        problems.append(f"model.pos_encoding.type rope_ntk scales plain RoPE, but the base already uses rope_type "
                        f"'{kind}'{'' if theta is not None else ' without a rope_theta'}; use pos_encoding.type rope")
    original = hf_config.max_position_embeddings
    if p.ntk_original_max_seq_len is not None and p.ntk_original_max_seq_len != original:
        problems.append(f"model.pos_encoding.ntk_original_max_seq_len = {p.ntk_original_max_seq_len}: on an adapter "
                        f"run L0 is the base's max_position_embeddings ({original}); leave it null or set {original}")
    return problems


def rope_parameters(cfg: MegamemConfig, hf_config) -> Optional[dict]:
    """The rope parameters that replace the base's (None: the base keeps its own)."""
    p = cfg.model.pos_encoding
    if position_type(cfg.model) != "rope_ntk":
        return None
    factor = p.ntk_factor if p.ntk_factor is not None else 1.0
    if p.ntk_scaling == "dynamic":
        return {"rope_type": "dynamic", "factor": factor}
    theta = _rope(hf_config)["rope_theta"]
    return {"rope_type": "default", "rope_theta": static_ntk_base(theta, factor, rotary_dim(hf_config))}


def apply_positions(base: nn.Module, cfg: MegamemConfig) -> None:
    """Give the (already checked) base the configured rope parameters and window, before LoRA wraps it."""
    family, params = FAMILIES[base.config.model_type], rope_parameters(cfg, base.config)
    if params is not None:
        family.set_rope(base, params)
    if cfg.model.window_size is not None:
        family.set_window(base, cfg.model.window_size)
