"""YAML → typed config: strict keys, strict types, dotted CLI overrides, resolved-config dump."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, Dict, Iterable, List, Optional, Tuple

import yaml

from .aliases import clear_partner, resolve_aliases
from .schema import RETIRED_KEYS, RETIRED_VALUES, SECTIONS, MegamemConfig
from .validate import validate


class ConfigError(ValueError):
    """A user error in a config file or override; the message is meant to be shown as is."""


class _EntryError(Exception):
    """An error inside a list entry (e.g. one of data.datasets); _set_field adds where and key."""


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice in one mapping "
                                  f"(first on line {seen[key]}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> Any:
    """The YAML document in path (strict: no duplicate keys); ConfigError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]} "
                          f"({getattr(e, 'problem_mark', '') or ''})".replace(" ()", "")) from None


def _closest(name: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return {int: "integer", float: "number", bool: "true/false", str: "string"}.get(tp, str(tp))


_NO = object()


def _coerce(value: Any, tp: Any) -> Any:
    """Return value as type tp, or _NO. Accepts '1e-4' for floats (YAML 1.1 reads it as a string)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value is False and "no" in typing.get_args(tp):
            return "no"  # YAML 1.1 reads a bare `no` as false
        for choice in typing.get_args(tp):
            if value == choice and type(value) is type(choice):
                return value
            if isinstance(choice, int) and isinstance(value, str) and value.strip() == str(choice):
                return choice
        return _NO
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            out = _coerce(value, arg)
            if out is not _NO:
                return out
        return _NO
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            return _NO
        (item_tp,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item_tp):
            return [coerce_entry(v, item_tp, f"entry {i}" + (f" ('{v.get('name')}')" if isinstance(v, dict)
                                                               and v.get("name") else "")) for i, v in enumerate(value)]
        items = [_coerce(v, item_tp) for v in value]
        return _NO if any(i is _NO for i in items) else items
    if tp is type(None):
        return None if value is None else _NO
    if dataclasses.is_dataclass(tp):
        return coerce_entry(value, tp)
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _NO
        return _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    raise TypeError(f"unsupported config field type {tp}")


def coerce_entry(value: Any, cls, label: str = "entry") -> Any:
    """A mapping → dataclass cls; unknown keys and wrong types raise _EntryError naming the key."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise _EntryError(f"{label} must be a mapping of keys ({', '.join(_field_types(cls))}), got {value!r}")
    types_ = _field_types(cls)
    out = cls()
    for key, v in value.items():
        key = str(key)
        if key not in types_:
            raise _EntryError(f"{label}: unknown key '{key}'{_closest(key, types_)}")
        got = _coerce(v, types_[key])
        if got is _NO:
            raise _EntryError(f"{label}: {key} = {v!r} has the wrong type: expected {_type_name(types_[key])}")
        setattr(out, key, got)
    return out


def _field_types(cls) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _set_field(obj, section: str, key: str, value: Any, where: str) -> None:
    types_ = _field_types(type(obj))
    if key not in types_:
        if (section, key) in RETIRED_KEYS:
            raise ConfigError(f"{where}: {section}.{key} is not supported: {RETIRED_KEYS[(section, key)]}")
        raise ConfigError(f"{where}: unknown key '{section}.{key}'{_closest(key, types_)}")
    if isinstance(value, str) and (section, key, value) in RETIRED_VALUES:
        raise ConfigError(f"{where}: {section}.{key}: '{value}' is not supported: {RETIRED_VALUES[(section, key, value)]}")
    try:
        out = _coerce(value, types_[key])
    except _EntryError as e:
        raise ConfigError(f"{where}: {section}.{key} {e}") from None
    if out is _NO:
        raise ConfigError(
            f"{where}: {section}.{key} = {value!r} has the wrong type: expected {_type_name(types_[key])}"
        )
    if isinstance(out, float) and not math.isfinite(out):
        raise ConfigError(f"{where}: {section}.{key} = {value!r} is not a finite number")
    setattr(obj, key, out)


def config_from_dict(data: Any, where: str = "<dict>", resolve: bool = True) -> MegamemConfig:
    """A config from parsed YAML; resolve=False leaves old alias keys in place (overrides come next)."""
    cfg = MegamemConfig()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping with sections {', '.join(SECTIONS)}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section '{section}'{_closest(str(section), SECTIONS)}; "
                              f"valid sections: {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping of keys, got {type(values).__name__}")
        for key, value in values.items():
            _set_field(getattr(cfg, section), section, str(key), value, where)
    if resolve:
        resolve_aliases(cfg, where, ConfigError)
    return cfg


def parse_overrides(args: List[str]) -> List[Tuple[str, str]]:
    """['--memory.num_memory_tokens', '2048', '--model.dropout=0.1'] → [(dotted, raw)]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unrecognised argument '{arg}': overrides look like --section.key VALUE "
                              f"(sections: {', '.join(SECTIONS)})")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '{arg}' needs a value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        out.append((key, raw))
    return out


def apply_overrides(cfg: MegamemConfig, overrides: List[Tuple[str, str]]) -> None:
    for dotted, raw in overrides:
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or not key:
            raise ConfigError(f"override --{dotted}: unknown section '{section}'{_closest(section, SECTIONS)}; "
                              f"valid sections: {', '.join(SECTIONS)}")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        obj, label = getattr(cfg, section), section
        *parents, key = key.split(".")
        for part in parents:  # nested sections, e.g. --model.pos_encoding.type rope
            child = getattr(obj, part, None)
            if not dataclasses.is_dataclass(child):
                raise ConfigError(f"override --{dotted}: {label}.{part} is not a section of keys")
            obj, label = child, f"{label}.{part}"
        _set_field(obj, label, key, value, f"override --{dotted}")
        if section == "model":
            clear_partner(cfg.model, ".".join(parents + [key]))


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> MegamemConfig:
    """Load, override, validate. Every user error is a ConfigError naming the file and key."""
    where = str(path) if path else "<defaults>"
    data = None
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        data = read_yaml(path)
        if data is None:
            raise ConfigError(f"{path}: the file is empty; a config has sections such as model:, memory:, training: "
                              "(configs/base_small.yaml documents every key)")
    cfg = config_from_dict(data, where, resolve=False)
    apply_overrides(cfg, parse_overrides(overrides or []))
    resolve_aliases(cfg, where, ConfigError)
    problems = validate(cfg)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return cfg


def config_to_dict(cfg: MegamemConfig) -> Dict[str, Dict[str, Any]]:
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


def dump_config(cfg: MegamemConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: MegamemConfig, path: str) -> None:
    """Write the resolved config atomically (a crash never leaves half a file)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dump_config(cfg))
    os.replace(tmp, path)
