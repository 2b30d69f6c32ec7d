"""The release's DINO discriminator and DiffAugment (hieratok.losses.dino_disc)."""

import math

import pytest
import torch
import torch.nn.functional as F

from hieratok.losses.dino_disc import (
    DINO_FILE,
    DinoDiscriminator,
    FrozenDinoViT,
    _VirtualBatchNorm1d,
    diff_augment,
    find_dino_weights,
)
from hieratok.losses.gan import GANConfig, GANLoss
from hieratok.weights import MissingWeightsError

TINY = dict(dim=32, depth=4, heads=2, patch=8, img_size=32, key_depths=(1, 3))


def test_missing_weights_are_a_clear_error_not_a_random_network(tmp_path, monkeypatch):
    monkeypatch.delenv("HIERATOK_DINO_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError, match=DINO_FILE) as e:
        find_dino_weights()
    assert "HIERATOK_DINO_WEIGHTS" in str(e.value) and "gan.discriminator=patch" in str(e.value)
    with pytest.raises(FileNotFoundError, match=DINO_FILE):
        GANLoss(GANConfig(discriminator="dino"))


def test_an_explicit_missing_path_is_an_error_not_the_hub_copy(tmp_path, monkeypatch):
    monkeypatch.delenv("HIERATOK_DINO_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub = tmp_path / "hub" / "checkpoints" / DINO_FILE
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"other weights")
    assert find_dino_weights() == hub
    with pytest.raises(MissingWeightsError, match="dino_typo.pth"):
        find_dino_weights(str(tmp_path / "dino_typo.pth"))
    monkeypatch.setenv("HIERATOK_DINO_WEIGHTS", str(tmp_path / "nothing.pth"))
    with pytest.raises(MissingWeightsError, match="HIERATOK_DINO_WEIGHTS"):
        find_dino_weights()


def test_checkpoint_loads_frozen_and_only_heads_train(tmp_path, gen):
    torch.manual_seed(0)
    src = FrozenDinoViT(**TINY)
    sd = {k: torch.randn(v.shape, generator=gen) for k, v in src.state_dict().items()}
    sd["norm.weight"], sd["norm.bias"] = torch.ones(32), torch.zeros(32)  # in DINO's file, unused here
    torch.save(sd, tmp_path / DINO_FILE)
    d = DinoDiscriminator(str(tmp_path / DINO_FILE), **TINY)
    for k, v in d.backbone.state_dict().items():
        assert torch.equal(v, sd[k]), k
    d.requires_grad_(True)  # what a trainer does around the generator step
    assert not any(p.requires_grad for p in d.backbone.parameters())
    d.train()
    assert not d.backbone.training
    x = torch.rand(4, 3, 40, 40, generator=gen) * 2 - 1
    logits = d(x)
    assert logits.shape == (4, 3 * 16)  # (embedding + 2 key depths) x 16 tokens
    logits.square().mean().backward()
    assert all(p.grad is not None for p in d.heads.parameters())
    assert all(p.grad is None for p in d.backbone.parameters())


def test_corrupt_or_foreign_dino_files_are_one_line_errors(tmp_path, gen):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint " * 20)
    with pytest.raises(ValueError, match="bad.pth is not a readable PyTorch weight file") as e:
        DinoDiscriminator(str(bad), **TINY)
    assert "\n" not in str(e.value)
    sd = FrozenDinoViT(**TINY).state_dict()
    sd["pos_embed"] = torch.zeros(1, 5, 32)  # another image size
    del sd["blocks.1.mlp.fc2.bias"]
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"bad.pth \(DINO ViT backbone\) do not fit") as e:
        DinoDiscriminator(str(bad), **TINY)
    msg = str(e.value)
    assert "\n" not in msg and "blocks.1.mlp.fc2.bias" in msg and "pos_embed: checkpoint (1, 5, 32)" in msg


