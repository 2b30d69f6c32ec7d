"""Tokenizers: HieraTok (multi-scale ViT KL-VAE) and its single-scale twin."""

from .hieratok import ConvDownsampler, HieraTok, HieraTokConfig, InterpDownsampler, default_scales

__all__ = ["HieraTok", "HieraTokConfig", "ConvDownsampler", "InterpDownsampler", "default_scales"]
