"""Training losses: multi-scale reconstruction, perceptual distances, GAN, foundation-model alignment."""

from hieratok.losses.alignment import FrozenFeatureEncoder, VFAlignmentLoss, build_frozen_encoder, tokens_to_grid
from hieratok.losses.dino_disc import DinoDiscriminator, diff_augment
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
from hieratok.losses.perceptual import LPIPS, EfficientNetPerceptual, build_perceptual
from hieratok.losses.reconstruction import MultiScaleReconstructionLoss, ReconLossConfig, scale_targets
from hieratok.losses.restok import ResTokLoss, ResTokLossConfig, restok_gan_config

__all__ = [
    "LPIPS", "EfficientNetPerceptual", "build_perceptual",
    "MultiScaleReconstructionLoss", "ReconLossConfig", "scale_targets",
    "GANConfig", "GANLoss", "PatchDiscriminator", "DinoDiscriminator", "diff_augment", "LeCamEMA", "hinge_d_loss", "hinge_g_loss", "non_saturating_d_loss",
    "non_saturating_g_loss", "lecam_regularizer", "adaptive_gan_weight",
    "VFAlignmentLoss", "FrozenFeatureEncoder", "build_frozen_encoder", "tokens_to_grid",
    "ResTokLoss", "ResTokLossConfig", "restok_gan_config",
]
