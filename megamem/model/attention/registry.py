"""The table of self-attention types: each option file registers itself here."""
from ..registry import Registry

ATTENTION = Registry("model.attention_type")
