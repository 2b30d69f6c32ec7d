"""Patchify / unpatchify between images and token grids."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PatchEmbed", "unpatchify"]


class PatchEmbed(nn.Module):
    """Conv patch embedding: (B, C, H, W) -> (B, H/p * W/p, D)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)


def unpatchify(x_BLK: torch.Tensor, side: int | tuple[int, int], patch_size: int, channels: int = 3) -> torch.Tensor:
    """(B, h*w, p*p*C) patches in row-major order -> (B, C, h*p, w*p) image; ``side`` is the grid
    (h, w), or one int for a square grid.

    Patch vectors are laid out (p, p, C), the inverse of the usual ViT/MAE patchify.
    """
    B = x_BLK.shape[0]
    p = patch_size
    h, w = (side, side) if isinstance(side, int) else side
    x = x_BLK.reshape(B, h, w, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(B, channels, h * p, w * p)
