"""The multi-scale downsamplers: what each passes on of the latent (issue: the paper-literal conv
stack erases per-token magnitude and starts with no identity path)."""

import pytest
import torch
import torch.nn.functional as F

from hieratok import HieraTok

CONV_DESIGNS = ["conv", "conv-residual", "conv-prenorm"]


def make(downsample, **kw):
    torch.manual_seed(0)
    kw = {"image_size": 32, "patch_size": 8, "latent_channels": 4, "encoder_depth": 1, "decoder_depth": 1,
          "scales": (1, 2, 4), **kw}
    return HieraTok.from_preset("tiny", downsample=downsample, **kw).eval()


def _trained_like(m, gen):
    """Give every downsampler parameter a random value, as after training (no zero branches)."""
    with torch.no_grad():
        for p in m.downsampler.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] > 4 else 0.0))
    return m


def _r2_linear(maps_BdGG, z_BdGG):
    """R^2 of the best affine map from each token of the finest map to the same token of z."""
    X = maps_BdGG.permute(0, 2, 3, 1).reshape(-1, maps_BdGG.shape[1]).double()
    Y = z_BdGG.permute(0, 2, 3, 1).reshape(-1, z_BdGG.shape[1]).double()
    X1 = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    res = X1 @ torch.linalg.lstsq(X1, Y).solution - Y
    return 1 - (res ** 2).sum().item() / ((Y - Y.mean(0)) ** 2).sum().item()


def test_residual_design_starts_as_area_interpolation(gen):
    m, ref = make("conv-residual"), make("interp")
    z = torch.randn(3, 4, 4, 4, generator=gen)
    for a, b in zip(m.multiscale_maps(z), ref.multiscale_maps(z)):
        assert torch.equal(a, b)  # zero last conv: exactly interp, the finest map is z itself
    assert torch.equal(m.multiscale_maps(z)[-1], z)
    # and it learns: the stacks receive gradients through the zero conv
    sum(t.square().sum() for t in m.multiscale_maps(z)).backward()
    assert all(st[-1].weight.grad.abs().sum() > 0 for st in m.downsampler.stacks)


def test_prenorm_design_starts_linear(gen):
    m = make("conv-prenorm")
    z = torch.randn(3, 4, 4, 4, generator=gen)
    bias = [st.out.bias.view(1, -1, 1, 1) + st.out.weight.sum((2, 3)) @ st.down.bias  # map of z = 0
            for st in m.downsampler.stacks]
    bias = [m.multiscale_maps(torch.zeros_like(z))[k] for k in range(3)]
    for a, b, c in zip(m.multiscale_maps(z), m.multiscale_maps(-2.5 * z), bias):
        torch.testing.assert_close(b - c, -2.5 * (a - c), rtol=1e-5, atol=1e-6)
    assert _r2_linear(m.multiscale_maps(z)[-1], z) > 1 - 1e-9


@pytest.mark.parametrize("downsample", ["conv-residual", "conv-prenorm", "interp"])
def test_designs_that_keep_magnitude(downsample, gen):
    """Scaling the latent (globally, or one token) changes the token maps, also after training."""
    m = make(downsample)
    if downsample != "interp":
        _trained_like(m, gen)
    z = torch.randn(2, 4, 4, 4, generator=gen)
    for scale in (3.0, torch.rand(2, 1, 4, 4, generator=gen) * 5 + 0.2):
        for a, b in zip(m.multiscale_maps(z), m.multiscale_maps(z * scale)):
            assert (b - a).norm() > 0.1 * a.norm()


def test_paper_literal_conv_erases_token_magnitude(gen):
    """The documented defect of the paper-literal stack, pinned so that the README's claim stays true:
    a LayerNorm right after a linear map of z makes the maps blind to the latent's scale, and at
    initialisation the finest map carries little of z linearly."""
    m = make("conv")
    z = torch.randn(2, 4, 4, 4, generator=gen)
    for a, b in zip(m.multiscale_maps(z), m.multiscale_maps(3.0 * z)):
        assert (b - a).norm() < 1e-2 * a.norm()  # only the eps of LayerNorm sees the scale
    big = torch.randn(64, 4, 4, 4, generator=gen)
    assert _r2_linear(m.multiscale_maps(big)[-1], big) < 0.5
    assert _r2_linear(make("conv-residual").multiscale_maps(big)[-1], big) > 1 - 1e-9


@pytest.mark.parametrize("downsample", CONV_DESIGNS)
def test_every_design_has_the_three_convs_per_scale(downsample):
    m = make(downsample, downsample_width=12)
    convs = [mod for mod in m.downsampler.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 3 * 3
    assert [c.kernel_size for c in convs[:3]] == [(4, 4), (3, 3), (1, 1)]  # grid 4 -> side 1
    assert all(c.out_channels in (12, 4) for c in convs)


@pytest.mark.parametrize("downsample", CONV_DESIGNS)
def test_designs_train_and_round_trip(downsample, tmp_path, gen):
    m = make(downsample)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    m.train()
    out = m(x, generator=gen)
    sum(F.mse_loss(r, F.adaptive_avg_pool2d(x, r.shape[-1])) for r in out["reconstructions"]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.downsampler.parameters())
    m.eval().save_pretrained(tmp_path / "m")
    back = HieraTok.from_pretrained(tmp_path / "m")
    assert back.config.downsample == downsample
    assert torch.equal(back.decode(back.encode(x).mode()), m.decode(m.encode(x).mode()))


def test_unknown_design_is_named():
    with pytest.raises(ValueError, match="downsample 'conv-x' is not one of"):
        make("conv-x")
