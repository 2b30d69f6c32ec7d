"""Multi-head self-attention with one module and three interchangeable backends.

Backends (all compute softmax(q k^T / sqrt(d) + mask) v):

- ``"reference"``: explicit scores and softmax in float32; the ground truth for parity tests.
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` with the dense boolean mask
  (or no mask for full attention, which lets it pick the flash / fused kernels). Given a
  :class:`SegmentedMask` it runs one call per segment of queries instead (fast path, below).
- ``"flex"``: FlexAttention with a block-sparse ``BlockMask`` built from the same mask rule
  (compiled on CUDA; eager elsewhere, which is slow and only meant for parity tests).

Segmented masks (the fast path for the scale masks): a coarse-to-fine scale-causal mask is
block-lower-triangular (scale k's queries see the keys of scales <= k), a scale-independent one
block-diagonal. :func:`segment_mask` cuts the queries into a few segments, each with the key range
its rows use and a sub-mask only where that block is not all True; SDPA then runs once per segment.
On scales [1, 2, 4, 8, 16] the 256 finest queries (75% of them) attend to their keys with no mask,
and fewer query-key pairs are computed (81% of L^2 for scale-causal, which allows 80%; 63% for
scale-independent, which allows 60%). The dense masked call is its reference path (same result
up to float rounding; tests/nn/test_attention_segments.py).

Legend: B batch, L tokens, D width, H heads, K head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ATTENTION_BACKENDS", "Attention", "MaskSegment", "SegmentedMask", "attention_reference", "attention", "segment_mask"]

ATTENTION_BACKENDS = ("sdpa", "reference", "flex")

try:  # FlexAttention exists from torch 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - torch < 2.5 is outside our supported range
    BlockMask, flex_attention = None, None

_compiled_flex = None


class MaskSegment(NamedTuple):
    """Queries ``q0:q1`` attend to keys ``k0:k1`` only, under ``mask`` (bool (q1-q0, k1-k0)) or
    to all of them when ``mask`` is None."""

    q0: int
    q1: int
    k0: int
    k1: int
    mask: Optional[torch.Tensor]


@dataclass(frozen=True, eq=False)
class SegmentedMask:
    """A boolean mask stored both densely and as query segments with their key ranges.

    Attributes:
        dense: the (Lq, Lk) bool mask, True where attention is allowed (used by non-sdpa backends).
        segments: :class:`MaskSegment` s covering the queries in order.
    """

    dense: torch.Tensor
    segments: tuple[MaskSegment, ...]

    def __repr__(self) -> str:
        segs = ", ".join(f"q[{s.q0}:{s.q1}]->k[{s.k0}:{s.k1}]{'' if s.mask is None else ' masked'}" for s in self.segments)
        return f"SegmentedMask({tuple(self.dense.shape)}: {segs})"


MaskLike = Union[None, torch.Tensor, SegmentedMask, "BlockMask"]


def segment_mask(mask: torch.Tensor, merge_queries: int = 128, max_segments: int = 16) -> Optional[SegmentedMask]:
    """Split a bool (Lq, Lk) mask into query segments, each over the key range its rows use.

    Consecutive queries with the same first and last allowed key form a run; neighbouring runs are
    merged while the merged segment has at most ``merge_queries`` queries (a masked call on a small
    block costs less than several tiny calls), and a segment keeps a sub-mask only where its block
    is not all True. For the scale-causal mask on [1, 2, 4, 8, 16] this gives two segments: the 85
    coarse queries over the first 85 keys (masked) and the 256 finest over all 341 (unmasked).

    Returns None when some query allows no key (SDPA gives NaN rows there; the dense path keeps
    that behaviour) or when more than ``max_segments`` segments would be needed. Syncs with the
    device a few times: build once per mask and reuse.
    """
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"segment_mask expects a 2-d bool mask, got {mask.dtype} of shape {tuple(mask.shape)}")
    Lq, Lk = mask.shape
    idx = torch.arange(Lk, device=mask.device)
    lo = torch.where(mask, idx, Lk).amin(dim=1)  # (Lq,) first allowed key
    hi = torch.where(mask, idx + 1, 0).amax(dim=1)  # (Lq,) one past the last allowed key
    if not bool((hi > lo).all()):
        return None
    new = torch.ones(Lq, dtype=torch.bool, device=mask.device)
    new[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])  # a run starts where the key range changes
    starts = new.nonzero().flatten().tolist() + [Lq]
    bounds = [0]  # segment boundaries over the queries
    for a, b in zip(starts[:-1], starts[1:]):
        if a > bounds[-1] and b - bounds[-1] > merge_queries:
            bounds.append(a)
    bounds.append(Lq)
    if len(bounds) - 1 > max_segments:
        return None
    lo_l, hi_l = lo.tolist(), hi.tolist()
    segments = []
    for q0, q1 in zip(bounds[:-1], bounds[1:]):
        k0, k1 = min(lo_l[q0:q1]), max(hi_l[q0:q1])
        sub = mask[q0:q1, k0:k1]
        segments.append(MaskSegment(q0, q1, k0, k1, None if bool(sub.all()) else sub))
    return SegmentedMask(mask, tuple(segments))


def _sdpa_segmented(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: tuple[MaskSegment, ...]) -> torch.Tensor:
    """One SDPA call per segment; output (B, H, L, K), laid out as (B, L, H, K) in memory."""
    if len(segments) == 1:
        s = segments[0]
        return F.scaled_dot_product_attention(q, k[:, :, s.k0:s.k1], v[:, :, s.k0:s.k1], attn_mask=s.mask)
    outs = [F.scaled_dot_product_attention(q[:, :, s.q0:s.q1], k[:, :, s.k0:s.k1], v[:, :, s.k0:s.k1], attn_mask=s.mask)
            for s in segments]
    # concatenate in the (B, L, H, K) layout the output projection reads, so its reshape is free
    return torch.cat([o.transpose(1, 2) for o in outs], dim=1).transpose(1, 2)


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
    """Dispatch to a backend. ``mask`` is a bool (L, L) tensor or a :class:`SegmentedMask` for
    sdpa/reference (reference uses its dense form), a BlockMask for flex."""
    if isinstance(mask, SegmentedMask):
        if backend == "sdpa":
            return _sdpa_segmented(q, k, v, mask.segments)
        mask = mask.dense
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "reference":
        return attention_reference(q, k, v, mask)
    if backend == "flex":
        if flex_attention is None:
            raise RuntimeError("attention backend 'flex' needs torch >= 2.5")
        if isinstance(mask, torch.Tensor):
            raise TypeError("attention backend 'flex' takes a BlockMask (torch.nn.attention.flex_attention."
                            "create_block_mask) or None, not a dense tensor mask")
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
