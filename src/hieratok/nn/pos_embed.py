"""Learnable absolute positional embeddings for multi-scale token maps (HieraTok appendix E).

A table at the largest grid (G x G) is area-pooled to each scale s (s x s), and a learnable
per-scale embedding is added: ``pos(s) = area(P, s) + e_s``. For a single scale this reduces to
a plain learnable ViT table plus a constant.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiScalePosEmbed"]


class MultiScalePosEmbed(nn.Module):
    """Positional embedding for a coarse-to-fine concatenation of s x s token maps.

    Args:
        grid: the largest grid side G.
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

    def forward(self) -> torch.Tensor:
        """Return the (1, L, D) embedding for the whole sequence, L = sum s^2."""
        parts = []
        for k, s in enumerate(self.scales):
            p_1DSS = self.pos_grid if s == self.grid else F.adaptive_avg_pool2d(self.pos_grid, s)
            parts.append(p_1DSS.flatten(2).transpose(1, 2) + self.scale_embed[k])  # (1, s*s, D)
        return torch.cat(parts, dim=1)
