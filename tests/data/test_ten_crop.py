"""ten_crop against torchvision's TenCrop semantics, spelled out on a labelled image."""

import pytest
import torch

from hieratok.data.transforms import ten_crop


def test_ten_crop_views_and_order():
    x = torch.arange(2 * 3 * 7 * 9, dtype=torch.float32).view(2, 3, 7, 9)
    v = ten_crop(x, 4)
    assert v.shape == (2, 10, 3, 4, 4)
    top, left = round((7 - 4) / 2), round((9 - 4) / 2)  # centre crop offsets (torchvision rounds)
    crops = [x[..., :4, :4], x[..., :4, 5:], x[..., 3:, :4], x[..., 3:, 5:], x[..., top:top + 4, left:left + 4]]
    for i, c in enumerate(crops):
        assert torch.equal(v[:, i], c)
    m = x.flip(-1)  # the second five are the same crops of the mirrored image
    assert torch.equal(v[:, 5], m[..., :4, :4]) and torch.equal(v[:, 5], x[..., :4, 5:].flip(-1))
    assert torch.equal(v[:, 9], m[..., top:top + 4, left:left + 4])


def test_ten_crop_rejects_crops_larger_than_the_image():
    with pytest.raises(ValueError, match="exceeds"):
        ten_crop(torch.zeros(1, 3, 8, 8), 9)
