"""Pixel-level reconstruction metrics: per-image PSNR and SSIM on 8-bit images, averaged.

Both metrics first quantise the images to 8 bits (what a saved PNG holds), then score each image
on its own and average over the batch:

* :func:`psnr` -- ``10 log10(255^2 / MSE)`` over all pixels and channels of one image.
* :func:`ssim` -- Wang et al. 2004 with the standard Gaussian window (11 taps, sigma 1.5),
  ``K1 = 0.01``, ``K2 = 0.03``, data range 255, population (not sample) covariances, the SSIM map
  averaged over the "valid" region (borders of 5 px dropped) and over channels. This is exactly
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255, channel_axis=...)``. This is a protocol choice:
  papers differ here. VA-VAE's evaluation, for one, uses torchmetrics' SSIM, which averages the
  map over the reflect-padded full image and scores a little higher (e.g. 0.8929 where the
  valid region gives 0.8905); compare SSIMs only under the same protocol.

Images are float tensors with a ``value_range`` (``(-1, 1)``, the tokenizer convention, by
default) or uint8 tensors (taken as they are). Everything is batched torch and runs on any
device; the statistics are computed in float64 by default because the SSIM variance terms
``E[x^2] - E[x]^2`` lose digits in float32 at the 0..255 scale.

Shape legend: B batch, C channels, H height, W width.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

__all__ = ["quantize_to_uint8", "psnr", "ssim", "color_error", "gaussian_window_1d"]

Reduction = Literal["mean", "none"]

# Standard SSIM constants (Wang et al. 2004, sec. III-C).
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DATA_RANGE = 255.0


def quantize_to_uint8(images: torch.Tensor, value_range: Sequence[float] = (-1.0, 1.0)) -> torch.Tensor:
    """Map images to 8-bit levels 0..255 the way saving them as PNG does.

    Args:
        images: uint8 tensor (returned unchanged) or float tensor with values in ``value_range``.
        value_range: ``(low, high)`` of float inputs; ``low`` maps to 0 and ``high`` to 255.

    Returns:
        A uint8 tensor of the same shape. Float values are clamped to the range and rounded
        half up (``floor(v * 255 + 0.5)``), as ``clamp(127.5 * x + 128, 0, 255).to(uint8)`` in
        the usual sampling scripts.

    Raises:
        ValueError: a float image holds NaN or Inf (it has no 8-bit value; clamping would score
            a broken output as black or white).
    """
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN/Inf: they have no 8-bit value to score (check the model's output)")
    lo, hi = _check_range(value_range)
    v = (images.float() - lo) * (DATA_RANGE / (hi - lo))
    return torch.floor(v + 0.5).clamp_(0, 255).to(torch.uint8)


def _check_range(value_range: Sequence[float]) -> tuple[float, float]:
    if len(value_range) != 2 or not float(value_range[0]) < float(value_range[1]):
        raise ValueError(f"value_range must be (low, high) with low < high, got {tuple(value_range)}")
    return float(value_range[0]), float(value_range[1])


def _pair(
    pred: torch.Tensor, target: torch.Tensor, value_range: Sequence[float], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(pred.shape)}")
    return (
        quantize_to_uint8(pred, value_range).to(dtype),
        quantize_to_uint8(target, value_range).to(dtype),
    )


def _reduce(per_image_B: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return per_image_B.mean()
    if reduction == "none":
        return per_image_B
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def psnr(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    value_range: Sequence[float] = (-1.0, 1.0),
    reduction: Reduction = "mean",
    dtype: torch.dtype = torch.float64,
    floor_mse: bool = False,
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB on 8-bit-quantised images, per image then averaged.

    Args:
        pred: reconstructions ``(B, C, H, W)``, float in ``value_range`` or uint8.
        target: originals, same shape and convention.
        value_range: range of float inputs.
        reduction: ``"mean"`` over images or ``"none"`` for the ``(B,)`` per-image values.
        dtype: computation dtype.
        floor_mse: score an exact match not as ``inf`` (scikit-image's value) but as the smallest
            nonzero error an 8-bit image of its size can have, one value off by one level
            (MSE ``1 / (C H W)``): ``10 log10(255^2 C H W)`` dB, above every inexact image of that
            size. A mean over a data set then stays finite; exact matches are practically
            impossible at 256 px but common at coarse pyramid scales.

    Returns:
        Scalar or ``(B,)`` tensor. An image identical to its target scores ``inf`` unless
        ``floor_mse``.
    """
    p_BCHW, t_BCHW = _pair(pred, target, value_range, dtype)
    mse_B = (p_BCHW - t_BCHW).square().flatten(1).mean(1)
    if floor_mse:
        mse_B = mse_B.clamp_min(1.0 / p_BCHW[0].numel())
    return _reduce(10.0 * torch.log10(DATA_RANGE**2 / mse_B), reduction)


def gaussian_window_1d(
    size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Normalised 1-D Gaussian taps ``exp(-x^2 / 2 sigma^2)`` for ``x = -(size//2) .. size//2``."""
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    value_range: Sequence[float] = (-1.0, 1.0),
    reduction: Reduction = "mean",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Structural similarity on 8-bit-quantised images with the standard Gaussian window.

    Args:
        pred: reconstructions ``(B, C, H, W)``, float in ``value_range`` or uint8; H and W must be
            at least 11.
        target: originals, same shape and convention.
        value_range: range of float inputs.
        reduction: ``"mean"`` over images or ``"none"`` for the ``(B,)`` per-image values.
        dtype: computation dtype (float64 by default; float32 agrees to about 1e-5).

    Returns:
        Scalar or ``(B,)`` tensor; the per-image value is the mean SSIM map over the valid
        region of every channel, as scikit-image computes it.
    """
    p_BCHW, t_BCHW = _pair(pred, target, value_range, dtype)
    B, C, H, W = p_BCHW.shape
    if min(H, W) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {H}x{W}")
    g = gaussian_window_1d(dtype=dtype).to(p_BCHW.device)
    # Separable 'valid' filtering of x, y, x^2, y^2, xy stacked along channels: the Gaussian
    # is applied along H then W, so the 5 moment maps cost two 1-D convolutions.
    stack = torch.cat([p_BCHW, t_BCHW, p_BCHW * p_BCHW, t_BCHW * t_BCHW, p_BCHW * t_BCHW], dim=1)
    n = stack.shape[1]  # 5C
    stack = F.conv2d(stack, g.view(1, 1, -1, 1).expand(n, 1, -1, 1), groups=n)
    stack = F.conv2d(stack, g.view(1, 1, 1, -1).expand(n, 1, 1, -1), groups=n)
    mu_x, mu_y, e_xx, e_yy, e_xy = stack.split(C, dim=1)  # each (B, C, H-10, W-10)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return _reduce(ssim_map.flatten(1).mean(1), reduction)


def color_error(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Colour cast per image and channel, (B, C) float64: |mean over pixels of (rec - target)| in
    [-1, 1] units (uint8 inputs are read as 0..255 -> -1..1). An error made only of a uniform cast
    has colour error equal to its L1."""
    def unit(t: torch.Tensor) -> torch.Tensor:
        return t.double() / 127.5 if t.dtype == torch.uint8 else t.double()

    return (unit(rec) - unit(target)).mean(dim=(2, 3)).abs()
