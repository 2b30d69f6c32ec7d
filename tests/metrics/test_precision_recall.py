"""Improved precision / recall (k-NN manifolds): closed forms, a hand-computed case, and a brute-force
scipy reference on random features, also across block boundaries."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from hieratok.metrics import in_manifold, manifold_radii, precision_recall


def _brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The definition, written independently: float64 distances, k-th neighbour by sorting."""
    def radii(x):  # column 0 of each sorted row is the point itself
        return np.sort(cdist(x, x), axis=1)[:, k]

    r_real, r_fake = radii(real), radii(fake)
    d = cdist(fake, real)  # (M, N)
    precision = np.mean((d <= r_real[None, :]).any(1))
    recall = np.mean((d.T <= r_fake[None, :]).any(1))
    return float(precision), float(recall)


def test_identical_sets_give_one_and_far_apart_clusters_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=g)
    pr = precision_recall(x, x.clone())
    assert (pr.precision, pr.recall, pr.k) == (1.0, 1.0, 3)  # every point lies in its own ball (distance 0)
    far = torch.randn(40, 16, generator=g) + 1000.0  # radii are O(sqrt(16)) = O(4), the gap O(4000)
    pr = precision_recall(x, far)
    assert (pr.precision, pr.recall) == (0.0, 0.0)
    assert (pr.num_real, pr.num_fake) == (50, 40)


def test_hand_computed_one_dimensional_case():
    # real {0,1,2,3}: 3rd-neighbour radii 3,2,2,3 -> balls [-3,3], [-1,3], [0,4], [0,6]: union [-3, 6]
    # fake {5,6,7,8}: radii 3,2,2,3           -> balls [2,8], [4,8], [5,9], [5,11]:  union [2, 11]
    # precision: 5, 6 (|6-3| = 3, on the boundary: inside) of the fakes -> 1/2
    # recall: 2 (|2-5| = 3, on the boundary), 3 of the reals -> 1/2
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[5.0], [6.0], [7.0], [8.0]])
    assert manifold_radii(real).tolist() == [9.0, 4.0, 4.0, 9.0]  # squared radii
    pr = precision_recall(real, fake)
    assert (pr.precision, pr.recall) == (0.5, 0.5)
    assert in_manifold(fake, real, manifold_radii(real)).tolist() == [True, True, False, False]
    # k = 1: every radius is 1, the balls cover [-1, 4] and [4, 9]; the closest pair (3, 5) is 2 apart
    pr1 = precision_recall(real, fake, k=1)
    assert (pr1.precision, pr1.recall) == (0.0, 0.0)


@pytest.mark.parametrize("block_size", [7, 10_000])
def test_matches_brute_force_reference(block_size):
    rng = np.random.default_rng(1)
    real = rng.normal(size=(120, 32))
    fake = rng.normal(size=(90, 32)) * 1.2 + 0.2  # overlapping, shifted, wider: both fractions strictly in (0, 1)
    want = _brute_force(real, fake, 3)
    assert 0.0 < want[0] < 1.0 and 0.0 < want[1] < 1.0
    got = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3, block_size=block_size)
    # float32 distances vs float64: a point may flip only if it lies within ~1e-5 (relative) of a
    # ball's boundary; none does for these random points, so the fractions agree exactly
    assert (got.precision, got.recall) == want
    r = manifold_radii(torch.from_numpy(real), 3, block_size).double().sqrt().numpy()
    np.testing.assert_allclose(r, np.sort(cdist(real, real), axis=1)[:, 3], rtol=1e-5)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="at least 4"):
        manifold_radii(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(torch.randn(10, 4), torch.randn(10, 5))
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(torch.full((10, 4), float("nan")), torch.randn(10, 4))
