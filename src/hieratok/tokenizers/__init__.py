"""Tokenizers: HieraTok (multi-scale ViT KL-VAE) and its single-scale twin; ResTok (1D hierarchical residual VQ)."""

from .hieratok import ConvDownsampler, HieraTok, HieraTokConfig, InterpDownsampler, default_scales
from .restok import RESTOK_PRESETS, ResTok, ResTokConfig

__all__ = ["HieraTok", "HieraTokConfig", "ConvDownsampler", "InterpDownsampler", "default_scales",
           "ResTok", "ResTokConfig", "RESTOK_PRESETS"]
