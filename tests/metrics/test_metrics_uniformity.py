"""Latent uniformity: closed-form density statistics, the VA-VAE and pooled samplers, the
normalisation, and an end-to-end ordering check."""

import inspect

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde

import hieratok.metrics.uniformity as uni
from hieratok.metrics import density_cv, gini_coefficient, latent_uniformity, normalized_entropy
from hieratok.metrics.uniformity import (
    VAVAE_TSNE_SEED,
    channel_stats,
    sample_latent_vectors,
    sample_one_position_per_image,
)


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


@pytest.mark.parametrize("protocol, n, hw, runs", [("pooled", 20, 4, 2), ("vavae", 300, 2, 1)])
def test_clustered_latents_are_less_uniform(protocol, n, hw, runs):
    rng = np.random.default_rng(0)
    c, h, w = 8, hw, hw
    iso = torch.from_numpy(rng.normal(size=(n, c, h, w)))
    # Tight clusters of very unequal sizes.
    centers = rng.normal(size=(5, c)) * 4
    labels = rng.choice(5, size=n * h * w, p=[0.5, 0.25, 0.12, 0.08, 0.05])
    vecs = centers[labels] + 0.1 * rng.normal(size=(n * h * w, c))
    clustered = torch.from_numpy(vecs.reshape(n, h, w, c)).permute(0, 3, 1, 2)
    kw = dict(protocol=protocol, num_points=300, num_runs=runs, seed=0, num_threads=1)
    r_iso = latent_uniformity(iso, **kw)
    r_clu = latent_uniformity(clustered, **kw)
    assert r_iso.points_2d.shape == (300, 2) and r_iso.densities.shape == (300,)
    assert len(r_iso.runs) == runs and r_iso.cv[1] >= 0 and r_iso.protocol == protocol
    assert r_clu.cv[0] > r_iso.cv[0]
    assert r_clu.gini[0] > r_iso.gini[0]
    assert r_clu.entropy[0] < r_iso.entropy[0]
    assert 0 < r_iso.entropy[0] <= 1 and 0 <= r_iso.gini[0] < 1


