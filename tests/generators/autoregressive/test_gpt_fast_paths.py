"""GPT sampling fast paths (prepacked linear weights, complex RoPE, unmasked full-prefix steps)
against their reference paths, and replaying explicit per-pass guidance scales."""

import pytest
import torch

from hieratok.generators.autoregressive import cfg_scale_at, har_layout, sample_layout, training_batch


def test_cached_har_sampling_agrees_with_and_without_fast_paths(model):
    lay = har_layout(32, 4)
    labels = torch.tensor([1, 4, 7])
    outs = []
    for fast in (False, True):
        model.set_fast_paths(fast)
        outs.append(sample_layout(model, labels, lay, cfg_scale=3.0, keep_logits=True, top_p=0.9,
                                  generator=torch.Generator().manual_seed(3)))
    model.set_fast_paths(True)
    assert torch.equal(outs[0].codes, outs[1].codes)
    for a, b in zip(outs[0].step_logits, outs[1].step_logits):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    # and the cached fast steps equal one full masked forward over the sampled codes (reference paths)
    model.set_fast_paths(False)
    try:
        both = torch.cat([labels, torch.full_like(labels, model.null_class)])
        inputs, _ = training_batch(outs[1].codes.repeat(2, 1), lay, model.config.vocab_size)
        full = model(inputs, both, mask=lay.mask)
    finally:
        model.set_fast_paths(True)
    torch.testing.assert_close(torch.cat(outs[1].step_logits, 1), full, atol=1e-5, rtol=1e-5)


def test_explicit_cfg_scales_replay_a_schedule(model):
    lay = har_layout(32, 4)
    labels = torch.tensor([2, 5])
    scales = [cfg_scale_at(g, lay.num_steps, 3.0, "step", 0.4) for g in range(lay.num_steps)]
    a = sample_layout(model, labels, lay, cfg_scale=3.0, cfg_schedule="step", cfg_start=0.4,
                      generator=torch.Generator().manual_seed(9))
    b = sample_layout(model, labels, lay, cfg_scales=scales, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.codes, b.codes) and b.cfg_scales == scales
    # a replayed schedule of the authors' kind: guided passes interleaved with (near-)unguided ones
    odd = [1.0001, 1.0001, 3.0, 3.0, 1.0001, 1.0001, 3.0]
    c = sample_layout(model, labels, lay, cfg_scales=odd, keep_logits=True, generator=torch.Generator().manual_seed(9))
    assert c.cfg_scales == odd and all(x.shape[0] == 4 for x in c.step_logits)  # the null half ran every pass
    with pytest.raises(ValueError, match="cfg_scales"):
        sample_layout(model, labels, lay, cfg_scales=[2.0] * 3)
