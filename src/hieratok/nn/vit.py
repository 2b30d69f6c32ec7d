"""Pre-norm ViT blocks (timm-style), with stochastic depth and optional activation checkpointing.

Fast paths, each with a switch that gives its reference path (parity tests in tests/nn):

- :class:`Mlp` applies GELU in place when no gradient is needed (``inplace_act``);
- :class:`Transformer` turns a dense boolean mask into a
  :class:`~hieratok.nn.attention.SegmentedMask` once (cached while the same mask object comes
  back), so SDPA runs per scale segment instead of masking every score (``segment_masks``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, MaskLike, SegmentedMask, segment_mask

__all__ = ["DropPath", "Mlp", "Block", "Transformer"]


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


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2.

    Fast path (``inplace_act``; ``False`` is the reference path): when no gradient flows through
    fc1's output (inference), the GELU runs in place on it, which saves one (B, L, hidden) tensor
    per block, and inputs of more than :attr:`CHUNK_BYTES` of hidden activations run in row
    chunks. The chunks keep every hidden tensor below glibc's 32 MiB mmap threshold, so it is
    recycled from the heap instead of being mapped fresh and page-faulted in on each call (on a
    2-core VM, 40 MB of fresh pages cost about 60 ms: ResTok's last encoder stage, 2432 x 4096).
    """

    CHUNK_BYTES = 16 * 2**20

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.inplace_act = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.inplace_act and type(self.act) is nn.GELU and not torch.is_grad_enabled()):
            return self.fc2(self.act(self.fc1(x)))
        rows = x.numel() // x.shape[-1]
        chunks = -(-rows * self.fc1.out_features * x.element_size() // self.CHUNK_BYTES)
        if chunks <= 1:
            return self._inplace(x)
        flat, step = x.reshape(rows, x.shape[-1]), -(-rows // chunks)
        out = torch.cat([self._inplace(flat[s:s + step]) for s in range(0, rows, step)])
        return out.view(*x.shape[:-1], out.shape[-1])

    def _inplace(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.ops.aten.gelu_(self.fc1(x), approximate=self.act.approximate))


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
    ``segment_masks`` (default True) runs a dense boolean mask as a :class:`SegmentedMask` when it
    has that short form (the scale masks do); masks are treated as immutable once passed in.
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
        self.segment_masks = True
        self._segmented: Optional[tuple[torch.Tensor, Optional[SegmentedMask]]] = None  # (mask, its segments)

    def set_backend(self, backend: str) -> None:
        for b in self.blocks:
            b.attn.backend = backend

    def _block_mask(self, mask: MaskLike) -> MaskLike:
        """The mask the blocks get: the segmented form of a dense bool mask where it has one."""
        if not (self.segment_masks and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.ndim == 2):
            return mask  # per-sample / per-head masks go to the backend as they are
        if mask.is_meta or torch.compiler.is_compiling():  # no data to analyse / keep graphs free of host syncs
            return mask
        if self._segmented is None or self._segmented[0] is not mask:
            self._segmented = (mask, segment_mask(mask))
        seg = self._segmented[1]
        return mask if seg is None else seg

    def forward(self, x_BLD: torch.Tensor, mask: MaskLike = None) -> torch.Tensor:
        mask = self._block_mask(mask)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x_BLD = checkpoint(blk, x_BLD, mask, use_reentrant=False)
            else:
                x_BLD = blk(x_BLD, mask)
        return x_BLD
