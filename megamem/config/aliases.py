"""Old keys kept as aliases of the registry keys that replaced them.

`model.use_rope` names the position encoding (`model.pos_encoding.type`), `model.hidden_activation`
the MLP (`model.mlp_type`). A config may give either; giving both with different meanings is
refused. After loading, the canonical key holds the choice and the alias is null, so a saved
config says it once. Code reads the choice through `position_type` / `mlp_type`, which also
understand a ModelConfig built in code with only the alias set.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from .schema import MegamemConfig, ModelConfig

# alias key → (canonical key, alias value → canonical value, canonical default)
_POSITION = ("pos_encoding.type", {True: "rope", False: "learned"}, "rope")
_MLP = ("mlp_type", {"silu": "swiglu", "gelu": "gelu", "gelu_tanh": "gelu_tanh"}, "swiglu")
MODEL_ALIASES: Dict[str, Tuple[str, Dict, str]] = {"use_rope": _POSITION, "hidden_activation": _MLP}


def _get(m: ModelConfig, dotted: str):
    obj = m
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set(m: ModelConfig, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    obj = m
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _choice(m: ModelConfig, alias: str) -> str:
    canonical, mapping, default = MODEL_ALIASES[alias]
    value = _get(m, canonical)
    if value is not None:
        return value
    given = getattr(m, alias)
    return mapping[given] if given is not None else default


def position_type(m: ModelConfig) -> str:
    """The positional encoding's registry name."""
    return _choice(m, "use_rope")


def mlp_type(m: ModelConfig) -> str:
    """The MLP's registry name."""
    return _choice(m, "hidden_activation")


def alias_conflicts(m: ModelConfig) -> List[str]:
    problems = []
    for alias, (canonical, mapping, _) in MODEL_ALIASES.items():
        given, value = getattr(m, alias), _get(m, canonical)
        if given is not None and value is not None and mapping[given] != value:
            shown = str(given).lower() if isinstance(given, bool) else given
            problems.append(f"model.{alias} = {shown} (an alias: model.{canonical} = {mapping[given]}) contradicts "
                            f"model.{canonical} = {value}; keep only model.{canonical}")
    return problems


def resolve_aliases(cfg: MegamemConfig, where: str, error: Callable[[str], Exception]) -> None:
    """Move alias values to their canonical keys (refusing contradictions) and fill the defaults."""
    problems = alias_conflicts(cfg.model)
    if problems:
        raise error(f"{where}: " + "; ".join(problems))
    for alias, (canonical, _, _) in MODEL_ALIASES.items():
        _set(cfg.model, canonical, _choice(cfg.model, alias))
        setattr(cfg.model, alias, None)


def clear_partner(m: ModelConfig, key: str) -> Optional[str]:
    """An override of one key of an alias pair wins over the file's value of the other."""
    for alias, (canonical, _, _) in MODEL_ALIASES.items():
        if key == alias:
            _set(m, canonical, None)
            return canonical
        if key == canonical:
            setattr(m, alias, None)
            return alias
    return None
