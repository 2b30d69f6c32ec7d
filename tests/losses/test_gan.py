"""Tests for hieratok.losses.gan: PatchGAN discriminator, GAN losses, LeCam, adaptive weight."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hieratok.losses.gan import (
    GANConfig,
    GANLoss,
    LeCamEMA,
    PatchDiscriminator,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
    lecam_regularizer,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from hieratok.losses.restok import restok_gan_config


def _images(b: int, size: int, gen: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    return (offset + 0.3 * torch.randn(b, 3, size, size, generator=gen)).clamp(-1, 1)


# ---- discriminator ----


@pytest.mark.parametrize("size,expected", [(64, 6), (128, 14), (256, 30)])
def test_discriminator_output_shape(size: int, expected: int, gen: torch.Generator) -> None:
    # 3 stride-2 convs (k4 p1): size / 8; then two stride-1 k4 p1 convs: -1 each
    d = PatchDiscriminator(ndf=8, n_layers=3)
    out = d(_images(2, size, gen))
    assert out.shape == (2, 1, expected, expected)
    assert d.output_size(size) == expected == size // 8 - 2


def test_discriminator_layout_and_param_count() -> None:
    d = PatchDiscriminator(ndf=64, n_layers=3, norm="batch")
    # taming's NLayerDiscriminator with BatchNorm: bias only on the first and last conv
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 1), (512, 1, 1)]
    expected = (3 * 64 * 16 + 64) + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + (512 * 16 + 1)
    expected += 2 * (128 + 256 + 512)  # norm scale + shift
    assert sum(p.numel() for p in d.parameters()) == expected == 2_765_633
    # channel multiplier is capped at 8
    d5 = PatchDiscriminator(ndf=4, n_layers=5)
    widths = [m.out_channels for m in d5.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [4, 8, 16, 32, 32, 32, 1]


def test_discriminator_init_statistics() -> None:
    torch.manual_seed(0)
    d = PatchDiscriminator(ndf=64, n_layers=3, norm="group")
    big = d.main[8].weight  # 256 -> 512 conv, 2M weights
    assert big.shape == (512, 256, 4, 4)
    assert abs(big.mean().item()) < 1e-3 and abs(big.std().item() - 0.02) < 5e-4
    norms = [m for m in d.modules() if isinstance(m, nn.GroupNorm)]
    w = torch.cat([m.weight for m in norms])
    assert abs(w.mean().item() - 1.0) < 5e-3 and abs(w.std().item() - 0.02) < 5e-3
    assert all(torch.all(m.bias == 0) for m in norms)


def test_discriminator_min_size() -> None:
    d = PatchDiscriminator(ndf=4, n_layers=3)
    assert d.min_input_size == 24
    assert d(torch.zeros(1, 3, 24, 24)).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="at least 24 px"):
        d(torch.zeros(1, 3, 23, 23))
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="layer")


def test_group_norm_discriminator_is_per_sample(gen: torch.Generator) -> None:
    # justifies GANLoss's single pass over [real; fake] for per-sample norms
    d = PatchDiscriminator(ndf=8, n_layers=3, norm="group")
    a, b = _images(2, 32, gen), _images(3, 32, gen)
    both = d(torch.cat([a, b]))
    torch.testing.assert_close(both[:2], d(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[2:], d(b), atol=1e-5, rtol=1e-5)


# ---- losses on logits ----


def test_hinge_losses_closed_form() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.3, 1.5])
    # relu(1 - real) = [0, .5, 2]; relu(1 + fake) = [0, 1.3, 2.5]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.8 / 3))
    assert hinge_g_loss(fake).item() == pytest.approx(-(-2.0 + 0.3 + 1.5) / 3)
    # a perfectly separated margin costs nothing
    assert hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -1.0)).item() == 0.0


def test_non_saturating_losses_closed_form() -> None:
    real = np.array([2.0, 0.5, -1.0])
    fake = np.array([-2.0, 0.3, 1.5])
    softplus = lambda v: np.log1p(np.exp(v))  # noqa: E731
    d_ref = 0.5 * (softplus(-real).mean() + softplus(fake).mean())
    g_ref = -np.log(1 / (1 + np.exp(-fake))).mean()
    r, f = torch.tensor(real), torch.tensor(fake)
    assert non_saturating_d_loss(r, f).item() == pytest.approx(d_ref, rel=1e-12)
    assert non_saturating_g_loss(f).item() == pytest.approx(g_ref, rel=1e-12)
    bce = 0.5 * (F.binary_cross_entropy_with_logits(r, torch.ones(3)) + F.binary_cross_entropy_with_logits(f, torch.zeros(3)))
    assert non_saturating_d_loss(r, f).item() == pytest.approx(bce.item(), rel=1e-6)


def test_lecam_closed_form() -> None:
    real = torch.tensor([1.0, -0.5, 2.0])
    fake = torch.tensor([-1.0, 0.5])
    ema_real, ema_fake = 0.3, -0.2
    # relu(real + 0.2)^2 = [1.44, 0, 4.84]; relu(0.3 - fake)^2 = [1.69, 0]
    expected = (1.44 + 0 + 4.84) / 3 + (1.69 + 0) / 2
    assert lecam_regularizer(real, fake, ema_real, ema_fake).item() == pytest.approx(expected, rel=1e-6)
    t = lecam_regularizer(real, fake, torch.tensor(ema_real), torch.tensor(ema_fake))
    assert t.item() == pytest.approx(expected, rel=1e-6)


def test_lecam_ema_updates() -> None:
    ema = LeCamEMA(decay=0.99)
    ema.update(torch.tensor([1.0, 3.0]), torch.tensor([-2.0]))
    assert ema.ema_real.item() == pytest.approx(2.0) and ema.ema_fake.item() == pytest.approx(-2.0)
    ema.update(torch.tensor([4.0]), torch.tensor([0.0, 2.0]))
    assert ema.ema_real.item() == pytest.approx(0.99 * 2.0 + 0.01 * 4.0)
    assert ema.ema_fake.item() == pytest.approx(0.99 * -2.0 + 0.01 * 1.0)
    assert set(ema.state_dict()) == {"ema_real", "ema_fake", "initialized"}


def test_gan_loss_lecam_term(gen: torch.Generator) -> None:
    gan = GANLoss(GANConfig(ndf=8, n_layers=2, lecam_weight=1e-3))
    real, fake = _images(2, 32, gen, 0.5), _images(2, 32, gen, -0.5)
    loss, logs = gan.discriminator_loss(real, fake, step=0)
    lr_, lf_ = gan.discriminator(torch.cat([real, fake])).chunk(2)
    # first update: the EMAs equal the current means
    reg = lecam_regularizer(lr_, lf_, lr_.mean(), lf_.mean())
    assert logs["lecam"].item() == pytest.approx(reg.item(), rel=1e-5)
    assert loss.item() == pytest.approx(hinge_d_loss(lr_, lf_).item() + 1e-3 * reg.item(), rel=1e-5)


class _Logits(nn.Module):
    """A stand-in discriminator whose logits are its input pixels (a closed form for the losses)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_lecam_mean_form_is_the_releases(gen: torch.Generator) -> None:
    # ResTok's release (TiTok's compute_lecam_loss): batch-mean logits against averages taken
    # before this step's update, both starting at 0: relu(m_r - e_f)^2 + relu(e_r - m_f)^2
    gan = GANLoss(GANConfig(ndf=8, n_layers=2, lecam_weight=0.1, lecam_decay=0.9, lecam_form="mean"))
    e_r = e_f = 0.0
    for offset_r, offset_f in ((0.5, -0.5), (-0.2, 0.4), (0.1, 0.3)):
        real, fake = _images(2, 32, gen, offset_r), _images(2, 32, gen, offset_f)
        loss, logs = gan.discriminator_loss(real, fake, step=0, discriminator=_Logits())
        m_r, m_f = real.mean().item(), fake.mean().item()
        want = max(m_r - e_f, 0.0) ** 2 + max(e_r - m_f, 0.0) ** 2
        assert logs["lecam"].item() == pytest.approx(want, rel=1e-5, abs=1e-9)
        assert loss.item() == pytest.approx(hinge_d_loss(real, fake).item() + 0.1 * want, rel=1e-5)
        e_r, e_f = 0.9 * e_r + 0.1 * m_r, 0.9 * e_f + 0.1 * m_f
    assert logs["lecam"].item() > 0
    assert restok_gan_config().lecam_form == "mean" and GANConfig().lecam_form == "elementwise"
    with pytest.raises(ValueError, match="lecam_form"):
        GANConfig(lecam_form="batch")


