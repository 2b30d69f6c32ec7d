"""Vector quantisation with a straight-through estimator (VQ-VAE, van den Oord et al. 2017).

For a vector ``z`` and a codebook ``{e_k}`` (optionally both l2-normalised, as in ViT-VQGAN /
TiTok / ResTok, where the nearest code is then the one of largest cosine similarity):

* index ``k* = argmin_k ||z - e_k||^2``, quantised vector ``q = e_k*``;
* codebook loss ``mean((q - sg[z])^2)`` (moves codes towards the encoder outputs);
* commitment loss ``mean((sg[q] - z)^2)`` (keeps the encoder near its codes);
* ``loss = codebook_loss + beta * commitment_loss``;
* straight-through output ``z + sg[q - z]``: equal to ``q`` in value, with the gradient of ``z``.

Distances and losses are computed in float32 with autocast off. Optional usage tracking counts
indices in a :class:`~hieratok.metrics.codebook.CodebookUsage` (usage, entropy H_C, perplexity).

Legend: K codes, D code dim, ``...`` any leading shape.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import require_positive_ints
from ..metrics.codebook import CodebookStats, CodebookUsage

__all__ = ["VQOutput", "VectorQuantizer"]


@dataclass
class VQOutput:
    """Result of :meth:`VectorQuantizer.forward`.

    Attributes:
        quantized: straight-through quantised vectors (..., D), float32.
        indices: code indices (...), int64.
        loss: ``codebook_loss + beta * commitment_loss`` (scalar).
        commitment_loss: ``mean((sg[q] - z)^2)``, unweighted.
        codebook_loss: ``mean((q - sg[z])^2)``.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor


def _fp32_region(device_type: str) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantiser over the last axis.

    Args:
        codebook_size: codebook size K.
        dim: code dimension D.
        l2_normalized: normalise inputs and codes to unit length before the search and in the
            output (ResTok / TiTok: True).
        beta: weight of the commitment loss (0.25).
        track_usage: count every index seen in :meth:`forward` (see :meth:`usage_stats`).

    The codebook is ``embedding.weight`` (K, D), initialised uniform in [-1/K, 1/K] as in
    VQ-VAE implementations.
    """

    def __init__(self, codebook_size: int, dim: int, l2_normalized: bool = True, beta: float = 0.25,
                 track_usage: bool = False) -> None:
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        require_positive_ints(self, ("codebook_size", "dim"))
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.l2_normalized, self.beta = l2_normalized, float(beta)
        self.embedding = nn.Embedding(codebook_size, dim)
        self.reset_parameters()
        self.usage: Optional[CodebookUsage] = None
        if track_usage:
            self.track_usage(True)

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.embedding.weight, -1.0 / self.codebook_size, 1.0 / self.codebook_size)

    # ---- codebook ------------------------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        """The code vectors (K, D) in float32, normalised when ``l2_normalized``."""
        e = self.embedding.weight.float()
        return F.normalize(e, dim=-1) if self.l2_normalized else e

    def _check(self, z: torch.Tensor) -> None:
        if z.ndim < 1 or z.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of shape (..., {self.dim}), got {tuple(z.shape)}")

    def _search(self, z_ND: torch.Tensor, e_KD: torch.Tensor) -> torch.Tensor:
        # ||z||^2 + ||e||^2 - 2 z.e, float32 (the sums are constant per row / column)
        d_NK = z_ND.square().sum(1, keepdim=True) + e_KD.square().sum(1)[None, :] - 2.0 * (z_ND @ e_KD.t())
        return d_NK.argmin(dim=1)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code index of every vector: (..., D) -> (...) int64."""
        self._check(z)
        with _fp32_region(z.device.type), torch.no_grad():
            z_ND = z.detach().float().reshape(-1, self.dim)
            if self.l2_normalized:
                z_ND = F.normalize(z_ND, dim=-1)
            return self._search(z_ND, self.codebook()).reshape(z.shape[:-1])

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors of indices: (...) -> (..., D) float32 (normalised when ``l2_normalized``)."""
        if indices.is_floating_point():
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return F.embedding(indices.long(), self.codebook())

    def forward(self, z: torch.Tensor) -> VQOutput:
        """Quantise ``z`` (..., D); see the module docstring for the outputs and losses."""
        self._check(z)
        with _fp32_region(z.device.type):
            z = z.float()
            if self.l2_normalized:
                z = F.normalize(z, dim=-1)
            e_KD = self.codebook()
            idx = self._search(z.detach().reshape(-1, self.dim), e_KD.detach()).reshape(z.shape[:-1])
            q = F.embedding(idx, e_KD)  # (..., D), differentiable w.r.t. the codebook
            commitment = (q.detach() - z).square().mean()
            codebook = (q - z.detach()).square().mean()
            out = z + (q - z).detach()
        if self.usage is not None:
            self.usage.update(idx.detach())
        return VQOutput(out, idx, codebook + self.beta * commitment, commitment, codebook)

    # ---- usage statistics ----------------------------------------------------------------------
    def track_usage(self, enabled: bool = True) -> None:
        """Start (fresh counts) or stop counting the indices of :meth:`forward`."""
        self.usage = CodebookUsage(self.codebook_size, device=self.embedding.weight.device) if enabled else None

    def reset_usage(self) -> None:
        if self.usage is not None:
            self.usage.reset()

    def usage_stats(self) -> CodebookStats:
        """Usage, entropy (H_C) and perplexity of the indices counted since tracking started."""
        if self.usage is None:
            raise RuntimeError("usage tracking is off; call track_usage(True) first")
        return self.usage.compute()

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, dim={self.dim}, l2_normalized={self.l2_normalized}, beta={self.beta}"
