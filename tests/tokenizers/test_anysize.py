"""Any image size: bit-identity at the training size, the rectangular pyramid, mask semantics on
rectangular grids, resampled positions, ResTok at other sizes."""

import pytest
import torch
import torch.nn.functional as F

from hieratok import HieraTok, HieraTokConfig
from hieratok.distributions import DiagonalGaussian
from hieratok.nn import MaskSpec
from hieratok.nn.attention import SegmentedMask, resolve_mask
from hieratok.nn.pos_embed import resample_grid
from hieratok.tokenizers.hieratok import scale_shapes
from hieratok.tokenizers.restok import ResTok

SMALL = dict(image_size=32, patch_size=8, latent_channels=4, encoder_depth=1, encoder_width=32, encoder_heads=2,
             decoder_depth=2, decoder_width=48, decoder_heads=4, scales=(1, 2, 4))


def make(**kw) -> HieraTok:
    torch.manual_seed(0)
    return HieraTok(HieraTokConfig(**{**SMALL, **kw})).eval()


def legacy_square_forward(m: HieraTok, x: torch.Tensor) -> list[torch.Tensor]:
    """The square-only code path as it was before any-size support (learned tables used as they are,
    area pooling with int sides, s*s mask blocks), written out from the model's parameters."""
    c, e, d = m.config, m.encoder, m.decoder
    G, p, B = c.grid, c.patch_size, x.shape[0]
    h = e.head(e.norm(e.blocks(e.patch_embed(x) + e.pos_embed)))
    z = DiagonalGaussian(h.transpose(1, 2).reshape(B, -1, G, G)).mode()
    if m.downsampler is None:
        maps = [z]
    elif c.downsample == "interp":
        maps = [z if s == G else F.interpolate(z, size=(s, s), mode="area") for s in c.scales]
    else:
        maps = [st(z) for st in m.downsampler.stacks]
        if c.downsample == "conv-residual":
            maps = [(z if s == G else F.interpolate(z, size=(s, s), mode="area")) + t for s, t in zip(c.scales, maps)]
    pos = torch.cat([(d.pos.pos_grid if s == G else F.adaptive_avg_pool2d(d.pos.pos_grid, s)).flatten(2).transpose(1, 2)
                     + d.pos.scale_embed[k] for k, s in enumerate(c.scales)], dim=1)
    t = d.proj_in(torch.cat([t.flatten(2).transpose(1, 2) for t in maps], dim=1)) + pos
    t = d.head(d.norm(d.blocks(t, MaskSpec.for_scales(d.attention, c.scales))))
    out, start = [], 0
    for s in c.scales:
        q = t[:, start:start + s * s].reshape(B, s, s, p, p, 3)
        out.append(torch.einsum("bhwpqc->bchpwq", q).reshape(B, 3, s * p, s * p))
        start += s * s
    return out


@pytest.mark.parametrize("kw", [dict(), dict(downsample="conv"), dict(downsample="interp"),
                                dict(downsample="conv-prenorm"), dict(multiscale=False, scales=None),
                                dict(attention="scale_independent")])
def test_training_size_is_bit_identical_to_the_square_path(kw, gen):
    m = make(**kw)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        new, old = m(x)["reconstructions"], legacy_square_forward(m, x)
    assert all(torch.equal(a, b) for a, b in zip(new, old))
    # and nothing is resampled at the training grid
    assert m.encoder.pos_for(4, 4) is m.encoder.pos_embed
    assert resample_grid(m.decoder.pos.pos_grid, (4, 4)) is m.decoder.pos.pos_grid


def test_scale_shapes_rule():
    # same fraction of each side, half up, at least 1; (s, s) at the training grid
    assert scale_shapes((1, 2, 4, 8), 8, (8, 8)) == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert scale_shapes((1, 2, 4, 8), 8, (8, 12)) == [(1, 2), (2, 3), (4, 6), (8, 12)]  # 1.5 -> 2
    assert scale_shapes((1, 2, 4, 8), 8, (16, 16)) == [(2, 2), (4, 4), (8, 8), (16, 16)]
    assert scale_shapes((1, 2, 4, 8, 16), 16, (32, 48)) == [(2, 3), (4, 6), (8, 12), (16, 24), (32, 48)]
    with pytest.raises(ValueError, match="too small"):
        scale_shapes((1, 2, 4, 8), 8, (2, 2))


