"""PSNR / SSIM against scikit-image and torchmetrics on 8-bit-quantised images."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from hieratok.metrics import psnr, quantize_to_uint8, ssim


def _pair(seed: int = 0, shape=(3, 3, 40, 48)):
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    # Smooth structure plus noise, in [-1, 1], so SSIM is far from both 0 and 1.
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack([torch.sin(3 * xx + k) * torch.cos(2 * yy - k) for k in range(b * c)]).view(b, c, h, w)
    target = (0.8 * base + 0.1 * torch.randn(shape, generator=g)).clamp(-1, 1)
    pred = (target + 0.15 * torch.randn(shape, generator=g)).clamp(-1, 1)
    return pred, target


def _u8_hwc(x: torch.Tensor) -> np.ndarray:
    return quantize_to_uint8(x).permute(1, 2, 0).numpy()


def test_quantize_to_uint8_levels():
    x = torch.tensor([-1.0, -2.0, 0.0, 1.0, 3.0, -1 + 1 / 127.5 * 0.49, -1 + 1 / 127.5 * 0.51])
    assert quantize_to_uint8(x).tolist() == [0, 0, 128, 255, 255, 0, 1]
    assert quantize_to_uint8(torch.tensor([0.0, 0.5, 1.0]), (0, 1)).tolist() == [0, 128, 255]
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(quantize_to_uint8(u), u)
    # uint8 -> [-1, 1] -> uint8 is lossless
    assert torch.equal(quantize_to_uint8(u.float() / 127.5 - 1), u)


def test_psnr_matches_skimage_per_image_mean():
    pred, target = _pair()
    ours = psnr(pred, target, reduction="none")
    ref = [peak_signal_noise_ratio(_u8_hwc(t), _u8_hwc(p), data_range=255) for p, t in zip(pred, target)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10)
    assert psnr(pred, target).item() == pytest.approx(np.mean(ref), rel=1e-10)
    # uint8 inputs give the same numbers
    assert psnr(quantize_to_uint8(pred), quantize_to_uint8(target)).item() == pytest.approx(np.mean(ref), rel=1e-10)
    assert torch.isinf(psnr(target, target)).item()


def test_ssim_matches_skimage():
    pred, target = _pair(1)
    ours = ssim(pred, target, reduction="none")
    ref = [
        structural_similarity(
            _u8_hwc(t), _u8_hwc(p), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=255, channel_axis=2,
        )
        for p, t in zip(pred, target)
    ]
    assert 0.2 < min(ref) and max(ref) < 0.95  # a non-trivial regime
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-8)
    assert ssim(pred, target).item() == pytest.approx(np.mean(ref), abs=1e-8)
    assert ssim(target, target).item() == pytest.approx(1.0, abs=1e-12)
    # float32 arithmetic stays within 1e-5 of the float64 result (the docstring's claim; measured 1.1e-6)
    f32 = ssim(pred, target, reduction="none", dtype=torch.float32)
    np.testing.assert_allclose(f32.double().numpy(), ref, atol=1e-5)


def test_ssim_matches_torchmetrics_valid_region():
    # torchmetrics averages its SSIM map over the reflect-padded full image; scikit-image (and
    # the papers' numbers) average over the valid region. Its map cropped by the 5-px window
    # radius must give our values.
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    pred, target = _pair(2)
    p = quantize_to_uint8(pred).double()
    t = quantize_to_uint8(target).double()
    _, full = tm_ssim(p, t, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=255.0,
                      reduction="none", return_full_image=True)
    ref = full[..., 5:-5, 5:-5].flatten(1).mean(1)
    np.testing.assert_allclose(ssim(pred, target, reduction="none").numpy(), ref.numpy(), atol=1e-8)


def test_bad_inputs():
    pred, target = _pair()
    with pytest.raises(ValueError):
        psnr(pred, target[:, :, :-1])
    with pytest.raises(ValueError):
        ssim(pred[..., :8, :8], target[..., :8, :8])
    with pytest.raises(ValueError):
        quantize_to_uint8(pred, (1.0, -1.0))
    with pytest.raises(ValueError):
        psnr(pred, target, reduction="sum")


def test_nan_and_inf_images_raise():
    # NaN used to quantise to 0: a NaN reconstruction of a black image scored PSNR inf
    black = -torch.ones(1, 3, 16, 16)
    for bad in (float("nan"), float("inf"), -float("inf")):
        rec = black.clone()
        rec[0, 1, 3, 4] = bad
        with pytest.raises(ValueError, match="NaN/Inf"):
            quantize_to_uint8(rec)
        with pytest.raises(ValueError, match="NaN/Inf"):
            psnr(rec, black)
        with pytest.raises(ValueError, match="NaN/Inf"):
            ssim(black, rec)


def test_psnr_floor_for_exact_matches():
    pred, target = _pair(3)
    exact = psnr(target, target, reduction="none", floor_mse=True)
    c, h, w = target.shape[1:]
    # one value off by one level: MSE 1 / (C H W)
    torch.testing.assert_close(exact, torch.full((3,), 10 * np.log10(255.0**2 * c * h * w), dtype=torch.float64))
    off = quantize_to_uint8(target).clone()
    off[:, 0, 0, 0] += torch.where(off[:, 0, 0, 0] < 255, 1, -1).to(torch.uint8)
    torch.testing.assert_close(psnr(off, target, reduction="none"), exact)
    torch.testing.assert_close(psnr(pred, target, floor_mse=True), psnr(pred, target))  # inexact: unchanged


def test_color_error_is_the_l1_of_a_pure_cast_and_reads_uint8_in_the_same_units(gen):
    from hieratok.metrics import color_error

    x = torch.rand(3, 3, 8, 8, generator=gen) * 1.2 - 0.6
    cast = torch.tensor([0.1, -0.2, 0.05]).view(1, 3, 1, 1)
    err = color_error(x + cast, x)
    assert err.shape == (3, 3) and err.dtype == torch.float64
    torch.testing.assert_close(err, (x + cast - x).abs().double().mean((2, 3)), rtol=0, atol=1e-7)
    # structure without a cast (a zero-mean pattern per channel) has no colour error
    pattern = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(4, 4) * 0.1
    assert color_error(x + pattern, x).max() < 1e-7
    # uint8: 255 levels span 2 units
    a = torch.full((1, 3, 4, 4), 100, dtype=torch.uint8)
    torch.testing.assert_close(color_error(a + 51, a), torch.full((1, 3), 0.4, dtype=torch.float64))
