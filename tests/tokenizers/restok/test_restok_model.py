import pytest
import torch
import torch.nn.functional as F

from hieratok.losses.restok import ResTokLoss, ResTokLossConfig, cosine_margin_loss
from hieratok.nn.transformer import set_attention_backend
from hieratok.tokenizers.restok import (
    ResTok,
    ResTokConfig,
    latent_level_sizes,
    latent_levels_to_map,
    level_pooling_grid,
    merge_image_tokens,
    nested_dropout_choices,
    residual_latent_init,
)

TINY_GRIDS = [(1, 1), (1, 1), (1, 2), (2, 2), (2, 4), (4, 4)]


@pytest.fixture(scope="module")
def tiny() -> ResTok:
    torch.manual_seed(0)
    return ResTok.from_preset("restok-tiny", attn_backend="reference").eval()


def _images(gen, B=2, size=64):
    return torch.rand(B, 3, size, size, generator=gen) * 2 - 1


# ---- hierarchy bookkeeping ----------------------------------------------------------------------


def test_levels_and_grids_of_the_release():
    cfg = ResTok.preset_config("restok-l-128")
    assert cfg.latent_levels == [1, 1, 2, 4, 8, 16, 32, 64]
    assert cfg.latent_grids == [(1, 1), (1, 1), (1, 2), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8)]
    assert cfg.merge_layers == [5, 11, 17]
    assert cfg.image_stage_grids == [(16, 2), (16, 4), (16, 8), (16, 16)]
    assert cfg.grid == 16
    assert level_pooling_grid(128) == (8, 16) and latent_level_sizes(4) == [1, 1, 2]


def test_residual_init_levels_sum_back_to_the_pooled_map(gen):
    x = torch.randn(2, 5, 8, 8, generator=gen, dtype=torch.float64)
    t = residual_latent_init(x, TINY_GRIDS)
    assert t.shape == (2, 32, 5)
    # closed form: the residuals telescope to the area-pooled input at the finest level grid
    pooled = x.reshape(2, 5, 4, 2, 4, 2).mean(dim=(3, 5))
    torch.testing.assert_close(latent_levels_to_map(t, TINY_GRIDS, (4, 4)), pooled)
    torch.testing.assert_close(t[:, 0], x.mean(dim=(2, 3)))  # level 0: the global mean
    torch.testing.assert_close(t[:, 1], torch.zeros_like(t[:, 1]))  # level 1: mean of a zero-mean residual
    # level 2 (1 x 2): left/right half means of x minus the global mean
    halves = x.reshape(2, 5, 8, 2, 4).mean(dim=(2, 4)) - x.mean(dim=(2, 3))[..., None]
    torch.testing.assert_close(t[:, 2:4], halves.transpose(1, 2))


