"""Hierarchy bookkeeping of ResTok (pure functions, tested on their own): latent level sizes,
pooling grids, nested-dropout choices, residual latent initialisation, image-token merging.

Legend: B batch, L sequence, D width, C channels, N latent tokens.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def latent_level_sizes(num_tokens: int) -> list[int]:
    """Sizes of the latent levels, ``[1, 1, 2, 4, ..., N/2]`` (sum N) for a power of two N >= 2."""
    if num_tokens < 2 or num_tokens & (num_tokens - 1):
        raise ValueError(f"num_latent_tokens must be a power of two >= 2, got {num_tokens}")
    return [1] + [2 ** k for k in range(int(math.log2(num_tokens)))]


def level_pooling_grid(n: int) -> tuple[int, int]:
    """(h, w) grid a level of n = 2^k tokens is pooled to: width doubles first, then height.

    1 -> (1, 1), 2 -> (1, 2), 4 -> (2, 2), 8 -> (2, 4), ..., 64 -> (8, 8), 128 -> (8, 16).
    """
    k = int(math.log2(n))
    if 2 ** k != n:
        raise ValueError(f"level size must be a power of two, got {n}")
    return 2 ** (k // 2), 2 ** (k - k // 2)


def nested_dropout_choices(num_tokens: int, min_tokens: int, drop_prob: float) -> tuple[list[int], list[float]]:
    """Kept prefix lengths ``[min, 2 min, ..., N]`` and their probabilities.

    Shorter prefixes get weights ``2^i`` (i = 0, 1, ...); the full length gets
    ``sum(shorter) * (1 - p) / p`` so that a sample is dropped with probability ``p``
    (the release's p = 0.2 gives [4, 8, 16, 32, 64, 128] with weights [1, 2, 4, 8, 16, 124]).
    """
    lengths = [n for n in (2 ** k for k in range(int(math.log2(num_tokens)) + 1)) if n >= min_tokens]
    short = [2.0 ** i for i in range(len(lengths) - 1)]
    if not short or drop_prob <= 0:
        return [num_tokens], [1.0]
    if drop_prob >= 1:
        raise ValueError(f"nested_dropout_prob must be < 1, got {drop_prob}")
    w = short + [sum(short) * (1.0 - drop_prob) / drop_prob]
    return lengths, [x / sum(w) for x in w]


def residual_latent_init(x_BCHW: torch.Tensor, grids: Sequence[tuple[int, int]], residual: bool = True) -> torch.Tensor:
    """Residual 1D latent-token initialisation (ResTok Algorithm 1).

    For each grid (h, w) in order: area-pool the remainder ``r`` to (h, w), emit the h*w tokens
    (row-major), and with ``residual`` set ``r <- r - nearest_upsample(tokens)``. The remainder
    starts as ``x``. Without ``residual`` every level pools ``x`` itself.

    Args:
        x_BCHW: feature map (B, C, H, W).
        grids: per-level pooling grids, e.g. ``[(1, 1), (1, 1), (1, 2), (2, 2), ...]``.
        residual: subtract each level from the remainder.

    Returns:
        (B, sum h*w, C) latent tokens, levels concatenated in order.
    """
    H, W = x_BCHW.shape[-2:]
    rest, out = x_BCHW, []
    for h, w in grids:
        t_BChw = F.interpolate(rest, size=(h, w), mode="area")
        out.append(t_BChw.flatten(2).transpose(1, 2))
        if residual:
            rest = rest - F.interpolate(t_BChw, size=(H, W), mode="nearest")
    return torch.cat(out, dim=1)


def latent_levels_to_map(tokens_BNC: torch.Tensor, grids: Sequence[tuple[int, int]], size: tuple[int, int]) -> torch.Tensor:
    """Sum of the nearest-upsampled level maps (B, C, *size): undoes :func:`residual_latent_init`.

    With ``residual=True`` and ``size`` the finest level grid, the result equals ``x`` area-pooled
    to that grid (the residuals telescope).
    """
    out, start = None, 0
    for h, w in grids:
        t = tokens_BNC[:, start:start + h * w].transpose(1, 2).reshape(tokens_BNC.shape[0], -1, h, w)
        up = F.interpolate(t, size=size, mode="nearest")
        out = up if out is None else out + up
        start += h * w
    if start != tokens_BNC.shape[1]:
        raise ValueError(f"grids cover {start} tokens but {tokens_BNC.shape[1]} were given")
    return out


def merge_image_tokens(x_BLD: torch.Tensor, num_image: int, residual: bool = True) -> torch.Tensor:
    """Hierarchical merging (sec. 3.2) of the leading ``num_image`` tokens (the current coarsest stage).

    ``coarse = x[:, 0:num_image:2]`` (2x nearest pooling of the row-major sequence: a G x w grid
    becomes G x w/2), ``fine = x[:, :num_image] - repeat(coarse, 2)`` with ``residual``;
    returns ``[coarse ; fine ; x[:, num_image:]]``.
    """
    if num_image % 2:
        raise ValueError(f"cannot halve {num_image} image tokens")
    img = x_BLD[:, :num_image]
    coarse = img[:, 0::2]
    fine = img - coarse.repeat_interleave(2, dim=1) if residual else img
    return torch.cat((coarse, fine, x_BLD[:, num_image:]), dim=1)
