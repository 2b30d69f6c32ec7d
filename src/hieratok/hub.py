"""``save_pretrained`` / ``from_pretrained`` with the huggingface_hub file conventions.

A model directory holds ``config.json`` (the config dataclass plus ``model_type`` and the
library version) and ``model.safetensors`` (the weights; no pickle anywhere). ``from_pretrained``
takes a local directory or a Hub repo id; repo ids are resolved from ``huggingface_hub``'s cache
only (``cache_dir`` and ``HF_HOME`` work as usual): nothing is downloaded at run time. Fetch a
model into the cache beforehand with ``huggingface-cli download <repo id>``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Type, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model

from .config import architecture_diff, config_from_dict, config_from_preset, config_to_dict
from .version import __version__

__all__ = ["PretrainedMixin", "CONFIG_NAME", "WEIGHTS_NAME", "EMA_NAME", "check_state_dict", "state_dict_problems",
           "meta_shapes", "safetensors_shapes", "check_config_fits_weights", "write_model_dir", "read_json", "read_safetensors", "model_type_of", "load_ema_weights", "write_atomic"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"  # a training checkpoint's averaged trained parameters (hieratok.train.ema)
M = TypeVar("M", bound="PretrainedMixin")


def resolve_pretrained_dir(path_or_repo: str | os.PathLike, cache_dir: Optional[str], revision: Optional[str]) -> Path:
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
            snapshot_download(str(path_or_repo), revision=revision, cache_dir=cache_dir,
                              allow_patterns=[CONFIG_NAME, WEIGHTS_NAME], local_files_only=True)
        )
    except Exception as e:  # not in the cache
        raise FileNotFoundError(
            f"{path_or_repo}: no such local directory and no such Hub repo in the local cache "
            f"({type(e).__name__}); put {CONFIG_NAME} and {WEIGHTS_NAME} in a folder and pass its path, or "
            f"fetch it beforehand with `huggingface-cli download {path_or_repo}` (nothing is downloaded at run time)"
        ) from None


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then rename it over ``path``: a killed
    writer never leaves a truncated ``path`` (the name is per process, so ranks do not collide)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ValueError naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def model_type_of(directory: Path) -> Optional[str]:
    """The ``model_type`` recorded in a model folder's ``config.json``."""
    return read_json(Path(directory) / CONFIG_NAME).get("model_type")


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; FileNotFoundError / ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {path.name}")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated / foreign files
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors file's header, without reading the tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {path.name}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def _int_fields(config: Any) -> dict[str, int]:
    return {k: v for k, v in config_to_dict(config).items() if isinstance(v, int) and not isinstance(v, bool)}


def check_config_fits_weights(model_cls: Any, config: Any, weights: Path) -> None:
    """Compare a config with a weight file's header before any model is built (an absurd or foreign
    ``config.json`` must not cost memory): every ``*depth*`` field is at most the file's tensor count
    (each block holds tensors), then the shapes of a model built on the meta device must match."""
    shapes = safetensors_shapes(weights)
    for key, value in _int_fields(config).items():
        if "depth" in key and value > len(shapes):
            raise ValueError(f"config {key}={value} does not fit {weights}, which holds {len(shapes)} tensors: "
                             f"the config and the weights belong to different models")
    problems = state_dict_problems(shapes, meta_shapes(model_cls, config), limit=5)
    if problems:
        raise ValueError(f"weights in {weights} do not fit the config: " + " | ".join(problems))


def load_ema_weights(model: torch.nn.Module, path: Path) -> None:
    """Load an EMA file (one tensor per trained parameter, as the trainer saves it) into ``model``;
    buffers and frozen parameters keep their values. Every trained parameter must be in it."""
    ema = read_safetensors(path)
    want = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    problems = state_dict_problems({k: v.shape for k, v in ema.items()}, want, limit=5)
    if problems:
        raise ValueError(f"EMA weights in {path} do not fit this model: " + " | ".join(problems))
    model.load_state_dict({**model.state_dict(), **ema})


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


def write_model_dir(directory: str | os.PathLike, model: Any,
                    state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """The one writer of a model folder: ``config.json`` (``model.config`` plus ``model_type`` and
    the library version) and ``model.safetensors`` (``state_dict``, e.g. gathered from shards by the
    trainer; else the model's own), each written atomically."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"model_type": model.model_type, "hieratok_version": __version__, **config_to_dict(model.config)}
    write_atomic(d / CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    if state_dict is None:
        write_atomic(d / WEIGHTS_NAME, lambda p: save_model(model, str(p)))
    else:
        write_atomic(d / WEIGHTS_NAME, lambda p: save_file({k: v.contiguous() for k, v in state_dict.items()}, str(p)))
    return d


class PretrainedMixin:
    """Adds ``save_pretrained``/``from_pretrained`` to an ``nn.Module`` built from ``self.config``."""

    config_class: ClassVar[Type[Any]]
    model_type: ClassVar[str]
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}  # name -> config field values (hieratok.presets)

    @classmethod
    def preset_names(cls) -> list[str]:
        return sorted(cls.presets)

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> Any:
        """The config of preset ``name`` with field ``overrides``; a ValueError naming the choices."""
        return config_from_preset(cls.config_class, cls.presets, name, overrides, cls.__name__)

    @classmethod
    def from_preset(cls: Type[M], name: str, **overrides: Any) -> M:
        """A new model (random initialisation) of preset ``name`` with config field ``overrides``."""
        return cls(cls.preset_config(name, **overrides))

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory`` (created if needed)."""
        return write_model_dir(save_directory, self)

    @classmethod
    def read_config(cls, directory: str | os.PathLike) -> Any:
        """Read and validate ``config.json`` of a saved model."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}")
        meta = read_json(path)
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
        """Load a saved model, in eval mode (as transformers and diffusers return theirs: posterior
        mode, no drop-path); ``overrides`` change runtime fields (e.g. ``attn_backend="reference"``).

        Overriding a field that changes the weights (width, scales, ...) is an error naming the
        field and both values.
        """
        d = resolve_pretrained_dir(path_or_repo, cache_dir, revision)
        saved = cls.read_config(d)
        cfg = config_from_dict(cls.config_class, {**config_to_dict(saved), **overrides}) if overrides else saved
        diff = architecture_diff(saved, cfg)
        if diff:
            desc = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{d} was saved with a different architecture ({desc})")
        check_config_fits_weights(cls, cfg, d / WEIGHTS_NAME)
        model = cls(cfg).to(map_location)
        model.load_pretrained_weights(d, map_location=map_location)
        return model.eval()

    def load_pretrained_weights(self, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> None:
        """Load ``model.safetensors`` from ``directory`` into this model, checking the config first."""
        d = Path(directory)
        diff = architecture_diff(self.read_config(d), self.config)
        if diff:
            desc = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{d} holds weights of another configuration ({desc})")
        path = d / WEIGHTS_NAME
        sd = read_safetensors(path, map_location)
        check_state_dict(self, sd, str(path))
        self.load_state_dict(sd)
