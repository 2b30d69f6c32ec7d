"""Convolutional pixel encoder / decoder of the MaskGIT VQGAN (no attention layers).

Used by ResTok as the pixel front end (images -> a 256-channel map at stride 16) and back end
(that map -> images). Layout for ``channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2``
(MaskGIT / TiTok / ResTok)::

    encoder: conv3x3 3->128 | per level i: num_res_blocks ResBlocks to 128*mult[i], 2x2 avg-pool
             except after the last level | num_res_blocks ResBlocks | GroupNorm, SiLU, conv1x1 -> z
    decoder: conv3x3 z->512 | num_res_blocks ResBlocks | per level i = last..0: num_res_blocks
             ResBlocks to 128*mult[i], then (i > 0) nearest 2x upsample + conv3x3 | GroupNorm,
             SiLU, conv3x3 -> 3

The residual block is GroupNorm(32) -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3. When it
changes the width, the released MaskGIT/ResTok weights were trained with the 1x1 "shortcut"
applied to the *branch output* (``h + W h``, with W of shape (out, out)) rather than to the
block input; this module does the same so that those weights load and behave identically.

Parameter names (``conv_in``, ``down.i.block.j.norm1`` ..., ``mid.j``, ``up.i.upsample_conv``,
``norm_out``, ``conv_out``) follow the taming-transformers convention.

Legend: B batch, C channels, H height, W width.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvResBlock", "ConvEncoder", "ConvDecoder"]


def _conv(c_in: int, c_out: int, k: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=k, padding=k // 2, bias=bias)  # stride 1, "same" padding


class ConvResBlock(nn.Module):
    """Pre-activation residual block (see the module docstring for the width-changing case)."""

    def __init__(self, c_in: int, c_out: int, groups: int = 32, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = _conv(c_in, c_out, 3, bias=False)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = _conv(c_out, c_out, 3, bias=False)
        self.nin_shortcut = _conv(c_out, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BCHW)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:  # released-weights behaviour: shortcut of the branch output
            return h + self.nin_shortcut(h)
        return h + x_BCHW


class _Level(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, groups: int) -> None:
        super().__init__()
        self.block = nn.ModuleList(ConvResBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(num_res_blocks))


class ConvEncoder(nn.Module):
    """Images (B, in_channels, H, W) -> (B, z_channels, H/2^(n-1), W/2^(n-1)), n = len(channel_mult)."""

    def __init__(self, in_channels: int = 3, channels: int = 128, channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, groups: int = 32) -> None:
        super().__init__()
        mult = tuple(channel_mult)
        self.conv_in = _conv(in_channels, channels, 3, bias=False)
        c_ins = (1,) + mult
        self.down = nn.ModuleList(_Level(channels * c_ins[i], channels * mult[i], num_res_blocks, groups)
                                  for i in range(len(mult)))
        c_mid = channels * mult[-1]
        self.mid = nn.ModuleList(ConvResBlock(c_mid, c_mid, groups) for _ in range(num_res_blocks))
        self.norm_out = nn.GroupNorm(groups, c_mid, eps=1e-6)
        self.conv_out = _conv(c_mid, z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.down) - 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_BCHW)
        for i, level in enumerate(self.down):
            for blk in level.block:
                h = blk(h)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, kernel_size=2, stride=2)
        for blk in self.mid:
            h = blk(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _UpLevel(_Level):
    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, groups: int, upsample: bool) -> None:
        super().__init__(c_in, c_out, num_res_blocks, groups)
        self.upsample_conv = _conv(c_out, c_out, 3) if upsample else None


class ConvDecoder(nn.Module):
    """(B, z_channels, h, w) -> images (B, out_channels, h*2^(n-1), w*2^(n-1))."""

    def __init__(self, out_channels: int = 3, channels: int = 128, channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, groups: int = 32) -> None:
        super().__init__()
        mult = tuple(channel_mult)
        n = len(mult)
        c_top = channels * mult[-1]
        self.conv_in = _conv(z_channels, c_top, 3)
        self.mid = nn.ModuleList(ConvResBlock(c_top, c_top, groups) for _ in range(num_res_blocks))
        # up[i] works at level i (index order as the encoder); it runs from i = n-1 down to 0
        self.up = nn.ModuleList(
            _UpLevel(channels * (mult[i + 1] if i < n - 1 else mult[-1]), channels * mult[i], num_res_blocks, groups,
                     upsample=i > 0)
            for i in range(n)
        )
        self.norm_out = nn.GroupNorm(groups, channels * mult[0], eps=1e-6)
        self.conv_out = _conv(channels * mult[0], out_channels, 3)

    def forward(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z_BCHW)
        for blk in self.mid:
            h = blk(h)
        for level in reversed(self.up):
            for blk in level.block:
                h = blk(h)
            if level.upsample_conv is not None:
                h = level.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
