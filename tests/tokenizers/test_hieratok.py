import pytest
import torch
import torch.nn.functional as F

from hieratok import HieraTok, HieraTokConfig
from hieratok.presets import HIERATOK_PRESETS
from hieratok.tokenizers.hieratok import _strided_kernel, default_scales

SMALL = dict(image_size=32, patch_size=8, latent_channels=4, encoder_depth=1, encoder_width=32, encoder_heads=2,
             decoder_depth=2, decoder_width=48, decoder_heads=4)


def make(**kw) -> HieraTok:
    torch.manual_seed(0)
    return HieraTok(HieraTokConfig(**{**SMALL, **kw})).eval()


@pytest.mark.parametrize("preset", ["tiny", "tiny-single", "small", "small-single"])
def test_cpu_presets_shapes_backward(preset, gen):
    m = HieraTok.from_preset(preset).train()
    c = m.config
    x = torch.rand(2, 3, c.image_size, c.image_size, generator=gen) * 2 - 1
    out = m(x, generator=gen)
    recs = out["reconstructions"]
    assert [r.shape[-1] for r in recs] == [s * c.patch_size for s in c.scales]
    assert out["latent"].shape == (2, c.latent_channels, c.grid, c.grid)
    loss = sum(F.l1_loss(r, F.interpolate(x, size=r.shape[-2:], mode="area")) for r in recs) + out["posterior"].kl().mean()
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_public_api_consistency(gen):
    m = make()
    x = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    post = m.encode(x)
    z = post.mode()
    assert z.shape == (3, 4, 4, 4) and torch.equal(z, post.mean)
    maps = m.multiscale_maps(z)
    assert [tuple(t.shape) for t in maps] == [(3, 4, s, s) for s in (1, 2, 4)]
    pyr = m.decode(z, all_scales=True)
    pyr2 = m.decode_multiscale(maps)
    for a, b in zip(pyr, pyr2):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(m.decode(z), pyr[-1])
    out = m(x)
    torch.testing.assert_close(out["reconstructions"][-1], pyr[-1])


@pytest.mark.parametrize("downsample", ["conv", "interp"])
@pytest.mark.parametrize("mode,affected", [
    ("scale_causal", lambda k, j: j >= k),
    ("scale_independent", lambda k, j: j == k),
    ("full", lambda k, j: True),
])
def test_mask_semantics_by_perturbation(downsample, mode, affected, gen):
    """Changing the token map of scale k changes exactly the outputs the attention mode allows."""
    m = make(scales=(1, 2, 4), attention=mode, downsample=downsample)
    maps = m.multiscale_maps(torch.randn(2, 4, 4, 4, generator=gen))
    base = m.decode_multiscale(maps)
    for k in range(3):
        pert = [t.clone() for t in maps]
        pert[k] = pert[k] + torch.randn(pert[k].shape, generator=gen)
        out = m.decode_multiscale(pert)
        for j in range(3):
            diff = (out[j] - base[j]).abs().max().item()
            if affected(k, j):
                assert diff > 1e-4, (mode, k, j, diff)
            else:
                assert diff < 1e-6, (mode, k, j, diff)


def test_single_scale_twin_has_no_downsampler_and_same_encoder():
    multi, single = make(), make(multiscale=False)
    assert single.config.scales == (4,) and single.downsampler is None
    assert single.config.decoder_tokens == 16 and multi.config.decoder_tokens == 21
    enc_m = {k: v.shape for k, v in multi.encoder.state_dict().items()}
    enc_s = {k: v.shape for k, v in single.encoder.state_dict().items()}
    assert enc_m == enc_s  # appendix C.2: identical encoders


def test_interp_downsampler_is_area_pooling(gen):
    m = make(downsample="interp", scales=(1, 2, 4))
    z = torch.randn(2, 4, 4, 4, generator=gen)
    maps = m.multiscale_maps(z)
    torch.testing.assert_close(maps[0], z.mean(dim=(2, 3), keepdim=True))
    torch.testing.assert_close(maps[1][:, :, 1, 0], z[:, :, 2:4, 0:2].mean(dim=(2, 3)))
    assert maps[2] is z
    assert sum(p.numel() for p in m.downsampler.parameters()) == 0


@pytest.mark.parametrize("grid", [4, 8, 16, 12])
def test_strided_kernel_maps_grid_to_every_side(grid):
    for side in range(1, grid + 1):
        k, t = _strided_kernel(grid, side)
        assert (grid - k) // t + 1 == side and (grid - k) % t == 0  # windows span the map exactly
        if grid % side == 0:
            assert k == t == grid // side


def test_non_power_of_two_scales(gen):
    """Table 4's [1,2,4,8,12,16] needs a 12 from 16: valid strided conv, no crash."""
    m = make(image_size=64, patch_size=4, scales=(1, 2, 4, 8, 12, 16))
    pyr = m.decode(torch.randn(1, 4, 16, 16, generator=gen), all_scales=True)
    assert [p.shape[-1] for p in pyr] == [4, 8, 16, 32, 48, 64]


