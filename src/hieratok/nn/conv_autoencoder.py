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

Fast paths, each an attribute whose ``False`` gives the reference path (parity tests in
tests/nn/test_conv_fast_paths.py):

- ``ConvEncoder.channels_last`` / ``ConvDecoder.channels_last``: on CPU the convolutions run on
  channels-last tensors (oneDNN's native layout, about 20% faster there); outputs come back in
  the default layout.
- ``ConvResBlock.inplace_act``: when no gradient is recorded (``torch.no_grad`` /
  ``torch.inference_mode``), SiLU and the residual add run in place, which saves two
  full-resolution tensors (and their fresh-page faults) per block. Inside the encoder / decoder
  (whose intermediate maps nobody else holds) the second convolution of an identity block adds
  its output straight into the block input (oneDNN's convolution with a "sum" post-op,
  :func:`conv_add_`): one fewer full-resolution tensor and one fewer pass over it.
- ``ConvDecoder.fused_upsample``: nearest 2x upsampling followed by a 3x3 convolution equals,
  for each of the four output phases (row parity a, column parity b), a 2x2 convolution of the
  low-resolution map whose taps are sums of the 3x3 taps (:func:`upsample_conv_phase_weight`).
  The four phases run as one 2x2 convolution with 4x the output channels and are interleaved:
  16 instead of 36 multiply-adds per low-resolution pixel and channel pair, no upsampled input.
  Same result up to float rounding; gradients flow through it as well.

Legend: B batch, C channels, H height, W width.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_MKLDNN_CONV_ADD = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise_")

__all__ = ["ConvResBlock", "ConvEncoder", "ConvDecoder", "upsample_conv_phase_weight", "upsample_conv", "conv_add_"]


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
        self.inplace_act = True

    def forward(self, x_BCHW: torch.Tensor, owns_input: bool = False) -> torch.Tensor:
        """``owns_input``: the caller will not read ``x_BCHW`` again, so it may be overwritten."""
        inplace = self.inplace_act and not torch.is_grad_enabled()  # no graph records these tensors
        h = self.conv1(F.silu(self.norm1(x_BCHW), inplace=inplace))
        h = F.silu(self.norm2(h), inplace=inplace)
        if inplace and owns_input and self.nin_shortcut is None and _can_conv_add(x_BCHW, h):
            return conv_add_(x_BCHW, h, self.conv2)
        h = self.conv2(h)
        if self.nin_shortcut is not None:  # released-weights behaviour: shortcut of the branch output
            return h.add_(self.nin_shortcut(h)) if inplace else h + self.nin_shortcut(h)
        return h.add_(x_BCHW) if inplace else h + x_BCHW


def _can_conv_add(acc: torch.Tensor, x: torch.Tensor) -> bool:
    cl = torch.channels_last
    return (_MKLDNN_CONV_ADD and acc.device.type == "cpu" and acc.dtype == x.dtype == torch.float32
            and acc.is_contiguous(memory_format=cl) and x.is_contiguous(memory_format=cl))


def conv_add_(acc_BCHW: torch.Tensor, x_BCHW: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``acc += conv(x)`` in place, as one oneDNN convolution with a sum post-op (CPU, float32,
    channels-last, no autograd; ``acc`` must have the convolution's output shape)."""
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        acc_BCHW, x_BCHW, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation),
        conv.groups, "add", None, None, [], None)


def upsample_conv_phase_weight(weight_OI33: torch.Tensor) -> torch.Tensor:
    """2x2 kernels (4*O, I, 2, 2) of the four phases of "nearest 2x upsample, then 3x3 conv".

    Output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. low-resolution rows
    (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1; taps that land on the same row add up.
    Likewise for columns. Phase p = 2a + b occupies output channels [p*O, (p+1)*O).
    """
    w = weight_OI33
    rows = (torch.stack((w[:, :, 0], w[:, :, 1] + w[:, :, 2]), 2),  # a = 0: rows (i-1, i)
            torch.stack((w[:, :, 0] + w[:, :, 1], w[:, :, 2]), 2))  # a = 1: rows (i, i+1)
    out = []
    for r in rows:
        out.append(torch.stack((r[..., 0], r[..., 1] + r[..., 2]), -1))  # b = 0: cols (j-1, j)
        out.append(torch.stack((r[..., 0] + r[..., 1], r[..., 2]), -1))  # b = 1: cols (j, j+1)
    return torch.cat(out, 0)


def upsample_conv(x_BCHW: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3, stride-1, padding-1 conv,
    computed at the low resolution (see the module docstring); output in x's memory layout."""
    B, _, H, W = x_BCHW.shape
    O = conv.out_channels  # noqa: E741 (output channels, as the shape names use)
    bias = None if conv.bias is None else conv.bias.repeat(4)
    # 2x2 kernels with padding 1: output (H+1, W+1); phase (a, b) is the window starting at (a, b)
    r = F.conv2d(x_BCHW, upsample_conv_phase_weight(conv.weight), bias, padding=1)  # (B, 4O, H+1, W+1)
    fmt = torch.channels_last if x_BCHW.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty((B, O, 2 * H, 2 * W), dtype=r.dtype, device=r.device, memory_format=fmt)
    for a in (0, 1):
        for b in (0, 1):
            p = 2 * a + b
            out[:, :, a::2, b::2] = r[:, p * O:(p + 1) * O, a:a + H, b:b + W]
    return out


def _to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last and x.device.type == "cpu" and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


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
        self.channels_last = True

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(_to_layout(x_BCHW, self.channels_last))
        for i, level in enumerate(self.down):
            for blk in level.block:
                h = blk(h, owns_input=True)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, kernel_size=2, stride=2)
        for blk in self.mid:
            h = blk(h, owns_input=True)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()


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
        self.channels_last = True
        self.fused_upsample = True

    def forward(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(_to_layout(z_BCHW, self.channels_last))
        for blk in self.mid:
            h = blk(h, owns_input=True)
        for level in reversed(self.up):
            for blk in level.block:
                h = blk(h, owns_input=True)
            if level.upsample_conv is not None:
                if self.fused_upsample:
                    h = upsample_conv(h, level.upsample_conv)
                else:
                    h = level.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()
