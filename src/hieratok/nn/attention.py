"""Multi-head self-attention: one module, three interchangeable backends, structural masks.

:class:`Attention` covers every transformer in the library: a fused qkv projection (with a bias,
none, or ResTok's q/v-only bias), optional LayerNorm on q and k per head, optional rotary
positions (:mod:`hieratok.nn.rope`), an optional :class:`KVCache` for decoding, and an output
projection. It takes the queries of all rows or of the rows from ``q_from`` on (keys always
come from every row).

Backends (all compute softmax(q k^T / sqrt(d) + mask) v):

- ``"reference"``: explicit scores and softmax in float32; the ground truth for parity tests.
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` with the dense boolean mask
  (or no mask where every query sees every key, which lets it pick the flash / fused kernels).
  Given a :class:`SegmentedMask` it runs one call per segment of queries instead (fast path).
- ``"flex"``: FlexAttention with a block-sparse ``BlockMask`` built from the same rule
  (compiled on CUDA; eager elsewhere, which is slow and only meant for parity tests).

Masks are passed as a :class:`~hieratok.nn.masks.MaskSpec` (block sizes and a rule) and
:func:`resolve_mask` turns it into what the backend runs, once per spec, backend, device and
query rows: the dense tensor (reference), a :class:`SegmentedMask` (sdpa) or a ``BlockMask``
(flex), and None where the rows asked for see every key (a block-causal decoding step).
Segmented masks are the fast path for the block masks: a coarse-to-fine scale-causal mask is
block-lower-triangular, a scale-independent one block-diagonal; on scales [1, 2, 4, 8, 16] the
256 finest queries (75% of them) attend to their keys with no mask, and fewer query-key pairs
are computed (81% of L^2 for scale-causal, which allows 80%; 63% for scale-independent, which
allows 60%). ``Attention.segment_masks = False`` is the reference path (the dense mask; parity:
tests/nn/test_attention_segments.py). A dense bool tensor or a ``BlockMask`` can also be passed
as is.

Legend: B batch, L tokens, D width, H heads, K head dim, T cached + new positions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .masks import MaskSpec
from .rope import Table, apply_rope, apply_rope_reference

__all__ = [
    "ATTENTION_BACKENDS", "Attention", "KVCache", "MaskSegment", "SegmentedMask", "attention_reference", "attention",
    "check_backend", "resolve_mask",
]

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


MaskLike = Union[None, torch.Tensor, SegmentedMask, "BlockMask", MaskSpec]
MAX_SEGMENTS = 16  # more SDPA calls than this cost more than one masked call


def check_backend(backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attn_backend {backend!r} is not one of {ATTENTION_BACKENDS}")
    return backend


def resolve_mask(mask: MaskLike, backend: str, device: torch.device | str, q0: int = 0, q1: Optional[int] = None,
                 segmented: bool = True) -> MaskLike:
    """What ``backend`` runs for the query rows ``[q0, q1)`` of ``mask`` over the keys they see.

    A :class:`MaskSpec` becomes None where those rows see every key (the keys are then
    ``[0, spec.key_end(q0, q1))``), else a BlockMask (flex), a :class:`SegmentedMask` (sdpa,
    when ``segmented`` and at most :data:`MAX_SEGMENTS` calls) or the dense bool tensor. The
    result is cached per spec, backend, device and rows. Anything else is returned as it is.
    """
    if not isinstance(mask, MaskSpec):
        return mask
    q1 = mask.length if q1 is None else q1
    if mask.sees_all_keys(q0, q1) and (segmented or backend == "flex"):
        return None
    if torch.compiler.is_compiling():  # keep compiled graphs free of Python-side caches
        return _build_mask(mask, backend, torch.device(device), q0, q1, False)
    return _cached_mask(mask, backend, torch.device(device), q0, q1, segmented)


def _build_mask(spec: MaskSpec, backend: str, device: torch.device, q0: int, q1: int, segmented: bool) -> MaskLike:
    k1 = spec.key_end(q0, q1)
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(spec.mask_mod(device, q0), None, None, q1 - q0, k1, device=device)
    dense = spec.dense(device, q0, q1, k1)
    if backend == "sdpa" and segmented:
        segs = spec.segments(q0, q1)
        if len(segs) <= MAX_SEGMENTS:
            return SegmentedMask(dense, tuple(MaskSegment(s.q0, s.q1, s.k0, s.k1, dense[s.q0:s.q1, s.k0:s.k1] if s.masked
                                                          else None) for s in segs))
    return dense


_cached_mask = functools.lru_cache(maxsize=64)(_build_mask)


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




class KVCache:
    """Preallocated keys and values for every layer, filled left to right.

    ``length`` is the number of positions already written. A forward pass with a cache writes
    its L new positions at ``[length, length + L)`` in every layer; the model then advances ``length``.

    Args:
        depth: number of layers.
        batch_size: B (2B when guidance runs both halves in one batch).
        num_heads: H.
        max_len: capacity in positions.
        head_dim: K.
        dtype, device: of the stored tensors.
    """

    def __init__(self, depth: int, batch_size: int, num_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        shape = (batch_size, num_heads, max_len, head_dim)
        # uninitialised: positions at or after ``length`` are never read
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.max_len = max_len
        self.batch_size = batch_size
        self.length = 0

    def update(self, layer: int, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of ``layer``; return all keys/values so far, (B, H, T, K)."""
        end = self.length + k_BHLK.shape[2]
        self.k[layer][:, :, self.length:end] = k_BHLK
        self.v[layer][:, :, self.length:end] = v_BHLK
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    """Multi-head self-attention (see the module docstring).

    Args:
        dim: model width D.
        num_heads: H, must divide D.
        qkv_bias: True (a bias on q, k and v), False, or ``"qv"`` (learned q and v biases, none on
            k: ResTok / BEiT).
        proj_bias: bias on the output projection.
        qk_norm: LayerNorm (eps ``norm_eps``) on q and k per head, before RoPE.
        proj_dropout: dropout after the output projection (training only).
        linear: the linear layer class (e.g. :class:`hieratok.nn.linear.Linear` for prepacked CPU decoding).
        backend: one of :data:`ATTENTION_BACKENDS`; can be changed after construction.

    Fast-path switches (False gives the reference path): ``segment_masks`` (structural masks,
    :func:`resolve_mask`) and ``fast_rope`` (RoPE as a complex multiply).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: Union[bool, str] = False, proj_bias: bool = True,
                 qk_norm: bool = False, norm_eps: float = 1e-6, proj_dropout: float = 0.0,
                 linear: type[nn.Linear] = nn.Linear, backend: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        if qkv_bias not in (True, False, "qv"):
            raise ValueError(f"qkv_bias must be True, False or 'qv', got {qkv_bias!r}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.backend = check_backend(backend)
        self.qkv = linear(dim, 3 * dim, bias=qkv_bias is True)
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        if qk_norm:
            self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.proj = linear(dim, dim, bias=proj_bias)
        self.proj_dropout = nn.Dropout(proj_dropout) if proj_dropout else nn.Identity()
        self.segment_masks = True
        self.fast_rope = True

    def forward(self, x_BLD: torch.Tensor, mask: MaskLike = None, *, rope: Optional[Table] = None, q_from: int = 0,
                cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        """Attention of the rows ``x[:, q_from:]`` over all rows of ``x`` (and the cached ones).

        Args:
            x_BLD: the input rows.
            mask: a :class:`MaskSpec` over the whole sequence (cached positions included), a dense bool
                mask of the query rows over the keys, a ``BlockMask``, or None (full attention).
            rope: the RoPE table ``(cos, sin)`` of the L input rows, each (L, K/2).
            q_from: first input row that gives a query.
            cache: a :class:`KVCache`; the input rows are positions ``cache.length`` onwards.
            layer: this layer's index in ``cache``.

        Returns:
            (B, L - q_from, D).
        """
        B, L, D = x_BLD.shape
        if self.q_bias is None:
            qkv = self.qkv(x_BLD)
        else:
            qkv = F.linear(x_BLD, self.qkv.weight, torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias)))
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, K)
        q = q[:, :, q_from:]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            rotate = apply_rope if self.fast_rope else apply_rope_reference
            q, k = rotate(q, (rope[0][q_from:], rope[1][q_from:])), rotate(k, rope)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(layer, k, v)  # (B, H, T, K)
        mask = resolve_mask(mask, self.backend, x_BLD.device, start + q_from, start + L, self.segment_masks)
        o_BHLK = attention(q, k, v, mask, self.backend)
        return self.proj_dropout(self.proj(o_BHLK.transpose(1, 2).reshape(B, L - q_from, D)))
