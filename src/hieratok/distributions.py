"""Diagonal Gaussian posterior of a KL-VAE (as in LDM's ``DiagonalGaussianDistribution``)."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["DiagonalGaussian"]


class DiagonalGaussian:
    """N(mean, exp(logvar)) per element of a (B, C, H, W) latent.

    Args:
        params_B2CHW: encoder output, mean and log-variance stacked on dim 1.
        logvar_range: clamp for the log-variance (numerical safety, as in LDM).
    """

    def __init__(self, params_B2CHW: torch.Tensor, logvar_range: tuple[float, float] = (-30.0, 20.0)) -> None:
        self.mean, logvar = params_B2CHW.chunk(2, dim=1)
        self.logvar = logvar.clamp(*logvar_range)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Reparameterised sample mean + std * eps; ``generator`` makes it reproducible.

        eps is drawn on ``generator``'s device (a CPU generator also serves a CUDA latent) and moved.
        """
        src = self.mean.device if generator is None else generator.device
        eps = torch.randn(self.mean.shape, generator=generator, device=src, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The mean (the latent used for generation and evaluation)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over all latent elements, shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(dim=1)
