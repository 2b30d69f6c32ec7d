"""Decoding every PIL mode to RGB, unreadable files, and tensor conversion."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hieratok.data.images import UnreadableImageError, load_rgb, pil_to_tensor, tensor_to_pil, tensor_to_uint8, to_rgb


def _roundtrip(img: Image.Image, fmt: str, tmp_path, name: str) -> Image.Image:
    path = tmp_path / f"{name}.{fmt.lower()}"
    img.save(path, format=fmt)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == img.size
    return out


def _composite_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + 255.0 * (1.0 - a)


def test_grey_and_bilevel(tmp_path):
    grey = np.arange(0, 240, 15, dtype=np.uint8).reshape(4, 4)
    out = np.asarray(_roundtrip(Image.fromarray(grey, "L"), "PNG", tmp_path, "grey"))
    assert np.array_equal(out, np.repeat(grey[..., None], 3, axis=2))

    bits = np.array([[0, 1], [1, 0]], dtype=bool)
    out = np.asarray(_roundtrip(Image.fromarray(bits).convert("1"), "PNG", tmp_path, "bits"))
    assert np.array_equal(out[..., 0], bits.astype(np.uint8) * 255)


def test_alpha_modes_composite_on_white(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    out = np.asarray(_roundtrip(rgba, "PNG", tmp_path, "rgba")).astype(np.float64)
    ref = _composite_white(rgb, alpha)
    assert np.abs(out - ref).max() <= 1.0
    assert np.array_equal(out[0, 0], [255, 255, 255]) and np.array_equal(out[0, 1], rgb[0, 1])

    la = Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
    out = np.asarray(_roundtrip(la, "PNG", tmp_path, "la")).astype(np.float64)
    ref = _composite_white(np.repeat(rgb[..., :1], 3, axis=2), alpha)
    assert np.abs(out - ref).max() <= 1.0


def test_palette_with_and_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 128, 0, 10, 20, 30] + [0] * (256 * 3 - 9)
    idx = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette(palette)
    colours = np.array(palette[:9], dtype=np.uint8).reshape(3, 3)
    out = np.asarray(_roundtrip(img, "PNG", tmp_path, "pal"))
    assert np.array_equal(out, colours[idx])

    img.info["transparency"] = 1  # colour index 1 is transparent
    path = tmp_path / "pal_t.png"
    img.save(path, transparency=1)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    out = np.asarray(load_rgb(path))
    expected = colours[idx].copy()
    expected[idx == 1] = 255
    assert np.array_equal(out, expected)


def test_cmyk_pure_cyan(tmp_path):
    cmyk = Image.new("CMYK", (3, 2), (255, 0, 0, 0))
    out = np.asarray(_roundtrip(cmyk, "TIFF", tmp_path, "cmyk"))
    assert np.array_equal(out, np.broadcast_to(np.array([0, 255, 255], np.uint8), (2, 3, 3)))


def test_16bit_png_gradient_maps_to_8bit(tmp_path):
    ramp = np.linspace(0, 65535, 300).round().astype(np.uint16).reshape(1, 300).repeat(2, axis=0)
    path = tmp_path / "g16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_rgb(path))[0, :, 0].astype(int)
    assert out[0] == 0 and out[-1] == 255
    assert np.all(np.diff(out) >= 0)
    assert np.array_equal(out, np.rint(ramp[0] / 257.0).astype(int))


def test_int32_and_float_modes():
    wide = np.array([[0, 1000, 65535]], dtype=np.int32)
    out = np.asarray(to_rgb(Image.fromarray(wide, "I")))[..., 0]
    assert out.tolist() == [[0, 4, 255]]
    small = np.array([[0, 17, 255]], dtype=np.int32)  # 8-bit values stored as "I"
    assert np.asarray(to_rgb(Image.fromarray(small, "I")))[..., 1].tolist() == [[0, 17, 255]]
    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    assert np.asarray(to_rgb(Image.fromarray(unit, "F")))[..., 2].tolist() == [[0, 128, 255]]


@pytest.mark.parametrize("kind", ["random", "truncated", "missing", "empty"])
def test_unreadable_files_raise_named_one_line_error(tmp_path, kind):
    path = tmp_path / f"bad_{kind}.jpg"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        buf = io.BytesIO()
        noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(buf, format="JPEG", quality=95)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(UnreadableImageError) as info:
        load_rgb(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_bytes_source_and_tensor_roundtrip():
    arr = np.random.default_rng(2).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    img = load_rgb(buf.getvalue())
    x = pil_to_tensor(img)
    assert x.shape == (3, 7, 5) and x.dtype == torch.float32
    ref = torch.from_numpy(arr).permute(2, 0, 1).double() / 127.5 - 1.0
    assert torch.allclose(x.double(), ref, atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(tensor_to_uint8(x), torch.from_numpy(arr).permute(2, 0, 1))
    assert np.array_equal(np.asarray(tensor_to_pil(x)), arr)
    assert tensor_to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_16bit_scaled_by_bit_depth_not_content(tmp_path):
    """A 16-bit image of small values stays dark: its scale is its bit depth, so one pixel above 255
    changes nothing else (the content-based rule rescaled the whole image 257x)."""
    low = np.full((4, 4), 200, np.uint16)
    Image.fromarray(low).save(tmp_path / "a.png")
    low[0, 0] = 256
    Image.fromarray(low).save(tmp_path / "b.png")
    a, b = np.asarray(load_rgb(tmp_path / "a.png")), np.asarray(load_rgb(tmp_path / "b.png"))
    assert a.max() == 1 and np.array_equal(a[1:], b[1:])  # round(200 / 257) = 1


def test_pixel_limit_refuses_before_decoding(tmp_path):
    Image.fromarray(np.zeros((40, 50), np.uint16)).save(tmp_path / "big.png")
    with pytest.raises(UnreadableImageError, match="big.png: 50x40 pixels is more than the limit of 1999"):
        load_rgb(tmp_path / "big.png", max_pixels=1999)
    assert load_rgb(tmp_path / "big.png", max_pixels=2000).size == (50, 40)
