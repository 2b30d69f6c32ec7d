"""The release's DINO discriminator and DiffAugment (hieratok.losses.dino_disc)."""

import pytest
import torch

from hieratok.losses.dino_disc import DINO_FILE, DinoDiscriminator, FrozenDinoViT, diff_augment, find_dino_weights
from hieratok.losses.gan import GANConfig, GANLoss

TINY = dict(dim=32, depth=4, heads=2, patch=8, img_size=32, key_depths=(1, 3))


def test_missing_weights_are_a_clear_error_not_a_random_network(tmp_path, monkeypatch):
    monkeypatch.delenv("HIERATOK_DINO_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=DINO_FILE) as e:
        find_dino_weights()
    assert "HIERATOK_DINO_WEIGHTS" in str(e.value) and "gan.discriminator=patch" in str(e.value)
    with pytest.raises(FileNotFoundError, match=DINO_FILE):
        GANLoss(GANConfig(discriminator="dino"))


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
    opt = gan.make_optimizer()
    assert sum(p.numel() for g_ in opt.param_groups for p in g_["params"]) == sum(
        p.numel() for p in gan.discriminator.heads.parameters())
