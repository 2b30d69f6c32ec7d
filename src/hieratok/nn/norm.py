"""Normalisation layers not in torch.nn."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm2d"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, H, W) map (as in ViTDet / ConvNeXt)."""

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x = x_BCHW.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
