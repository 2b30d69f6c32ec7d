"""Frechet distance, streaming statistics, image sources (no Inception network needed here)."""


import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from hieratok.metrics import (
    CodebookUsage,
    FeatureStats,
    GaussianStats,
    all_reduce_feature_stats,
    fid_from_sources,
    frechet_distance,
    iter_image_folder,
    iter_npz_images,
    stats_from_source,
)
from hieratok.metrics.fid import npz_kind


def _random_cov(rng, d, n=None):
    a = rng.normal(size=(n or 3 * d, d))
    return np.cov(a, rowvar=False)


def _classic_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 50
    a, b = rng.uniform(0, 3, d), rng.uniform(0, 3, d)
    a[:5] = 0.0  # singular
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Rotating both covariances by the same orthogonal matrix changes nothing.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_matches_scipy_sqrtm_on_well_conditioned():
    rng = np.random.default_rng(1)
    for d in (8, 64):
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        ref = _classic_fid(mu1, s1, mu2, s2)
        got = frechet_distance(mu1, s1, mu2, s2)
        assert abs(got - ref) / abs(ref) < 1e-12  # measured 1e-15


def test_wide_spectrum_is_unbiased():
    # Eigenvalues over 7 decades, as Inception feature covariances have: squaring the condition
    # number (eigenvalues of S1^1/2 S2 S1^1/2) loses the small ones and biased FID(S, S) by 5e-5.
    rng = np.random.default_rng(5)
    d = 512
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a = 3 * np.logspace(0, -7, d)
    b = rng.permutation(a) * rng.uniform(0.5, 2, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s = (q * a) @ q.T
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(((mu1 - mu2) ** 2).sum(), abs=1e-10)
    # commuting covariances: tr sqrt(S1 S2) = sum sqrt(a_i b_i)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, s, mu2, (q * b) @ q.T) == pytest.approx(expected, rel=1e-12)


def test_rank_deficient_is_finite():
    rng = np.random.default_rng(2)
    d = 128
    x = rng.normal(size=(10, d))  # N < D: rank-9 covariances
    y = rng.normal(size=(12, d)) + 0.5
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    fid = frechet_distance(x.mean(0), sx, y.mean(0), sy)
    assert np.isfinite(fid) and fid > 0
    same = frechet_distance(x.mean(0), sx, x.mean(0), sx)
    assert abs(same) < 1e-8 * np.trace(sx)


def test_feature_stats_streaming_and_merge():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(257, 16)) * rng.uniform(0.1, 3, 16) + rng.normal(size=16) * 5
    a, b = FeatureStats(16), FeatureStats(16)
    for chunk in np.array_split(f[:100], 7):
        a.update(torch.from_numpy(chunk).float())  # float32 features, float64 sums
    b.update(f[100:])
    a.merge(b)
    f32 = f.astype(np.float32).astype(np.float64)
    full = np.concatenate([f32[:100], f[100:]])
    assert a.count == 257
    np.testing.assert_allclose(a.mean, full.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.cov, np.cov(full, rowvar=False), rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError):
        FeatureStats(16).update(np.zeros((3, 15)))


