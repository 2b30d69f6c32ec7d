"""top-k / top-p / temperature sampling and the guidance schedule."""

import math

import pytest
import torch

from hieratok.generators.autoregressive import cfg_scale_at, filter_logits, sample_logits


def _nucleus_bruteforce(probs, p):
    """Smallest set of the most probable entries whose mass reaches p (Holtzman et al.)."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_nucleus(top_p):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(17, generator=g, dtype=torch.float64) * 2
        kept = set(torch.nonzero(filter_logits(logits[None], top_p=top_p)[0].isfinite()).flatten().tolist())
        assert kept == _nucleus_bruteforce(logits.softmax(-1).tolist(), top_p)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_keeps_the_k_largest(k):
    logits = torch.randn(4, 10)
    out = filter_logits(logits, top_k=k)
    for row, o in zip(logits, out):
        kept = set(torch.nonzero(o.isfinite()).flatten().tolist())
        assert kept == set(row.argsort(descending=True)[:k].tolist())
        torch.testing.assert_close(o[o.isfinite()], row[o.isfinite()])


def test_filters_off_and_combined():
    logits = torch.randn(3, 12)
    assert torch.equal(filter_logits(logits), logits)
    both = filter_logits(logits, top_k=5, top_p=0.5)
    assert (both.isfinite().sum(-1) <= 5).all() and (both.isfinite().sum(-1) >= 1).all()
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)


def test_sampling_frequencies_follow_the_tempered_distribution():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    g = torch.Generator().manual_seed(0)
    draws = sample_logits(logits.expand(20000, 4), temperature=2.0, generator=g)
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    expected = (logits.double() / 2).softmax(-1)
    assert (freq - expected).abs().max() < 0.015


def test_sampling_is_deterministic_under_a_generator_and_greedy_at_zero():
    logits = torch.randn(6, 5, 40)
    a = sample_logits(logits, generator=torch.Generator().manual_seed(7))
    b = sample_logits(logits, generator=torch.Generator().manual_seed(7))
    c = sample_logits(logits, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (6, 5)
    assert torch.equal(sample_logits(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample_logits(logits, temperature=1e-4, generator=torch.Generator()), logits.argmax(-1))


def test_step_schedule_of_the_published_evaluation():
    """9 passes, start 0.25: passes 0 and 1 (ratios 0, 1/8) unguided, passes 2..8 guided."""
    scales = [cfg_scale_at(i, 9, 3.75, "step", 0.25) for i in range(9)]
    assert scales == [1.0, 1.0] + [3.75] * 7
    assert [cfg_scale_at(i, 9, 3.75) for i in range(9)] == [3.75] * 9
    with pytest.raises(ValueError, match="cfg_schedule"):
        cfg_scale_at(0, 9, 2.0, "cosine")


@pytest.mark.parametrize("scale", [0.05, 0.5, 3.0, 12.0])  # flat .. peaked distributions
@pytest.mark.parametrize("top_p", [0.5, 0.95])
def test_partial_sort_nucleus_equals_the_full_sort(scale, top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 2048, generator=g) * scale
    fast = filter_logits(logits, top_p=top_p, probe=64)  # small probe: both sides and the fallback run
    ref = filter_logits(logits, top_p=top_p, probe=0)
    assert torch.equal(fast.isfinite(), ref.isfinite())
    for row, f in zip(logits[:4].double(), fast[:4]):  # and both are the brute-force nucleus
        kept = set(torch.nonzero(f.isfinite()).flatten().tolist())
        assert kept == _nucleus_bruteforce(row.softmax(-1).tolist(), top_p)


def _script_step(ratio, cfg_scale, window_start, min_cfg_scale=1.0):
    """The release's ``step_schedule``: no guidance when cfg_scale is 1, else cfg_scale from
    window_start on and min_cfg_scale (+1e-4 when it is 1) before."""
    if cfg_scale == 1.0 or ratio >= window_start:
        return cfg_scale
    return min_cfg_scale + 1e-4 if min_cfg_scale == 1.0 else min_cfg_scale


def _script_har_ratios(N, a, num_steps=None):
    """Progress ratio of every forward pass of the release's ``generate_har`` (prefill, a - 1
    next-token passes in ``decode_n_tokens``, then ``decode_n_tokens_har``), with or without
    ``num_steps`` in the schedule kwargs."""
    ratios = [0.0]  # the prefill
    for i in range(a - 1):  # decode_n_tokens(..., max_new_tokens=N)
        if num_steps is not None:
            ratios.append((i + 1) / (num_steps - 1))
        else:  # the first pass pops max_new_tokens; the others divide by the count of new tokens
            ratios.append((i + 1) / (N - 1) if i == 0 else (i + 1) / (a - 1))
    i, cnt, n = a - 1, a - 1, a  # decode_n_tokens_har: levels of a, 2a, ... codes
    while i < N - a + a - 1:
        ratios.append((cnt + 1) / (num_steps - 1) if num_steps is not None else (i + 1) / (N - 1))
        i, cnt, n = i + n, cnt + 1, n * 2
    return ratios


def test_step_release_is_the_published_scripts_schedule():
    """The published sampling script sets num_steps = a + log2(N) - log2(a) for a HAR generator:
    pass ratios (cnt + 1) / (num_steps - 1), guided from 0.25 on."""
    from hieratok.generators.autoregressive import har_layout, release_step_scales

    u, g = 1.0001, 3.75
    num_steps = 4 + int(math.log2(128)) - int(math.log2(4))  # the script's value: 9
    ratios = _script_har_ratios(128, 4, num_steps)
    assert len(ratios) == num_steps == har_layout(128, 4).num_steps
    assert ratios == [p / 8 for p in range(9)]
    expected = [_script_step(r, g, 0.25) for r in ratios]
    assert expected == [u, u] + [g] * 7
    assert release_step_scales(har_layout(128, 4), g, 0.25) == expected
    assert release_step_scales(har_layout(128, 4), 1.0, 0.25) == [1.0] * 9  # no guidance at all
    assert release_step_scales(har_layout(128, 4), g, 0.25, min_cfg_scale=2.0) == [2.0, 2.0] + [g] * 7
    for N, a in ((32, 4), (64, 2), (16, 1)):
        steps = a + int(math.log2(N)) - int(math.log2(a))
        want = [_script_step(r, 2.0, 0.4) for r in _script_har_ratios(N, a, steps)]
        assert release_step_scales(har_layout(N, a), 2.0, 0.4) == want


def test_step_release_on_the_plain_next_token_layout():
    """No num_steps for a non-HAR generator: the release's generate divides by the count of new
    tokens, so decode pass i (0-based, after the prefill) has ratio (i + 1) / (N - 1)."""
    from hieratok.generators.autoregressive import ar_layout, release_step_scales, release_token_step_scales

    u, g = 1.0001, 3.75
    expected = [_script_step(0.0, g, 0.25)] + [_script_step((i + 1) / 127, g, 0.25) for i in range(127)]
    assert release_step_scales(ar_layout(128), g, 0.25) == expected
    assert expected[:2] == [u, u] and expected.index(g) == 32 and set(expected[32:]) == {g}
    assert release_token_step_scales(ar_layout(128), g, 0.25) == expected


def test_step_release_tokens_is_the_path_without_num_steps():
    """The old schedule (the release's token counter, used only when num_steps is not set) stays
    available as release_token_step_scales / "step-release-tokens"."""
    from hieratok.generators.autoregressive import har_layout, release_token_step_scales

    u, g = 1.0001, 3.75
    expected = [_script_step(r, g, 0.25) for r in _script_har_ratios(128, 4)]
    assert expected == [u, u, g, g, u, u, u, g, g]
    assert release_token_step_scales(har_layout(128, 4), g, 0.25) == expected
    for N, a in ((32, 4), (64, 2)):
        want = [_script_step(r, 2.0, 0.3) for r in _script_har_ratios(N, a)]
        assert release_token_step_scales(har_layout(N, a), 2.0, 0.3) == want


def test_cli_offers_every_schedule():
    from hieratok.cli import build_parser
    from hieratok.generators.autoregressive import CFG_SCHEDULES

    sample = build_parser()._subparsers._group_actions[0].choices["sample"]
    (action,) = [a for a in sample._actions if "--cfg-schedule" in a.option_strings]
    assert tuple(action.choices) == CFG_SCHEDULES
    assert {"step-release", "step-release-tokens"} <= set(CFG_SCHEDULES)
