"""Checks of the images a tokenizer is given: shape, and (outside training) their values."""

from __future__ import annotations

import warnings
from typing import Optional

import torch

__all__ = ["check_images", "InputRangeWarning"]


class InputRangeWarning(UserWarning):
    """Images far outside [-1, 1] given to a tokenizer (shown once per calling line, as Python's
    default warning filter does; ``warnings.simplefilter("ignore", InputRangeWarning)`` silences it)."""


def check_images(x_BCHW: torch.Tensor, channels: int, size: Optional[int], training: bool, multiple_of: int = 1,
                 what: str = "the patch size") -> None:
    """ValueError for a wrong shape, or (outside training, where it costs one read-back per call)
    NaN/Inf values; an :class:`InputRangeWarning` for images far outside [-1, 1] (uint8 [0, 255] or
    [0, 1] images passed as they are). Training batches come from our data pipeline and are not
    read back, so a training step makes no host sync here.

    ``size=None`` accepts any height and width that are positive multiples of ``multiple_of``
    (``what`` names that number in the error)."""
    if size is not None and (x_BCHW.ndim != 4 or tuple(x_BCHW.shape[1:]) != (channels, size, size)):
        raise ValueError(f"expected images of shape (B, {channels}, {size}, {size}) in [-1, 1], got {tuple(x_BCHW.shape)}")
    if x_BCHW.ndim != 4 or x_BCHW.shape[1] != channels:
        raise ValueError(f"expected images of shape (B, {channels}, H, W) in [-1, 1], got {tuple(x_BCHW.shape)}")
    H, W = x_BCHW.shape[-2:]
    if H % multiple_of or W % multiple_of or not (H and W):
        m = multiple_of
        raise ValueError(f"image size {H}x{W} does not work: height and width must be positive multiples of {what} "
                         f"{m} (e.g. {max(m, H // m * m)}x{max(m, W // m * m)})")
    if not x_BCHW.dtype.is_floating_point:
        raise ValueError(f"expected float images in [-1, 1], got dtype {x_BCHW.dtype} (uint8 images: x / 127.5 - 1)")
    if training or x_BCHW.numel() == 0 or x_BCHW.device.type == "meta":
        return
    x = x_BCHW.detach().float()
    finite, lo, hi = torch.stack([torch.isfinite(x).all().float(), x.amin(), x.amax()]).tolist()
    if not finite:
        raise ValueError("images contain NaN or Inf values")
    if hi > 1.5 or lo < -1.5:  # one message text, so the default filter shows it once per calling line
        warnings.warn("images reach far outside [-1, 1]: tokenizers expect [-1, 1] (uint8 images: x / 127.5 - 1; "
                      "[0, 1] images: 2 * x - 1)", InputRangeWarning, stacklevel=4)
