"""MaskSpec: every form (dense, FlexAttention mask_mod, SDPA segments) against independent
definitions written token by token."""

import itertools

import pytest
import torch

from hieratok.nn.masks import ATTENTION_MODES, MaskSpec

SCALES = [(1, 2, 4, 8, 16), (1, 2, 4, 16), (1, 2, 4, 8, 12, 16), (3,)]
SIZES = [(1,), (1, 1, 1), (1, 1, 1, 1, 4, 8), (2, 3, 1), (1, 1, 2, 4, 8, 16), (16, 32, 1, 1, 2, 4, 8, 16)]
RULES = ["causal", "diagonal", "full"]


def _brute(rule, sizes):
    """Independent definition: loop over tokens with their block index."""
    ids = [b for b, n in enumerate(sizes) for _ in range(n)]
    L = len(ids)
    m = torch.zeros(L, L, dtype=torch.bool)
    for q, k in itertools.product(range(L), range(L)):
        m[q, k] = {"causal": ids[q] >= ids[k], "diagonal": ids[q] == ids[k], "full": True}[rule]
    return m


def _rediscover(mask, merge_queries=128):
    """Segments found from the mask's values (the old way): runs of queries with one key range,
    merged while a segment holds at most ``merge_queries`` queries; a segment is masked unless its
    block of the mask is all True."""
    L = mask.shape[1]
    lo = [int(r.nonzero()[0]) for r in mask]
    hi = [int(r.nonzero()[-1]) + 1 for r in mask]
    starts = [q for q in range(len(lo)) if q == 0 or (lo[q], hi[q]) != (lo[q - 1], hi[q - 1])] + [len(lo)]
    bounds = [0]
    for a, b in zip(starts[:-1], starts[1:]):
        if a > bounds[-1] and b - bounds[-1] > merge_queries:
            bounds.append(a)
    bounds.append(len(lo))
    out = []
    for q0, q1 in zip(bounds[:-1], bounds[1:]):
        k0, k1 = min(lo[q0:q1]), max(hi[q0:q1])
        out.append((q0, q1, k0, k1, not bool(mask[q0:q1, k0:k1].all())))
    assert L >= max(hi)
    return tuple(out)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("sizes", SIZES)
def test_dense_and_mask_mod_match_the_token_loop(rule, sizes):
    spec = MaskSpec(sizes, rule)
    want = _brute(rule, sizes)
    assert torch.equal(spec.dense(), want)
    L = spec.length
    q, k = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
    assert torch.equal(spec.mask_mod()(0, 0, q, k), want)
    for q0 in {0, L // 2, L - 1}:  # query rows from q0 on (a cached step, the last layer's rows)
        q, k = torch.meshgrid(torch.arange(L - q0), torch.arange(L), indexing="ij")
        assert torch.equal(spec.mask_mod(q_offset=q0)(0, 0, q, k), want[q0:])
        assert torch.equal(spec.dense(q0=q0), want[q0:])


@pytest.mark.parametrize("mode", ATTENTION_MODES)
@pytest.mark.parametrize("scales", SCALES)
def test_scale_masks_are_the_papers_rules(mode, scales):
    spec = MaskSpec.for_scales(mode, scales)
    rule = {"scale_causal": "causal", "scale_independent": "diagonal", "full": "full"}[mode]
    assert torch.equal(spec.dense(), _brute(rule, [s * s for s in scales]))
    assert spec.dense().diagonal().all()  # every query sees itself


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("sizes", SIZES + [tuple(s * s for s in sc) for sc in SCALES] + [(1,) * 300, (200, 100, 3)])
def test_segments_equal_the_ones_found_from_the_values(rule, sizes):
    spec = MaskSpec(sizes, rule)
    dense = spec.dense()
    assert spec.segments() == _rediscover(dense)
    L = spec.length
    for q0, q1 in {(0, L), (L // 3, L), (L - 1, L), (0, max(1, L // 2))}:  # any rows
        k1 = spec.key_end(q0, q1)
        rows = dense[q0:q1]
        assert not rows[:, k1:].any() and rows[:, k1 - 1].any()  # key_end: one past the last key seen
        assert spec.segments(q0, q1) == _rediscover(rows[:, :k1])
        assert spec.sees_all_keys(q0, q1) == bool(rows[:, :k1].all())


def test_paper_scale_segments_and_fractions_closed_form():
    L, fine = 341, 256
    causal = MaskSpec.for_scales("scale_causal", (1, 2, 4, 8, 16))
    indep = MaskSpec.for_scales("scale_independent", (1, 2, 4, 8, 16))
    # the finest scale's queries (3/4 of them) attend to their keys without any mask
    assert causal.segments() == ((0, 85, 0, 85, True), (85, L, 0, L, False))
    assert indep.segments() == ((0, 85, 0, 85, True), (85, L, L - fine, L, False))
    assert MaskSpec.for_scales("full", (1, 2, 4, 8, 16)).segments() == ((0, L, 0, L, False),)
    pairs = sum((s.q1 - s.q0) * (s.k1 - s.k0) for s in causal.segments())
    assert pairs / L ** 2 == pytest.approx(0.813, abs=1e-3)
    n = torch.tensor([s * s for s in (1, 2, 4, 8, 16)], dtype=torch.float64)
    assert causal.allowed_fraction() == pytest.approx(float((n * n.cumsum(0)).sum() / n.sum() ** 2), rel=1e-12)
    assert indep.allowed_fraction() == pytest.approx(float((n * n).sum() / n.sum() ** 2), rel=1e-12)
    assert 0.79 < causal.allowed_fraction() < 0.81  # "about 80% of query-key pairs" of the paper's decoder
    for spec in (causal, indep, MaskSpec((2, 3, 1), "full")):
        assert spec.allowed_fraction() == pytest.approx(spec.dense().double().mean().item(), rel=1e-12)


def test_plain_causal_and_decoding_steps():
    spec = MaskSpec.causal(7)
    assert torch.equal(spec.dense(), torch.ones(7, 7, dtype=torch.bool).tril())
    assert all(spec.sees_all_keys(t, t + 1) and spec.key_end(t, t + 1) == t + 1 for t in range(7))
    har = MaskSpec((1, 1, 2, 4))
    assert har.sees_all_keys(4, 8) and har.key_end(4, 8) == 8  # one HAR group: no mask needed
    assert not har.sees_all_keys(2, 8)  # two groups: the first cannot see the second


def test_bad_specs():
    with pytest.raises(ValueError, match="positive"):
        MaskSpec((1, 0, 2))
    with pytest.raises(ValueError, match="mask rule"):
        MaskSpec((1, 2), "sideways")
    with pytest.raises(ValueError, match="attention mode"):
        MaskSpec.for_scales("causal", (1, 2))
    with pytest.raises(ValueError, match="outside"):
        MaskSpec((2, 2)).dense(q0=3, q1=5)
    assert MaskSpec([1, 2]) == MaskSpec((1, 2)) and hash(MaskSpec([1, 2])) == hash(MaskSpec((1, 2)))
