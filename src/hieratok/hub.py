"""``save_pretrained`` / ``from_pretrained`` with the huggingface_hub file conventions.

A model directory holds ``config.json`` (the config dataclass plus ``model_type`` and the
library version) and ``model.safetensors`` (the weights; no pickle anywhere). ``from_pretrained``
takes a local directory or a Hub repo id; repo ids are resolved through ``huggingface_hub``'s
cache (``cache_dir``, ``HF_HOME``, ``HF_HUB_OFFLINE`` work as usual), so on an offline machine a
model that was placed in the cache or a local folder loads and nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence, Type, TypeVar

import torch
from safetensors.torch import load_file, save_model

from .config import architecture_diff, config_from_dict, config_to_dict

__all__ = ["PretrainedMixin", "CONFIG_NAME", "WEIGHTS_NAME", "check_state_dict", "state_dict_problems", "meta_shapes"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
M = TypeVar("M", bound="PretrainedMixin")


def _resolve_dir(path_or_repo: str | os.PathLike, cache_dir: Optional[str], revision: Optional[str]) -> Path:
    p = Path(path_or_repo).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_repo)
    looks_like_repo = s.count("/") == 1 and not s.startswith((".", "/", "~")) and not p.exists()
    if not looks_like_repo:
        raise FileNotFoundError(f"{path_or_repo}: not a model directory (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                str(path_or_repo), revision=revision, cache_dir=cache_dir, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]
            )
        )
    except Exception as e:  # offline, unknown repo, no cache entry
        raise FileNotFoundError(
            f"{path_or_repo}: no such local directory and the Hub repo could not be resolved "
            f"({type(e).__name__}); on an offline machine put {CONFIG_NAME} and {WEIGHTS_NAME} in a folder "
            f"and pass its path"
        ) from None


def state_dict_problems(got: Mapping[str, Sequence[int]], want: Mapping[str, Sequence[int]], *,
                        limit: Optional[int] = None, labels: Optional[Mapping[str, str]] = None) -> list[str]:
    """The missing / unexpected / mis-shaped parts of an error comparing tensor shapes (``got``,
    e.g. a checkpoint) with a model's (``want``); empty when they fit.

    ``limit`` shortens each list; ``labels`` names a missing key differently (e.g. with its
    official name). Shared by :func:`check_state_dict` and the checkpoint converters.
    """
    def show(items: list[str]) -> str:
        cut = items if limit is None else items[:limit]
        return f"({len(items)}): {cut}{' ...' if len(cut) < len(items) else ''}"

    labels = labels or {}
    missing = sorted(labels.get(k, k) for k in want if k not in got)
    unexpected = sorted(k for k in got if k not in want)
    shapes = [f"{k}: checkpoint {tuple(got[k])} vs model {tuple(want[k])}"
              for k in sorted(want) if k in got and tuple(got[k]) != tuple(want[k])]
    return [f"{what} {show(items)}" for what, items in
            (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if items]


def meta_shapes(model_cls: Any, config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of ``model_cls(config)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped tensor."""
    problems = state_dict_problems({k: v.shape for k, v in sd.items()},
                                   {k: v.shape for k, v in model.state_dict().items()}, limit=5)
    if problems:
        raise ValueError(f"weights in {where} do not fit this model: " + " | ".join(problems))


class PretrainedMixin:
    """Adds ``save_pretrained``/``from_pretrained`` to an ``nn.Module`` built from ``self.config``."""

    config_class: ClassVar[Type[Any]]
    model_type: ClassVar[str]

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory`` (created if needed)."""
        from . import __version__

        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"model_type": self.model_type, "hieratok_version": __version__, **config_to_dict(self.config)}
        tmp = d / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, d / CONFIG_NAME)
        save_model(self, str(d / (WEIGHTS_NAME + ".tmp")))
        os.replace(d / (WEIGHTS_NAME + ".tmp"), d / WEIGHTS_NAME)
        return d

    @classmethod
    def read_config(cls, directory: str | os.PathLike) -> Any:
        """Read and validate ``config.json`` of a saved model."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}")
        meta = json.loads(path.read_text())
        mt = meta.pop("model_type", None)
        meta.pop("hieratok_version", None)
        if mt != cls.model_type:
            raise ValueError(f"{path}: model_type is {mt!r}, expected {cls.model_type!r}")
        return config_from_dict(cls.config_class, meta)

    @classmethod
    def from_pretrained(
        cls: Type[M],
        path_or_repo: str | os.PathLike,
        *,
        cache_dir: Optional[str] = None,
        revision: Optional[str] = None,
        map_location: str | torch.device = "cpu",
        **overrides: Any,
    ) -> M:
        """Load a saved model; ``overrides`` change runtime fields (e.g. ``attn_backend="reference"``).

        Overriding a field that changes the weights (width, scales, ...) is an error naming the
        field and both values.
        """
        d = _resolve_dir(path_or_repo, cache_dir, revision)
        saved = cls.read_config(d)
        cfg = cls.config_class(**{**config_to_dict(saved), **overrides}) if overrides else saved
        diff = architecture_diff(saved, cfg)
        if diff:
            desc = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{d} was saved with a different architecture ({desc})")
        model = cls(cfg)
        model.load_pretrained_weights(d, map_location=map_location)
        return model

    def load_pretrained_weights(self, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> None:
        """Load ``model.safetensors`` from ``directory`` into this model, checking the config first."""
        d = Path(directory)
        diff = architecture_diff(self.read_config(d), self.config)
        if diff:
            desc = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{d} holds weights of another configuration ({desc})")
        sd = load_file(str(d / WEIGHTS_NAME), device=str(map_location))
        check_state_dict(self, sd, str(d / WEIGHTS_NAME))
        self.load_state_dict(sd)
