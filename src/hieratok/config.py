"""Configs are plain dataclasses: JSON in, JSON out, unknown keys are errors."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Type, TypeVar

__all__ = ["config_from_dict", "config_to_dict", "architecture_diff", "runtime_field", "require_positive_ints"]

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
    return cls(**d)


def architecture_diff(a: Any, b: Any) -> dict[str, tuple[Any, Any]]:
    """Fields that change the weights and differ between two configs of the same class."""
    out = {}
    for f in dataclasses.fields(a):
        if f.metadata.get("runtime"):
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if (list(va) if isinstance(va, tuple) else va) != (list(vb) if isinstance(vb, tuple) else vb):
            out[f.name] = (va, vb)
    return out


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
