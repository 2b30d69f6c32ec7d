"""Load any saved tokenizer (HieraTok or ResTok) by its ``config.json`` ``model_type``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_any_tokenizer", "LoadedTokenizer"]


class LoadedTokenizer:
    """A tokenizer in eval mode with one ``decode_latents_or_codes`` entry point for generators."""

    def __init__(self, model: Any, kind: str, info: dict[str, Any]) -> None:
        self.model, self.kind, self.info = model, kind, info

    @torch.no_grad()
    def decode_latents_or_codes(self, v: torch.Tensor, all_scales: bool = False) -> Any:
        dev = next(self.model.parameters()).device
        if self.kind == "hieratok":
            return self.model.decode(v.to(dev).float(), all_scales=all_scales)
        return self.model.decode_indices(v.to(dev).long())

    @torch.no_grad()
    def encode_for_cache(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (posterior mode) for HieraTok, code indices for ResTok."""
        if self.kind == "hieratok":
            return self.model.encode(x).mode()
        return self.model.encode_indices(x)


def load_any_tokenizer(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> LoadedTokenizer:
    """A run folder, checkpoint or model folder of HieraTok or ResTok, ready to encode/decode."""
    from ..evaluate.checkpoints import load_tokenizer, resolve_model_dir

    d = resolve_model_dir(path)
    kind = json.loads((d / "config.json").read_text()).get("model_type")
    if kind == "hieratok":
        model, info = load_tokenizer(d, ema=ema, device=device)
        return LoadedTokenizer(model, kind, info)
    if kind == "restok":
        from .restok import ResTok

        model = ResTok.from_pretrained(d).to(device).eval()
        return LoadedTokenizer(model, kind, {"model_dir": str(d), "weights": "model"})
    raise ValueError(f"{d}: model_type {kind!r} is not a tokenizer (hieratok or restok)")
