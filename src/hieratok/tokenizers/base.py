"""The interface every tokenizer implements: what evaluation, latent caching, sampling and training
read from it, so that none of them dispatches on the family.

A tokenizer maps images in [-1, 1] to what a generator models (:meth:`Tokenizer.tokenize`:
continuous latents, or code indices when ``codebook_size`` is set) and back
(:meth:`Tokenizer.detokenize`, every output scale where it has several).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Protocol, runtime_checkable

import torch

__all__ = ["Tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    model_type: ClassVar[str]
    config: Any

    @property
    def codebook_size(self) -> Optional[int]:
        """Number of codes of a discrete tokenizer; None for continuous latents."""

    def check_image_size(self, height: int, width: int) -> None:
        """A ValueError (one line, naming the rule) for an image size the tokenizer cannot encode;
        sizes other than the training size work where their sides follow the rule."""

    def output_sides(self) -> list[int]:
        """Side in pixels of each image :meth:`reconstruct` returns, coarse to fine."""

    def tokenize(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """What a generator models: latents (posterior mode) or code indices (long)."""

    def detokenize(self, v: torch.Tensor, all_scales: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Images from :meth:`tokenize`'s output; ``all_scales``: the list over :meth:`output_sides`
        (a ValueError for a tokenizer with one output scale)."""

    def reconstruct(self, x_BCHW: torch.Tensor) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        """(images coarse to fine, one per output side; code indices or None) for evaluation."""

    def last_layer(self) -> torch.Tensor:
        """The weight of the decoder's output layer (the adaptive GAN weight's reference)."""

    def no_weight_decay(self) -> set[str]:
        """Names of parameters kept out of weight decay besides biases and norms (timm's convention)."""
