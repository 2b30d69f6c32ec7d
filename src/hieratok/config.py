"""Configs are plain dataclasses: JSON in, JSON out, unknown keys are errors."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Type, TypeVar, Union, get_args, get_origin, get_type_hints

__all__ = ["config_from_dict", "config_to_dict", "architecture_diff", "runtime_field", "require_positive_ints",
           "coerce_value", "settings_diff"]

T = TypeVar("T")


def runtime_field(default: Any) -> Any:
    """A config field that does not change the weights (backend, checkpointing, drop-path...)."""
    return dataclasses.field(default=default, metadata={"runtime": True})


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> JSON-ready dict (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def config_from_dict(cls: Type[T], d: Mapping[str, Any]) -> T:
    """Build ``cls`` from a dict, rejecting keys the config does not have."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}")
    hints = get_type_hints(cls)
    # strings (YAML / command-line values such as "1e-4") are converted to the field's type
    return cls(**{k: coerce_value(k, hints[k], v) if isinstance(v, str) and hints[k] is not str else v
                  for k, v in d.items()})


_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}


def _scalar(tp: Any, value: Any) -> Any:
    """``value`` as ``tp`` (bool, int, float or str); ValueError/TypeError if it is not one."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() not in _BOOLS:
            raise ValueError
        return _BOOLS[str(value).lower()]
    if isinstance(value, (bool, list, tuple, dict)) or value is None:
        raise TypeError
    if tp is int:
        if isinstance(value, int):
            return value
        f = float(value)  # "1e3" (PyYAML reads exponents without a dot as strings)
        if not f.is_integer():
            raise ValueError
        return int(f)
    if tp is float:
        return float(value)
    if tp is str:
        return str(value)
    raise TypeError(f"unsupported config field type {tp}")  # pragma: no cover (a new field type)


def coerce_value(key: str, tp: Any, value: Any) -> Any:
    """``value`` (from YAML or the command line, so numbers may arrive as strings such as ``"2e-4"``)
    converted to the field type ``tp``; a ValueError naming ``key`` if it does not convert."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        (tp,) = [a for a in args if a is not type(None)]
        origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        raise ValueError(f"config key {key!r} is a section: set its fields, e.g. {key}.<field>=value")
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} expects a mapping, got {value!r}")
        return value
    if origin is tuple:
        n = None if args[-1] is Ellipsis else len(args)
        if not isinstance(value, (list, tuple)) or (n is not None and len(value) != n):
            raise ValueError(f"config key {key!r} expects a list of {n or 'any number of'} values, got {value!r}")
        return tuple(coerce_value(f"{key}[{i}]", args[0 if n is None else i], v) for i, v in enumerate(value))
    try:
        return _scalar(tp, value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {key!r} expects {tp.__name__}, got {value!r}") from None


def architecture_diff(a: Any, b: Any) -> dict[str, tuple[Any, Any]]:
    """Fields that change the weights and differ between two configs of the same class.

    A config class may name the fields that play no part in a given config (``unused_fields()``,
    e.g. the downsampler of a single-scale tokenizer); a field both configs leave unused is skipped.
    """
    unused = set(getattr(a, "unused_fields", tuple)()) & set(getattr(b, "unused_fields", tuple)())
    out = {}
    for f in dataclasses.fields(a):
        if f.metadata.get("runtime") or f.name in unused:
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if (list(va) if isinstance(va, tuple) else va) != (list(vb) if isinstance(vb, tuple) else vb):
            out[f.name] = (va, vb)
    return out


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``"key: old -> new"`` for every key (outside ``ignore``) whose value differs between two
    settings records, compared as JSON stores them (tuples are lists); empty when they agree."""
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
            if k not in ignore and old.get(k) != new.get(k)]


def require_positive_ints(cfg: Any, names: tuple[str, ...]) -> None:
    """ValueError naming the first field of ``names`` that is not a positive integer."""
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def config_from_preset(cls: Type[T], presets: Mapping[str, Mapping[str, Any]], name: str,
                       overrides: Mapping[str, Any], kind: str = "") -> T:
    """``cls`` from the preset ``name`` of ``presets`` with field ``overrides``; a ValueError naming
    the choices for an unknown name (``kind``, e.g. "DiT", goes into that message)."""
    if name not in presets:
        raise ValueError(f"unknown {kind + ' ' if kind else ''}preset {name!r}; choose one of {sorted(presets)}")
    return config_from_dict(cls, {**presets[name], **overrides})
