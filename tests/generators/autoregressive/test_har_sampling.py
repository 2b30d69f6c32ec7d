"""KV-cached HAR / next-token sampling against full masked forward passes."""

import pytest
import torch

from hieratok.generators.autoregressive import (
    ar_layout,
    ar_sample,
    cfg_scale_at,
    har_layout,
    har_sample,
    sample_layout,
    sample_logits,
    training_batch,
)
from hieratok.generators.llamagen import GPT


def _full_logits(model, codes, labels, layout):
    inputs, _ = training_batch(codes, layout, model.config.vocab_size)
    return model(inputs, labels, mask=layout.mask)


def _naive_sample(model, labels, layout, cfg_scale, schedule, temperature, generator):
    """Independent sampler: no cache, a full forward pass over all N positions per step, and the
    conditional and unconditional halves run as separate batches."""
    B, N = labels.shape[0], layout.num_tokens
    codes = torch.zeros(B, N, dtype=torch.long)
    null = torch.full_like(labels, model.null_class)
    for g, (s, e) in enumerate(layout.group_bounds()):
        cond = _full_logits(model, codes, labels, layout)[:, s:e]
        scale = cfg_scale_at(g, layout.num_steps, cfg_scale, schedule)
        if cfg_scale != 1.0:
            uncond = _full_logits(model, codes, null, layout)[:, s:e]
            cond = uncond + scale * (cond - uncond)
        codes[:, s:e] = sample_logits(cond, temperature, generator=generator)
    return codes


def test_cached_step_logits_equal_a_full_masked_forward(model):
    lay = har_layout(128, 4)
    labels = torch.tensor([0, 3, 7])
    out = sample_layout(model, labels, lay, cfg_scale=2.5, keep_logits=True, generator=torch.Generator().manual_seed(0))
    assert [x.shape[1] for x in out.step_logits] == list(lay.group_sizes)
    both = torch.cat([labels, torch.full_like(labels, model.null_class)])
    full = _full_logits(model, out.codes.repeat(2, 1), both, lay)
    assert (torch.cat(out.step_logits, 1) - full).abs().max() < 1e-5


def test_har_needs_nine_forward_passes_for_128_codes(model):
    calls = []
    h = model.register_forward_hook(lambda mod, args, out: calls.append(out.shape[1]))
    try:
        codes = har_sample(model, torch.tensor([1, 2]), cfg_scale=3.75, cfg_schedule="step", top_p=0.95,
                           generator=torch.Generator().manual_seed(0))
        assert codes.shape == (2, 128) and har_layout().num_steps == 9
        assert calls == [1, 1, 1, 1, 4, 8, 16, 32, 64]
        calls.clear()
        ar_sample(model, torch.tensor([1]), num_tokens=16, generator=torch.Generator().manual_seed(0))
        assert calls == [1] * 16
    finally:
        h.remove()


@pytest.mark.parametrize("cfg_scale,schedule", [(1.0, "constant"), (3.0, "constant"), (3.75, "step")])
def test_matches_an_independent_uncached_sampler(model, cfg_scale, schedule):
    lay = har_layout(32, 4)
    labels = torch.tensor([2, 5])
    for temperature in (0.0, 1.0):
        ref = _naive_sample(model, labels, lay, cfg_scale, schedule, temperature, torch.Generator().manual_seed(1))
        got = sample_layout(model, labels, lay, cfg_scale=cfg_scale, cfg_schedule=schedule, temperature=temperature,
                            generator=torch.Generator().manual_seed(1)).codes
        assert torch.equal(got, ref)


