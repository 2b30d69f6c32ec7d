import torch

from hieratok.nn.patch import PatchEmbed, unpatchify
from hieratok.nn.pos_embed import MultiScalePosEmbed


def test_unpatchify_inverts_reference_patchify(gen):
    p, side, C = 4, 3, 3
    img = torch.randn(2, C, side * p, side * p, generator=gen)
    # reference patchify with explicit loops: patch (i, j) -> vector laid out (p, p, C)
    patches = torch.stack([img[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(0, 2, 3, 1).reshape(2, -1)
                           for i in range(side) for j in range(side)], dim=1)
    assert torch.equal(unpatchify(patches, side, p, C), img)


def test_patch_embed_is_a_linear_map_of_patches(gen):
    pe = PatchEmbed(4, 3, 8)
    img = torch.randn(1, 3, 8, 8, generator=gen)
    out = pe(img)  # (1, 4, 8)
    patch = img[:, :, 4:8, 0:4]  # row 1, col 0 -> token 2
    expected = (pe.proj.weight * patch).sum(dim=(1, 2, 3)) + pe.proj.bias
    torch.testing.assert_close(out[0, 2], expected)


def test_multiscale_pos_embed_is_area_pooled_plus_scale_embedding():
    pos = MultiScalePosEmbed(grid=4, dim=5, scales=(1, 2, 4))
    e = pos()  # (1, 21, 5)
    assert e.shape == (1, 21, 5)
    g = pos.pos_grid[0]  # (D, 4, 4)
    torch.testing.assert_close(e[0, 0], g.mean(dim=(1, 2)) + pos.scale_embed[0])
    # scale 2, token (1, 0) averages rows 2-3, cols 0-1
    torch.testing.assert_close(e[0, 1 + 2], g[:, 2:4, 0:2].mean(dim=(1, 2)) + pos.scale_embed[1])
    torch.testing.assert_close(e[0, 5 + 7], g[:, 1, 3] + pos.scale_embed[2])
