"""Tests for hieratok.losses.alignment: the VA-VAE VF loss and the frozen feature encoders."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hieratok.losses.alignment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FrozenFeatureEncoder,
    VFAlignmentLoss,
    build_frozen_encoder,
    tokens_to_grid,
    vf_alignment_terms,
)
from hieratok.weights import MissingWeightsError


@pytest.fixture(autouse=True)
def _isolated_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for var in ("HIERATOK_DINOV2_WEIGHTS", "HIERATOK_CLIP_WEIGHTS", "HIERATOK_VF_ENCODER_WEIGHTS",
                "HIERATOK_EFFNET_LITE0_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)


def _vf_reference(zp: np.ndarray, f: np.ndarray, m_cos: float, m_dm: float) -> tuple[float, float]:
    """Loop-over-positions reference for one batch of (B, C, H, W) arrays."""
    B, C, H, W = zp.shape
    pos = list(itertools.product(range(H), range(W)))
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    l_cos, l_dm = [], []
    for b in range(B):
        for (i, j) in pos:
            l_cos.append(max(0.0, 1 - m_cos - cos(zp[b, :, i, j], f[b, :, i, j])))
        for p, q in itertools.product(pos, pos):
            dz = cos(zp[b, :, p[0], p[1]], zp[b, :, q[0], q[1]])
            df = cos(f[b, :, p[0], p[1]], f[b, :, q[0], q[1]])
            l_dm.append(max(0.0, abs(dz - df) - m_dm))
    return float(np.mean(l_cos)), float(np.mean(l_dm))


def _identity_vf(d: int, **kw) -> VFAlignmentLoss:
    vf = VFAlignmentLoss(feature_dim=d, latent_channels=d, adaptive=False, **kw)
    with torch.no_grad():
        vf.proj.weight.copy_(torch.eye(d).view(d, d, 1, 1))
    return vf


# ---- the loss ----


def test_vf_loss_zero_when_projection_equals_features(gen: torch.Generator) -> None:
    z = torch.randn(2, 6, 4, 4, generator=gen)
    vf = _identity_vf(6, margin_cos=0.0, margin_dm=0.0)  # no margin: only an exact match is free
    loss, logs = vf.vf_loss(z, z.clone())
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert logs["vf_cos"].item() == pytest.approx(0.0, abs=1e-6) and logs["vf_dm"].item() == pytest.approx(0.0, abs=1e-6)
    # scaling features by a positive constant changes no cosine
    assert vf.vf_loss(z, 3.0 * z)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_vf_loss_matches_loop_reference(gen: torch.Generator) -> None:
    z = torch.randn(2, 5, 3, 3, generator=gen, dtype=torch.float64)
    f = torch.randn(2, 5, 3, 3, generator=gen, dtype=torch.float64)
    for m_cos, m_dm in [(0.0, 0.0), (0.5, 0.25), (0.9, 0.05)]:
        l_cos, l_dm = vf_alignment_terms(z, f, m_cos, m_dm)
        r_cos, r_dm = _vf_reference(z.numpy(), f.numpy(), m_cos, m_dm)
        assert l_cos.item() == pytest.approx(r_cos, rel=1e-9, abs=1e-12)
        assert l_dm.item() == pytest.approx(r_dm, rel=1e-9, abs=1e-12)
    l_cos, l_dm = vf_alignment_terms(z, f, 0.0, 0.0)
    assert l_cos > 0.5 and l_dm > 0.1  # random directions are far from aligned

    vf = _identity_vf(5, w_cos=2.0, w_dm=3.0)
    loss, _ = vf.vf_loss(z.float(), f.float())
    r_cos, r_dm = _vf_reference(z.numpy(), f.numpy(), 0.5, 0.25)
    assert loss.item() == pytest.approx(2.0 * r_cos + 3.0 * r_dm, rel=1e-5)


def test_vf_margins_respected() -> None:
    e1, e2 = torch.eye(2)
    # cos(z', f) = 0.6 at every position
    zp = e1.view(1, 2, 1, 1).expand(1, 2, 2, 2).clone()
    f = (0.6 * e1 + 0.8 * e2).view(1, 2, 1, 1).expand(1, 2, 2, 2).clone()
    assert vf_alignment_terms(zp, f, 0.5, 0.25)[0].item() == pytest.approx(0.0, abs=1e-7)  # 0.6 > 1 - 0.5
    assert vf_alignment_terms(zp, f, 0.0, 0.25)[0].item() == pytest.approx(0.4, abs=1e-6)
    assert vf_alignment_terms(zp, f, 0.3, 0.25)[0].item() == pytest.approx(0.1, abs=1e-6)

    # two positions: cos(z'_0, z'_1) = cos(60 deg) = 0.5, cos(f_0, f_1) = cos(90 deg) - 0.2 ... use 0.3
    a = torch.tensor([1.0, 0.0])
    zp2 = torch.stack([a, torch.tensor([0.5, math.sqrt(0.75)])], dim=1).view(1, 2, 1, 2)
    f2 = torch.stack([a, torch.tensor([0.3, math.sqrt(1 - 0.09)])], dim=1).view(1, 2, 1, 2)
    # |0.5 - 0.3| = 0.2 on the 2 off-diagonal entries of the 2x2 matrices, 0 on the diagonal
    assert vf_alignment_terms(zp2, f2, 0.5, 0.25)[1].item() == pytest.approx(0.0, abs=1e-7)
    assert vf_alignment_terms(zp2, f2, 0.5, 0.1)[1].item() == pytest.approx(2 * 0.1 / 4, abs=1e-6)


def test_features_resized_to_latent_grid(gen: torch.Generator) -> None:
    z = torch.randn(1, 4, 4, 4, generator=gen)
    vf = _identity_vf(4, margin_cos=0.0, margin_dm=0.0)
    f_big = torch.randn(1, 4, 8, 8, generator=gen)
    direct = vf_alignment_terms(z, F.avg_pool2d(f_big, 2), 0.0, 0.0)  # area == 2x2 average
    got = vf.vf_loss(z, f_big)[1]
    assert got["vf_cos"].item() == pytest.approx(direct[0].item(), rel=1e-5)
    assert got["vf_dm"].item() == pytest.approx(direct[1].item(), rel=1e-5)
    f_small = torch.randn(1, 4, 2, 2, generator=gen)
    up = F.interpolate(f_small, size=(4, 4), mode="bilinear", align_corners=False)
    assert vf.vf_loss(z, f_small)[1]["vf_cos"].item() == pytest.approx(vf_alignment_terms(z, up, 0, 0)[0].item(), rel=1e-5)
    # tokens with a class token are accepted too
    tokens = torch.cat([torch.randn(1, 1, 4), f_big.flatten(2).transpose(1, 2)], dim=1)
    assert vf.vf_loss(z, tokens)[0].item() == pytest.approx(vf.vf_loss(z, f_big)[0].item(), rel=1e-6)
    with pytest.raises(ValueError, match="features must be"):
        vf.vf_loss(z, torch.randn(1, 5, 4, 4))


class _SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)
        self.bn = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.conv(x)))


def test_gradients_reach_projection_and_latent_not_encoder(gen: torch.Generator) -> None:
    torch.manual_seed(0)
    enc = FrozenFeatureEncoder(_SmallNet())
    holder = nn.Module()
    holder.enc = enc
    holder.train()  # must not switch the frozen network into training mode
    assert not enc.training and not enc.encoder.training and not enc.encoder.bn.training
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    feats = enc(x)
    assert feats.shape == (2, 16, 8, 8) and not feats.requires_grad
    torch.testing.assert_close(enc(x), feats)  # deterministic: dropout off, BN statistics frozen
    z = torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True)
    vf = VFAlignmentLoss(feature_dim=16, latent_channels=4, adaptive=False, weight=1.0)
    loss, logs = vf(z, feats)
    loss.backward()
    assert loss.item() > 0 and logs["vf_weight"].item() == 1.0
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert vf.proj.weight.grad is not None and vf.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    assert vf.proj.bias is None  # VA-VAE's projection is bias-free


def test_adaptive_vf_weight(gen: torch.Generator) -> None:
    torch.manual_seed(0)
    head = nn.Linear(3, 4)  # stands in for the encoder's last layer
    x = torch.randn(2, 9, 3, generator=gen)
    z = head(x).transpose(1, 2).reshape(2, 4, 3, 3)
    rec = z.pow(2).mean()
    feats = torch.randn(2, 8, 3, 3, generator=gen)
    vf = VFAlignmentLoss(feature_dim=8, latent_channels=4)  # adaptive, weight 0.1 (VA-VAE)
    loss, logs = vf(z, feats, rec_loss=rec, last_layer=head.weight)
    raw, _ = vf.vf_loss(z, feats)
    g_rec = torch.autograd.grad(rec, head.weight, retain_graph=True)[0]
    g_vf = torch.autograd.grad(raw, head.weight, retain_graph=True)[0]
    w = 0.1 * g_rec.norm() / (g_vf.norm() + 1e-4)
    assert logs["vf_weight"].item() == pytest.approx(w.item(), rel=1e-5)
    assert loss.item() == pytest.approx(w.item() * raw.item(), rel=1e-5)
    assert not logs["vf_weight"].requires_grad
    with pytest.raises(ValueError, match="rec_loss and last_layer"):
        vf(z, feats)
    with torch.no_grad():
        loss0, logs0 = vf(z, feats, rec_loss=rec, last_layer=head.weight)
    assert loss0.item() == 0.0 and logs0["vf_loss"].item() == pytest.approx(raw.item(), rel=1e-6)


# ---- tokens and encoders ----


def test_tokens_to_grid_with_and_without_class_token(gen: torch.Generator) -> None:
    grid = torch.randn(2, 5, 3, 3, generator=gen)
    tokens = grid.flatten(2).transpose(1, 2)  # (2, 9, 5), raster order
    torch.testing.assert_close(tokens_to_grid(tokens), grid, rtol=0, atol=0)
    with_cls = torch.cat([torch.full((2, 1, 5), 99.0), tokens], dim=1)  # 10 = 3*3 + 1
    torch.testing.assert_close(tokens_to_grid(with_cls), grid, rtol=0, atol=0)
    with_regs = torch.cat([torch.full((2, 5, 5), 99.0), tokens], dim=1)  # DINOv2 + 4 registers
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        tokens_to_grid(with_regs)
    torch.testing.assert_close(tokens_to_grid(with_regs, num_prefix_tokens=5), grid, rtol=0, atol=0)
    rect = torch.randn(1, 4, 2, 3, generator=gen)
    torch.testing.assert_close(tokens_to_grid(rect.flatten(2).transpose(1, 2), grid_size=(2, 3)), rect, rtol=0, atol=0)


class _TinyViT(nn.Module):
    """Patchify + class token: returns (B, 1 + h*w, C) tokens."""

    def __init__(self, patch: int = 8, dim: int = 12) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1)


def test_frozen_encoder_token_output_and_preprocessing(gen: torch.Generator) -> None:
    net = _TinyViT()
    enc = FrozenFeatureEncoder(net, mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=32)
    x = torch.rand(2, 3, 48, 48, generator=gen) * 2 - 1
    out = enc(x)
    assert out.shape == (2, 12, 4, 4)
    x32 = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ref = net.embed(((x32 + 1) / 2 - mean) / std)
    torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=1e-5)
    assert enc.output_shape(64) == (12, 4, 4) and enc.feature_dim == 12
    # a plain callable works as well
    plain = FrozenFeatureEncoder(lambda t: t[:, :, ::4, ::4])
    torch.testing.assert_close(plain(x), x[:, :, ::4, ::4])
    with pytest.raises(ValueError, match="both mean and std"):
        FrozenFeatureEncoder(net, mean=IMAGENET_MEAN)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_build_torchscript_and_dinov2_from_file(tmp_path, gen: torch.Generator) -> None:
    path = tmp_path / "vit.pt"
    torch.jit.save(torch.jit.script(_TinyViT(patch=14)), str(path))
    x = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    ts = build_frozen_encoder("torchscript", path, input_size=56)
    assert ts(x).shape == (1, 12, 4, 4)
    assert all(not p.requires_grad for p in ts.parameters())
    dino = build_frozen_encoder("dinov2", path)  # the DINOv2 preset: 224 px, ImageNet normalisation
    assert dino.input_size == (224, 224) and dino(x).shape == (1, 12, 16, 16)
    torch.testing.assert_close(dino.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    # a torch.export program (the successor of TorchScript) loads as well
    net = _TinyViT(patch=14)
    pt2 = tmp_path / "vit.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 56, 56),)), str(pt2))
    # it may hold pickles that run code while loading: refused unless the caller opts in
    with pytest.raises(ValueError, match="can run code while it loads.*--allow-code-execution"):
        build_frozen_encoder("torchscript", pt2, input_size=56)
    exported = build_frozen_encoder("torchscript", pt2, allow_code_execution=True, input_size=56)
    holder = nn.Module()
    holder.enc = exported
    holder.train()  # exported graphs reject .train(); the holder must not pass it on
    with torch.no_grad():
        ref = tokens_to_grid(net(F.interpolate(x, size=(56, 56), mode="bilinear", antialias=True)))
    torch.testing.assert_close(exported(x), ref, atol=1e-5, rtol=1e-5)
    bad = tmp_path / "not_ts.pt"
    torch.save({"w": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="TorchScript"):
        build_frozen_encoder("torchscript", bad)


def test_missing_foundation_weights_name_the_file() -> None:
    with pytest.raises(MissingWeightsError, match="dinov2_vitl14_torchscript.pt") as e:
        build_frozen_encoder("dinov2")
    assert "TorchScript" in str(e.value) and "effnet-lite0" in str(e.value)
    with pytest.raises(MissingWeightsError, match="clip_vitl14_torchscript.pt"):
        build_frozen_encoder("clip")
    with pytest.raises(MissingWeightsError, match="path you gave"):
        build_frozen_encoder("torchscript", "/nonexistent/encoder.pt")
    with pytest.raises(ValueError, match="kind"):
        build_frozen_encoder("dino")


def test_effnet_lite0_encoder_matches_unfused_trunk(gen: torch.Generator) -> None:
    from hieratok.losses.perceptual import load_effnet_lite0

    enc = build_frozen_encoder("effnet-lite0")
    assert enc.feature_dim == 112
    x = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    out = enc(x)
    assert out.shape == (2, 112, 4, 4)  # stride 16: the latent grid of an f16 tokenizer
    ref_net, _ = load_effnet_lite0()
    with torch.no_grad():
        ref = ref_net.forward_features(x, (10,))[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert all(not p.requires_grad for p in enc.parameters())


def test_hieratok_tiny_latent_alignment(gen: torch.Generator) -> None:
    from hieratok.tokenizers.hieratok import HieraTok

    torch.manual_seed(0)
    model = HieraTok.from_preset("tiny")  # 64 px, patch 8, latent (B, 8, 8, 8)
    enc = FrozenFeatureEncoder(nn.Conv2d(3, 24, 16, stride=16))  # (B, 24, 4, 4), upsampled to 8x8
    x = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    out = model(x, generator=gen)
    rec = (out["reconstructions"][-1] - x).abs().mean()
    vf = VFAlignmentLoss(feature_dim=24, latent_channels=model.config.latent_channels)
    loss, logs = vf(out["latent"], enc(x), rec_loss=rec, last_layer=model.encoder.head.weight)
    (rec + loss).backward()
    assert torch.isfinite(loss) and logs["vf_weight"].item() > 0
    assert model.encoder.head.weight.grad is not None and vf.proj.weight.grad.abs().sum() > 0
