"""Tiled reconstruction: tile layout, weights that sum to 1, no seams."""

import pytest
import torch
from torch import nn

from hieratok import HieraTok
from hieratok.tokenizers.tiling import _ramps, blend_weights, tile_starts, tiled_reconstruct


@pytest.mark.parametrize("length,tile,overlap", [(64, 64, 16), (100, 64, 16), (160, 64, 16), (451, 64, 16), (300, 48, 12)])
def test_tile_starts_cover_with_overlap(length, tile, overlap):
    s = tile_starts(length, tile, overlap)
    assert s[0] == 0 and s[-1] == max(0, length - tile)
    assert all(tile - (b - a) >= overlap for a, b in zip(s, s[1:]))  # neighbours overlap by at least `overlap`
    if len(s) > 1:  # the fewest tiles: one fewer could not overlap by `overlap`
        assert (len(s) - 2) * (tile - overlap) < length - tile


@pytest.mark.parametrize("k", [1, 2, 5])
def test_ramps_sum_to_one_in_closed_form_on_a_regular_layout(k):
    tile, overlap = 64, 16
    length = tile + k * (tile - overlap)
    starts = tile_starts(length, tile, overlap)
    assert starts == [i * (tile - overlap) for i in range(k + 1)]
    # ramp up (j + 1/2) / OV and ramp down 1 - (j + 1/2) / OV: the sum is 1 before any normalisation
    torch.testing.assert_close(_ramps(starts, tile, overlap, length).sum(0), torch.ones(length, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_blend_weights_sum_to_one_on_any_layout():
    for length, tile, overlap in [(451, 64, 16), (300, 64, 30), (65, 64, 8)]:
        w = blend_weights(tile_starts(length, tile, overlap), tile, overlap, length)
        torch.testing.assert_close(w.sum(0), torch.ones(length, dtype=torch.float64), rtol=0, atol=1e-12)
        assert (w >= 0).all()


class ShiftPerTile(nn.Module):
    """A stand-in tokenizer whose reconstruction is the tile plus a tile-wide offset c = 0.5 * mean(tile):
    tiles of a gradient get different offsets, the artefact that makes seams."""

    class config:  # noqa: N801 - what tiled_reconstruct reads
        image_size = 32

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def reconstruct(self, x):
        return [x + 0.5 * x.mean(dim=(1, 2, 3), keepdim=True)], None


def test_smooth_gradient_has_no_seam():
    """Derivation: tile i returns g + c_i. Blended: g + sum_i w_i c_i with sum_i w_i = 1; along x the
    separable weights are u_a(x) v_b(y) with sum_b v_b = 1, and where tiles a, a+1 blend, u_a + u_{a+1} = 1
    with each moving by 1 / OV per pixel (a ramp of OV pixels). So a horizontal neighbour difference is
    at most slope_x(g) + max|c(a+1, b) - c(a, b)| / OV (likewise vertically). Stitching instead steps
    by |c(a+1, b) - c(a, b)| at the border."""
    T, OV = 32, 8
    H, W = T + (T - OV), T + 4 * (T - OV)  # a regular layout: 2 x 5 tiles, neighbours overlap by OV
    yy, xx = torch.meshgrid(torch.linspace(-0.8, 0.8, H), torch.linspace(-0.9, 0.9, W), indexing="ij")
    x = torch.stack([xx, 0.5 * xx + 0.3 * yy, yy])[None]  # (1, 3, H, W), smooth
    (out,) = tiled_reconstruct(ShiftPerTile(), x, tile=T, overlap=OV)
    assert out.shape == x.shape
    ys, xs = tile_starts(H, T, OV), tile_starts(W, T, OV)
    c = torch.tensor([[0.5 * x[:, :, a:a + T, b:b + T].mean().item() for b in xs] for a in ys])  # (rows, cols)
    eps = 1e-6  # float32 rounding of values of order 1
    for dim, dc in ((-1, c.diff(dim=1).abs().max().item()), (-2, c.diff(dim=0).abs().max().item())):
        bound = x.diff(dim=dim).abs().max().item() + dc / OV + eps
        assert out.diff(dim=dim).abs().max().item() <= bound, (dim, bound)
    # stitching (each pixel from the last tile that covers it, no blend) breaks the bound at a border
    stitched = x.clone()
    for a in ys:
        for b in xs:
            t = x[:, :, a:a + T, b:b + T]
            stitched[:, :, a:a + T, b:b + T] = t + 0.5 * t.mean()
    bound_x = x.diff(dim=-1).abs().max().item() + c.diff(dim=1).abs().max().item() / OV + eps
    assert stitched.diff(dim=-1).abs().max().item() > 2 * bound_x


def test_one_tile_is_the_plain_reconstruction_and_pyramids_are_blended(gen):
    torch.manual_seed(0)
    m = HieraTok.from_preset("tiny").eval()
    x = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        direct, _ = m.reconstruct(x)
    tiled = tiled_reconstruct(m, x)
    assert all(torch.equal(a, b) for a, b in zip(tiled[-1:], direct[-1:]))  # weight 1 everywhere, finest scale
    big = torch.rand(1, 3, 80, 150, generator=gen) * 2 - 1
    pyr = tiled_reconstruct(m, big, overlap=16, batch_size=3)
    assert [tuple(p.shape[-2:]) for p in pyr] == [(10, 19), (20, 38), (40, 75), (80, 150)]
    assert all(torch.isfinite(p).all() for p in pyr)
