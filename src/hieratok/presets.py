"""Named configurations, as data. ``build_config(name, **overrides)`` turns one into a config.

The paper presets (appendix C/E): encoder 6 layers / 768 / 12 heads, decoder 24 / 1024 / 16,
patch 16, 256x256 images, latent d = 16 or 32, scales [1, 2, 4, 8, 16] or the single scale [16].
``tiny`` and ``small`` are for CPUs (tests, the demo). Their ``downsample_width`` is chosen so
that the downsampler's share of the parameters is the paper preset's (52.9M of 399.4M, 13.2%; the
multi-scale model 1.153x its twin): at the decoder width it would be 39% (tiny) and 25% (small),
a downsampler larger than the paper's relative to everything else. Overrides such as ``image_size=64``,
``scales=[1, 4, 16]``, ``downsample="interp"`` or ``attention="full"`` give the ablations of
Tables 3 and 4.
"""

from __future__ import annotations

from typing import Any

from .config import config_from_preset
from .tokenizers.hieratok import HieraTokConfig

__all__ = ["TOKENIZER_PRESETS", "build_config", "preset_names"]

_PAPER: dict[str, Any] = dict(image_size=256, patch_size=16, encoder_depth=6, encoder_width=768, encoder_heads=12,
                              decoder_depth=24, decoder_width=1024, decoder_heads=16)
_TINY: dict[str, Any] = dict(image_size=64, patch_size=8, latent_channels=8, encoder_depth=2, encoder_width=128,
                             encoder_heads=4, decoder_depth=4, decoder_width=192, decoder_heads=4, downsample_width=88)
_SMALL: dict[str, Any] = dict(image_size=128, patch_size=16, latent_channels=16, encoder_depth=4, encoder_width=256,
                              encoder_heads=4, decoder_depth=8, decoder_width=384, decoder_heads=6, downsample_width=256)

TOKENIZER_PRESETS: dict[str, dict[str, Any]] = {
    "hieratok-f16d16": {**_PAPER, "latent_channels": 16},
    "hieratok-f16d16-single": {**_PAPER, "latent_channels": 16, "multiscale": False},
    "hieratok-f16d32": {**_PAPER, "latent_channels": 32},
    "hieratok-f16d32-single": {**_PAPER, "latent_channels": 32, "multiscale": False},
    "tiny": _TINY,
    "tiny-single": {**_TINY, "multiscale": False},
    "small": _SMALL,
    "small-single": {**_SMALL, "multiscale": False},
}


def preset_names() -> list[str]:
    return sorted(TOKENIZER_PRESETS)


def build_config(name: str, **overrides: Any) -> HieraTokConfig:
    """Config of preset ``name`` with field ``overrides`` (``scales`` re-derives from the grid when
    ``image_size``/``patch_size`` change and no explicit scales are given)."""
    return config_from_preset(HieraTokConfig, TOKENIZER_PRESETS, name, overrides)
