"""Pre-norm ViT blocks (timm-style) and what every transformer stack here shares.

- :class:`Block` / :class:`Transformer`: LayerNorm -> :class:`~hieratok.nn.attention.Attention` ->
  LayerNorm -> :class:`~hieratok.nn.mlp.Mlp` with stochastic depth (HieraTok's encoder and decoder);
- :func:`checkpointed`: the block runner with activation checkpointing that every stack uses;
- :func:`set_attention_backend` / :func:`set_fast_paths`: switch every attention layer (and MLP,
  prepacked linear) of a model at once.

Masks reach the blocks as a :class:`~hieratok.nn.masks.MaskSpec`; each attention layer resolves
it for its backend (:func:`hieratok.nn.attention.resolve_mask`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, MaskLike, check_backend
from .linear import Linear
from .mlp import Mlp

__all__ = ["DropPath", "Block", "Transformer", "checkpointed", "set_attention_backend", "set_fast_paths"]


def checkpointed(enabled: bool, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``fn(*args)``, recomputed in the backward pass when ``enabled`` and autograd is on (same
    results, less memory). Callers pass ``enabled = grad_checkpointing and training``."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def set_attention_backend(model: nn.Module, backend: str) -> None:
    """Switch every :class:`Attention` in ``model`` to ``backend``."""
    check_backend(backend)
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = backend


def set_fast_paths(model: nn.Module, enabled: bool = True) -> None:
    """Switch the transformer fast paths of ``model`` on (default) or to their reference paths:
    structural masks and complex RoPE (:class:`Attention`), in-place GELU (:class:`Mlp`) and
    prepacked CPU linears (:class:`~hieratok.nn.linear.Linear`)."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.segment_masks = m.fast_rope = enabled
        elif isinstance(m, Mlp):
            m.inplace_act = enabled
        elif isinstance(m, Linear):
            m.fast = enabled


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``.

    The draws come from torch's global generator (``torch.manual_seed`` makes training runs
    repeatable); in eval mode it is the identity."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


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

    def forward(self, x_BLD: torch.Tensor, mask: MaskLike = None) -> torch.Tensor:
        for blk in self.blocks:
            x_BLD = checkpointed(self.grad_checkpointing and self.training, blk, x_BLD, mask)
        return x_BLD
