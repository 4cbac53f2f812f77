"""The table of MLP types: each option file registers itself here."""
from ..registry import Registry

MLP = Registry("model.mlp_type")
