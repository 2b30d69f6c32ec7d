"""Rotary position embeddings (RoPE): 1D, multi-axis (2D) and mixed image / 1D-token sequences.

RoPE rotates consecutive channel pairs ``(x[2i], x[2i+1])`` of queries and keys by an angle
``pos * omega_i`` with ``omega_i = theta^(-2i / d)``, so that ``<R(p) q, R(p') k>`` depends on the
positions only through ``p - p'`` (Su et al. 2021).

For several position axes (2D RoPE, as in Flux or M-RoPE) the head dimension is split into one
contiguous block per axis, each rotated by its own 1D RoPE over that axis' coordinate: with two
axes and head dim K, channels ``[0, K/2)`` follow the row and ``[K/2, K)`` the column.

A mixed sequence (ResTok, section 3.4) holds image grids (2D positions ``(row, col)``) and 1D
tokens whose position is repeated on both axes ``(t, t)``. Blocks are laid out one after
another: each block's positions are offset by the number of tokens before it
(:func:`mixed_positions`), so a 1D token after the image grids sits "after" all of them.

The rotation tables are plain tensors ``(cos, sin)`` of shape (L, K/2), computed in float64 and
stored in float32; :func:`apply_rope` rotates in float32 and returns the input dtype.

Fast path: for float32 / float64 inputs whose channel pairs sit next to each other in memory,
:func:`apply_rope` multiplies the pairs, viewed as complex numbers, by ``cos + i sin`` (one pass
over the input instead of a copy, six elementwise ops and a stack);
:func:`apply_rope_reference` is the plain real-arithmetic path (parity: tests/nn/test_rope.py).

Legend: L tokens, K head dim, A position axes, B batch, H heads.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = [
    "rope_frequencies", "rope_angles", "rope_table", "apply_rope", "apply_rope_reference", "rotate_pairs",
    "grid_positions", "mixed_positions",
]

Table = tuple[torch.Tensor, torch.Tensor]


def rope_frequencies(dim: int, theta: float = 10000.0, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``omega_i = 1 / theta^(2i/dim)`` for i in [0, dim/2), computed in ``dtype``, shape (dim/2,)."""
    if dim < 2 or dim % 2:
        raise ValueError(f"RoPE dim must be a positive even number, got {dim}")
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=device) / dim)


def rope_angles(pos_LA: torch.Tensor, axes_dims: Sequence[int], theta: float = 10000.0,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Rotation angles (L, sum(axes_dims)/2) in ``dtype``: axis a rotates its own block of channels.

    Args:
        pos_LA: positions (L, A) (or (L,) for one axis), any real dtype.
        axes_dims: channels per axis (each even), e.g. ``[K/2, K/2]`` for 2D RoPE on head dim K.
        theta: RoPE base.
        dtype: precision of the frequencies and angles (float64 by default; LlamaGen computes
            them in float32, which its converted weights expect).
    """
    pos = pos_LA.to(dtype)
    if pos.ndim == 1:
        pos = pos[:, None]
    if pos.ndim != 2 or pos.shape[1] != len(axes_dims):
        raise ValueError(f"positions of shape {tuple(pos_LA.shape)} do not match {len(axes_dims)} axes")
    return torch.cat([pos[:, a:a + 1] * rope_frequencies(d, theta, pos.device, dtype)[None, :]
                      for a, d in enumerate(axes_dims)], dim=1)


def rope_table(pos_LA: torch.Tensor, axes_dims: Sequence[int], theta: float = 10000.0,
               dtype: torch.dtype = torch.float64) -> Table:
    """``(cos, sin)`` float32 tables (L, K/2) for :func:`apply_rope`, angles computed in ``dtype``."""
    ang = rope_angles(pos_LA, axes_dims, theta, dtype)
    return ang.cos().float(), ang.sin().float()


def _check_table(x: torch.Tensor, cos: torch.Tensor) -> None:
    if x.shape[-1] != 2 * cos.shape[-1] or x.shape[-2] != cos.shape[-2]:
        raise ValueError(f"RoPE table {tuple(cos.shape)} does not fit input {tuple(x.shape)} (..., L, K)")


def _pairs_viewable_as_complex(x: torch.Tensor) -> bool:
    """``view_as_complex`` works without a copy: adjacent pairs, every other stride and the offset even."""
    return (x.dtype in (torch.float32, torch.float64) and x.shape[-1] % 2 == 0 and x.stride(-1) == 1
            and all(st % 2 == 0 for st, n in zip(x.stride()[:-1], x.shape[:-1]) if n > 1)
            and x.storage_offset() % 2 == 0)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``(x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)`` on channel pairs (2i, 2i+1) of ``x``.

    ``cos`` / ``sin`` broadcast against ``x``'s shape without its last axis halved, e.g. (L, K/2)
    for x (..., L, K). float32 / float64 inputs with adjacent pairs take the complex-multiply
    fast path; anything else (e.g. bf16) is rotated in float32 and cast back.
    """
    if _pairs_viewable_as_complex(x):
        rot = torch.complex(cos, sin).to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rot).flatten(-2)
    return _rotate_pairs_reference(x, cos, sin)


def _rotate_pairs_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xp = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.reshape(x.shape).to(x.dtype)


def apply_rope(x: torch.Tensor, table: Table) -> torch.Tensor:
    """Rotate the channel pairs of ``x`` (..., L, K) by a table from :func:`rope_table` (L, K/2)."""
    cos, sin = table
    _check_table(x, cos)
    return rotate_pairs(x, cos, sin)


def apply_rope_reference(x: torch.Tensor, table: Table) -> torch.Tensor:
    """:func:`apply_rope` in plain real arithmetic (float32), the reference of its fast path."""
    cos, sin = table
    _check_table(x, cos)
    return _rotate_pairs_reference(x, cos, sin)


def grid_positions(h: int, w: int, offset: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """Row-major ``(row, col)`` positions of an h x w grid plus ``offset`` on both axes, shape (h*w, 2)."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack((rows, cols), dim=1) + offset


def mixed_positions(
    grids: Sequence[tuple[int, int]],
    num_tokens: int,
    tokens_first: bool = False,
    device: Optional[torch.device | str] = None,
) -> torch.Tensor:
    """2D positions (L, 2) of a sequence of image grids and ``num_tokens`` 1D tokens.

    Blocks follow each other (the 1D tokens first if ``tokens_first``, else last); every block
    is offset by the number of tokens before it. Grid blocks get ``(row, col) + offset``; the 1D
    tokens get ``(t, t) + offset``.

    Example: grids ``[(1, 2), (2, 2)]`` and 2 tokens after them give
    ``(0,0) (0,1) | (2,2) (2,3) (3,2) (3,3) | (6,6) (7,7)``.
    """
    blocks, offset = [], 0
    t = torch.arange(num_tokens, device=device)[:, None].expand(num_tokens, 2)
    if tokens_first:
        blocks.append(t)
        offset += num_tokens
    for h, w in grids:
        blocks.append(grid_positions(h, w, offset, device))
        offset += h * w
    if not tokens_first:
        blocks.append(t + offset)
    return torch.cat(blocks, dim=0)
