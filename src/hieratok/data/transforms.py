"""Image transforms on PIL images (no torchvision).

* :func:`center_crop_arr`: the ADM / guided-diffusion centre crop used for ImageNet 256 training
  and FID reference statistics (DiT, MAR, VA-VAE and most tokenizer papers evaluate with it).
* :class:`RandomResizedCrop`: torchvision's ``RandomResizedCrop`` semantics (area scale, log-uniform
  aspect ratio, 10 tries then a central fallback), bicubic resampling.
* :class:`RandomHorizontalFlip`, :func:`random_crop`, :class:`CenterCrop` and :class:`Compose`.
* Sizes are a side (square) or (height, width): :func:`random_crop`, :class:`RandomResizedCrop`
  and :func:`cover_crop` make rectangles for aspect-ratio buckets (:func:`bucket_transform`).
* :func:`ten_crop`: torchvision's ``TenCrop`` on image tensors (LlamaGen's code-extraction
  augmentation).

Random transforms take their randomness from an explicit ``rng`` argument, either a
``torch.Generator`` or a ``random.Random``; ``None`` falls back to torch's global generator (which
DataLoader seeds differently in every worker). The datasets pass an ``rng`` derived from
(seed, epoch, index), so an augmentation is a pure function of those numbers.
"""

from __future__ import annotations

import inspect
import math
import random
from typing import Callable, Optional, Sequence, Union

import torch
from PIL import Image

__all__ = [
    "Rng",
    "center_crop_arr",
    "ten_crop",
    "resize_short_side",
    "random_crop",
    "upscale_to_cover",
    "RandomResizedCrop",
    "RandomHorizontalFlip",
    "CenterCrop",
    "Compose",
    "accepts_rng",
    "cover_crop",
    "bucket_transform",
    "check_hw",
]

Rng = Optional[Union[torch.Generator, random.Random]]


def _uniform(rng: Rng, low: float, high: float) -> float:
    """A float drawn uniformly from [low, high)."""
    if isinstance(rng, random.Random):
        return low + (high - low) * rng.random()
    u = torch.rand((), generator=rng).item()
    return low + (high - low) * u


def _randint(rng: Rng, low: int, high: int) -> int:
    """An integer drawn uniformly from [low, high] (both ends included)."""
    if high < low:
        raise ValueError(f"empty integer range [{low}, {high}]")
    if isinstance(rng, random.Random):
        return rng.randint(low, high)
    return int(torch.randint(low, high + 1, (), generator=rng).item())


def _check_size(size: int) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"image size must be a positive int, got {size!r}")
    return size


def check_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of a side or an (h, w) pair, each a positive int."""
    if isinstance(size, int):
        return _check_size(size), size
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"image size must be a side or (height, width), got {size!r}")
    return _check_size(size[0]), _check_size(size[1])


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size``, the ADM way (aspect ratio kept).

    While the shorter side is at least ``2 * size`` the image is halved with a BOX filter
    (cheap anti-aliasing for large downscales); a final BICUBIC resize then makes the shorter
    side exactly ``size`` (each side is ``round(side * size / short_side)``).
    """
    size = _check_size(size)
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    new_size = (round(img.width * scale), round(img.height * scale))
    return img.resize(new_size, resample=Image.Resampling.BICUBIC)


def center_crop_arr(img: Image.Image, size: int) -> Image.Image:
    """The ADM (guided-diffusion) centre crop: short side -> ``size``, then a central square.

    This is the preprocessing of the ImageNet reference batches used for FID at 256 px:
    :func:`resize_short_side` followed by a ``size`` x ``size`` crop whose top-left corner is
    ``((H - size) // 2, (W - size) // 2)``.

    Args:
        img: a PIL image (any size; small images are upsampled).
        size: output side in pixels.

    Returns:
        A ``size`` x ``size`` PIL image.
    """
    img = resize_short_side(img, size)
    top = (img.height - size) // 2
    left = (img.width - size) // 2
    return img.crop((left, top, left + size, top + size))


def upscale_to_cover(img: Image.Image, size: int | Sequence[int]) -> Image.Image:
    """Bicubic upscale (aspect kept) so the image covers ``size`` (a side, or (height, width));
    larger images pass through."""
    h, w = check_hw(size)
    if img.height >= h and img.width >= w:
        return img
    scale = max(h / img.height, w / img.width)
    new_size = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    return img.resize(new_size, resample=Image.Resampling.BICUBIC)


def random_crop(img: Image.Image, size: int | Sequence[int], rng: Rng = None) -> Image.Image:
    """A uniformly placed ``size`` crop (a side, or (height, width)) at native resolution.

    An image that does not cover ``size`` is first upscaled (bicubic, aspect kept) until it does.
    """
    h, w = check_hw(size)
    img = upscale_to_cover(img, (h, w))
    top = _randint(rng, 0, img.height - h)
    left = _randint(rng, 0, img.width - w)
    return img.crop((left, top, left + w, top + h))


