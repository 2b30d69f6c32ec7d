"""Load any saved tokenizer (HieraTok or ResTok) by its ``config.json`` ``model_type``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["load_any_tokenizer", "LoadedTokenizer"]


class LoadedTokenizer:
    """A tokenizer in eval mode with one ``decode_latents_or_codes`` entry point for generators."""

    def __init__(self, model: Any, kind: str, info: dict[str, Any]) -> None:
        self.model, self.kind, self.info = model, kind, info

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def decode_latents_or_codes(self, v: torch.Tensor, all_scales: bool = False) -> Any:
        """Images from latents (HieraTok; ``all_scales``: the whole pyramid) or codes (ResTok)."""
        if self.kind == "hieratok":
            return self.model.decode(v.to(self.device).float(), all_scales=all_scales)
        if all_scales:
            raise ValueError("all_scales: ResTok decodes one image per code sequence (no pyramid)")
        return self.model.decode_indices(v.to(self.device).long())

    @torch.no_grad()
    def encode_for_cache(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (posterior mode) for HieraTok, code indices for ResTok."""
        x = x.to(self.device)
        if self.kind == "hieratok":
            return self.model.encode(x).mode()
        return self.model.encode_indices(x)


def load_any_tokenizer(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> LoadedTokenizer:
    """A run folder, checkpoint or model folder of HieraTok or ResTok, ready to encode/decode
    (EMA weights of a training checkpoint unless ``ema=False``)."""
    from ..evaluate.checkpoints import load_tokenizer, resolve_model_dir
    from ..hub import EMA_NAME, load_ema_weights, model_type_of

    d = resolve_model_dir(path)
    kind = model_type_of(d)
    if kind == "hieratok":
        model, info = load_tokenizer(d, ema=ema, device=device)
        return LoadedTokenizer(model, kind, info)
    if kind == "restok":
        from .restok import ResTok

        model, weights = ResTok.from_pretrained(d), "model"
        if ema and (d / EMA_NAME).is_file():
            load_ema_weights(model, d / EMA_NAME)
            weights = "ema"
        return LoadedTokenizer(model.to(device).eval(), kind, {"model_dir": str(d), "weights": weights})
    raise ValueError(f"{d}: model_type {kind!r} is not a tokenizer (hieratok or restok)")