# ---- adaptive weight ----


def test_adaptive_weight_matches_manual_grad_norm_ratio(gen: torch.Generator) -> None:
    # linear "decoder" Y = X W^T; grads of both losses w.r.t. W in closed form
    X = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    T = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    C = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    W = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    Y = X @ W.T
    rec = (Y - T).pow(2).mean()
    g = -(Y * C).mean()
    n = Y.numel()
    grad_rec = (2.0 / n) * (Y - T).detach().T @ X  # (2, 3)
    grad_g = -(1.0 / n) * C.T @ X
    expected = grad_rec.norm() / (grad_g.norm() + 1e-4)
    w = adaptive_gan_weight(rec, g, W)
    assert not w.requires_grad
    assert w.item() == pytest.approx(expected.item(), rel=1e-10)
    # the graphs survive for the caller's backward
    (rec + w * g).backward()
    assert W.grad is not None
    # clamp at 1e4 when the GAN gradient vanishes
    Y2 = X @ W.T
    assert adaptive_gan_weight((Y2 - T).pow(2).mean(), 1e-12 * Y2.sum(), W).item() == 1e4


def test_gan_loss_adaptive_option(gen: torch.Generator) -> None:
    gan = GANLoss(GANConfig(ndf=8, n_layers=2, adaptive_weight=True))
    head = nn.Conv2d(3, 3, 3, padding=1)
    x = _images(2, 32, gen)
    fake = torch.tanh(head(x))
    rec = (fake - x).abs().mean()
    loss, logs = gan.generator_loss(fake, step=0, rec_loss=rec, last_layer=head.weight)
    g = -gan.discriminator(fake).mean()
    w = adaptive_gan_weight(rec, g, head.weight) * 0.6
    assert logs["g_weight"].item() == pytest.approx(w.item(), rel=1e-5)
    assert loss.item() == pytest.approx(w.item() * g.item(), rel=1e-5)
    with pytest.raises(ValueError, match="rec_loss and last_layer"):
        gan.generator_loss(fake, step=0)
    with torch.no_grad():  # evaluation: weight 0, loss still logged
        loss0, logs0 = gan.generator_loss(fake, step=0, rec_loss=rec.detach(), last_layer=head.weight)
    assert loss0.item() == 0.0 and logs0["g_loss"].item() == pytest.approx(g.item(), rel=1e-5)


