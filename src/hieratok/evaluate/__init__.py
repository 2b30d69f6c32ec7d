"""Evaluation protocols: reconstruction (rFID, PSNR, SSIM, perceptual, per-scale PSNR), latent
uniformity, FID between sources, and run comparison tables."""

from .compare import compare_runs
from .latents import evaluate_latents
from .recon import ReconEvalConfig, evaluate_reconstruction

__all__ = ["evaluate_reconstruction", "ReconEvalConfig", "evaluate_latents",
           "compare_runs"]
