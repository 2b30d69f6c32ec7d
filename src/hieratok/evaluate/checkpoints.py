"""Finding a tokenizer from what a user points at: a run, a checkpoint or a model folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from ..hub import CONFIG_NAME, EMA_NAME, load_ema_weights
from ..tokenizers import HieraTok
from ..train.checkpoint import latest_checkpoint

__all__ = ["resolve_model_dir", "load_tokenizer"]

log = logging.getLogger(__name__)


def resolve_model_dir(path: str | Path) -> Path:
    """A folder with ``config.json``: ``path`` itself, or the latest checkpoint of a run folder."""
    p = Path(path).expanduser()
    if (p / CONFIG_NAME).is_file():
        return p
    ckpt = latest_checkpoint(p)
    if ckpt is not None:
        return ckpt
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such run, checkpoint or model folder")
    raise FileNotFoundError(f"{p}: neither a model folder (no {CONFIG_NAME}) nor a run with checkpoints/")


def load_tokenizer(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu",
                   attn_backend: Optional[str] = None) -> tuple[HieraTok, dict]:
    """Load a HieraTok for evaluation (eval mode), preferring the EMA weights of a training checkpoint.

    Returns:
        ``(model, info)`` with ``info = {"model_dir", "weights": "ema" | "model"}``.
    """
    d = resolve_model_dir(path)
    kw = {"attn_backend": attn_backend} if attn_backend else {}
    model = HieraTok.from_pretrained(d, **kw)
    weights = "model"
    if ema and (d / EMA_NAME).is_file():
        load_ema_weights(model, d / EMA_NAME)
        weights = "ema"
    log.info("tokenizer %s (%s weights)", d, weights)
    return model.to(device).eval(), {"model_dir": str(d), "weights": weights}