# ---- GANLoss ----


def test_generator_loss_zero_before_start(gen: torch.Generator, monkeypatch) -> None:
    gan = GANLoss(GANConfig(ndf=8, n_layers=2, start_step=100))
    fake = _images(2, 32, gen)
    calls = []
    orig = gan.discriminator.forward
    monkeypatch.setattr(gan.discriminator, "forward", lambda x: calls.append(1) or orig(x))
    g0, _ = gan.generator_loss(fake, step=99)
    d0, _ = gan.discriminator_loss(fake, fake, step=99)
    assert g0.item() == 0.0 and d0.item() == 0.0 and not calls and not gan.active(99)
    g1, logs = gan.generator_loss(fake, step=100)
    expected = -0.6 * orig(fake).mean()
    assert gan.active(100) and calls
    assert g1.item() == pytest.approx(expected.item(), rel=1e-5) and g1.item() != 0.0
    assert logs["g_weight"].item() == pytest.approx(0.6)


def test_discriminator_loss_decreases_on_toy_data(gen: torch.Generator) -> None:
    torch.manual_seed(0)
    gan = GANLoss(GANConfig(ndf=8, n_layers=2))
    opt = torch.optim.AdamW(gan.discriminator.parameters(), lr=2e-3, betas=gan.config.d_betas)
    losses, acc = [], None
    for _ in range(15):
        real, fake = _images(4, 32, gen, 0.4), _images(4, 32, gen, -0.4)
        loss, logs = gan.discriminator_loss(real, fake, step=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        acc = logs["d_accuracy"].item()
    assert losses[0] == pytest.approx(1.0, abs=0.1)  # logits ~ 0 at init
    assert losses[-1] < 0.5 * losses[0]
    assert acc == 1.0 and logs["logits_real"] > 0 > logs["logits_fake"]


def test_finest_scale_default_and_all_scales(gen: torch.Generator) -> None:
    real = _images(2, 64, gen, 0.2)
    pyramid = [_images(2, s, gen, -0.2) for s in (8, 16, 32, 64)]  # HieraTok tiny: coarse -> fine
    finest = GANLoss(GANConfig(ndf=8, n_layers=3))
    loss, _ = finest.discriminator_loss(real, pyramid, step=0)
    D = finest.discriminator
    assert loss.item() == pytest.approx(hinge_d_loss(D(real), D(pyramid[-1])).item(), rel=1e-5)

    multi = GANLoss(GANConfig(ndf=8, n_layers=3, all_scales=True, min_size=32))
    multi.discriminator.load_state_dict(D.state_dict())
    loss, _ = multi.discriminator_loss(real, pyramid, step=0)
    real32 = F.avg_pool2d(real, 2)  # area downsampling by 2 == 2x2 average
    ref = 0.5 * (hinge_d_loss(D(real32), D(pyramid[2])) + hinge_d_loss(D(real), D(pyramid[3])))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    g, _ = multi.generator_loss(pyramid, step=0)
    assert g.item() == pytest.approx(-0.6 * 0.5 * (D(pyramid[2]).mean() + D(pyramid[3]).mean()).item(), rel=1e-5)
    # a list of per-scale real images gives the same result
    loss_list, _ = multi.discriminator_loss([F.avg_pool2d(real, k) for k in (8, 4, 2, 1)], pyramid, step=0)
    assert loss_list.item() == pytest.approx(loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="min_size"):
        multi.generator_loss(pyramid[:2], step=0)
    with pytest.raises(ValueError, match="smallest input"):
        GANLoss(GANConfig(n_layers=3, all_scales=True, min_size=16))


def test_batchnorm_discriminator_separate_passes(gen: torch.Generator) -> None:
    gan = GANLoss(GANConfig(ndf=8, n_layers=2, norm="batch"))
    real, fake = _images(3, 32, gen, 0.3), _images(3, 32, gen, -0.3)
    loss, _ = gan.discriminator_loss(real, fake, step=0)
    ref = hinge_d_loss(gan.discriminator(real), gan.discriminator(fake))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_gan_config_validation() -> None:
    with pytest.raises(ValueError, match="GAN loss"):
        GANConfig(loss="wasserstein")
    with pytest.raises(ValueError, match="start_step"):
        GANConfig(start_step=-1)
    assert GANConfig(d_betas=[0.5, 0.9]).d_betas == (0.5, 0.9)


def test_hieratok_tiny_generator_step_reaches_decoder(gen: torch.Generator) -> None:
    from hieratok.tokenizers.hieratok import HieraTok

    torch.manual_seed(0)
    model = HieraTok.from_preset("tiny")
    gan = GANLoss(GANConfig(ndf=8, n_layers=3, all_scales=True))
    x = _images(2, model.config.image_size, gen)
    out = model(x, generator=gen)
    loss, logs = gan.generator_loss(out["reconstructions"], step=0)
    loss.backward()
    assert torch.isfinite(loss) and math.isfinite(logs["g_loss"].item())
    assert model.decoder.head.weight.grad is not None and model.decoder.head.weight.grad.abs().sum() > 0