@pytest.mark.parametrize("kw", [dict(), dict(downsample="conv"), dict(downsample="interp")])
@pytest.mark.parametrize("hw", [(32, 48), (64, 64), (48, 24), (8, 40)])
def test_any_size_gives_a_pyramid_of_matching_aspect(kw, hw, gen):
    m = make(**kw)
    x = torch.rand(2, 3, *hw, generator=gen) * 2 - 1
    with torch.no_grad():
        out = m(x)
    z = out["latent"]
    assert z.shape == (2, 4, hw[0] // 8, hw[1] // 8)
    shapes = m.config.scale_shapes(tuple(z.shape[-2:]))
    assert [tuple(t.shape[-2:]) for t in m.multiscale_maps(z)] == shapes
    assert [tuple(r.shape[-2:]) for r in out["reconstructions"]] == [(h * 8, w * 8) for h, w in shapes]
    assert m.output_shapes(*hw) == [tuple(r.shape[-2:]) for r in out["reconstructions"]]
    assert all(torch.isfinite(r).all() for r in out["reconstructions"])


def test_rectangular_mask_is_scale_causal_by_perturbation(gen):
    """Changing the tokens of scale k leaves every coarser scale's output unchanged, on a 4x6 grid."""
    m = make(attention="scale_causal")
    z = torch.randn(1, 4, 4, 6, generator=gen)
    maps = m.multiscale_maps(z)
    assert [tuple(t.shape[-2:]) for t in maps] == [(1, 2), (2, 3), (4, 6)]
    with torch.no_grad():
        ref = m.decode_multiscale(maps)
        for k in range(len(maps)):
            pert = [t + (torch.randn_like(t) if i == k else 0) for i, t in enumerate(maps)]
            out = m.decode_multiscale(pert)
            for i in range(len(maps)):
                assert torch.equal(out[i], ref[i]) == (i < k), (k, i)


def test_rectangular_mask_keeps_its_structure():
    shapes = [(2, 3), (4, 6), (8, 12), (16, 24), (32, 48)]  # 1024 x 1536 px at patch 32, or a 512 x 768 f16 grid
    spec = MaskSpec.for_scales("scale_causal", shapes)
    assert spec.sizes == tuple(h * w for h, w in shapes)
    ids = torch.repeat_interleave(torch.arange(5), torch.tensor(spec.sizes))
    assert torch.equal(spec.dense(), ids[:, None] >= ids[None, :])  # the rule, from an independent block id
    segs = resolve_mask(spec, "sdpa", "cpu")
    assert isinstance(segs, SegmentedMask)
    # the finest scale (1536 of 2040 queries) attends to every key with no mask
    last = segs.segments[-1]
    assert (last.q0, last.q1, last.k0, last.k1, last.mask) == (spec.length - 1536, spec.length, 0, spec.length, None)


def test_backends_agree_on_a_rectangular_grid(gen):
    m = make(attention="scale_causal")
    z = torch.randn(2, 4, 4, 6, generator=gen)
    with torch.no_grad():
        ref = [t.double() for t in m.decode(z, all_scales=True)]
        for backend in ("reference", "flex"):
            m.set_attn_backend(backend)
            for a, b in zip(m.decode(z, all_scales=True), ref):
                assert (a.double() - b).norm() / b.norm() < 1e-5, backend


def test_resampled_positions():
    # bicubic weights sum to 1: a constant table stays constant; the table is returned at its own grid
    t = torch.full((1, 3, 4, 4), 0.7)
    torch.testing.assert_close(resample_grid(t, (6, 10)), torch.full((1, 3, 6, 10), 0.7))
    # a larger grid of the decoder: the coarsest scale of an 8x8 grid pools the table resampled to 8x8
    m = make()
    pos = m.decoder.pos
    e = pos(scale_shapes((1, 2, 4), 4, (8, 8)))
    assert e.shape == (1, 4 + 16 + 64, 48)
    full = resample_grid(pos.pos_grid, (8, 8))
    torch.testing.assert_close(e[0, 0:4], F.adaptive_avg_pool2d(full, 2).flatten(2)[0].T + pos.scale_embed[0])


def test_restok_other_sizes(gen):
    torch.manual_seed(0)
    m = ResTok.from_preset("restok-tiny").eval()
    assert m.config.size_multiples == (32, 64)
    x = torch.rand(2, 3, 96, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        (rec,), idx = m.reconstruct(x)
        assert rec.shape == x.shape and idx.shape == (2, 32)
        # the decoder's 12x8 queries: the same codes decode to any size asked for
        assert m.decode_indices(idx, (64, 128)).shape == (2, 3, 64, 128)
        fast = m.encode(x)["indices"]
        m.set_fast_paths(False)
        assert torch.equal(m.encode(x)["indices"], fast)  # fast paths keep parity on a rectangle
    with pytest.raises(ValueError, match="64x96 does not work for this ResTok"):
        m.encode(torch.zeros(1, 3, 64, 96))