def test_har_and_vanilla_agree_on_the_first_four_tokens(model):
    labels = torch.tensor([4, 9])
    kw = dict(cfg_scale=2.0, keep_logits=True)
    h = sample_layout(model, labels, har_layout(128, 4), generator=torch.Generator().manual_seed(5), **kw)
    a = sample_layout(model, labels, ar_layout(128), generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(h.codes[:, :4], a.codes[:, :4])
    for i in range(4):
        assert torch.equal(h.step_logits[i], a.step_logits[i])
    # teacher forcing on the same codes: the first 4 positions' logits coincide as well
    codes = torch.randint(0, 64, (2, 128))
    lh = _full_logits(model, codes, labels, har_layout(128, 4))
    la = _full_logits(model, codes, labels, ar_layout(128))
    torch.testing.assert_close(lh[:, :4], la[:, :4], atol=1e-6, rtol=0)
    assert not torch.allclose(lh[:, 4:], la[:, 4:])


@pytest.mark.parametrize("group", [1, 3, 4, 5, 6, 7])
def test_block_causality_by_perturbation(model, group):
    """Changing the codes one group predicts leaves every earlier position's logits unchanged."""
    lay = har_layout(128, 4)
    s, e = lay.group_bounds()[group]
    labels = torch.tensor([1, 6])
    codes = torch.randint(0, 64, (2, 128), generator=torch.Generator().manual_seed(group))
    changed = codes.clone()
    changed[:, s:e] = (codes[:, s:e] + 1 + torch.randint(0, 62, (2, e - s))) % 64
    base, pert = _full_logits(model, codes, labels, lay), _full_logits(model, changed, labels, lay)
    assert torch.equal(base[:, :e], pert[:, :e])  # the group itself and everything before it
    assert (base[:, e:] - pert[:, e:]).abs().amax(-1).min() > 0  # every later position reacts


def test_cfg_scale_one_equals_conditional(model):
    """With the null half in the batch but scale 1 (a late step schedule), every pass before the
    guided one reproduces plain conditional sampling exactly."""
    lay = har_layout(64, 4)
    labels = torch.tensor([0, 8, 3])
    plain = sample_layout(model, labels, lay, keep_logits=True, generator=torch.Generator().manual_seed(2))
    late = sample_layout(model, labels, lay, cfg_scale=4.0, cfg_schedule="step", cfg_start=0.99, keep_logits=True,
                         generator=torch.Generator().manual_seed(2))
    assert late.cfg_scales[:-1] == [1.0] * (lay.num_steps - 1) and late.cfg_scales[-1] == 4.0
    last = lay.group_bounds()[-1][0]
    assert torch.equal(plain.codes[:, :last], late.codes[:, :last])
    for p, q in zip(plain.step_logits, late.step_logits):
        torch.testing.assert_close(q[:3], p, atol=1e-6, rtol=0)
    assert not torch.equal(plain.codes[:, last:], late.codes[:, last:])


def test_deterministic_under_a_generator(model):
    labels = torch.tensor([1, 2, 3])
    a = har_sample(model, labels, 2.0, top_k=20, generator=torch.Generator().manual_seed(11))
    b = har_sample(model, labels, 2.0, top_k=20, generator=torch.Generator().manual_seed(11))
    c = har_sample(model, labels, 2.0, top_k=20, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < model.config.vocab_size


def test_sampling_refuses_training_mode_and_too_few_placeholders(model):
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            har_sample(model, torch.tensor([0]))
    finally:
        model.eval()
    small = GPT(GPT.preset_config("gpt-tiny", num_placeholders=10)).eval()
    with pytest.raises(ValueError, match="placeholders"):
        har_sample(small, torch.tensor([0]))


def test_release_schedules_reach_the_sampler(model):
    """``step-release`` (the published script's per-pass scales) and ``step-release-tokens`` (the
    release's token-counter path) are what ``sample_layout`` uses, and the same codes follow from
    replaying those scales."""
    lay, labels, u = har_layout(128, 4), torch.tensor([3, 1]), 1.0001
    runs = {}
    g = 3.75
    for schedule, want in (("step-release", [u, u] + [g] * 7), ("step-release-tokens", [u, u, g, g, u, u, u, g, g])):
        r = sample_layout(model, labels, lay, cfg_scale=g, cfg_schedule=schedule, top_p=0.95,
                          generator=torch.Generator().manual_seed(4))
        assert r.cfg_scales == want
        replay = sample_layout(model, labels, lay, cfg_scale=g, cfg_scales=want, top_p=0.95,
                               generator=torch.Generator().manual_seed(4))
        assert torch.equal(r.codes, replay.codes)
        runs[schedule] = r.codes
    assert not torch.equal(runs["step-release"], runs["step-release-tokens"])
