"""ResTok inference fast paths (set_fast_paths) against the reference paths, and the complex RoPE."""

import pytest
import torch

from hieratok.nn.attention import SegmentedMask
from hieratok.nn.rope import apply_rope, apply_rope_reference, rope_table, rotate_pairs
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_complex_rope_equals_the_real_rotation(gen, dtype):
    qkv = torch.randn(2, 7, 3, 4, 8, generator=gen, dtype=dtype)
    q = qkv.permute(2, 0, 3, 1, 4)[0]  # a strided view, as inside attention
    table = rope_table(torch.randn(7, 2, generator=gen) * 20, [4, 4])
    ref = apply_rope_reference(q.double(), table)  # float32 math on a float64 copy
    torch.testing.assert_close(apply_rope(q, table).double(), ref, atol=1e-6, rtol=1e-6)
    assert apply_rope(q, table).dtype == dtype


def test_rotate_pairs_falls_back_for_bf16_and_odd_layouts(gen):
    x = torch.randn(3, 5, 8, generator=gen)
    cos, sin = torch.rand(5, 4, generator=gen), torch.rand(5, 4, generator=gen)
    for y in (x.bfloat16(), x[:, :, 1:7]):  # no complex view: bf16, and pairs starting at an odd offset
        out = rotate_pairs(y, cos[:, : y.shape[-1] // 2], sin[:, : y.shape[-1] // 2])
        x0, x1 = y.float()[..., 0::2], y.float()[..., 1::2]
        c, s = cos[:, : y.shape[-1] // 2], sin[:, : y.shape[-1] // 2]
        want = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2)
        torch.testing.assert_close(out.float(), want, atol=1e-2 if y.dtype == torch.bfloat16 else 1e-6, rtol=0)


def test_encoder_runs_the_level_causal_mask_as_segments(tiny):
    enc = tiny.encoder
    blocks = [16, 32, 1, 1, 2, 4, 8, 16]
    m = enc._mask(blocks, torch.device("cpu"))
    assert isinstance(m, SegmentedMask)
    # each query block sees exactly the key prefix up to its end
    assert all(s.k0 == 0 for s in m.segments)
    enc.set_fast_paths(False)
    try:
        assert isinstance(enc._mask(blocks, torch.device("cpu")), torch.Tensor)
    finally:
        enc.set_fast_paths(True)


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
    # the query-row mask is the tail of the full mask
    blocks = [16, 32, 1, 1, 2, 4, 8, 16]
    tail = tiny.encoder._mask(blocks, torch.device("cpu"), q_from=48)
    dense = tail.dense if isinstance(tail, SegmentedMask) else tail
    full_mask = tiny.encoder._mask(blocks, torch.device("cpu"))
    assert torch.equal(dense, (full_mask.dense if isinstance(full_mask, SegmentedMask) else full_mask)[48:])
