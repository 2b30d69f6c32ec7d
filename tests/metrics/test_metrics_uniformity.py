"""Latent uniformity: closed-form density statistics and an end-to-end ordering check."""

import numpy as np
import pytest
import torch

from hieratok.metrics import density_cv, gini_coefficient, latent_uniformity, normalized_entropy
from hieratok.metrics.uniformity import sample_latent_vectors


def test_uniform_densities():
    d = np.full(50, 0.3)
    assert gini_coefficient(d) == pytest.approx(0.0, abs=1e-15)
    assert density_cv(d) == pytest.approx(0.0, abs=1e-15)
    assert normalized_entropy(d) == pytest.approx(1.0, abs=1e-15)


def test_one_hot_densities():
    n = 40
    d = np.zeros(n)
    d[7] = 2.0
    assert gini_coefficient(d) == pytest.approx((n - 1) / n, rel=1e-12)
    assert normalized_entropy(d) == pytest.approx(0.0, abs=1e-15)
    assert density_cv(d) == pytest.approx(np.sqrt(n - 1), rel=1e-12)  # std/mean of a one-hot vector


def test_two_level_densities_closed_form():
    # Half the points at density 1, half at 3: Gini = (3 - 1) / (2 * 2 * (1 + 3) / 2) = 0.25, CV = 0.5.
    d = np.array([1.0, 3.0] * 10)
    assert gini_coefficient(d) == pytest.approx(0.25, rel=1e-12)
    assert density_cv(d) == pytest.approx(0.5, rel=1e-12)
    p = d / d.sum()
    assert normalized_entropy(d) == pytest.approx(-(p * np.log(p)).sum() / np.log(20), rel=1e-12)
    # Gini against the mean-absolute-difference definition
    mad = np.abs(d[:, None] - d[None, :]).mean()
    assert gini_coefficient(d) == pytest.approx(mad / (2 * d.mean()), rel=1e-12)


def test_sampling_is_seeded_and_normalised():
    z = torch.randn(6, 4, 5, 5) * torch.tensor([1.0, 2.0, 5.0, 0.1]).view(1, 4, 1, 1) + 3
    a = sample_latent_vectors(z, 150, seed=3)
    assert a.shape == (150, 4)
    np.testing.assert_array_equal(a, sample_latent_vectors(z, 150, seed=3))
    assert not np.array_equal(a, sample_latent_vectors(z, 150, seed=4))
    full = sample_latent_vectors(z, 150, seed=0)  # all 150 positions: exactly standardised
    np.testing.assert_allclose(full.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(full.std(0), 1, rtol=1e-12)
    with pytest.raises(ValueError):
        sample_latent_vectors(z, 151, seed=0)


def test_clustered_latents_are_less_uniform():
    rng = np.random.default_rng(0)
    n, c, h, w = 20, 8, 4, 4
    iso = torch.from_numpy(rng.normal(size=(n, c, h, w)))
    # Tight clusters of very unequal sizes.
    centers = rng.normal(size=(5, c)) * 4
    labels = rng.choice(5, size=n * h * w, p=[0.5, 0.25, 0.12, 0.08, 0.05])
    vecs = centers[labels] + 0.1 * rng.normal(size=(n * h * w, c))
    clustered = torch.from_numpy(vecs.reshape(n, h, w, c)).permute(0, 3, 1, 2)
    kw = dict(num_points=300, num_runs=2, seed=0, num_threads=1)
    r_iso = latent_uniformity(iso, **kw)
    r_clu = latent_uniformity(clustered, **kw)
    assert r_iso.points_2d.shape == (300, 2) and r_iso.densities.shape == (300,)
    assert len(r_iso.runs) == 2 and r_iso.cv[1] >= 0
    assert r_clu.cv[0] > r_iso.cv[0]
    assert r_clu.gini[0] > r_iso.gini[0]
    assert r_clu.entropy[0] < r_iso.entropy[0]
    assert 0 < r_iso.entropy[0] <= 1 and 0 <= r_iso.gini[0] < 1


def test_collapsed_latents_raise_before_tsne(monkeypatch):
    import hieratok.metrics.uniformity as uni

    def no_tsne(*a, **k):  # scikit-learn's t-SNE crashed the process on identical points
        raise AssertionError("t-SNE ran on degenerate data")

    monkeypatch.setattr(uni, "_tsne", no_tsne)
    with pytest.raises(ValueError, match="all identical"):
        latent_uniformity(torch.full((4, 8, 4, 4), 0.1), num_points=50, num_runs=1)
    z = torch.randn(4, 8, 4, 4)
    z[1, 2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        latent_uniformity(z, num_points=50, num_runs=1)
