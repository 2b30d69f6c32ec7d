import pytest
import torch
import torch.nn.functional as F

from hieratok.distributions import DiagonalGaussian
from hieratok.losses.reconstruction import MultiScaleReconstructionLoss, ReconLossConfig, scale_targets


def test_targets_are_block_means(gen):
    x = torch.rand(2, 3, 16, 16, generator=gen)
    t4, t8, t16 = scale_targets(x, [4, 8, 16])
    torch.testing.assert_close(t4[:, :, 1, 2], x[:, :, 4:8, 8:12].mean(dim=(2, 3)))
    assert t16 is x and t8.shape[-1] == 8


def test_loss_is_the_weighted_sum_over_scales(gen):
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    recs = [torch.rand(2, 3, s, s, generator=gen) * 2 - 1 for s in (4, 8, 16)]
    post = DiagonalGaussian(torch.randn(2, 8, 2, 2, generator=gen))
    cfg = ReconLossConfig(l1=1.0, mse=0.4, perceptual=0.0, kl=1e-3, scale_weights=(0.5, 1.0, 2.0))
    out = MultiScaleReconstructionLoss(cfg, 3)(x, recs, post)
    ref = sum(w * (F.l1_loss(r, F.adaptive_avg_pool2d(x, r.shape[-1])) + 0.4 * F.mse_loss(r, F.adaptive_avg_pool2d(x, r.shape[-1])))
              for w, r in zip((0.5, 1.0, 2.0), recs)) + 1e-3 * post.kl().mean()
    torch.testing.assert_close(out["loss"], ref)


def test_perceptual_term_and_validation(gen):
    x = torch.rand(1, 3, 8, 8, generator=gen)
    recs = [x.clone()]

    class Const(torch.nn.Module):
        def forward(self, a, b):
            return torch.full((a.shape[0],), 0.25)

    out = MultiScaleReconstructionLoss(ReconLossConfig(perceptual=2.0, kl=0.0), 1, Const())(x, recs, None)
    assert out["loss"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="scale_weights has 2 values for 3 scales"):
        MultiScaleReconstructionLoss(ReconLossConfig(perceptual=0.0, scale_weights=(1.0, 1.0)), 3)
    with pytest.raises(ValueError, match="needs a perceptual module"):
        MultiScaleReconstructionLoss(ReconLossConfig(perceptual=1.0), 1)
