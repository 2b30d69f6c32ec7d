import numpy as np
import pytest
import torch
from PIL import Image

from hieratok.metrics.image import quantize_to_uint8
from hieratok.report import (
    pyramid_strip,
    reconstruction_grid,
    render_image_grid,
    save_image_grid,
    save_samples_grid,
    to_uint8,
)


def _solid(rgb_u8, h, w):
    """(3, h, w) image in [-1, 1] whose uint8 quantisation is exactly rgb_u8."""
    v = torch.tensor(rgb_u8, dtype=torch.float32) / 127.5 - 1.0
    return v.view(3, 1, 1).expand(3, h, w).clone()


def test_to_uint8_matches_numpy_reference(gen):
    x = torch.rand(2, 3, 5, 7, generator=gen) * 2.4 - 1.2  # includes out-of-range values
    x[0, 0, 0, :3] = torch.tensor([-1.0, 0.0, 1.0])  # (x + 1) * 127.5 = 0, 127.5 (half-way), 255
    ref = np.clip(np.floor((x.numpy() + np.float32(1)) * np.float32(127.5) + np.float32(0.5)), 0, 255)
    ref = ref.astype(np.uint8).transpose(0, 2, 3, 1)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (2, 5, 7, 3)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(out[0, 0, :3, 0], [0, 128, 255])
    # a dense sweep across every level boundary, float32 like the metrics
    sweep = torch.linspace(-1.0, 1.0, 30001).view(1, 1, -1).expand(3, 1, -1)
    ref = np.floor((sweep[0, 0].numpy() + np.float32(1)) * np.float32(127.5) + np.float32(0.5))
    np.testing.assert_array_equal(to_uint8(sweep)[0, :, 0], np.clip(ref, 0, 255).astype(np.uint8))
    # one image -> HWC, and identical to what PSNR / SSIM quantise
    np.testing.assert_array_equal(to_uint8(x[1]), quantize_to_uint8(x[1]).permute(1, 2, 0).numpy())


def test_to_uint8_rejects_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        to_uint8(torch.zeros(4, 4))


def test_grid_of_mixed_sizes_places_cells(tmp_path):
    pad = 3
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    rows = [[_solid(red, 4, 4), _solid(green, 8, 6)], [_solid(blue, 2, 8)]]  # ragged, mixed sizes
    grid = save_image_grid(rows, tmp_path / "g.png", pad=pad)
    arr = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    cell_h, cell_w = 8, 8  # largest height, largest width
    assert arr.shape == (pad + 2 * (cell_h + pad), pad + 2 * (cell_w + pad), 3)
    np.testing.assert_array_equal(arr, grid.array)

    def block(top, left, h, w):
        return arr[top:top + h, left:left + w]

    # cell (0, 0): 4x4 red centred in an 8x8 cell at (pad, pad)
    top, left = pad + (cell_h - 4) // 2, pad + (cell_w - 4) // 2
    assert (block(top, left, 4, 4) == red).all()
    assert (arr[pad:pad + cell_h, pad:pad + cell_w] == red).all(axis=-1).sum() == 16
    # cell (0, 1): 8x6 green, horizontally centred
    top, left = pad, pad + cell_w + pad + 1
    assert (block(top, left, 8, 6) == green).all()
    # cell (1, 0): 2x8 blue, vertically centred
    top, left = pad + cell_h + pad + 3, pad
    assert (block(top, left, 2, 8) == blue).all()
    # empty cell (1, 1) and padding stay background white
    assert (arr[pad + cell_h + pad:, pad + cell_w + pad:] == 255).all()
    assert (arr[:pad] == 255).all() and (arr[:, :pad] == 255).all()
    assert grid.image_boxes[1][1] is None and grid.image_boxes[0][1] == (pad, pad + cell_w + pad + 1, 8, 6)


