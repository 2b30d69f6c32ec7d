"""Latent-space uniformity (HieraTok Table 5, following VA-VAE's analysis).

Procedure, repeated for several seeds:

1. sample ``num_points`` per-position latent vectors (one C-dim vector per (image, h, w)) from
   latents ``(N, C, H, W)``, without replacement, with a seeded generator. The positions of all
   images are pooled, so an image can give several vectors; VA-VAE's analysis takes one position
   per image instead, so numbers from the two samplings are not interchangeable;
2. normalise every channel by its mean and std (by default measured over all given latents;
   pass the tokenizer's saved latent statistics instead where they exist);
3. embed in 2-D with t-SNE (scikit-learn, perplexity 30, 1000 iterations, PCA init);
4. estimate the density at each embedded point with a Gaussian KDE (scipy, Scott's bandwidth);
5. score the densities d_1..d_n: coefficient of variation ``std / mean``, Gini coefficient,
   and normalised entropy ``H(p) / log n`` with ``p = d / sum d``.

A perfectly uniform layout has CV 0, Gini 0 and normalised entropy 1; concentrated clusters
raise CV and Gini and lower the entropy. The paper reports (f16d16) single-scale
0.522 / 0.299 / 0.984 and multi-scale 0.381 / 0.216 / 0.991 (CV / Gini / entropy), 10k points,
averaged over 10 runs.

Shape legend: N images, C latent channels, H, W latent grid, P sampled points.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = [
    "density_cv",
    "gini_coefficient",
    "normalized_entropy",
    "sample_latent_vectors",
    "UniformityResult",
    "latent_uniformity",
]

logger = logging.getLogger(__name__)


def density_cv(densities: np.ndarray) -> float:
    """Coefficient of variation ``std / mean`` (population std) of positive densities."""
    d = np.asarray(densities, dtype=np.float64)
    return float(d.std() / d.mean())


def gini_coefficient(values: np.ndarray) -> float:
    """Gini coefficient of nonnegative values: 0 for all equal, ``(n - 1) / n`` for a single nonzero.

    ``G = sum_i (2 i - n - 1) x_(i) / (n sum x)`` over the values sorted ascending, i = 1..n.
    """
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if x.size == 0 or (x < 0).any() or x.sum() <= 0:
        raise ValueError("Gini coefficient needs nonnegative values with a positive sum")
    n = x.size
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * x.sum()))


def normalized_entropy(values: np.ndarray) -> float:
    """Entropy of ``p = values / sum(values)`` divided by ``log n``: 1 for uniform, 0 for one nonzero."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2 or (x < 0).any() or x.sum() <= 0:
        raise ValueError("normalised entropy needs at least 2 nonnegative values with a positive sum")
    p = x / x.sum()
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / np.log(x.size))


def sample_latent_vectors(
    latents_NCHW: torch.Tensor | np.ndarray,
    num_points: int,
    seed: int,
    *,
    channel_mean: Optional[Sequence[float] | np.ndarray] = None,
    channel_std: Optional[Sequence[float] | np.ndarray] = None,
) -> np.ndarray:
    """Sample ``num_points`` per-position vectors ``(P, C)``, normalised per channel.

    Args:
        latents_NCHW: latents (a torch tensor or an array).
        num_points: how many (image, h, w) positions to draw, without replacement.
        seed: seed of the NumPy generator that draws them.
        channel_mean, channel_std: per-channel statistics to normalise with; measured over all
            of ``latents_NCHW`` when not given.

    Raises:
        ValueError: the latents hold NaN/Inf, or the sampled vectors are all identical (collapsed
            latents; t-SNE is undefined there and scikit-learn's crashes the process).
    """
    z = torch.as_tensor(latents_NCHW).detach().to("cpu", torch.float64).numpy()
    if z.ndim != 4:
        raise ValueError(f"latents must be (N, C, H, W), got shape {z.shape}")
    n, c, h, w = z.shape
    vecs = z.transpose(0, 2, 3, 1).reshape(-1, c)  # (N*H*W, C)
    if not 2 <= num_points <= vecs.shape[0]:
        raise ValueError(f"num_points must be in [2, {vecs.shape[0]}] (N*H*W positions), got {num_points}")
    mean = vecs.mean(0) if channel_mean is None else np.asarray(channel_mean, dtype=np.float64)
    std = vecs.std(0) if channel_std is None else np.asarray(channel_std, dtype=np.float64)
    if not np.isfinite(vecs).all():
        raise ValueError("latents contain NaN/Inf: no uniformity can be measured (check the tokenizer's encoder)")
    idx = np.random.default_rng(seed).choice(vecs.shape[0], size=num_points, replace=False)
    if (vecs[idx] == vecs[idx[0]]).all():
        raise ValueError(f"the {num_points} sampled latent vectors are all identical (collapsed latents): "
                         "t-SNE uniformity is undefined; check the tokenizer checkpoint")
    return (vecs[idx] - mean) / np.maximum(std, 1e-12)


