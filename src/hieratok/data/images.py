"""Robust image decoding to 8-bit RGB and conversion to and from model tensors.

Every dataset in :mod:`hieratok.data` decodes through :func:`load_rgb`, so an image of any PIL
mode (grey, palette, alpha, CMYK, 16-bit, float) reaches the model as the same kind of 8-bit RGB
picture, and a broken file always fails the same way: :class:`UnreadableImageError`, which the
datasets catch, count and skip.

Tensors follow the convention of the tokenizers: float32, channels first, values in [-1, 1].
Shape legend: C channels (3), H height, W width, B batch.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ImageSource",
    "UnreadableImageError",
    "load_rgb",
    "to_rgb",
    "pil_to_tensor",
    "tensor_to_uint8",
    "tensor_to_pil",
]

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

# Background that transparent pixels are composited onto (white, as browsers show them).
_BACKGROUND_RGB = (255, 255, 255)
# Modes that carry an alpha channel PIL can expand to RGBA.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Exceptions PIL raises for broken, truncated or unsupported files.
_DECODE_ERRORS = (
    OSError,
    UnidentifiedImageError,
    SyntaxError,
    ValueError,
    EOFError,
    TypeError,
    IndexError,
    Image.DecompressionBombError,
)


class UnreadableImageError(ValueError):
    """An image file is corrupt, truncated or not an image; the message names the file."""


def _describe(src: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return getattr(src, "name", repr(src))


MAX_PIXELS = 8192 * 8192  # larger images are refused before decoding (a small file can decode to gigabytes)


def load_rgb(src: ImageSource, *, name: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image file (path, bytes or binary file object) to an 8-bit RGB PIL image.

    The whole image is decoded here (not lazily), so truncated files fail now rather than
    later inside a transform. Multi-frame files (GIF, TIFF) give their first frame. EXIF
    orientation is not applied, as in the standard ImageNet loaders.

    Args:
        src: a file path, the encoded bytes, or an open binary file object.
        name: how to name the source in error messages (defaults to the path).
        max_pixels: refuse images with more pixels than this (checked from the header, before
            decoding), whatever their mode.

    Returns:
        The image in mode ``"RGB"``; see :func:`to_rgb` for how each mode is converted.

    Raises:
        UnreadableImageError: the data cannot be decoded (corrupt, truncated, not an image,
            missing file); the one-line message names the file.
    """
    label = _describe(src, name)
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            src = io.BytesIO(bytes(src))
        with Image.open(src) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise UnreadableImageError(f"cannot read image {label}: {w}x{h} pixels is more than the limit of "
                                           f"{max_pixels} (max_pixels); downscale it first")
            img.load()
            return to_rgb(img)
    except UnreadableImageError:
        raise
    except _DECODE_ERRORS as exc:
        if isinstance(exc, UnidentifiedImageError):
            reason = "not a recognised image format"  # PIL's text names a BytesIO object
        else:
            reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UnreadableImageError(f"cannot read image {label}: {reason}") from exc


def _composite_on_white(img_rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", img_rgba.size, _BACKGROUND_RGB + (255,))
    return Image.alpha_composite(background, img_rgba).convert("RGB")


def _uint16_to_uint8(arr: np.ndarray) -> np.ndarray:
    """16-bit pixels to 8 bits by their bit depth, round(x / 257) (0 -> 0, 65535 -> 255), in
    integer arithmetic (4 bytes a pixel, no float64 copy): the scale never depends on the content."""
    return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _integer_to_uint8(arr: np.ndarray) -> np.ndarray:
    """32-bit integer pixels (mode ``I``, whose bit depth the mode does not say) to 8 bits: values
    within 0..255 kept, within 0..65535 read as 16-bit data, anything else min-max normalised."""
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 255:  # 8-bit values stored in a wider mode (e.g. convert("I"))
        return arr.astype(np.uint8)
    if lo >= 0 and hi <= 65535:  # 16-bit data
        return _uint16_to_uint8(arr)
    return _minmax_to_uint8(arr)


def _minmax_to_uint8(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _float_to_uint8(arr: np.ndarray) -> np.ndarray:
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:  # normalised intensities
        return np.rint(arr * 255.0).astype(np.uint8)
    if lo >= 0.0 and hi <= 255.0:  # 8-bit range stored as float
        return np.rint(arr).astype(np.uint8)
    return _minmax_to_uint8(arr)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB.

    * ``RGB``: unchanged. ``1``, ``L``, ``YCbCr``, ``CMYK`` and other colour modes: PIL's
      conversion (``1`` maps to 0/255; CMYK uses PIL's naive inversion, so pure cyan becomes
      (0, 255, 255)).
    * Alpha (``RGBA``, ``LA``, ``PA``) and palette images with a transparent colour:
      composited onto a white background.
    * 16-bit modes (``I;16*``): scaled by their bit depth, round(x / 257), so the 16-bit range
      maps onto 0..255 whatever the content. Mode ``I`` (32-bit, depth unknown) holding 8-bit
      values is kept, values up to 65535 are read as 16-bit, other ranges min-max normalised.
    * Float ``F``: values in [0, 1] are scaled by 255, values in [0, 255] are rounded,
      anything else is min-max normalised.

    Args:
        img: a loaded PIL image.

    Returns:
        A new (or the same, if already RGB) image in mode ``"RGB"``.

    Raises:
        UnreadableImageError: the mode cannot be converted to RGB.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in img.info):
        return _composite_on_white(img.convert("RGBA"))
    if mode.startswith("I;16"):
        grey = _uint16_to_uint8(np.asarray(img))
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "I":
        grey = _integer_to_uint8(np.asarray(img))
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        grey = _float_to_uint8(np.asarray(img))
        return Image.fromarray(grey, "L").convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnreadableImageError(f"cannot convert image mode {mode!r} to RGB: {exc}") from exc


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 tensor (3, H, W) in [-1, 1] (u / 127.5 - 1)."""
    if img.mode != "RGB":
        img = to_rgb(img)
    arr_HWC = np.asarray(img, dtype=np.uint8)
    x_CHW = torch.from_numpy(arr_HWC.copy()).permute(2, 0, 1)
    return x_CHW.to(torch.float32).div_(127.5).sub_(1.0)


def tensor_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Tensor in [-1, 1] (any shape, e.g. (3, H, W) or (B, 3, H, W)) -> uint8 in [0, 255].

    Values are clamped to [-1, 1] and rounded, so ``tensor_to_uint8(pil_to_tensor(img))``
    gives back the original pixels exactly.
    """
    return ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round_().to(torch.uint8)


def tensor_to_pil(x_CHW: torch.Tensor) -> Image.Image:
    """Tensor (3, H, W) in [-1, 1] -> 8-bit RGB PIL image."""
    if x_CHW.ndim != 3 or x_CHW.shape[0] != 3:
        raise ValueError(f"tensor_to_pil expects a (3, H, W) tensor, got shape {tuple(x_CHW.shape)}")
    arr_HWC = tensor_to_uint8(x_CHW).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr_HWC), "RGB")
