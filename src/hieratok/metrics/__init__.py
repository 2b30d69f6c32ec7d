"""Evaluation metrics: FID / sFID / IS / precision / recall (standard FID Inception, ADM's evaluator),
PSNR, SSIM, latent uniformity, codebook stats.

LPIPS lives with the perceptual losses (:mod:`hieratok.losses.perceptual`).
"""

from .adm import BatchFeatures, adm_metrics, batch_features, load_reference, save_adm_stats
from .codebook import CodebookStats, CodebookUsage, codebook_stats, shared_code_fraction
from .fid import (
    FeatureStats,
    FIDResult,
    GaussianStats,
    all_reduce_feature_stats,
    compute_feature_stats,
    fid_from_sources,
    frechet_distance,
    iter_image_folder,
    iter_npz_images,
    stats_from_source,
)
from .image import color_error, psnr, quantize_to_uint8, ssim
from .inception import (
    FID_FEATURE_DIM,
    PT_INCEPTION_FILENAME,
    SFID_FEATURE_DIM,
    FIDInceptionV3,
    InceptionFeatures,
    InceptionScoreResult,
    InceptionScoreUnavailable,
    inception_score,
    inception_score_from_logits,
    tf_bilinear_resize,
)
from .kid import kernel_inception_distance, polynomial_mmd2
from .precision_recall import PrecisionRecall, in_manifold, manifold_radii, precision_recall
from .uniformity import (
    UniformityResult,
    density_cv,
    gini_coefficient,
    latent_uniformity,
    normalized_entropy,
)

__all__ = [
    "BatchFeatures", "adm_metrics", "batch_features", "load_reference", "save_adm_stats",
    "PrecisionRecall", "in_manifold", "manifold_radii", "precision_recall", "SFID_FEATURE_DIM",
    "CodebookStats", "CodebookUsage", "codebook_stats", "shared_code_fraction",
    "FeatureStats", "FIDResult", "GaussianStats", "all_reduce_feature_stats", "compute_feature_stats",
    "fid_from_sources", "frechet_distance", "iter_image_folder", "iter_npz_images", "stats_from_source",
    "color_error", "kernel_inception_distance", "polynomial_mmd2", "psnr", "quantize_to_uint8", "ssim",
    "FID_FEATURE_DIM", "PT_INCEPTION_FILENAME", "FIDInceptionV3", "InceptionFeatures",
    "InceptionScoreResult", "InceptionScoreUnavailable", "inception_score", "inception_score_from_logits",
    "tf_bilinear_resize",
    "UniformityResult", "density_cv", "gini_coefficient", "latent_uniformity", "normalized_entropy",
]