def test_stats_npz_roundtrip_and_adm_layout(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.normal(size=8), _random_cov(rng, 8)
    GaussianStats(mu, sigma, 123).save(tmp_path / "s.npz")
    s = GaussianStats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(s.mu, mu)
    np.testing.assert_array_equal(s.sigma, sigma)
    assert s.num_samples == 123
    # ADM reference batches: raw images plus mu / sigma (and spatial mu_s / sigma_s).
    adm = tmp_path / "VIRTUAL_ref.npz"
    np.savez(adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu + 1, sigma=sigma, mu_s=mu, sigma_s=sigma)
    assert npz_kind(adm) == "stats"
    r = stats_from_source(adm)  # no extractor needed
    np.testing.assert_array_equal(r.mu, mu + 1)
    res = fid_from_sources(tmp_path / "s.npz", adm, progress=False)
    assert res.inception_source == "none"
    assert res.fid == pytest.approx(8.0, rel=1e-9)  # |mu + 1 - mu|^2 with equal covariances


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_images_stream(tmp_path, compressed):
    imgs = np.random.default_rng(5).integers(0, 256, size=(7, 6, 5, 3), dtype=np.uint8)
    path = tmp_path / "samples.npz"
    (np.savez_compressed if compressed else np.savez)(path, imgs)
    assert npz_kind(path) == "images"
    batches = list(iter_npz_images(path, batch_size=3))
    assert [b.shape[0] for b in batches] == [3, 3, 1]
    got = torch.cat(batches)
    assert got.dtype == torch.uint8 and got.shape == (7, 3, 6, 5)
    np.testing.assert_array_equal(got.permute(0, 2, 3, 1).numpy(), imgs)
    with pytest.raises(ValueError):
        stats_from_source(path)  # images need an extractor


def test_image_folder_batches(tmp_path):
    rng = np.random.default_rng(6)
    ims = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(8, 9, 3)] * 3 + [(5, 4, 3)] * 2]
    (tmp_path / "sub").mkdir()
    for i, im in enumerate(ims):
        Image.fromarray(im).save(tmp_path / ("sub" if i % 2 else ".") / f"{i:02d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    batches = list(iter_image_folder(tmp_path, batch_size=4))
    order = sorted(range(5), key=lambda i: (("sub/" if i % 2 else "") + f"{i:02d}.png"))
    flat = [im for b in batches for im in b]
    assert len(flat) == 5 and all(b.dtype == torch.uint8 for b in batches)
    for im, i in zip(flat, order):
        np.testing.assert_array_equal(im.permute(1, 2, 0).numpy(), ims[i])
    with pytest.raises(ValueError):
        list(iter_image_folder(tmp_path / "sub" / "00.png"))


def _dist_worker(rank: int, world: int, init_file: str, feats: np.ndarray, idx: np.ndarray, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stats = FeatureStats(feats.shape[1])
        if rank == 0:  # uneven shards; rank 1 gets the rest
            stats.update(feats[:5])
        else:
            stats.update(feats[5:])
        all_reduce_feature_stats(stats)
        usage = CodebookUsage(10).update(torch.from_numpy(idx[rank::world]))
        usage.all_reduce_()
        if rank == 1:
            queue.put((stats.count, stats.mean, stats.cov, usage.counts.numpy()))
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_processes(tmp_path):
    rng = np.random.default_rng(7)
    feats = rng.normal(size=(13, 6))
    idx = rng.integers(0, 10, size=40)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), feats, idx, queue), nprocs=2, join=True)
    count, mean, cov, counts = queue.get()
    assert count == 13
    np.testing.assert_allclose(mean, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(feats, rowvar=False), rtol=1e-10)
    np.testing.assert_array_equal(counts, np.bincount(idx, minlength=10))


def test_all_reduce_without_process_group_is_identity():
    s = FeatureStats(3).update(np.eye(3))
    assert all_reduce_feature_stats(s) is s and s.count == 3
    u = CodebookUsage(4).update(torch.tensor([1, 1, 2]))
    assert u.all_reduce_().counts.tolist() == [0, 2, 1, 0]


def test_corrupt_sources_name_the_file(tmp_path):
    from hieratok.data import ImageFolderDataset

    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "._0.png").write_bytes(b"macOS resource fork")  # hidden: skipped, as the datasets skip it
    assert sum(b.shape[0] for b in iter_image_folder(folder)) == len(ImageFolderDataset(folder)) == 2
    good = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    with pytest.raises(ValueError, match=r"1\.png: not a recognised image format"):
        list(iter_image_folder(folder))
    bad = tmp_path / "stats.npz"
    bad.write_bytes(b"<html>not found</html>")  # e.g. a failed download
    for call in (npz_kind, GaussianStats.load, stats_from_source, lambda p: list(iter_npz_images(p))):
        with pytest.raises(ValueError, match=r"stats\.npz: not a readable \.npz"):
            call(bad)


def test_identical_statistics_give_zero_and_non_finite_ones_an_error():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    d = frechet_distance(mu, sigma, mu, sigma)
    assert d >= 0.0 and str(round(d, 4)) != "-0.0" and f"{d:.4f}" == "0.0000"
    with pytest.raises(ValueError, match="NaN or Inf.*sigma of the second set"):
        frechet_distance(mu, sigma, mu, np.full_like(sigma, np.nan))
