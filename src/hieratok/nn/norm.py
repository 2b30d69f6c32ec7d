"""Normalisation layers not in torch.nn."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm2d", "RMSNorm", "fold_batchnorm", "fold_batchnorm_into"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, H, W) map (as in ViTDet / ConvNeXt)."""

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x = x_BCHW.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, then cast back and scaled (as in LlamaGen)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the convolution before it, in place.

    ``bn(conv(x)) == conv'(x)`` with ``w' = w * s`` and ``b' = (b - mean) * s + beta`` per output
    channel, ``s = gamma / sqrt(var + eps)``: the same function with its running statistics
    frozen, up to float rounding. The caller then replaces ``bn`` with an identity
    (:func:`fold_batchnorm_into` does both).
    """
    scale_C = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias_C = bn.bias - bn.running_mean * scale_C
    if conv.bias is not None:
        bias_C = bias_C + conv.bias * scale_C
    conv.weight = nn.Parameter(conv.weight * scale_C.view(-1, 1, 1, 1), requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(bias_C, requires_grad=conv.weight.requires_grad)


def fold_batchnorm_into(parent: nn.Module, conv: str, bn: str) -> None:
    """Fold ``parent.<bn>`` into ``parent.<conv>`` (:func:`fold_batchnorm`) and put an identity in
    its place; nothing happens when ``parent.<bn>`` is no longer a BatchNorm (already folded)."""
    if isinstance(getattr(parent, bn), nn.BatchNorm2d):
        fold_batchnorm(getattr(parent, conv), getattr(parent, bn))
        setattr(parent, bn, nn.Identity())
