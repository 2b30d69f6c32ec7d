"""ADM centre crop parity, random resized crop, flips and random crops."""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from hieratok.data.transforms import (
    Compose,
    RandomHorizontalFlip,
    RandomResizedCrop,
    center_crop_arr,
    random_crop,
)


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _adm_reference(img: Image.Image, n: int) -> np.ndarray:
    """guided-diffusion's protocol written out step by step on plain sizes and numpy slicing."""
    w, h = img.size
    while min(w, h) >= 2 * n:
        w, h = w // 2, h // 2
        img = img.resize((w, h), Image.BOX)
    s = min(w, h)
    w, h = int(round(w * n / s)), int(round(h * n / s))
    arr = np.array(img.resize((w, h), Image.BICUBIC))
    y0, x0 = (arr.shape[0] - n) // 2, (arr.shape[1] - n) // 2
    return arr[y0 : y0 + n, x0 : x0 + n]


@pytest.mark.parametrize("w,h,n", [(512, 384, 128), (300, 200, 64), (1000, 130, 64), (50, 40, 64), (64, 64, 64), (257, 999, 32)])
def test_center_crop_arr_matches_reference(w, h, n):
    img = _noise(w, h)
    out = center_crop_arr(img, n)
    assert out.size == (n, n)
    assert np.array_equal(np.asarray(out), _adm_reference(img, n))


def test_center_crop_arr_known_geometry():
    # 512x384 -> BOX halves once to 256x192, bicubic to 171x128, crop columns 21..148.
    ramp = np.tile(np.arange(512, dtype=np.float32) / 2, (384, 1))
    out = np.asarray(center_crop_arr(Image.fromarray(ramp.astype(np.uint8)), 128), dtype=np.float64)
    # the horizontal ramp survives: column c of the output comes from x = (c + 21 + 0.5) * 3 - 0.5
    expected = ((np.arange(128) + 21 + 0.5) * 512 / 171 - 0.5) / 2
    assert np.abs(out[64, 5:-5] - expected[5:-5]).max() < 1.5


@pytest.mark.parametrize("rng_factory", [lambda s: torch.Generator().manual_seed(s), lambda s: random.Random(s)])
def test_random_resized_crop_shape_determinism_and_bounds(rng_factory):
    rrc = RandomResizedCrop(32, scale=(0.2, 0.9))
    img = _noise(97, 61)
    a = np.asarray(rrc(img, rng_factory(1)))
    b = np.asarray(rrc(img, rng_factory(1)))
    c = np.asarray(rrc(img, rng_factory(2)))
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    rng = rng_factory(3)
    for _ in range(200):
        top, left, h, w = rrc.get_params(97, 61, rng)
        assert 0 <= top and top + h <= 61 and 0 <= left and left + w <= 97
        # scale/ratio up to the rounding of w and h to integers
        assert 0.2 * 0.9 <= h * w / (97 * 61) <= 0.9 * 1.1
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_random_resized_crop_fallback_is_central():
    # area 1 with aspect 2 never fits a square: torchvision falls back to a central crop.
    rrc = RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(2.0, 2.0))
    assert rrc.get_params(40, 40, random.Random(0)) == ((40 - 20) // 2, 0, 20, 40)
    img = _noise(40, 40)
    ref = img.crop((0, 10, 40, 30)).resize((16, 16), Image.BICUBIC)
    assert np.array_equal(np.asarray(rrc(img, random.Random(0))), np.asarray(ref))


def test_random_resized_crop_full_image_equals_resize():
    img = _noise(30, 30)
    rrc = RandomResizedCrop(20, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert np.array_equal(np.asarray(rrc(img, random.Random(0))), np.asarray(img.resize((20, 20), Image.BICUBIC)))


def test_horizontal_flip_and_compose():
    img = _noise(9, 4)
    assert np.array_equal(np.asarray(RandomHorizontalFlip(1.0)(img, random.Random(0))), np.asarray(img)[:, ::-1])
    assert np.array_equal(np.asarray(RandomHorizontalFlip(0.0)(img, random.Random(0))), np.asarray(img))
    flips = [np.array_equal(np.asarray(RandomHorizontalFlip()(img, random.Random(s))), np.asarray(img)) for s in range(200)]
    assert 60 < sum(flips) < 140
    pipe = Compose([RandomResizedCrop(8, (0.5, 1.0)), RandomHorizontalFlip(), lambda im: im.rotate(90)])
    assert np.array_equal(np.asarray(pipe(img, random.Random(5))), np.asarray(pipe(img, random.Random(5))))


def test_random_crop_is_a_window_and_upscales_small_images():
    img = _noise(20, 16)
    arr = np.asarray(img)
    for seed in range(5):
        crop = np.asarray(random_crop(img, 8, random.Random(seed)))
        hits = [(y, x) for y in range(9) for x in range(13) if np.array_equal(arr[y : y + 8, x : x + 8], crop)]
        assert len(hits) == 1
    small = random_crop(_noise(12, 30), 16, random.Random(0))
    assert small.size == (16, 16)
    with pytest.raises(ValueError):
        random_crop(img, 0)
    assert math.isclose(RandomResizedCrop(4).ratio[1], 4 / 3)
