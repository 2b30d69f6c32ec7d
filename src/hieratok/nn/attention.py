"""Multi-head self-attention with one module and three interchangeable backends.

Backends (all compute softmax(q k^T / sqrt(d) + mask) v):

- ``"reference"``: explicit scores and softmax in float32; the ground truth for parity tests.
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` with the dense boolean mask
  (or no mask for full attention, which lets it pick the flash / fused kernels).
- ``"flex"``: FlexAttention with a block-sparse ``BlockMask`` built from the same mask rule
  (compiled on CUDA; eager elsewhere, which is slow and only meant for parity tests).

Legend: B batch, L tokens, D width, H heads, K head dim.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ATTENTION_BACKENDS", "Attention", "attention_reference", "attention"]

ATTENTION_BACKENDS = ("sdpa", "reference", "flex")

try:  # FlexAttention exists from torch 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - torch < 2.5 is outside our supported range
    BlockMask, flex_attention = None, None

MaskLike = Union[None, torch.Tensor, "BlockMask"]
_compiled_flex = None


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Plain softmax attention in at least float32. q, k, v: (B, H, L, K); mask: bool (L, L) or None."""
    dtype = q.dtype
    work = torch.promote_types(dtype, torch.float32)
    q, k, v = q.to(work), k.to(work), v.to(work)
    s_BHLL = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        s_BHLL = s_BHLL.masked_fill(~mask, float("-inf"))
    return (s_BHLL.softmax(dim=-1) @ v).to(dtype)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: "BlockMask") -> torch.Tensor:
    global _compiled_flex
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    return flex_attention(q, k, v, block_mask=block_mask)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskLike, backend: str) -> torch.Tensor:
    """Dispatch to a backend. ``mask`` is a bool (L, L) tensor for sdpa/reference, a BlockMask for flex."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "reference":
        return attention_reference(q, k, v, mask)
    if backend == "flex":
        if flex_attention is None:
            raise RuntimeError("attention backend 'flex' needs torch >= 2.5")
        return _flex(q, k, v, mask)
    raise ValueError(f"attention backend {backend!r} is not one of {ATTENTION_BACKENDS}")


class Attention(nn.Module):
    """Multi-head self-attention (fused qkv projection, output projection).

    Args:
        dim: model width D.
        num_heads: H, must divide D.
        qkv_bias: bias on the qkv projection (HieraTok: False).
        backend: one of :data:`ATTENTION_BACKENDS`; can be changed after construction.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, backend: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BLD: torch.Tensor, mask: MaskLike = None) -> torch.Tensor:
        B, L, D = x_BLD.shape
        qkv = self.qkv(x_BLD).reshape(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, K)
        o_BHLK = attention(q, k, v, mask, self.backend)
        return self.proj(o_BHLK.transpose(1, 2).reshape(B, L, D))
