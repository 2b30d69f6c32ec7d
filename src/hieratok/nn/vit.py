"""Pre-norm ViT blocks (timm-style), with stochastic depth and optional activation checkpointing."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, MaskLike

__all__ = ["DropPath", "Mlp", "Block", "Transformer"]


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        mlp_bias: bool = False,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=backend)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=mlp_bias)
        self.drop_path = DropPath(drop_path)

    def forward(self, x_BLD: torch.Tensor, mask: MaskLike = None) -> torch.Tensor:
        x_BLD = x_BLD + self.drop_path(self.attn(self.norm1(x_BLD), mask))
        return x_BLD + self.drop_path(self.mlp(self.norm2(x_BLD)))


class Transformer(nn.Module):
    """A stack of :class:`Block` with linearly increasing drop-path rate (0 .. ``drop_path``).

    ``grad_checkpointing`` recomputes each block in the backward pass (same results, less memory).
    """

    def __init__(
        self,
        depth: int,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        mlp_bias: bool = False,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        rates: Sequence[float] = [drop_path * i / (depth - 1) for i in range(depth)] if depth > 1 else [drop_path]
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias, mlp_bias, r, norm_eps, backend) for r in rates
        )
        self.grad_checkpointing = False

    def set_backend(self, backend: str) -> None:
        for b in self.blocks:
            b.attn.backend = backend

    def forward(self, x_BLD: torch.Tensor, mask: MaskLike = None) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x_BLD = checkpoint(blk, x_BLD, mask, use_reentrant=False)
            else:
                x_BLD = blk(x_BLD, mask)
        return x_BLD