def test_grid_upscale_is_nearest_blocks_and_labels_add_bands():
    small = torch.zeros(3, 2, 2)
    small[:, 0, 0] = 1.0  # top-left pixel white, rest mid-grey (128)
    big = _solid((10, 20, 30), 8, 8)
    plain = render_image_grid([[small, big]], upscale_to=8, pad=1)
    top, left, h, w = plain.image_boxes[0][0]
    assert (h, w) == (8, 8)
    tile = plain.array[top:top + 8, left:left + 8]
    assert (tile[:4, :4] == 255).all() and (tile[4:, :] == 128).all() and (tile[:4, 4:] == 128).all()

    labelled = render_image_grid([[small, big]], row_labels=["row"], col_labels=["a", "b"],
                                 upscale_to=8, pad=1)
    assert labelled.array.shape[0] > plain.array.shape[0]
    assert labelled.array.shape[1] > plain.array.shape[1]
    # the cells moved but their content did not change
    top, left, _, _ = labelled.image_boxes[0][1]
    assert (labelled.array[top:top + 8, left:left + 8] == (10, 20, 30)).all()
    # labels drew dark pixels outside the cells
    assert (labelled.array[:top] < 100).any()
    with pytest.raises(ValueError, match="col_labels"):
        render_image_grid([[small]], col_labels=["a", "b"])


def test_reconstruction_grid_rows_and_columns(tmp_path, gen):
    x = torch.rand(5, 3, 16, 16, generator=gen) * 2 - 1
    pyr = [torch.rand(5, 3, s, s, generator=gen) * 2 - 1 for s in (4, 8, 16)]
    grid = reconstruction_grid(x, {"multi": pyr, "single": x.clone()}, tmp_path / "r.png", max_images=3)
    with Image.open(tmp_path / "r.png") as im:
        arr = np.asarray(im.convert("RGB"))
    assert len(grid.image_boxes) == 3 and all(len(r) == 1 + 3 + 1 for r in grid.image_boxes)
    assert grid.cell_h == grid.cell_w == 16
    assert arr.shape[0] == grid.cell_origins[-1][0][0] + 16 + 2  # last row ends one pad above the edge
    for i in range(3):  # row i of the file starts with input image i
        top, left = grid.cell_origins[i][0]
        np.testing.assert_array_equal(arr[top:top + 16, left:left + 16], to_uint8(x[i]))
    # the coarsest level is nearest-upscaled x4 into its cell
    top, left, h, w = grid.image_boxes[2][1]
    up = np.kron(to_uint8(pyr[0][2]), np.ones((4, 4, 1), dtype=np.uint8))
    np.testing.assert_array_equal(grid.array[top:top + h, left:left + w], up)
    with pytest.raises(ValueError, match="holds 2 images"):
        reconstruction_grid(x, {"m": [pyr[0][:2]]}, tmp_path / "bad.png")


def test_pyramid_strip_and_samples_grid(tmp_path, gen):
    levels = [torch.rand(3, s, s, generator=gen) * 2 - 1 for s in (2, 4, 8)]
    strip = pyramid_strip(levels, tmp_path / "p.png")
    assert len(strip.image_boxes) == 1 and [b[2] for b in strip.image_boxes[0]] == [8, 8, 8]
    true_size = pyramid_strip(levels, tmp_path / "p2.png", upscale=False, labels=False)
    assert [b[2] for b in true_size.image_boxes[0]] == [2, 4, 8]
    samples = save_samples_grid(torch.rand(7, 3, 6, 6, generator=gen) * 2 - 1, tmp_path / "s.png", nrow=3)
    assert [len(r) for r in samples.image_boxes] == [3, 3, 3] and samples.image_boxes[2][1] is None
    assert Image.open(tmp_path / "s.png").size == (samples.array.shape[1], samples.array.shape[0])


def test_nan_pixels_are_black_and_logged(tmp_path, caplog):
    x = _solid((200, 100, 50), 4, 4)
    x[:, 1, 2] = float("nan")
    x[0, 0, 0] = float("inf")
    with caplog.at_level("WARNING", logger="hieratok.report.images"):
        out = to_uint8(x)
    assert "4 of 48 image values are NaN or infinite" in caplog.text
    assert out[1, 2].tolist() == [0, 0, 0] and out[0, 0].tolist() == [255, 100, 50]
    assert out[3, 3].tolist() == [200, 100, 50]
    caplog.clear()
    save_image_grid([[x]], tmp_path / "g.png")  # what a report saves goes through the same check
    assert "NaN or infinite" in caplog.text
    caplog.clear()
    to_uint8(_solid((1, 2, 3), 2, 2))
    assert not caplog.text
