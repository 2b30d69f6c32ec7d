"""Reading the authors' checkpoint files (shared by the ResTok and LlamaGen converters)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from ..hub import read_safetensors

__all__ = ["WRAPPERS", "checkpoint_file", "load_official_state_dict", "unwrap_state_dict"]

WRAPPERS = ("model", "state_dict", "module", "ema")  # training checkpoints nest the weights under one of these
_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pt")


def checkpoint_file(path: Union[str, os.PathLike]) -> Path:
    """``path`` itself, or the weights file of a Hub-style directory (``model.safetensors``,
    ``pytorch_model.bin`` or ``pytorch_model.pt``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in _DIR_FILES:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{path}: no {' / '.join(_DIR_FILES)} in this directory")
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    return p


def unwrap_state_dict(sd: Any) -> Any:
    """The weights inside a training checkpoint (``{"model": ...}``, ``{"state_dict": ...}``, ...)."""
    for key in WRAPPERS:
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            return sd[key]
    return sd


def load_official_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (``.safetensors``, or a torch pickle ``.bin``/``.pt``/``.pth`` read with
    ``weights_only=True``) or a directory holding one (:func:`checkpoint_file`); a training
    checkpoint is unwrapped (:data:`WRAPPERS`). ValueError naming the file when it is unreadable or
    not a state dict of tensors."""
    p = checkpoint_file(path)
    if p.suffix == ".safetensors":
        sd: Any = read_safetensors(p)
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated file, foreign pickle, ...
            raise ValueError(f"{p} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        sd = unwrap_state_dict(sd)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{p}: not a state dict of tensors")
    return dict(sd)
