"""Which parameters train: one policy resolved from the config, for from-scratch and adapter models.

Every parameter belongs to one part — `memory` (banks and memory branches), `lora` (peft LoRA
weights) or `base` (everything else: a pretrained HF model, or a from-scratch model's own weights).
The mode keys decide which parts train (the presets below); `training.trainable` / `training.frozen`
(fnmatch globs over parameter names) then narrow that set. Pure config logic, no torch: the
adapter builder and megamem.train apply the same object, so a dry run and a run agree.

  from scratch             base + memory train
  from scratch + LoRA      lora (+ memory with use_both_memory_and_lora) train; base only with
                           model.freeze_base_model: false
  adapter                  memory / lora as the mode keys say; base with freeze_base_model: false
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import FrozenSet, Iterable, List, Optional, Set, Tuple

from .load import ConfigError
from .progressive import frozen_blocks
from .schema import MegamemConfig


def lora_enabled(cfg: MegamemConfig) -> bool:
    return cfg.memory.use_lora or cfg.memory.use_both_memory_and_lora


@dataclass(frozen=True)
class TrainablePolicy:
    parts: FrozenSet[str]  # parts the mode keys train: subset of {"memory", "lora", "base"}
    trainable: Optional[Tuple[str, ...]] = None  # training.trainable globs (only matches train)
    frozen: Optional[Tuple[str, ...]] = None  # training.frozen globs (matches never train)

    def select(self, named_parts: Iterable[Tuple[str, str]]) -> Set[str]:
        """Names of the parameters that train, from (name, part) pairs. A glob that matches no parameter,
        or only parameters the mode keys freeze, is a ConfigError naming the key."""
        named_parts = list(named_parts)
        chosen = {name for name, part in named_parts if part in self.parts}
        key, globs = ("training.trainable", self.trainable) if self.trainable is not None else \
            ("training.frozen", self.frozen) if self.frozen is not None else (None, None)
        if key is None:
            return chosen
        names = [name for name, _ in named_parts]
        for glob in globs:
            hits = [n for n in names if fnmatchcase(n, glob)]
            if not hits:
                raise ConfigError(f"{key}: pattern '{glob}' matches no parameter; names start with "
                                  f"{', '.join(name_prefixes(names))}")
            if key == "training.trainable" and not chosen.intersection(hits):
                raise ConfigError(f"{key}: pattern '{glob}' matches only parameters the mode keys freeze "
                                  f"(e.g. {hits[0]}); {self.unfreeze_hint()}")
        match = {n for n in names if any(fnmatchcase(n, g) for g in globs)}
        return chosen & match if key == "training.trainable" else chosen - match

    def unfreeze_hint(self) -> str:
        return ("set model.freeze_base_model: false to train base weights" if "base" not in self.parts
                else "memory and LoRA parts follow use_memory_adapter / use_lora / use_both_memory_and_lora")


def name_prefixes(names: List[str], limit: int = 10) -> List[str]:
    """A few distinct patterns of real parameter names (`blocks.*.attn.*`, `banks.*.memory`), for messages."""
    seen: List[str] = []
    for n in names:
        parts, out = n.split("."), []
        for i, part in enumerate(parts):
            out.append("*" if part.isdigit() else part)
            if not part.isdigit() and i > 0 and i < len(parts) - 1 or (i == 0 and len(parts) > 1
                                                                    and not parts[1].isdigit()):
                out.append("*")
                break
        prefix = ".".join(out)
        if prefix not in seen:
            seen.append(prefix)
    return seen[:limit] + (["…"] if len(seen) > limit else [])


def trainable_policy(cfg: MegamemConfig) -> TrainablePolicy:
    """The presets of the mode keys, narrowed by training.trainable / training.frozen (see the module doc)."""
    m, mem, t = cfg.model, cfg.memory, cfg.training
    if m.base_model_name is None:
        memory = not mem.vanilla_mode and (not lora_enabled(cfg) or mem.use_both_memory_and_lora
                                           or t.trainable is not None or t.frozen is not None)
        base = not lora_enabled(cfg) or not m.freeze_base_model
    else:
        memory = mem.use_memory_adapter and not mem.vanilla_mode
        base = not m.freeze_base_model
    parts = {p for p, on in (("memory", memory), ("lora", lora_enabled(cfg)), ("base", base)) if on}
    frozen = t.frozen if t.frozen is not None else frozen_blocks(t, m.num_layers)  # a progressive phase's blocks
    return TrainablePolicy(frozenset(parts), tuple(t.trainable) if t.trainable is not None else None,
                           tuple(frozen) if frozen is not None else None)