def _tsne(
    x_PC: np.ndarray, seed: int, perplexity: float, iterations: int, num_threads: Optional[int]
) -> np.ndarray:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    # scikit-learn renamed n_iter to max_iter in 1.5 (n_iter removed in 1.7).
    iter_kw = "max_iter" if "max_iter" in inspect.signature(TSNE.__init__).parameters else "n_iter"
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed, **{iter_kw: iterations})
    # Barnes-Hut t-SNE runs OpenMP loops; on an oversubscribed machine spinning OpenMP threads
    # slow it down by 10x or more, so the thread count can be capped.
    with threadpool_limits(limits=num_threads):
        return tsne.fit_transform(x_PC)


@dataclass
class UniformityResult:
    """Uniformity metrics over several runs.

    Attributes:
        cv, gini, entropy: ``(mean, std)`` over runs of density CV, Gini coefficient and
            normalised entropy.
        runs: per-run ``{"cv", "gini", "entropy", "seed"}``.
        points_2d: ``(P, 2)`` t-SNE embedding of the first run (for plotting).
        densities: ``(P,)`` KDE densities of the first run.
        num_points, perplexity, iterations: the settings used.
    """

    cv: tuple[float, float]
    gini: tuple[float, float]
    entropy: tuple[float, float]
    runs: list[dict] = field(default_factory=list)
    points_2d: Optional[np.ndarray] = None
    densities: Optional[np.ndarray] = None
    num_points: int = 0
    perplexity: float = 30.0
    iterations: int = 1000

    def as_dict(self) -> dict:
        """The summary numbers (JSON-serialisable)."""
        return {
            "density_cv": self.cv[0], "density_cv_std": self.cv[1],
            "gini": self.gini[0], "gini_std": self.gini[1],
            "normalized_entropy": self.entropy[0], "normalized_entropy_std": self.entropy[1],
            "num_points": self.num_points, "num_runs": len(self.runs),
            "perplexity": self.perplexity, "iterations": self.iterations,
        }


def latent_uniformity(
    latents_NCHW: torch.Tensor | np.ndarray,
    *,
    num_points: int = 10_000,
    num_runs: int = 10,
    seed: int = 0,
    perplexity: float = 30.0,
    iterations: int = 1000,
    channel_mean: Optional[Sequence[float] | np.ndarray] = None,
    channel_std: Optional[Sequence[float] | np.ndarray] = None,
    num_threads: Optional[int] = None,
) -> UniformityResult:
    """t-SNE + KDE uniformity of per-position latent vectors (HieraTok Table 5 / VA-VAE).

    Args:
        latents_NCHW: tokenizer latents ``(N, C, H, W)``; N*H*W must be at least ``num_points``.
        num_points: points per run (10k in the paper; a few hundred is enough for tests).
        num_runs: runs with seeds ``seed, seed + 1, ...`` (sampling and t-SNE both use it).
        seed: first seed.
        perplexity: t-SNE perplexity (must be below ``num_points``).
        iterations: t-SNE optimisation iterations.
        channel_mean, channel_std: normalisation statistics; measured from the latents if None.
        num_threads: cap on OpenMP / BLAS threads during t-SNE (None: library default). Use 1
            on a small or busy machine: Barnes-Hut t-SNE is much slower with contended threads.

    Returns:
        :class:`UniformityResult` with mean/std of each metric and the first run's embedding.
    """
    from scipy.stats import gaussian_kde

    if num_runs < 1:
        raise ValueError(f"num_runs must be >= 1, got {num_runs}")
    if not 0 < perplexity < num_points:
        raise ValueError(f"perplexity must be in (0, num_points={num_points}), got {perplexity}")
    runs: list[dict] = []
    first_points = first_dens = None
    for r in range(num_runs):
        s = seed + r
        x = sample_latent_vectors(latents_NCHW, num_points, s, channel_mean=channel_mean, channel_std=channel_std)
        pts = _tsne(x, s, perplexity, iterations, num_threads)  # (P, 2)
        dens = gaussian_kde(pts.T)(pts.T)  # (P,)
        runs.append({"seed": s, "cv": density_cv(dens), "gini": gini_coefficient(dens),
                     "entropy": normalized_entropy(dens)})
        logger.info("uniformity run %d/%d: %s", r + 1, num_runs, runs[-1])
        if r == 0:
            first_points, first_dens = pts, dens

    def agg(key: str) -> tuple[float, float]:
        v = np.array([run[key] for run in runs])
        return float(v.mean()), float(v.std())

    return UniformityResult(agg("cv"), agg("gini"), agg("entropy"), runs, first_points, first_dens,
                            num_points, perplexity, iterations)
