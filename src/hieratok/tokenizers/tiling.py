"""Tiled reconstruction with overlap blending, for images larger than a budget (diffusers'
``enable_tiling``, in pixel space).

The image is covered by overlapping tiles of ``tile`` pixels, spread evenly from the first row /
column to the last (so no tile hangs over the edge); each tile is reconstructed on its own and the
reconstructions are blended with separable weights that ramp linearly over ``overlap`` pixels where
a tile has a neighbour (:func:`blend_weights`). The weights are divided by their sum, so they form
a partition of unity everywhere; where neighbours overlap by exactly ``overlap`` (a regular layout)
the ramps sum to 1 before that division (ramp up ``(k + 1/2) / overlap`` plus ramp down ``1 - (k + 1/2) / overlap``).

Why there is no seam: if tile i's reconstruction is off by a constant ``c_i`` (a tile-wide colour
or brightness shift, the typical tiling artefact), the blended image is off by ``sum_i w_i c_i``,
which moves by at most ``max|c_i - c_j| / overlap`` per pixel in a ramp instead of stepping by
``|c_i - c_j|`` at a stitched border (tests/tokenizers/test_tiling.py).

Every scale of a pyramid is blended the same way: each tile's coarser output is upsampled (nearest)
to the tile's pixels, blended at full resolution and area-resized to the whole image's shape at
that scale.

Legend: B batch, C channels, H/W image sides, T tile side, n tiles along an axis.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

__all__ = ["tile_starts", "blend_weights", "tiled_reconstruct"]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """First pixel of each tile along an axis of ``length``: the fewest tiles of ``tile`` pixels that
    overlap their neighbours by at least ``overlap``, spread evenly from 0 to ``length - tile``."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in [0, tile {tile})")
    if length <= tile:
        return [0]
    n = 1 + math.ceil((length - tile) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _ramps(starts: list[int], tile: int, overlap: int, length: int) -> torch.Tensor:
    """(n, length) float64 weights of the tiles along one axis before normalisation: 1 inside a tile,
    ramping over ``overlap`` pixels at a side that has a neighbour, 0 outside it."""
    w = torch.zeros(len(starts), length, dtype=torch.float64)
    k = torch.arange(tile, dtype=torch.float64)
    for i, s in enumerate(starts):
        r = torch.ones(tile, dtype=torch.float64)
        if overlap:
            if i > 0:
                r = torch.minimum(r, (k + 0.5) / overlap)  # rises over the first `overlap` pixels
            if i < len(starts) - 1:
                r = torch.minimum(r, (tile - k - 0.5) / overlap)  # falls over the last `overlap`
        w[i, s:s + tile] = r.clamp(max=1.0)[: length - s]
    return w


def blend_weights(starts: list[int], tile: int, overlap: int, length: int) -> torch.Tensor:
    """(n, length) blending weights of the tiles at ``starts`` along one axis: the linear ramps of
    :func:`_ramps` divided by their sum, so that they sum to 1 at every pixel."""
    w = _ramps(starts, tile, overlap, length)
    return w / w.sum(0, keepdim=True)


@torch.no_grad()
def tiled_reconstruct(model: Any, x_BCHW: torch.Tensor, tile: Optional[int | tuple[int, int]] = None,
                      overlap: Optional[int] = None, batch_size: int = 8) -> list[torch.Tensor]:
    """Reconstruct images of any size tile by tile, blending the tiles (see the module docstring).

    Args:
        model: a tokenizer (:class:`~hieratok.tokenizers.base.Tokenizer`); ``model.reconstruct`` runs
            on every tile.
        x_BCHW: images in [-1, 1], any size; a side below the tile is padded (replicate) and cropped back.
        tile: tile (height, width) or side in pixels, a size the model accepts (default: its
            training size, ``model.config.image_size``).
        overlap: pixels of blending between neighbouring tiles (default: a quarter of the tile).
        batch_size: tiles per model call.

    Returns:
        The pyramid, coarse to fine, on ``x``'s device: the finest (B, C, H, W), scale k resized
        to H and W times its tile ratio.
    """
    size = model.config.image_size if tile is None else tile
    th, tw = (size, size) if isinstance(size, int) else size
    ov = min(th, tw) // 4 if overlap is None else overlap
    B, C, H, W = x_BCHW.shape
    xp = F.pad(x_BCHW, (0, max(0, tw - W), 0, max(0, th - H)), mode="replicate") if H < th or W < tw else x_BCHW
    Hp, Wp = xp.shape[-2:]
    ys, xs = tile_starts(Hp, th, ov), tile_starts(Wp, tw, ov)
    wy, wx = blend_weights(ys, th, ov, Hp), blend_weights(xs, tw, ov, Wp)
    boxes = [(a, y, b, x) for a, y in enumerate(ys) for b, x in enumerate(xs)]
    dev = next(model.parameters()).device
    canvases: Optional[list[torch.Tensor]] = None
    ratios: list[tuple[int, int]] = []
    for i in range(0, len(boxes), max(1, batch_size // B)):
        chunk = boxes[i:i + max(1, batch_size // B)]
        tiles = torch.cat([xp[:, :, y:y + th, x:x + tw] for _, y, _, x in chunk]).to(dev)  # (len(chunk)*B, C, th, tw)
        pyr, _ = model.reconstruct(tiles)
        if canvases is None:
            canvases = [torch.zeros(B, p.shape[1], Hp, Wp, dtype=torch.float32) for p in pyr]
            ratios = [tuple(p.shape[-2:]) for p in pyr]
        for k, p in enumerate(pyr):
            full = p.float().cpu()
            full = full if full.shape[-2:] == (th, tw) else F.interpolate(full, size=(th, tw), mode="nearest")
            for j, (a, y, b, x) in enumerate(chunk):
                w = (wy[a, y:y + th, None] * wx[b, None, x:x + tw]).float()  # (th, tw)
                canvases[k][:, :, y:y + th, x:x + tw] += w * full[j * B:(j + 1) * B]
    assert canvases is not None
    out = []
    for canvas, (h, w) in zip(canvases, ratios):
        img = canvas[:, :, :H, :W]
        size_k = (max(1, round(H * h / th)), max(1, round(W * w / tw)))
        out.append((img if size_k == (H, W) else F.interpolate(img, size=size_k, mode="area")).to(x_BCHW.device))
    return out