def test_vit_block_matches_a_plain_attention(gen):
    blk = FrozenDinoViT(**TINY).blocks[0]
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    x = torch.randn(2, 5, 32, generator=gen)
    h = blk.norm1(x)
    q, k, v = blk.attn.qkv(h).view(2, 5, 3, 2, 16).unbind(2)  # (B, L, H, K)
    a = torch.einsum("blhk,bmhk->bhlm", q, k).div(4.0).softmax(-1)
    y = x + blk.attn.proj(torch.einsum("bhlm,bmhk->blhk", a, v).reshape(2, 5, 32))
    y = y + blk.mlp.fc2(torch.nn.functional.gelu(blk.mlp.fc1(blk.norm2(y))))
    torch.testing.assert_close(blk(x), y, atol=1e-5, rtol=1e-5)


def test_diff_augment_groups(gen):
    x = torch.rand(6, 3, 16, 16, generator=gen) * 2 - 1
    assert torch.equal(diff_augment(x, ""), x)
    assert torch.allclose(diff_augment(x, "color,translation,cutout", prob=0.0), x, atol=1e-6)  # no group drawn
    t = diff_augment(x, "translation", prob=1.0, generator=torch.Generator().manual_seed(1))
    for b in range(6):  # every sample is a shifted copy with a black (-1) border
        ok = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                want = torch.full_like(x[b], -1.0)
                ys, xs = slice(max(0, -dy), 16 - max(0, dy)), slice(max(0, -dx), 16 - max(0, dx))
                yd, xd = slice(max(0, dy), 16 - max(0, -dy)), slice(max(0, dx), 16 - max(0, -dx))
                want[:, ys, xs] = x[b][:, yd, xd]
                ok |= torch.allclose(t[b], want, atol=1e-6)
        assert ok, b
    c = diff_augment(x, "cutout_0.25", prob=1.0, generator=torch.Generator().manual_seed(2))
    changed = (c != x).any(1)  # (B, H, W)
    for b in range(6):  # a square of at most 4 x 4 pixels turned black, nothing else touched
        assert 0 < int(changed[b].sum()) <= 16
        assert torch.all(c[b][:, changed[b]] == -1.0) and torch.equal(c[b][:, ~changed[b]], x[b][:, ~changed[b]])
    y = x.clone().requires_grad_(True)
    diff_augment(y, "color,translation,cutout_0.2", prob=1.0).sum().backward()  # differentiable
    assert y.grad is not None
    with pytest.raises(ValueError, match="DiffAugment"):
        diff_augment(x, "blur")


def test_gan_loss_with_the_dino_discriminator_and_diffaug(gen):
    gan = GANLoss(GANConfig(discriminator="dino", dino_pretrained=False, diffaug="color,translation,cutout_0.2"))
    real = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    fake = (torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1).requires_grad_(True)
    g, _ = gan.generator_loss(fake, step=0)
    g.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    d, logs = gan.discriminator_loss(real, fake, step=0)
    assert torch.isfinite(d) and set(logs) >= {"d_loss", "d_accuracy"}
    trainable = sum(p.numel() for p in gan.discriminator.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in gan.discriminator.heads.parameters())


@pytest.mark.parametrize("B, sizes", [(4, [4]), (12, [6, 6]), (16, [8, 8]), (9, [5, 4]), (13, [7, 6]),
                                      (17, [6, 6, 5])])
def test_virtual_batch_norm_is_batch_norm_per_group(B, sizes, gen):
    bn = _VirtualBatchNorm1d(5, virtual_bs=8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0, generator=gen)
        bn.bias.normal_(generator=gen)
    x = torch.randn(B, 5, 7, generator=gen) * 3 + 1
    want = torch.cat([F.batch_norm(g, None, None, bn.weight, bn.bias, training=True, eps=1e-6) for g in x.split(sizes)])
    torch.testing.assert_close(bn(x), want)
    if B % math.ceil(B / 8) == 0:  # the release's BatchNormLocal, where its view works
        g = x.view(math.ceil(B / 8), -1, 5, 7)
        mean, var = g.mean([1, 3], keepdim=True), g.var([1, 3], keepdim=True, unbiased=False)
        release = (g - mean) / torch.sqrt(var + 1e-6) * bn.weight[None, :, None] + bn.bias[None, :, None]
        torch.testing.assert_close(bn(x), release.view(x.shape))


