"""The release's random pad-and-crop of the perceptual-loss input (ResTokLoss)."""

import random

import pytest
import torch
import torch.nn.functional as F

from hieratok.losses.restok import ResTokLoss, ResTokLossConfig, perceptual_pad_crop


def _images(seed, B=2, size=32):
    return torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class _Recorder(torch.nn.Module):
    """A perceptual 'distance' that keeps its inputs: mean absolute difference per image."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, a, b):
        self.seen.append((a.detach().clone(), b.detach().clone()))
        return (a - b).abs().flatten(1).mean(1)


def test_same_window_for_both_images_and_any_pairing():
    x, y, z = _images(0), _images(1), _images(2)
    xa, ya = perceptual_pad_crop(x, y, generator=torch.Generator().manual_seed(5))
    yb, xb = perceptual_pad_crop(y, x, generator=torch.Generator().manual_seed(5))
    xc, zc = perceptual_pad_crop(x, z, generator=torch.Generator().manual_seed(5))
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(xa, xc)  # one transform for both slots
    same = perceptual_pad_crop(x, x.clone(), generator=torch.Generator().manual_seed(5))
    assert torch.equal(same[0], same[1])
    assert xa.shape == x.shape and not torch.allclose(xa, x)


def test_deterministic_per_generator_and_leaves_global_state_alone():
    x, y = _images(3), _images(4)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    a = perceptual_pad_crop(x, y, generator=torch.Generator().manual_seed(1))
    b = perceptual_pad_crop(x, y, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    windows = {perceptual_pad_crop(x, y, generator=torch.Generator().manual_seed(s))[0].sum().item() for s in range(6)}
    assert len(windows) > 1  # the window depends on the seed


def test_window_is_a_replicate_padded_crop_resized_back():
    """Offsets top, bottom, left, right in 0..pad, drawn in that order from the generator; the
    crop of the 15-px replicate-padded image is resized back with bicubic interpolation."""
    x, y = _images(6, size=40), _images(7, size=40)
    for seed in range(3):
        top, bottom, left, right = torch.randint(0, 16, (4,), generator=torch.Generator().manual_seed(seed)).tolist()
        want = []
        for img in (x, y):
            p = F.pad(img, (15, 15, 15, 15), mode="replicate")
            crop = p[:, :, top:p.shape[2] - bottom, left:p.shape[3] - right]
            want.append(F.interpolate(crop, size=(40, 40), mode="bicubic", align_corners=False))
        got = perceptual_pad_crop(x, y, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    a, b = perceptual_pad_crop(x, y, pad=0)
    assert a is x and b is y
    with pytest.raises(ValueError, match="shape"):
        perceptual_pad_crop(x, y[:, :, :20])


def test_restok_loss_feeds_the_perceptual_term_the_cropped_pair():
    x = _images(8)
    rec = (x + 0.1 * _images(9)).requires_grad_(True)
    out = {"reconstructions": rec, "vq_loss": torch.tensor(0.0), "commitment_loss": torch.tensor(0.0),
           "codebook_loss": torch.tensor(0.0)}
    assert ResTokLossConfig().perceptual_pad_crop  # on by default, as released
    perc = _Recorder()
    logs = ResTokLoss(perceptual=perc)(x, out, 0, generator=torch.Generator().manual_seed(2))
    want = perceptual_pad_crop(x, rec.detach(), generator=torch.Generator().manual_seed(2))
    assert torch.equal(perc.seen[0][0], want[0]) and torch.equal(perc.seen[0][1], want[1])
    logs["loss"].backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0  # the crop keeps the graph
    # a perfect reconstruction stays perfect after the crop: both images went through one window
    same = {**out, "reconstructions": x.clone()}
    assert ResTokLoss(perceptual=_Recorder())(x, same, 0, generator=torch.Generator().manual_seed(2))["perceptual"] == 0
    off = _Recorder()
    ResTokLoss(ResTokLossConfig(perceptual_pad_crop=False), perceptual=off)(x, out, 0)
    assert torch.equal(off.seen[0][0], x) and torch.equal(off.seen[0][1], rec.detach())
