"""Quantizers: vector quantisation with a straight-through estimator."""

from .vq import VectorQuantizer, VQOutput

__all__ = ["VectorQuantizer", "VQOutput"]