@pytest.mark.parametrize("protocol", ["vavae", "pooled"])
def test_collapsed_latents_raise_before_tsne(monkeypatch, protocol):
    def no_tsne(*a, **k):  # scikit-learn's t-SNE crashed the process on identical points
        raise AssertionError("t-SNE ran on degenerate data")

    monkeypatch.setattr(uni, "_tsne", no_tsne)
    points = 4 if protocol == "vavae" else 50  # 4 images of 16 positions
    with pytest.raises(ValueError, match="all identical"):
        latent_uniformity(torch.full((4, 8, 4, 4), 0.1), protocol=protocol, num_points=points, num_runs=1,
                          perplexity=1.0)
    z = torch.randn(4, 8, 4, 4)
    z[1, 2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        latent_uniformity(z, protocol=protocol, num_points=points, num_runs=1, perplexity=1.0)


# --- VA-VAE protocol: one random position per image -----------------------------------------------

def _id_latents(n: int, h: int, w: int) -> torch.Tensor:
    """(n, 3, h, w): channel 0 = image id, channel 1 = position id h*w_i + w_i, channel 2 = noise."""
    z = torch.empty(n, 3, h, w, dtype=torch.float64)
    z[:, 0] = torch.arange(n, dtype=torch.float64).view(n, 1, 1)
    z[:, 1] = torch.arange(h * w, dtype=torch.float64).view(1, h, w)
    z[:, 2] = torch.randn(n, h, w, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return z


def test_vavae_sampler_takes_one_position_per_image():
    n, h, w = 50, 4, 5
    z = _id_latents(n, h, w)
    d = sample_one_position_per_image(z, 30, np.random.default_rng(0))
    img, pos = d.vectors_PC[:, 0].astype(int), d.vectors_PC[:, 1].astype(int)
    assert d.vectors_PC.shape == (30, 3) and len(set(img.tolist())) == 30  # 30 distinct images
    np.testing.assert_array_equal(img, d.image_P)
    np.testing.assert_array_equal(pos, d.h_P * w + d.w_P)  # the vector of the recorded position
    np.testing.assert_array_equal(d.vectors_PC[:, 2], z[d.image_P, 2, d.h_P, d.w_P].numpy())
    assert not d.flipped_P.any()
    # seeded: the same seed (or int) gives the same draw, another seed another one
    same = sample_one_position_per_image(z, 30, 0)
    np.testing.assert_array_equal(same.vectors_PC, d.vectors_PC)
    every = [sample_one_position_per_image(z, n, np.random.default_rng(s)) for s in range(4)]
    for e in every:  # num_points == N: every image exactly once, at a random position
        assert sorted(e.vectors_PC[:, 0].astype(int).tolist()) == list(range(n))
    by_image = [e.vectors_PC[np.argsort(e.image_P), 1] for e in every]
    assert not np.array_equal(by_image[0], by_image[1])  # positions move between runs
    assert len(np.unique(np.concatenate(by_image))) > h * w // 2  # and cover the grid
    with pytest.raises(ValueError, match="one position per image"):
        sample_one_position_per_image(z, n + 1, 0)


def test_vavae_sampler_draws_mirrored_latents_half_the_time():
    n = 400
    z = _id_latents(n, 2, 2)
    z_flip = z.clone()
    z_flip[:, 2] = 1000.0  # marks a vector taken from the mirrored latents
    d = sample_one_position_per_image(z, n, np.random.default_rng(1), latents_flip_NCHW=z_flip)
    np.testing.assert_array_equal(d.vectors_PC[:, 2] == 1000.0, d.flipped_P)
    np.testing.assert_array_equal(d.vectors_PC[:, 0], d.image_P)  # still the same image's vector
    assert 0.4 < d.flipped_P.mean() < 0.6  # p = 1/2 (5 sigma is 0.125 at n = 400)
    none = sample_one_position_per_image(z, n, 1, latents_flip_NCHW=z_flip, flip_prob=0.0)
    assert not none.flipped_P.any()
    with pytest.raises(ValueError, match="pair image by image"):
        sample_one_position_per_image(z, 10, 0, latents_flip_NCHW=z_flip[:10])


def _capture_tsne(monkeypatch) -> list:
    """Replace t-SNE by the first two normalised coordinates (plus a little spread), recording inputs."""
    seen = []

    def fake(x, seed, perplexity, iterations, num_threads):
        seen.append((x.copy(), seed))
        return x[:, :2] + 1e-3 * np.arange(len(x))[:, None]

    monkeypatch.setattr(uni, "_tsne", fake)
    return seen


def test_vavae_normalises_by_the_given_training_statistics(monkeypatch):
    seen = _capture_tsne(monkeypatch)
    g = torch.Generator().manual_seed(0)
    mean, std = np.array([1.0, -2.0, 0.5, 3.0]), np.array([0.5, 2.0, 1.0, 4.0])
    z = torch.randn(40, 4, 3, 3, generator=g, dtype=torch.float64) * 3 + 7  # another distribution
    res = latent_uniformity(z, num_points=25, num_runs=2, seed=5, perplexity=5.0,
                            channel_mean=mean, channel_std=std)
    assert res.protocol == "vavae" and res.normalization == "train"
    for r, (x, _) in enumerate(seen):  # closed form: (raw - train mean) / train std of each run's draw
        raw = sample_one_position_per_image(z, 25, np.random.default_rng(5 + r)).vectors_PC
        np.testing.assert_allclose(x, (raw - mean) / std, rtol=0, atol=1e-12)
    # (1, C, 1, 1) statistics (VA-VAE's latents_stats.pt) are the same thing
    seen.clear()
    latent_uniformity(z, num_points=25, num_runs=1, seed=5, perplexity=5.0,
                      channel_mean=torch.tensor(mean).view(1, 4, 1, 1), channel_std=torch.tensor(std).view(1, 4, 1, 1))
    raw = sample_one_position_per_image(z, 25, np.random.default_rng(5)).vectors_PC
    np.testing.assert_allclose(seen[0][0], (raw - mean) / std, atol=1e-12)
    # without statistics: the evaluated set's own, over every image and position (population std)
    seen.clear()
    res = latent_uniformity(z, num_points=25, num_runs=1, seed=5, perplexity=5.0)
    m, s = z.mean((0, 2, 3)).numpy(), z.std((0, 2, 3), unbiased=False).numpy()
    np.testing.assert_allclose(seen[0][0], (raw - m) / s, atol=1e-12)
    assert res.normalization == "eval-set" and res.as_dict()["normalization"] == "eval-set"
    np.testing.assert_allclose(channel_stats(z)[0], m, atol=1e-12)
    with pytest.raises(ValueError, match="3 values but the latents have 4 channels"):
        latent_uniformity(z, num_points=25, num_runs=1, perplexity=5.0, channel_mean=mean[:3], channel_std=std[:3])
    with pytest.raises(ValueError, match="both"):
        latent_uniformity(z, num_points=25, num_runs=1, perplexity=5.0, channel_mean=mean)


def test_tsne_seed_fixed_for_vavae_per_run_for_pooled(monkeypatch):
    seen = _capture_tsne(monkeypatch)
    z = torch.randn(30, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    res = latent_uniformity(z, num_points=20, num_runs=3, seed=10, perplexity=5.0)
    assert [s for _, s in seen] == [VAVAE_TSNE_SEED] * 3 and res.as_dict()["tsne_seed"] == VAVAE_TSNE_SEED
    assert [r["seed"] for r in res.runs] == [10, 11, 12]
    assert not np.array_equal(seen[0][0], seen[1][0])  # the runs differ in their points
    seen.clear()
    res = latent_uniformity(z, protocol="pooled", num_points=20, num_runs=3, seed=10, perplexity=5.0)
    assert [s for _, s in seen] == [10, 11, 12] and res.as_dict()["tsne_seed"] == "per run"
    seen.clear()
    latent_uniformity(z, num_points=20, num_runs=2, seed=10, perplexity=5.0, tsne_seed=7)
    assert [s for _, s in seen] == [7, 7]


def test_result_records_protocol_and_flip(monkeypatch):
    _capture_tsne(monkeypatch)
    z = torch.randn(30, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    d = latent_uniformity(z, latents_flip_NCHW=z.flip(-1), num_points=20, num_runs=1, perplexity=5.0).as_dict()
    assert (d["protocol"], d["flip"], d["flip_prob"], d["normalization"]) == ("vavae", True, 0.5, "eval-set")
    with pytest.raises(ValueError, match="pooled protocol takes no mirrored"):
        latent_uniformity(z, protocol="pooled", latents_flip_NCHW=z, num_points=20, num_runs=1, perplexity=5.0)
    with pytest.raises(ValueError, match="protocol must be one of"):
        latent_uniformity(z, protocol="vavea", num_points=20, num_runs=1, perplexity=5.0)


# --- pooled protocol: the earlier behaviour, unchanged --------------------------------------------

def test_pooled_protocol_matches_the_earlier_computation():
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    z = torch.randn(5, 6, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 + 1  # 80 positions
    res = latent_uniformity(z, protocol="pooled", num_points=60, num_runs=2, seed=4, iterations=250,
                            perplexity=10.0, num_threads=1)
    assert (res.protocol, res.normalization, res.flip, res.tsne_seed) == ("pooled", "eval-set", False, None)
    iter_kw = "max_iter" if "max_iter" in inspect.signature(TSNE.__init__).parameters else "n_iter"
    vecs = z.double().permute(0, 2, 3, 1).reshape(-1, 6).numpy()  # every position of every image
    for r, run in enumerate(res.runs):  # the earlier code: pooled positions, own statistics, run-seeded t-SNE
        s = 4 + r
        idx = np.random.default_rng(s).choice(80, size=60, replace=False)
        x = (vecs[idx] - vecs.mean(0)) / vecs.std(0)
        np.testing.assert_array_equal(x, sample_latent_vectors(z, 60, s))
        with threadpool_limits(limits=1):  # as the call above: the same sums in the same order
            pts = TSNE(n_components=2, perplexity=10.0, init="pca", learning_rate="auto", random_state=s,
                       **{iter_kw: 250}).fit_transform(x)
        dens = gaussian_kde(pts.T)(pts.T)
        assert run["seed"] == s
        assert run["cv"] == pytest.approx(density_cv(dens), rel=1e-9)
        assert run["gini"] == pytest.approx(gini_coefficient(dens), rel=1e-9)
        assert run["entropy"] == pytest.approx(normalized_entropy(dens), rel=1e-9)
