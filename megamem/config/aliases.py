"""Old keys kept as aliases of the registry keys that replaced them.

`model.use_rope` names the position encoding (`model.pos_encoding.type`), `model.hidden_activation`
the MLP (`model.mlp_type`). A config may give either; giving both with different meanings is
refused. After loading, the canonical key holds the choice and the alias is null, so a saved
config says it once. Code reads the choice through `position_type` / `mlp_type`, which also
understand a ModelConfig built in code with only the alias set.

`model.pos_encoding.rope_base` and `model.pos_encoding.max_seq_len` (the π-Spiral guide's names) repeat
`model.rope_theta` and `model.max_seq_len`: null takes the model key, a value replaces it at load, and
a value that contradicts a model key set away from its default is refused.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from .schema import MegamemConfig, ModelConfig

# alias key → (canonical key, alias value → canonical value, canonical default)
_POSITION = ("pos_encoding.type", {True: "rope", False: "learned"}, "rope")
_MLP = ("mlp_type", {"silu": "swiglu", "gelu": "gelu", "gelu_tanh": "gelu_tanh"}, "swiglu")
MODEL_ALIASES: Dict[str, Tuple[str, Dict, str]] = {"use_rope": _POSITION, "hidden_activation": _MLP}
# pos_encoding key → the model key whose value it repeats
SAME_VALUE: Dict[str, str] = {"pos_encoding.rope_base": "rope_theta", "pos_encoding.max_seq_len": "max_seq_len"}


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


def rope_base(m: ModelConfig) -> float:
    """The RoPE base: pos_encoding.rope_base, else model.rope_theta."""
    return m.pos_encoding.rope_base if m.pos_encoding.rope_base is not None else m.rope_theta


def _model_default(name: str):
    return ModelConfig.__dataclass_fields__[name].default


def alias_conflicts(m: ModelConfig) -> List[str]:
    problems = []
    for alias, canonical in SAME_VALUE.items():
        given, value = _get(m, alias), getattr(m, canonical)
        if given is not None and value != _model_default(canonical) and given != value:
            problems.append(f"model.{alias} = {given} contradicts model.{canonical} = {value}; keep only one")
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
    for alias, canonical in SAME_VALUE.items():
        if _get(cfg.model, alias) is not None:
            setattr(cfg.model, canonical, _get(cfg.model, alias))
            _set(cfg.model, alias, None)


def clear_partner(m: ModelConfig, key: str) -> Optional[str]:
    """An override of one key of an alias pair wins over the file's value of the other."""
    for alias, canonical in SAME_VALUE.items():
        if key == alias:
            setattr(m, canonical, _model_default(canonical))
            return canonical
        if key == canonical:
            _set(m, alias, None)
            return alias
    for alias, (canonical, _, _) in MODEL_ALIASES.items():
        if key == alias:
            _set(m, canonical, None)
            return canonical
        if key == canonical:
            setattr(m, alias, None)
            return alias
    return None