def test_non_residual_init_pools_the_input_at_every_level(gen):
    x = torch.randn(1, 3, 8, 8, generator=gen, dtype=torch.float64)
    t = residual_latent_init(x, TINY_GRIDS, residual=False)
    start = 0
    for h, w in TINY_GRIDS:
        block = x.reshape(1, 3, h, 8 // h, w, 8 // w).mean(dim=(3, 5)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(t[:, start:start + h * w], block)
        start += h * w


@pytest.mark.parametrize("residual", [True, False])
def test_merge_is_nearest_pooling_of_the_row_major_grid(gen, residual):
    G, w, N = 4, 4, 3
    x = torch.randn(2, G * w + N, 6, generator=gen)
    y = merge_image_tokens(x, G * w, residual)
    img = x[:, :G * w]
    # the released op: 1D nearest interpolation of the token sequence, down then up
    coarse = F.interpolate(img.transpose(1, 2), size=G * w // 2, mode="nearest").transpose(1, 2)
    up = F.interpolate(coarse.transpose(1, 2), size=G * w, mode="nearest").transpose(1, 2)
    torch.testing.assert_close(y[:, :8], coarse)
    torch.testing.assert_close(y[:, 8:24], img - up if residual else img)
    torch.testing.assert_close(y[:, 24:], x[:, 16:])
    # in grid terms: every second column of the G x w grid
    torch.testing.assert_close(coarse.reshape(2, G, w // 2, 6), img.reshape(2, G, w, 6)[:, :, ::2])


# ---- hierarchical causality ----------------------------------------------------------------------


def test_encoder_mask_is_level_causal_by_perturbation(tiny, gen):
    torch.manual_seed(1)
    img, lat = tiny.encoder.embed(torch.randn(1, 32, 8, 8, generator=gen))
    with torch.no_grad():
        out, stages = tiny.encoder.forward_tokens(img, lat)
        assert [s.shape[1] for s in stages] == [8, 16, 32, 64]
        starts = [0, 1, 2, 4, 8, 16]
        for k in range(1, 6):
            lat2 = lat.clone()
            lat2[:, starts[k]:] += torch.randn(lat2[:, starts[k]:].shape, generator=gen)
            out2, stages2 = tiny.encoder.forward_tokens(img, lat2)
            torch.testing.assert_close(out2[:, :starts[k]], out[:, :starts[k]], atol=1e-6, rtol=0)
            assert (out2[:, starts[k]:] - out[:, starts[k]:]).abs().max() > 1e-3
            for a, b in zip(stages, stages2):  # image tokens never read latent tokens
                torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        # the latents do read the image tokens
        img2 = img + torch.randn(img.shape, generator=gen)
        out3, _ = tiny.encoder.forward_tokens(img2, lat)
        assert (out3[:, 0] - out[:, 0]).abs().max() > 1e-3


def test_codes_causal_without_legacy_layout_and_mixed_with_it(tiny, gen):
    lat = torch.randn(1, 32, 64, generator=gen)
    lat2 = lat.clone()
    lat2[:, 16:] += 1.0  # perturb the finest level only
    with torch.no_grad():
        a, b = tiny.encoder.project(lat), tiny.encoder.project(lat2)
        torch.testing.assert_close(a[:, :16], b[:, :16])
        tiny.encoder.legacy_layout = True
        try:
            c, d = tiny.encoder.project(lat), tiny.encoder.project(lat2)
        finally:
            tiny.encoder.legacy_layout = False
    assert (c[:, :16] - d[:, :16]).abs().max() > 1e-3  # the release's reshape mixes tokens
    # the legacy layout is a raw reinterpretation of (N, D) memory as (D, N), column n -> code n
    raw = lat.reshape(1, 64, 32)
    torch.testing.assert_close(c[:, 20], tiny.encoder.level_out[5](raw[:, :, 20]))


# ---- nested dropout ------------------------------------------------------------------------------


def test_nested_dropout_choices_of_the_release():
    lengths, probs = nested_dropout_choices(128, 4, 0.2)
    assert lengths == [4, 8, 16, 32, 64, 128]
    torch.testing.assert_close(torch.tensor(probs), torch.tensor([1, 2, 4, 8, 16, 124]) / 155.0)
    assert nested_dropout_choices(128, 4, 0.0) == ([128], [1.0])


def test_nested_dropout_draws_follow_the_probabilities(tiny):
    k1 = tiny.nested_dropout(20000, torch.Generator().manual_seed(3))
    k2 = tiny.nested_dropout(20000, torch.Generator().manual_seed(3))
    assert torch.equal(k1, k2)
    lengths, probs = nested_dropout_choices(32, 4, 0.2)
    assert set(k1.tolist()) <= set(lengths)
    freq = torch.tensor([(k1 == n).float().mean().item() for n in lengths])
    assert (freq - torch.tensor(probs)).abs().max() < 0.012


def test_nested_dropout_keeps_a_prefix_and_fills_the_mask_code(tiny, gen):
    q = F.normalize(torch.randn(2, 32, 8, generator=gen), dim=-1)
    keep = torch.tensor([4, 16])
    with torch.no_grad():
        ref = tiny.decode(q, keep=keep)
        garbage = q.clone()
        garbage[0, 4:] = 7.0
        garbage[1, 16:] = -3.0
        torch.testing.assert_close(tiny.decode(garbage, keep=keep), ref)  # the tail is ignored
        filled = q.clone()
        filled[0, 4:] = tiny.decoder.latent_mask_token
        filled[1, 16:] = tiny.decoder.latent_mask_token
        torch.testing.assert_close(tiny.decode(filled), ref, atol=1e-5, rtol=0)  # ... and is the mask code
        assert (tiny.decode(q) - ref).abs().max() > 1e-3
        idx = tiny.quantizer.encode(q)
        torch.testing.assert_close(tiny.decode_indices(idx[:, :8]), tiny.decode(tiny.quantizer.decode(idx), keep=8))


def test_keep_accepts_integers_and_rejects_bools_and_floats(tiny, gen):
    import numpy as np

    q = F.normalize(torch.randn(2, 32, 8, generator=gen), dim=-1)
    with torch.no_grad():
        ref = tiny.decode(q, keep=torch.tensor([8, 8]))
        torch.testing.assert_close(tiny.decode(q, keep=np.int64(8)), ref, rtol=0, atol=0)
        torch.testing.assert_close(tiny.decode(q, keep=8), ref, rtol=0, atol=0)
        for bad in (True, 8.0, torch.tensor([8.0, 8.0]), torch.tensor([True, True])):
            with pytest.raises(ValueError, match="keep must be an integer"):
                tiny.decode(q, keep=bad)


def test_alignment_asked_of_a_model_without_the_head_is_an_error(gen):
    torch.manual_seed(0)
    m = ResTok.from_preset("restok-tiny", decoder_alignment=False).eval()
    x = _images(gen)
    with torch.no_grad():
        assert "decoder_alignment" not in m(x)  # default (eval): no alignment asked
        with pytest.raises(ValueError, match="decoder alignment"):
            m(x, return_alignment=True)


def test_training_forward_draws_keep_with_the_generator(tiny, gen):
    x = _images(gen, B=4)
    tiny.train()
    try:
        with torch.no_grad():
            a = tiny(x, generator=torch.Generator().manual_seed(5), return_alignment=False)
            b = tiny(x, generator=torch.Generator().manual_seed(5), return_alignment=False)
    finally:
        tiny.eval()
    assert torch.equal(a["keep"], b["keep"])
    torch.testing.assert_close(a["reconstructions"], b["reconstructions"])
    with torch.no_grad():
        assert tiny(x)["keep"] is None


# ---- whole model ---------------------------------------------------------------------------------


def test_tiny_forward_backward_shapes_and_finite_grads(gen):
    torch.manual_seed(0)
    m = ResTok.from_preset("restok-tiny").train()
    x = _images(gen)
    out = m(x, keep=torch.tensor([4, 32]))
    assert out["reconstructions"].shape == (2, 3, 64, 64)
    assert out["indices"].shape == (2, 32) and out["indices"].dtype == torch.int64
    assert out["quantized"].shape == (2, 32, 8)
    assert out["encoder_alignment"].shape == (2, 8, 32)
    assert out["decoder_alignment"].shape == (2, 32, 8, 8)
    loss_fn = ResTokLoss(ResTokLossConfig())
    logs = loss_fn(x, out, step=0, foundation_cls=torch.randn(2, 32, generator=gen),
                   foundation_features=torch.randn(2, 32, 16, 16, generator=gen))
    assert torch.isfinite(logs["loss"])
    logs["loss"].backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.decoder.latent_mask_token.grad.abs().sum() > 0


def test_loss_closed_form(gen):
    x = _images(gen)
    rec = x + 0.1 * torch.randn(x.shape, generator=gen)
    out = {"reconstructions": rec, "vq_loss": torch.tensor(0.3), "commitment_loss": torch.tensor(0.2),
           "codebook_loss": torch.tensor(0.25), "encoder_alignment": torch.randn(2, 5, 7, generator=gen),
           "decoder_alignment": torch.randn(2, 7, 4, 4, generator=gen)}
    cls, feat = torch.randn(2, 7, generator=gen), torch.randn(2, 7, 4, 4, generator=gen)
    logs = ResTokLoss()(x, out, 0, foundation_cls=cls, foundation_features=feat)
    l2 = (((rec + 1) / 2 - (x + 1) / 2) ** 2).mean()
    enc = torch.relu(0.75 - F.cosine_similarity(out["encoder_alignment"].mean(1), cls, dim=1)).mean()
    dec = torch.relu(0.75 - F.cosine_similarity(out["decoder_alignment"], feat, dim=1)).mean()
    torch.testing.assert_close(logs["loss"], l2 + 0.3 + enc + dec)
    torch.testing.assert_close(cosine_margin_loss(cls, cls, 0.25), torch.tensor(0.0))


def test_codebook_usage_and_entropy(tiny, gen):
    from hieratok.metrics.codebook import codebook_stats

    tiny.quantizer.track_usage(True)
    try:
        with torch.no_grad():
            enc = tiny.encode(_images(gen, B=3))
        stats = tiny.quantizer.usage_stats()
    finally:
        tiny.quantizer.track_usage(False)
    assert stats.num_tokens == 96
    assert stats == codebook_stats(torch.bincount(enc["indices"].reshape(-1), minlength=256))
    assert 0 < stats.entropy_bits <= 8


def test_attention_backends_agree(tiny, gen):
    x = _images(gen)
    outs = {}
    for backend in ("reference", "sdpa"):
        tiny.set_attn_backend(backend)
        with torch.no_grad():
            enc = tiny.encode(x)
            outs[backend] = (enc["latents"], tiny.decode(enc["quantized"]))
    tiny.set_attn_backend("reference")
    torch.testing.assert_close(outs["sdpa"][0], outs["reference"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["sdpa"][1], outs["reference"][1], atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_encoder_matches_reference(tiny, gen):
    pytest.importorskip("torch.nn.attention.flex_attention")
    img, lat = tiny.encoder.embed(torch.randn(1, 32, 8, 8, generator=gen))
    with torch.no_grad():
        ref, _ = tiny.encoder.forward_tokens(img, lat)
        set_attention_backend(tiny.encoder, "flex")
        try:
            out, _ = tiny.encoder.forward_tokens(img, lat)
        finally:
            set_attention_backend(tiny.encoder, "reference")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_grad_checkpointing_gives_the_same_gradients(gen):
    torch.manual_seed(0)
    m = ResTok.from_preset("restok-tiny", encoder_depth=3, decoder_depth=2, hierarchy_stages=2).train()
    x = _images(gen)
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.set_grad_checkpointing(ckpt)
        out = m(x, keep=32, return_alignment=False)
        (out["reconstructions"].square().mean() + out["vq_loss"]).backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_save_and_load_round_trip(tiny, tmp_path, gen):
    tiny.save_pretrained(tmp_path / "m")
    m2 = ResTok.from_pretrained(tmp_path / "m", attn_backend="reference").eval()
    assert m2.config == tiny.config
    x = _images(gen)
    with torch.no_grad():
        assert torch.equal(m2.encode(x)["indices"], tiny.encode(x)["indices"])


def test_release_parameter_count_on_meta():
    with torch.device("meta"):
        m = ResTok.from_preset("restok-l-128")
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - 662e6) / 662e6 < 0.03, n
    enc = sum(p.numel() for p in m.encoder.parameters())
    assert abs(enc - 302.7e6) < 0.1e6  # ViT-L (24 x 12.6M) + embeddings + 8 level projections


def test_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        ResTokConfig(num_latent_tokens=96)
    with pytest.raises(ValueError, match="does not divide"):
        ResTok.preset_config("restok-tiny", num_latent_tokens=256)
    with pytest.raises(ValueError, match="unknown ResTok preset"):
        ResTok.preset_config("restok-xl")
    with pytest.raises(ValueError, match="images of shape"):
        ResTok.from_preset("restok-tiny").encode(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="32x32 does not work .* width of 64"):  # 3 merges x stride 8
        ResTok.from_preset("restok-tiny").encode(torch.zeros(1, 3, 32, 32))
