import pytest
import torch

from hieratok.metrics import kernel_inception_distance, polynomial_mmd2


def _naive(a, b):
    """The unbiased estimator written out pair by pair (Bińkowski et al. 2018, eq. 3)."""
    d = a.shape[1]
    k = lambda x, y: (float(x @ y) / d + 1) ** 3  # noqa: E731
    n, m = len(a), len(b)
    kaa = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kbb = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kab = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    return kaa + kbb - 2 * kab


def test_matches_the_pairwise_formula_and_torchmetrics(gen):
    from torchmetrics.image.kid import poly_mmd

    a = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(9, 5, generator=gen, dtype=torch.float64) + 0.3
    assert polynomial_mmd2(a, b) == pytest.approx(_naive(a, b), rel=1e-12)
    c = b[:7]  # torchmetrics' estimator assumes sets of one size
    assert polynomial_mmd2(a, c) == pytest.approx(float(poly_mmd(a, c)), rel=1e-9)


def test_unbiased_near_zero_for_one_distribution_and_grows_with_shift(gen):
    a = torch.randn(400, 16, generator=gen)
    b = torch.randn(400, 16, generator=gen)
    same = polynomial_mmd2(a, b)
    assert abs(same) < 0.05  # unbiased: fluctuates around 0, may be negative
    assert polynomial_mmd2(a, b + 0.5) > 10 * max(abs(same), 1e-3)


def test_subsets(gen):
    a, b = torch.randn(30, 4, generator=gen), torch.randn(30, 4, generator=gen) + 1
    assert kernel_inception_distance(a, b, subset_size=50) == (polynomial_mmd2(a, b), 0.0)
    m, s = kernel_inception_distance(a, b, subset_size=10, num_subsets=20, generator=torch.Generator().manual_seed(1))
    assert s > 0 and m == pytest.approx(polynomial_mmd2(a, b), rel=0.5)
    with pytest.raises(ValueError, match="at least 2"):
        polynomial_mmd2(a[:1], b)
