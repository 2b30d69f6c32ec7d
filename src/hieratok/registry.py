"""Every saved model family by the ``model_type`` of its ``config.json``, and one loader for all.

A saved model is a folder with ``config.json`` and ``model.safetensors`` (:mod:`hieratok.hub`); a
training checkpoint is such a folder with ``ema.safetensors`` and ``trainer_state.json`` beside
them (:mod:`hieratok.checkpoint`); a run folder holds checkpoints. :func:`load_model` takes any of
the three (or a Hub repo id, downloaded when online), builds the class registered for the folder's ``model_type`` and
loads the EMA weights when there are some. A new model family adds one entry to
:data:`MODEL_TYPES` (its class must use :class:`~hieratok.hub.PretrainedMixin`).

``diffusers:<dir>`` loads a diffusers ``AutoencoderKL`` folder as a tokenizer
(:class:`hieratok.interop.diffusers.AutoencoderKLTokenizer`, model type :data:`DIFFUSERS_VAE`).
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .checkpoint import STATE_NAME, latest_checkpoint
from .hub import (
    CONFIG_NAME,
    EMA_NAME,
    as_torch_dtype,
    is_repo_id,
    load_ema_weights,
    model_type_of,
    read_json,
    resolve_pretrained_dir,
)
from .interop.diffusers import load_autoencoder_kl

__all__ = ["MODEL_TYPES", "TOKENIZERS", "GENERATORS", "DIFFUSERS_PREFIX", "DIFFUSERS_VAE", "model_class",
           "resolve_model_dir", "load_model"]

log = logging.getLogger(__name__)

# model_type -> (module, class); imported when a folder of that type is loaded
MODEL_TYPES: dict[str, tuple[str, str]] = {
    "hieratok": ("hieratok.tokenizers.hieratok", "HieraTok"),
    "restok": ("hieratok.tokenizers.restok", "ResTok"),
    "dit": ("hieratok.generators.dit", "DiT"),
    "llamagen-gpt": ("hieratok.generators.llamagen", "GPT"),
}
DIFFUSERS_PREFIX = "diffusers:"  # load_model("diffusers:<dir>"): a diffusers AutoencoderKL folder
DIFFUSERS_VAE = "autoencoderkl"  # its model type (not in MODEL_TYPES: it has no hieratok model folder)
TOKENIZERS = ("hieratok", "restok", DIFFUSERS_VAE)
GENERATORS = ("dit", "llamagen-gpt")


def model_class(model_type: str) -> Any:
    """The class registered for ``model_type``; ValueError naming the known types otherwise."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(MODEL_TYPES)}")
    module, name = MODEL_TYPES[model_type]
    cls = getattr(importlib.import_module(module), name)
    assert cls.model_type == model_type, f"{module}.{name}.model_type is {cls.model_type!r}, registered as {model_type!r}"
    return cls


def resolve_model_dir(path: str | os.PathLike, **hub: Any) -> Path:
    """A folder with ``config.json``: ``path`` itself, the latest complete checkpoint of a run
    folder, or a Hub repo id (``hub``: ``subfolder``, ``revision``, ``cache_dir``, ``token``,
    ``local_files_only``, as :func:`~hieratok.hub.resolve_pretrained_dir`)."""
    if is_repo_id(path):
        return resolve_pretrained_dir(path, **hub)
    p = Path(path).expanduser() / (hub.get("subfolder") or "")
    if (p / CONFIG_NAME).is_file():
        return p
    ckpt = latest_checkpoint(p)
    if ckpt is not None:
        return ckpt
    if p.is_dir():
        raise FileNotFoundError(f"{p}: neither a model folder (no {CONFIG_NAME}) nor a run with checkpoints/")
    raise FileNotFoundError(f"{p}: no such run, checkpoint or model folder")


def load_model(path: str | os.PathLike, *, ema: bool = True, device: str | torch.device = "cpu",
               expect: Optional[Sequence[str]] = None, torch_dtype: Optional[str | torch.dtype] = None,
               subfolder: Optional[str] = None, revision: Optional[str] = None,
               cache_dir: Optional[str | os.PathLike] = None, token: Optional[str | bool] = None,
               local_files_only: bool = False, **overrides: Any) -> tuple[Any, dict[str, Any]]:
    """Load any saved model in eval mode: a model folder, a training checkpoint, a run folder
    (its latest checkpoint), a Hub repo id (downloaded unless ``local_files_only`` or
    ``HF_HUB_OFFLINE=1``), or ``diffusers:<dir>``, a diffusers ``AutoencoderKL`` folder
    (``overrides``: ``image_size``, default its ``sample_size``).

    Args:
        ema: use a checkpoint's EMA weights when it has them.
        expect: the model types the caller can use (e.g. :data:`TOKENIZERS`); another type is a
            ValueError naming both.
        torch_dtype: cast the loaded weights (e.g. ``torch.bfloat16``).
        subfolder, revision, cache_dir, token, local_files_only: where to find it, as ``from_pretrained``.
        overrides: runtime config fields (e.g. ``attn_backend="reference"``), as ``from_pretrained``.

    Returns:
        ``(model, info)``, ``info = {"model_dir", "model_type", "weights": "ema" | "model",
        "train_config", "source"}`` (the training config recorded in a checkpoint, else ``{}``;
        ``source``: what to pass to load this model again, e.g. from a latent cache's record).
    """
    if str(path).startswith(DIFFUSERS_PREFIX):
        if expect is not None and DIFFUSERS_VAE not in expect:
            raise ValueError(f"{path}: a diffusers AutoencoderKL ({DIFFUSERS_VAE!r}) is not one of {list(expect)}")

        vae, d = load_autoencoder_kl(str(path)[len(DIFFUSERS_PREFIX):], **overrides)
        log.info("%s %s", DIFFUSERS_VAE, d)
        return vae.to(device).eval(), {"model_dir": str(d), "model_type": DIFFUSERS_VAE, "weights": "model",
                                       "train_config": {}, "source": DIFFUSERS_PREFIX + str(d.resolve())}
    dtype = as_torch_dtype(torch_dtype)  # a bad name fails before anything is read
    d = resolve_model_dir(path, subfolder=subfolder, revision=revision, cache_dir=cache_dir, token=token,
                          local_files_only=local_files_only)
    kind = model_type_of(d)
    if kind is None and "_class_name" in read_json(d / CONFIG_NAME):
        raise ValueError(f"{d} holds a diffusers model: load it as {DIFFUSERS_PREFIX}{path}")
    if expect is not None and kind not in expect:
        raise ValueError(f"{d}: model_type {kind!r} is not one of {list(expect)}")
    model = model_class(kind).from_pretrained(d, **overrides)
    weights = "model"
    if ema and (d / EMA_NAME).is_file():
        load_ema_weights(model, d / EMA_NAME)
        weights = "ema"
    if dtype is not None:
        model.to(dtype)
    train_config = read_json(d / STATE_NAME).get("train_config", {}) if (d / STATE_NAME).is_file() else {}
    log.info("%s %s (%s weights)", kind, d, weights)
    return model.to(device).eval(), {"model_dir": str(d), "model_type": kind, "weights": weights,
                                     "train_config": train_config, "source": str(d.resolve())}
