"""Latent normalisation and seeded noise shared by the generator objectives.

A generator never sees raw tokenizer latents: it works on ``(z - mean) / std`` with per-channel
statistics measured on the latent cache. The statistics are fields of the generator's config
(``DiTConfig.latent_mean`` / ``latent_std``), so they travel with the checkpoint and no bare scale
constant (the SD-VAE ``0.18215`` kind) exists anywhere.

Legend: N latents, B batch, C latent channels, H/W latent grid.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["LatentNormalizer", "randn", "rand"]


def _draw(fn, shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device | str | None,
          dtype: torch.dtype) -> torch.Tensor:
    # Draw on the generator's own device, then move: a CPU generator then gives the same numbers
    # whatever device the model runs on (reproducible runs across CPU and CUDA).
    src = generator.device if generator is not None else device
    out = fn(tuple(shape), generator=generator, device=src, dtype=dtype)
    return out.to(device) if device is not None else out


def randn(shape: Sequence[int], generator: Optional[torch.Generator] = None, device: torch.device | str | None = None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise from ``generator`` (drawn on its device), placed on ``device``."""
    return _draw(torch.randn, shape, generator, device, dtype)


def rand(shape: Sequence[int], generator: Optional[torch.Generator] = None, device: torch.device | str | None = None,
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform [0, 1) numbers from ``generator`` (drawn on its device), placed on ``device``."""
    return _draw(torch.rand, shape, generator, device, dtype)


class LatentNormalizer:
    """Per-channel affine map between tokenizer latents and the generator's working space.

    ``normalize(z) = (z - mean) / std`` and ``denormalize`` is its inverse; with no statistics it is
    the identity.

    Args:
        mean: per-channel means, length C (or None with ``std`` None for the identity).
        std: per-channel standard deviations, length C, all > 0.

    Example:
        >>> norm = LatentNormalizer.from_latents(z_NCHW)           # statistics of the latent cache
        >>> cfg = DiT.preset_config("dit-xl", **norm.config_fields())
    """

    def __init__(self, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> None:
        if (mean is None) != (std is None):
            raise ValueError("give both latent mean and latent std, or neither (identity)")
        if mean is None:
            self.mean: Optional[torch.Tensor] = None
            self.std: Optional[torch.Tensor] = None
            return
        m = torch.as_tensor(mean, dtype=torch.float64).flatten()
        s = torch.as_tensor(std, dtype=torch.float64).flatten()
        if m.numel() != s.numel() or m.numel() == 0:
            raise ValueError(f"latent mean and std must be non-empty and of equal length, got {m.numel()} and {s.numel()}")
        if not bool(torch.isfinite(m).all()) or not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
            raise ValueError("latent std must be finite and > 0 and latent mean finite")
        self.mean, self.std = m, s

    @classmethod
    def from_latents(cls, z_NCHW: torch.Tensor) -> "LatentNormalizer":
        """Per-channel mean and std (population) of a stack of latents (N, C, H, W)."""
        if z_NCHW.ndim != 4:
            raise ValueError(f"expected latents of shape (N, C, H, W), got {tuple(z_NCHW.shape)}")
        z = z_NCHW.detach().to(torch.float64).transpose(0, 1).flatten(1)  # (C, N*H*W)
        return cls(z.mean(dim=1).tolist(), z.std(dim=1, unbiased=False).clamp_min(1e-12).tolist())

    @property
    def is_identity(self) -> bool:
        return self.mean is None

    @property
    def num_channels(self) -> Optional[int]:
        return None if self.mean is None else self.mean.numel()

    def config_fields(self) -> dict[str, Optional[tuple[float, ...]]]:
        """``{"latent_mean": ..., "latent_std": ...}`` for a generator config."""
        if self.mean is None:
            return {"latent_mean": None, "latent_std": None}
        return {"latent_mean": tuple(self.mean.tolist()), "latent_std": tuple(self.std.tolist())}

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.ndim < 2 or z.shape[1] != self.mean.numel():
            raise ValueError(f"latents have {z.shape[1] if z.ndim >= 2 else '?'} channels, the normalizer {self.mean.numel()}")
        shape = (1, -1) + (1,) * (z.ndim - 2)
        m = self.mean.to(dtype=z.dtype).to(z.device).view(shape)
        s = self.std.to(dtype=z.dtype).to(z.device).view(shape)
        return m, s

    def normalize(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        """Tokenizer latents -> generator space."""
        if self.mean is None:
            return z_BCHW
        m, s = self._stats(z_BCHW)
        return (z_BCHW - m) / s

    def denormalize(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Generator space -> tokenizer latents."""
        if self.mean is None:
            return x_BCHW
        m, s = self._stats(x_BCHW)
        return x_BCHW * s + m

    def __repr__(self) -> str:
        return "LatentNormalizer(identity)" if self.mean is None else f"LatentNormalizer(C={self.mean.numel()})"
