"""Tokenizers: HieraTok (multi-scale ViT KL-VAE) and its single-scale twin; ResTok (1D hierarchical residual VQ)."""

from ..presets import RESTOK_PRESETS
from .hieratok import ConvDownsampler, HieraTok, HieraTokConfig, InterpDownsampler, default_scales
from .restok import ResTok, ResTokConfig

__all__ = ["HieraTok", "HieraTokConfig", "ConvDownsampler", "InterpDownsampler", "default_scales",
           "ResTok", "ResTokConfig", "RESTOK_PRESETS"]
