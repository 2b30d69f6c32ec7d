"""top-k / top-p / temperature sampling and the guidance schedule."""

import pytest
import torch

from hieratok.generators.har import cfg_scale_at, filter_logits, sample_logits


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


def test_release_step_schedule_is_token_based():
    from hieratok.generators.har import ar_layout, har_layout, release_step_scales

    u, g = 1.0001, 3.75
    # what the authors' sampler used per pass (recorded from their generate_har; BENCHMARKS.md)
    assert release_step_scales(har_layout(128, 4), g, 0.25) == [u, u, g, g, u, u, u, g, g]
    ar = release_step_scales(ar_layout(128), g, 0.25)  # token-by-token: guided from token 32 of 127 on
    assert ar[:2] == [u, u] and ar.index(g) == 32 and set(ar[32:]) == {g}
    assert release_step_scales(har_layout(128, 4), 1.0, 0.25) == [1.0] * 9  # no guidance at all
    assert release_step_scales(har_layout(128, 4), g, 0.25, min_cfg_scale=2.0)[0] == 2.0
