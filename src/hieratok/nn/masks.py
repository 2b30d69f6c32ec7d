"""Attention masks over multi-scale token sequences (HieraTok section 3.2, eqs. 6-7).

Tokens of all scales are concatenated coarse-to-fine, so a sequence for scales [1, 2, 4] is
1 + 4 + 16 tokens with scale ids [0, 1,1,1,1, 2,...,2]. A mask is a boolean (L, L) tensor,
``True`` where query q may attend to key k.

- ``scale_causal``: q sees keys of its own scale and all coarser ones (eq. 7).
- ``scale_independent``: q sees keys of its own scale only (eq. 6).
- ``full``: every token sees every token.

The same rules exist as FlexAttention ``mask_mod`` functions (``mask_mod``), so the dense and the
block-sparse path are built from one definition and tested against each other.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["ATTENTION_MODES", "scale_ids", "dense_mask", "mask_mod", "allowed_fraction"]
__all__ += ["block_ids", "block_causal_mask", "block_causal_mask_mod"]

ATTENTION_MODES = ("scale_causal", "scale_independent", "full")

_RULES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "scale_causal": lambda sq, sk: sq >= sk,
    "scale_independent": lambda sq, sk: sq == sk,
    "full": lambda sq, sk: torch.ones_like(sq >= sk),
}


def _check_mode(mode: str) -> None:
    if mode not in _RULES:
        raise ValueError(f"attention mode {mode!r} is not one of {ATTENTION_MODES}")


def scale_ids(scales: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Scale index of every token of the coarse-to-fine sequence, shape (sum s^2,)."""
    return torch.tensor([k for k, s in enumerate(scales) for _ in range(s * s)], device=device)


def dense_mask(mode: str, scales: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (L, L) mask, True where attention is allowed."""
    _check_mode(mode)
    ids = scale_ids(scales, device)
    return _RULES[mode](ids[:, None], ids[None, :])


def mask_mod(mode: str, scales: Sequence[int], device: torch.device | str | None = None) -> Callable:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` implementing the same rule as :func:`dense_mask`."""
    _check_mode(mode)
    ids = scale_ids(scales, device)
    rule = _RULES[mode]

    def _mod(b, h, q_idx, kv_idx):  # noqa: ANN001 - signature fixed by FlexAttention
        return rule(ids[q_idx], ids[kv_idx])

    return _mod


def allowed_fraction(mode: str, scales: Sequence[int]) -> float:
    """Fraction of the L*L query-key pairs a mode allows (about 0.80 for scale-causal on [1,2,4,8,16])."""
    return dense_mask(mode, scales).float().mean().item()


# --- block-causal masks over arbitrary block sizes (ResTok HAR generator, sec. 3.4) -------------
# A sequence is cut into consecutive blocks of the given sizes; a query sees every key of its own
# block and of all earlier blocks. Blocks of size 1 give the plain causal mask.


def block_ids(block_sizes: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Block index of every token, shape (sum(block_sizes),)."""
    if any(int(n) < 1 for n in block_sizes):
        raise ValueError(f"block sizes must be positive, got {list(block_sizes)}")
    sizes = torch.as_tensor(list(block_sizes), dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)


def block_causal_mask(block_sizes: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (L, L) mask, True where ``block(q) >= block(k)``."""
    ids = block_ids(block_sizes, device)
    return ids[:, None] >= ids[None, :]


def block_causal_mask_mod(block_sizes: Sequence[int], device: torch.device | str | None = None) -> Callable:
    """FlexAttention ``mask_mod`` form of :func:`block_causal_mask`."""
    ids = block_ids(block_sizes, device)

    def _mod(b, h, q_idx, kv_idx):  # noqa: ANN001 - signature fixed by FlexAttention
        return ids[q_idx] >= ids[kv_idx]

    return _mod
