import itertools

import pytest
import torch

from hieratok.nn.masks import ATTENTION_MODES, allowed_fraction, dense_mask, mask_mod, scale_ids

SCALES = [(1, 2, 4, 8, 16), (1, 2, 4, 16), (1, 2, 4, 8, 12, 16), (3,)]


def _brute(mode, scales):
    """Independent definition: loop over tokens with their scale index."""
    ids = [k for k, s in enumerate(scales) for _ in range(s * s)]
    L = len(ids)
    m = torch.zeros(L, L, dtype=torch.bool)
    for q, k in itertools.product(range(L), range(L)):
        m[q, k] = {"scale_causal": ids[q] >= ids[k], "scale_independent": ids[q] == ids[k], "full": True}[mode]
    return m


@pytest.mark.parametrize("mode", ATTENTION_MODES)
@pytest.mark.parametrize("scales", [(1, 2, 4), (1, 3, 5)])
def test_dense_matches_bruteforce(mode, scales):
    assert torch.equal(dense_mask(mode, scales), _brute(mode, scales))


@pytest.mark.parametrize("mode", ATTENTION_MODES)
@pytest.mark.parametrize("scales", SCALES)
def test_mask_mod_matches_dense(mode, scales):
    L = sum(s * s for s in scales)
    q, k = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
    assert torch.equal(mask_mod(mode, scales)(0, 0, q, k), dense_mask(mode, scales))


def test_scale_ids_and_fraction_closed_form():
    scales = (1, 2, 4, 8, 16)
    ids = scale_ids(scales)
    assert ids.numel() == 341 and ids[0] == 0 and ids[-1] == 4 and (ids == 3).sum() == 64
    n = torch.tensor([s * s for s in scales], dtype=torch.float64)
    expected = float((n * n.cumsum(0)).sum() / n.sum() ** 2)
    assert allowed_fraction("scale_causal", scales) == pytest.approx(expected, rel=1e-6)
    assert allowed_fraction("scale_independent", scales) == pytest.approx(float((n * n).sum() / n.sum() ** 2), rel=1e-6)
    assert allowed_fraction("full", scales) == 1.0
    assert 0.79 < expected < 0.81  # the "about 80% of query-key pairs" of the paper's decoder


def test_every_query_sees_itself():
    for mode in ATTENTION_MODES:
        assert dense_mask(mode, (1, 2, 4, 8)).diagonal().all()


def test_bad_mode():
    with pytest.raises(ValueError, match="attention mode"):
        dense_mask("causal", (1, 2))
