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


def test_perceptual_term_compares_each_scale_with_its_downsampled_target(gen):
    x = torch.rand(2, 3, 16, 16, generator=gen)
    recs = [torch.rand(2, 3, s, s, generator=gen) for s in (4, 8, 16)]
    seen = []

    class MeanAbs(torch.nn.Module):  # depends on both inputs and their order
        def forward(self, a, b):
            seen.append((a, b))
            return (a - 2 * b).abs().flatten(1).mean(1)

    cfg = ReconLossConfig(l1=0.0, mse=0.0, perceptual=2.0, kl=0.0, scale_weights=(1.0, 0.5, 0.25))
    out = MultiScaleReconstructionLoss(cfg, 3, MeanAbs())(x, recs, None)
    ref = sum(w * 2.0 * (r - 2 * F.adaptive_avg_pool2d(x, r.shape[-1])).abs().mean() for w, r in zip((1.0, 0.5, 0.25), recs))
    torch.testing.assert_close(out["loss"], ref)
    assert [a is r for (a, _), r in zip(seen, recs)] == [True] * 3


def test_rec_loss_leaves_out_kl_and_keeps_its_graph(gen):
    x = torch.rand(1, 3, 8, 8, generator=gen)
    rec = torch.rand(1, 3, 8, 8, generator=gen, requires_grad=True)
    post = DiagonalGaussian(torch.randn(1, 8, 2, 2, generator=gen))
    out = MultiScaleReconstructionLoss(ReconLossConfig(perceptual=0.0, kl=0.5), 1)(x, [rec], post)
    torch.testing.assert_close(out["loss"] - out["rec_loss"], 0.5 * post.kl().mean())
    assert out["rec_loss"].requires_grad


def test_non_square_scales_get_non_square_targets(gen):
    x = torch.rand(1, 3, 8, 16, generator=gen)
    recs = [torch.rand(1, 3, 2, 4, generator=gen), x.clone()]
    out = MultiScaleReconstructionLoss(ReconLossConfig(l1=1.0, mse=0.0, perceptual=0.0, kl=0.0,
                                                               scale_weights="equal"), 2)(x, recs, None)
    torch.testing.assert_close(out["loss"], F.l1_loss(recs[0], F.avg_pool2d(x, 4)))


def test_perceptual_term_and_validation(gen):
    x = torch.rand(1, 3, 8, 8, generator=gen)
    recs = [x.clone()]

    class Const(torch.nn.Module):
        def forward(self, a, b):
            return torch.full((a.shape[0],), 0.25)

    out = MultiScaleReconstructionLoss(ReconLossConfig(perceptual=2.0, kl=0.0), 1, Const())(x, recs, None)
    assert out["loss"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="scale_weights has 2 values for the 3 scales"):
        MultiScaleReconstructionLoss(ReconLossConfig(perceptual=0.0, scale_weights=(1.0, 1.0)), 3)
    with pytest.raises(ValueError, match="needs a perceptual module"):
        MultiScaleReconstructionLoss(ReconLossConfig(perceptual=1.0), 1)
    with pytest.raises(ValueError, match="perceptual_kind='none' needs loss.perceptual=0"):
        ReconLossConfig(perceptual_kind="none")
    loss = MultiScaleReconstructionLoss(ReconLossConfig(perceptual=0.0), 3)
    x = torch.rand(1, 3, 16, 16, generator=gen)
    with pytest.raises(ValueError, match="2 reconstructions for a loss built for 3 scales"):
        loss(x, [x[..., :8, :8], x], None)  # a missing scale is never silently dropped
    with pytest.raises(ValueError, match="does not fit the input"):
        loss(x, [x[..., :4, :4], x[..., :8, :8], torch.rand(1, 3, 32, 32)], None)


def test_named_scale_weightings(gen):
    from hieratok.losses.reconstruction import resolve_scale_weights

    assert resolve_scale_weights("equal", [1, 2, 4]) == (1.0, 1.0, 1.0)
    w = resolve_scale_weights("pixels", [1, 2, 4, 8, 16])
    assert w == pytest.approx([5 * n / 341 for n in (1, 4, 16, 64, 256)]) and sum(w) == pytest.approx(5)
    # the loss applies the resolved weights: "pixels" equals the same weights given as a list
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    recs = [torch.rand(2, 3, s, s, generator=gen) * 2 - 1 for s in (4, 8, 16)]
    wp = resolve_scale_weights("pixels", [1, 2, 4])
    named = MultiScaleReconstructionLoss(ReconLossConfig(perceptual=0.0, scale_weights="pixels"), [1, 2, 4])
    listed = MultiScaleReconstructionLoss(ReconLossConfig(perceptual=0.0, scale_weights=list(wp)), 3)
    equal = MultiScaleReconstructionLoss(ReconLossConfig(perceptual=0.0, scale_weights="equal"), [1, 2, 4])
    assert named(x, recs, None)["loss"] == listed(x, recs, None)["loss"]
    assert named(x, recs, None)["loss"] != equal(x, recs, None)["loss"]
    only_finest = MultiScaleReconstructionLoss(ReconLossConfig(perceptual=0.0, scale_weights=[0, 0, 1]), 3)
    ref = F.l1_loss(recs[-1], x) + 0.4 * F.mse_loss(recs[-1], x)
    torch.testing.assert_close(only_finest(x, recs, None)["loss"], ref)
    assert ReconLossConfig(scale_weights=None).scale_weights == "equal"  # configs saved before the names
    for bad, match in (("pixel", "is not one of"), ([1, -1], "non-negative"), ([0, 0], "not all zero"),
                       (["a"], "list of numbers"), ([float("nan")], "finite")):
        with pytest.raises(ValueError, match=match):
            ReconLossConfig(scale_weights=bad)
    by_size = MultiScaleReconstructionLoss(ReconLossConfig(perceptual=0.0, scale_weights="pixels"), 3)
    assert by_size(x, recs, None)["loss"] == named(x, recs, None)["loss"]  # sides from the reconstructions