def test_default_scales():
    assert default_scales(16) == (1, 2, 4, 8, 16)
    assert default_scales(12) == (1, 2, 4, 8, 12)
    assert default_scales(1) == (1,)
    assert HieraTok.preset_config("tiny", image_size=128).scales == (1, 2, 4, 8, 16)
    assert HieraTok.preset_config("tiny-single", image_size=128).scales == (16,)


@pytest.mark.parametrize("kw,match", [
    (dict(image_size=30), "not divisible by patch_size"),
    (dict(scales=(1, 2, 3)), "must end at the full grid 4"),
    (dict(scales=(2, 1, 4)), "strictly increasing"),
    (dict(scales=(0, 4)), "scale 0"),
    (dict(scales=(1, 8)), "scale 8"),
    (dict(scales="1,2,4"), "list of grid sides"),
    (dict(downsample="pool"), "downsample 'pool'"),
    (dict(attention="causal"), "attention 'causal'"),
    (dict(multiscale=False, scales=(1, 4)), "multiscale=False"),
    (dict(decoder_heads=5), "not divisible by decoder_heads"),
    (dict(attn_backend="xformers"), "attn_backend"),
    (dict(downsample_width=0), "downsample_width must be a positive integer"),
    (dict(mlp_ratio=0), "mlp_ratio must be > 0"),
    (dict(decoder_drop_path=1.0), r"decoder_drop_path must be in \[0, 1\)"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        HieraTokConfig(**{**SMALL, **kw})


def test_input_errors(gen):
    m = make()
    with pytest.raises(ValueError, match=r"60x64 does not work: .* multiples of the patch size 8"):
        m.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="latents of shape"):
        m.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"token grid 1x1 is too small"):
        m.decode(torch.zeros(1, 4, 1, 1))
    with pytest.raises(ValueError, match="expected 3 token maps"):
        m.decode_multiscale([torch.zeros(1, 4, 4, 4)])
    with pytest.raises(ValueError, match="unknown HieraTok preset .huge.; choose one of"):
        HieraTok.from_preset("huge")
    with pytest.raises(ValueError, match="unknown HieraTokConfig field"):
        HieraTok.from_preset("tiny", widht=3)


def test_posterior_kl_closed_form_and_sampling(gen):
    m = make()
    post = m.encode(torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(post.mean, post.std), torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(post.kl(), ref, rtol=1e-5, atol=1e-5)
    a = post.sample(torch.Generator().manual_seed(1))
    b = post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, post.mode())


def test_backends_agree_on_the_whole_model(gen):
    m = make(attention="scale_causal")
    z = torch.randn(2, 4, 4, 4, generator=gen)
    ref = [t.double() for t in m.decode(z, all_scales=True)]
    for backend in ("reference", "flex"):  # flex: the decoder's BlockMask, eager on CPU
        m.set_attn_backend(backend)
        with torch.no_grad():  # FlexAttention has no CPU backward
            out = m.decode(z, all_scales=True)
        for a, b in zip(out, ref):
            assert (a.double() - b).norm() / b.norm() < 1e-5, backend


def test_paper_presets_carry_appendix_c():
    for d in (16, 32):
        for suffix, scales in (("", (1, 2, 4, 8, 16)), ("-single", (16,))):
            c = HieraTok.preset_config(f"hieratok-f16d{d}{suffix}")
            assert (c.image_size, c.patch_size, c.latent_channels, c.scales) == (256, 16, d, scales)
            assert (c.encoder_depth, c.encoder_width, c.encoder_heads) == (6, 768, 12)
            assert (c.decoder_depth, c.decoder_width, c.decoder_heads) == (24, 1024, 16)
    assert {"tiny", "tiny-single", "small", "small-single"} <= set(HIERATOK_PRESETS)


def test_empty_batch_round_trips():
    m = make().eval()
    with torch.no_grad():
        recs = m(torch.zeros(0, 3, 32, 32))["reconstructions"]
    assert [tuple(r.shape) for r in recs] == [(0, 3, 8 * s, 8 * s) for s in m.config.scales]


def test_image_values_checked_outside_training(gen):
    import warnings

    from hieratok.tokenizers.inputs import InputRangeWarning

    m = make()
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        m.encode(bad)
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        m.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # Python's default: once per calling line
        for _ in range(3):
            m.encode((x + 1) * 127.5)  # [0, 255] given as it is
        m.encode(x)
    assert [w.category for w in seen] == [InputRangeWarning]
    assert "tokenizers expect [-1, 1]" in str(seen[0].message) and seen[0].filename == __file__
    m.train()
    m.encode(bad)  # training batches are not read back (no host sync per step)
