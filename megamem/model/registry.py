"""Name → constructor tables for the model's parts (attention, MLP, positions, block branches).

An option registers itself where it is defined (`@ATTENTION.register("mha")`), and its package's
`__init__` imports the file: a new option is one file plus that one import line. The config key
named by `key` selects it; an unknown name is refused with the valid ones.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List

from ..config import ConfigError


class Registry:
    def __init__(self, key: str):
        self.key = key  # the config key whose values are this registry's names
        self.entries: Dict[str, Callable] = {}
        self.aliases: Dict[str, str] = {}

    def register(self, name: str, aliases: Iterable[str] = ()) -> Callable:
        def add(ctor: Callable) -> Callable:
            if name in self.entries or name in self.aliases:
                raise ValueError(f"{self.key}: '{name}' is registered twice")
            self.entries[name] = ctor
            self.aliases.update({a: name for a in aliases})
            return ctor
        return add

    def names(self) -> List[str]:
        return sorted(self.entries) + sorted(self.aliases)

    def resolve(self, name: str) -> str:
        name = self.aliases.get(name, name)
        if name not in self.entries:
            raise ConfigError(f"{self.key}: '{name}' is not available; valid: {', '.join(self.names())}")
        return name

    def get(self, name: str) -> Callable:
        return self.entries[self.resolve(name)]

    def build(self, name: str, *args, **kwargs):
        return self.get(name)(*args, **kwargs)