def cover_crop(img: Image.Image, size: int | Sequence[int]) -> Image.Image:
    """The central (height, width) crop of the image resized (bicubic, aspect kept) so it just covers
    ``size``: the ADM centre crop generalised to rectangles (equal to :func:`center_crop_arr`'s
    geometry for a square up to its BOX pre-shrinking)."""
    h, w = check_hw(size)
    scale = max(h / img.height, w / img.width)
    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                     resample=Image.Resampling.BICUBIC)
    top, left = (img.height - h) // 2, (img.width - w) // 2
    return img.crop((left, top, left + w, top + h))


class RandomResizedCrop:
    """Crop a random area and aspect ratio, then resize to ``size`` x ``size`` (bicubic).

    Same sampling as torchvision's ``RandomResizedCrop``: up to 10 tries of an area fraction
    uniform in ``scale`` and an aspect ratio (w / h) log-uniform in ``ratio``, placed uniformly;
    if none fits, a central crop with the aspect ratio clamped to ``ratio``.

    Args:
        size: output side in pixels, or (height, width).
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height).
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    ) -> None:
        self.size = size if isinstance(size, int) else check_hw(size)
        self.hw = check_hw(size)
        if not (0.0 < scale[0] <= scale[1] <= 1.0):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0.0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def get_params(self, width: int, height: int, rng: Rng = None) -> tuple[int, int, int, int]:
        """Sample a crop box for an image of this size.

        Returns:
            (top, left, crop_height, crop_width).
        """
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * _uniform(rng, *self.scale)
            aspect = math.exp(_uniform(rng, log_lo, log_hi))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = _randint(rng, 0, height - h)
                left = _randint(rng, 0, width - w)
                return top, left, h, w
        # Fallback: the largest central crop whose aspect ratio lies within `ratio`.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, rng: Rng = None) -> Image.Image:
        top, left, h, w = self.get_params(img.width, img.height, rng)
        # Crop, then resize (torchvision's resized_crop order; resizing with `box=` would also
        # read pixels outside the crop through the filter support).
        crop = img.crop((left, top, left + w, top + h))
        return crop.resize((self.hw[1], self.hw[0]), resample=Image.Resampling.BICUBIC)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, img: Image.Image, rng: Rng = None) -> Image.Image:
        # Always draw, so the random stream does not depend on p being 0 or 1.
        if _uniform(rng, 0.0, 1.0) < self.p:
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class CenterCrop:
    """:func:`center_crop_arr` as a transform object (ignores ``rng``)."""

    def __init__(self, size: int) -> None:
        self.size = _check_size(size)

    def __call__(self, img: Image.Image, rng: Rng = None) -> Image.Image:
        return center_crop_arr(img, self.size)

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size})"


def accepts_rng(fn: Callable) -> bool:
    """Whether a transform can be called as ``fn(img, rng)``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


class Compose:
    """Apply transforms in order, handing the same ``rng`` to those that take one.

    Args:
        transforms: callables ``img -> img`` or ``(img, rng) -> img``.
    """

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)
        self._takes_rng = [accepts_rng(t) for t in self.transforms]

    def __call__(self, img: Image.Image, rng: Rng = None) -> Image.Image:
        for t, takes_rng in zip(self.transforms, self._takes_rng):
            img = t(img, rng) if takes_rng else t(img)
        return img

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


def ten_crop(x_BCHW: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``TenCrop(size)`` on a batch: (B, C, H, W) -> (B, 10, C, size, size).

    Views in torchvision's order: top-left, top-right, bottom-left, bottom-right and centre crops
    of the image, then the same five crops of its horizontal mirror. The centre crop starts at
    ``round((H - size) / 2)``, ``round((W - size) / 2)``.
    """
    H, W = x_BCHW.shape[-2:]
    if size > H or size > W:
        raise ValueError(f"ten_crop size {size} exceeds the image size {H}x{W}")
    top, left = int(round((H - size) / 2.0)), int(round((W - size) / 2.0))
    corners = [(0, 0), (0, W - size), (H - size, 0), (H - size, W - size), (top, left)]
    views = [img[..., r:r + size, c:c + size] for img in (x_BCHW, x_BCHW.flip(-1)) for r, c in corners]
    return torch.stack(views, dim=1)


def bucket_transform(size: tuple[int, int], random_resized_crop_scale: Optional[tuple[float, float]] = None,
                     hflip: bool = True) -> Compose:
    """The training transform of one aspect-ratio bucket (height, width): a random resized crop with
    aspect ratios within 3/4 .. 4/3 of the bucket's (``random_resized_crop_scale`` the area range,
    default (0.35, 1)), resized to the bucket, then a random flip. Crops of a bucket's own aspect
    are the most likely, and an image is never squeezed by more than 4/3."""
    h, w = check_hw(size)
    a = w / h
    crop = RandomResizedCrop((h, w), random_resized_crop_scale or (0.35, 1.0), (a * 3 / 4, a * 4 / 3))
    return Compose([crop, RandomHorizontalFlip(0.5)] if hflip else [crop])
