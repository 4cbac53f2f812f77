"""Positional encodings, by `model.pos_encoding.type` (one file each; registered where defined).

An encoding is a PositionEncoding (base.py) with up to three hooks: an additive embedding, a
rotation of q/k, an additive attention bias. Each is a no-op unless the encoding overrides it.
"""
from ...config import position_type
from .registry import POSITIONS
from . import alibi, hybrid, learned, none, rope, rope_ntk, spiral  # noqa: F401  (each registers its type)
from .base import PositionEncoding


def build_positions(model_config) -> PositionEncoding:
    return POSITIONS.build(position_type(model_config), model_config)


__all__ = ["POSITIONS", "PositionEncoding", "build_positions"]
