"""Learnable absolute positional embeddings, resampled to any token grid.

* :func:`resample_grid`: a learned (1, D, G, G) table brought to another grid (h, w) by bicubic
  interpolation (antialiased when shrinking), as timm's ``resample_abs_pos_embed`` does for
  ViTs at a new image size; the table itself at its own grid (no arithmetic, so outputs at the
  training size are unchanged).
* :class:`MultiScalePosEmbed` (HieraTok appendix E): a table at the largest grid (G x G) is
  area-pooled to each scale s (s x s), and a learnable per-scale embedding is added:
  ``pos(s) = area(P, s) + e_s``. For a rectangular full grid (Gh, Gw) the table is first
  resampled to (Gh, Gw), then area-pooled to each scale's (h, w). For a single scale this reduces
  to a plain learnable ViT table plus a constant.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiScalePosEmbed", "resample_grid"]


def resample_grid(table_1DGG: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (1, D, Gh0, Gw0) table at grid ``size`` = (h, w): itself when the grid is unchanged, else bicubic
    (antialiased, so a smaller grid averages rather than aliases), as timm resamples ViT positions."""
    if tuple(table_1DGG.shape[-2:]) == tuple(size):
        return table_1DGG
    return F.interpolate(table_1DGG.float(), size=size, mode="bicubic", align_corners=False,
                         antialias=True).to(table_1DGG.dtype)


class MultiScalePosEmbed(nn.Module):
    """Positional embedding for a coarse-to-fine concatenation of token maps.

    Args:
        grid: the largest grid side G (training size).
        dim: embedding width D.
        scales: grid sides, coarse to fine.
        init_std: std of the truncated-normal init.
    """

    def __init__(self, grid: int, dim: int, scales: Sequence[int], init_std: float = 0.02) -> None:
        super().__init__()
        self.grid, self.scales = grid, tuple(scales)
        self.pos_grid = nn.Parameter(torch.zeros(1, dim, grid, grid))  # (1, D, G, G)
        self.scale_embed = nn.Parameter(torch.zeros(len(self.scales), dim))  # (S, D)
        nn.init.trunc_normal_(self.pos_grid, std=init_std)
        nn.init.trunc_normal_(self.scale_embed, std=init_std)

    def forward(self, shapes: Optional[Sequence[tuple[int, int]]] = None) -> torch.Tensor:
        """Return the (1, L, D) embedding for the whole sequence, L = sum h*w over the scales'
        ``shapes`` (coarse to fine, the last one the full grid; default: the training grid's s x s)."""
        shapes = [(s, s) for s in self.scales] if shapes is None else [tuple(hw) for hw in shapes]
        if len(shapes) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} scale shapes, got {shapes}")
        full = resample_grid(self.pos_grid, shapes[-1])  # (1, D, Gh, Gw)
        parts = []
        for k, hw in enumerate(shapes):
            p_1Dhw = full if hw == tuple(full.shape[-2:]) else F.adaptive_avg_pool2d(full, hw)
            parts.append(p_1Dhw.flatten(2).transpose(1, 2) + self.scale_embed[k])  # (1, h*w, D)
        return torch.cat(parts, dim=1)