def test_dino_discriminator_takes_odd_batch_sizes(gen):
    d = DinoDiscriminator(pretrained=False, **TINY)
    x = torch.rand(11, 3, 32, 32, generator=gen) * 2 - 1
    logits = d(x)
    assert logits.shape == (11, 3 * 16) and torch.isfinite(logits).all()
    # samples 6..10 form the second virtual batch: changing sample 0 must leave them unchanged
    x2 = x.clone()
    x2[0] = -x2[0]
    torch.testing.assert_close(d(x2)[6:], logits[6:])
    assert not torch.allclose(d(x2)[1:6], logits[1:6])


def test_colour_augmentation_closed_form(gen):
    # draws in order: the group's coin, then brightness, saturation and contrast per sample
    draws = torch.Generator().manual_seed(3)
    torch.rand((), generator=draws)
    b, s, c = (torch.rand(4, 1, 1, 1, generator=draws) for _ in range(3))
    grey = torch.rand(4, 1, 1, 1, generator=gen).expand(4, 3, 8, 8) * 1.6 - 0.8
    out = diff_augment(grey, "color", prob=1.0, generator=torch.Generator().manual_seed(3))
    # a flat grey image has no saturation or contrast to scale: only the brightness shift remains,
    # b - 0.5 on [0, 1] pixels, i.e. 2b - 1 on [-1, 1] pixels
    torch.testing.assert_close(out, grey + (2 * b - 1))
    # any image: saturation scales each pixel's deviation from its grey value by 2s, contrast
    # the deviation from the image mean by c + 0.5 (brightness moves both means along)
    x = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    out = (diff_augment(x, "color", prob=1.0, generator=torch.Generator().manual_seed(3)) + 1) / 2
    x01 = (x + 1) / 2 + (b - 0.5)
    grey01 = x01.mean(1, keepdim=True)
    mean01 = x01.mean((1, 2, 3), keepdim=True)  # saturation keeps each pixel's grey value, so the mean too
    want = ((x01 - grey01) * 2 * s + grey01 - mean01) * (c + 0.5) + mean01
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("size, mode", [(40, "area"), (24, "bicubic"), (32, None)])
def test_resize_to_the_backbone_size(size, mode, gen):
    d = DinoDiscriminator(pretrained=False, **TINY).eval()
    x = torch.rand(2, 3, size, size, generator=gen)
    want = x if mode is None else torch.nn.functional.interpolate(x, size=(32, 32), mode=mode)
    torch.testing.assert_close(d._resize(x), want)


def test_resize_takes_a_random_crop_half_the_time_in_training(gen):
    d = DinoDiscriminator(pretrained=False, **TINY).train()
    x = torch.rand(1, 3, 40, 40, generator=gen)
    area = F.interpolate(x, size=(32, 32), mode="area")
    crops = {(t, left): x[..., t:t + 32, left:left + 32] for t in range(9) for left in range(9)}
    torch.manual_seed(0)
    kinds = []
    for _ in range(40):
        y = d._resize(x)
        found = [k for k, c in crops.items() if torch.equal(y, c)]
        assert found or torch.equal(y, area)
        kinds.append(found[0] if found else "area")
    assert 8 < kinds.count("area") < 32 and len(set(kinds)) > 3  # both paths, several crop positions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_diff_augment_cpu_generator_on_cuda_input(gen):
    x = torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1
    policy = "color,translation,cutout_0.2"
    cpu = diff_augment(x, policy, prob=1.0, generator=torch.Generator().manual_seed(5))
    cuda = diff_augment(x.cuda(), policy, prob=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-5, rtol=1e-5)
