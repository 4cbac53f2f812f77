"""The table of block branches: each option file registers itself here."""
from ..registry import Registry

BRANCHES = Registry("block branch")
