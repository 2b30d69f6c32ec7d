"""ResTok inference fast paths (set_fast_paths) against the reference paths."""

import pytest
import torch

from hieratok.nn.masks import MaskSpec
from hieratok.tokenizers.restok import ResTok


@pytest.fixture(scope="module")
def tiny() -> ResTok:
    torch.manual_seed(0)
    m = ResTok.from_preset("restok-tiny").eval()
    with torch.no_grad():  # non-trivial norms, biases and layer scales
        for name, p in m.named_parameters():
            if p.ndim == 1 and not name.startswith("quantizer"):
                p.add_(0.1 * torch.randn_like(p))
    return m


def test_encoder_attends_under_the_level_causal_spec(tiny, gen):
    """Every encoder layer gets a causal MaskSpec over [image stages coarse..fine, latent levels]."""
    seen = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a, kw: seen.append(a[1]), with_kwargs=True)
             for b in tiny.encoder.blocks]
    with torch.no_grad():
        tiny.encode(torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1)
    for h in hooks:
        h.remove()
    levels = tiny.config.latent_levels
    assert seen[0] == MaskSpec((64, *levels)) and seen[-1] == MaskSpec((8, 16, 32, 64, *levels))
    assert all(isinstance(m, MaskSpec) and m.rule == "causal" for m in seen)


def test_fast_and_reference_paths_agree(tiny, gen):
    x = torch.rand(3, 3, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        tiny.set_fast_paths(False)
        ref_enc = tiny.encode(x)
        ref_img = tiny.decode(ref_enc["quantized"], keep=torch.tensor([4, 16, 32]))
        tiny.set_fast_paths(True)
        enc = tiny.encode(x)
        img = tiny.decode(ref_enc["quantized"], keep=torch.tensor([4, 16, 32]))
    assert torch.equal(enc["indices"], ref_enc["indices"])
    torch.testing.assert_close(enc["latents"], ref_enc["latents"], atol=1e-5, rtol=1e-5)
    for a, b in zip(enc["image_tokens"], ref_enc["image_tokens"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (img - ref_img).abs().max() <= 1e-5 * ref_img.abs().max()


def test_training_step_is_unchanged_by_the_fast_paths(tiny, gen):
    """Under autograd the in-place paths stay off: loss and gradients equal the reference paths."""
    x = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    tiny.train()
    try:
        grads = []
        for fast in (False, True):
            tiny.set_fast_paths(fast)
            tiny.zero_grad()
            out = tiny(x, keep=torch.tensor([8, 32]))
            (out["reconstructions"].square().mean() + out["vq_loss"]).backward()
            grads.append({n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys()
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-3, msg=n)
    finally:
        tiny.set_fast_paths(True)
        tiny.eval()
        tiny.zero_grad(set_to_none=True)


def test_last_layers_run_only_the_rows_that_are_read(tiny, gen):
    """Codes-only encoding skips the image rows of the encoder's last layer, and the decoder's last
    layer skips the latent rows: same codes, latents and images as computing every row."""
    x = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        full = tiny.encode(x)  # image tokens wanted: every row of every layer
        enc_rows = []
        hook = tiny.encoder.blocks[-1].mlp.register_forward_hook(lambda m, a, out: enc_rows.append(a[0].shape[1]))
        codes_only = tiny.encode(x, image_tokens=False)
        hook.remove()
        assert enc_rows == [tiny.config.num_latent_tokens]  # the last encoder layer ran the latent rows only
        assert codes_only["image_tokens"] == [] and "encoder_alignment" not in codes_only
        torch.testing.assert_close(codes_only["latents"], full["latents"], atol=1e-5, rtol=1e-5)
        assert torch.equal(tiny.encode_indices(x), full["indices"])
        dec = tiny.decoder
        dec.last_layer_needed_rows = False
        try:
            ref = tiny.decode(full["quantized"])
        finally:
            dec.last_layer_needed_rows = True
        rows = []
        hook = dec.blocks[-1].mlp.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[1]))
        torch.testing.assert_close(tiny.decode(full["quantized"]), ref, atol=1e-5, rtol=1e-5)
        hook.remove()
        assert rows == [dec.grid ** 2]  # the last decoder layer ran the image rows only
