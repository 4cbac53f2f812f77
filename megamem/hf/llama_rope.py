"""The positions a LlamaConfig expresses exactly, and its rope parameters for each (docs/positions.md).

- `rope`: rope_type default, rope_theta = the RoPE base (pos_encoding.rope_base, else model.rope_theta).
- `rope_ntk`, static: base' = base·s^(d/(d−2)) is one fixed base, so rope_type default with rope_theta =
  base', the very Python float megamem's model computes (transformers' default frequencies are
  megamem's, bit for bit; JSON keeps a float exactly).
- `rope_ntk`, dynamic: transformers' rope_type dynamic with factor s; transformers takes the trained
  length L0 from max_position_embeddings, so that is ntk_original_max_seq_len (megamem's
  model.max_seq_len, the longest sequence, has no Llama field: transformers sets no limit).
Every other encoding (alibi, pi_spiral, hybrid, learned, none) has no Llama form.
"""
from __future__ import annotations

from typing import Dict, Tuple

from ..config import ModelConfig, PositionEncodingConfig, rope_base
from ..model.positions.rope_ntk import NTKRotaryPositions
from .allow_list import Rule

# keys of model.pos_encoding that only a non-Llama encoding reads, or that repeat a model key
_NOT_LLAMA_KEYS = ("max_seq_len", "irrational", "hybrid_K", "transition_width")
_NTK_KEYS = ("ntk_factor", "ntk_scaling", "ntk_original_max_seq_len")


def _llama_positions(p: PositionEncodingConfig) -> bool:
    if p.type not in (None, "rope", "rope_ntk") or any(getattr(p, k) is not None for k in _NOT_LLAMA_KEYS):
        return False
    return p.type == "rope_ntk" or all(getattr(p, k) is None for k in _NTK_KEYS)


LLAMA_POSITIONS = Rule(_llama_positions, "type rope, or rope_ntk (static or dynamic), with only rope_base and "
                                         "the ntk_* keys set")


def llama_rope(m: ModelConfig) -> Tuple[Dict, int]:
    """(rope_parameters, max_position_embeddings) of the LlamaConfig giving megamem's rotation."""
    if m.pos_encoding.type != "rope_ntk":
        return {"rope_type": "default", "rope_theta": float(rope_base(m))}, m.max_seq_len
    ntk = NTKRotaryPositions(m)  # the model's own base and factor: no formula written twice
    if ntk.dynamic:
        return {"rope_type": "dynamic", "rope_theta": float(ntk.theta), "factor": float(ntk.factor)}, ntk.original
    return {"rope_type": "default", "rope_theta": float(ntk.base_for(ntk.original))}, m.max_seq_len
