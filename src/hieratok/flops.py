"""Parameter and FLOP accounting (HieraTok appendix C, Table 7).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add)
on one image, with attention run on the reference backend so that the score and value matmuls
are counted (fused SDPA kernels are invisible to the counter on some devices). Masked attention
is counted dense, as the paper's figures are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .nn.masks import MaskSpec

__all__ = ["param_counts", "count_flops", "model_info"]


def param_counts(model: Any) -> dict[str, int]:
    """Parameters of the encoder, downsampler, decoder and in total."""
    def n(m: Any) -> int:
        return 0 if m is None else sum(p.numel() for p in m.parameters())

    return {"encoder": n(model.encoder), "downsampler": n(model.downsampler), "decoder": n(model.decoder), "total": n(model)}


@torch.no_grad()
def count_flops(model: Any) -> dict[str, float]:
    """Forward FLOPs for one image: encoder, downsampler, decoder and total."""
    cfg = model.config
    backend, was_training = cfg.attn_backend, model.training
    model.set_attn_backend("reference")
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size, device=p.device, dtype=p.dtype)
        with FlopCounterMode(display=False) as fc:
            model(x)
        per_module = fc.get_flop_counts()
    finally:
        model.set_attn_backend(backend)
        model.train(was_training)

    def total(key: str) -> float:
        return float(sum(per_module.get(key, {}).values()))

    top = type(model).__name__
    return {"encoder": total(f"{top}.encoder"), "downsampler": total(f"{top}.downsampler"),
            "decoder": total(f"{top}.decoder"), "total": total("Global")}


def model_info(model: Any) -> dict[str, Any]:
    """Everything ``hieratok info`` prints."""
    cfg = model.config
    params = param_counts(model)
    return {
        "params": params,
        # the paper's f16d16 model: 52.9M of 399.4M (13.2%); the miniature presets keep that share
        "downsampler_share": params["downsampler"] / params["total"],
        "flops": count_flops(model),
        "encoder_tokens": cfg.encoder_tokens,
        "decoder_tokens": cfg.decoder_tokens,
        "scales": list(cfg.scales),
        "attention": cfg.attention,
        "attention_allowed_fraction": MaskSpec.for_scales(cfg.attention, cfg.scales).allowed_fraction(),
        "downsample": cfg.downsample if cfg.multiscale else None,
        "latent_shape": [cfg.latent_channels, cfg.grid, cfg.grid],
    }
