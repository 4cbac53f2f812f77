"""The table of positional encodings: each option file registers itself here."""
from ..registry import Registry

POSITIONS = Registry("model.pos_encoding.type")
