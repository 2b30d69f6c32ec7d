"""Latent-space uniformity (HieraTok Table 5, following VA-VAE's analysis).

Procedure, repeated ``num_runs`` times with seeds ``seed, seed + 1, ...``:

1. sample ``P = num_points`` C-dim latent vectors from latents ``(N, C, H, W)``. Two protocols:

   - ``"vavae"`` (the default; VA-VAE's ``tools/latent_vis.py`` in hustvl/LightningDiT):
     ``P`` distinct images, one vector from each, at a uniformly random position ``(h, w)``; with
     the latents of the mirrored images given, each drawn image contributes its mirrored latent
     with probability 1/2 (VA-VAE's cache stores both and picks one per draw). Positions, images
     and flips are drawn anew every run.
   - ``"pooled"`` (this package's earlier sampling): ``P`` of the ``N * H * W`` positions of all
     images pooled, without replacement, so an image gives several vectors.

   Numbers from the two samplings are not interchangeable: neighbouring positions of one image
   are correlated, which clusters the pooled points;
2. normalise every channel by a mean and std: the training set's statistics where the caller
   gives them (VA-VAE divides by the statistics saved with its training-set latent cache), else
   those of the evaluated latents (the result's ``normalization`` says which: ``"train"`` or
   ``"eval-set"``);
3. embed in 2-D with t-SNE (scikit-learn, perplexity 30, 1000 iterations, PCA init, automatic
   learning rate). VA-VAE fixes ``random_state=42`` for every run (its runs differ only in the
   sampled points); the pooled protocol seeds each run's t-SNE with the run's seed;
4. estimate the density at each embedded point with a Gaussian KDE (scipy, Scott's bandwidth);
5. score the densities d_1..d_n: coefficient of variation ``std / mean``, Gini coefficient,
   and normalised entropy ``H(p) / log n`` with ``p = d / sum d``.

A perfectly uniform layout has CV 0, Gini 0 and normalised entropy 1; concentrated clusters
raise CV and Gini and lower the entropy. The paper reports (f16d16) single-scale
0.522 / 0.299 / 0.984 and multi-scale 0.381 / 0.216 / 0.991 (CV / Gini / entropy), 10k ImageNet
test images, averaged over 10 runs.

Where this differs from VA-VAE's script, on purpose: it draws with NumPy's unseeded global state
(here one seeded generator per run) and runs once per call (its "10 runs" are a comment); it
encodes posterior samples (here the posterior mode, as every evaluation of this package); its
statistics come from 10k random training latents with the unbiased std (a ``cache.json`` holds
those of every cached latent, population std); its entropy uses log2 with a 1e-10 guard (the same
ratio ``H / log n``).

Shape legend: N images, C latent channels, H, W latent grid, P sampled points.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch

from .._optional import require

__all__ = [
    "PROTOCOLS",
    "VAVAE_FLIP_PROB",
    "VAVAE_TSNE_SEED",
    "PositionSample",
    "channel_stats",
    "density_cv",
    "gini_coefficient",
    "normalize_channels",
    "normalized_entropy",
    "sample_latent_vectors",
    "sample_one_position_per_image",
    "UniformityResult",
    "latent_uniformity",
]

logger = logging.getLogger(__name__)

Protocol = Literal["vavae", "pooled"]
PROTOCOLS: tuple[str, ...] = ("vavae", "pooled")
# VA-VAE's tools/latent_vis.py: TSNE(random_state=42) in every run, and per drawn image
# `"latents" if np.random.uniform(0, 1) > 0.5 else "latents_flip"`.
VAVAE_TSNE_SEED = 42
VAVAE_FLIP_PROB = 0.5

Latents = Union[torch.Tensor, np.ndarray]
ChannelVector = Union[Sequence[float], np.ndarray, torch.Tensor]


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


def _as_latents(latents_NCHW: Latents, name: str = "latents") -> np.ndarray:
    """Float64 NumPy view of a 4-D latent tensor or array, checked for shape and finiteness."""
    z = torch.as_tensor(latents_NCHW).detach().to("cpu", torch.float64).numpy()
    if z.ndim != 4:
        raise ValueError(f"{name} must be (N, C, H, W), got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError(f"{name} contain NaN/Inf: no uniformity can be measured (check the tokenizer's encoder)")
    return z


def _channel_vector(v: ChannelVector, channels: int, name: str) -> np.ndarray:
    """Per-channel statistics as a float64 ``(C,)`` vector; VA-VAE's ``(1, C, 1, 1)`` form is accepted."""
    x = torch.as_tensor(v).detach().to("cpu", torch.float64).numpy().reshape(-1)
    if x.size != channels:
        raise ValueError(f"{name} has {x.size} values but the latents have {channels} channels "
                         "(statistics of another tokenizer?)")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN/Inf")
    return x


def channel_stats(latents_NCHW: Latents) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std ``(C,)`` over all images and positions, in float64.

    These are the statistics a latent cache's ``cache.json`` stores
    (:func:`hieratok.data.latent_cache.finalize_cache`); pass the training set's to
    :func:`latent_uniformity` as ``channel_mean`` / ``channel_std``.
    """
    z = _as_latents(latents_NCHW)
    return z.mean(axis=(0, 2, 3)), z.std(axis=(0, 2, 3))


def normalize_channels(x_PC: np.ndarray, channel_mean: ChannelVector, channel_std: ChannelVector) -> np.ndarray:
    """``(x - mean) / std`` per channel of vectors ``(P, C)`` (std floored at 1e-12)."""
    x = np.asarray(x_PC, dtype=np.float64)
    mean = _channel_vector(channel_mean, x.shape[1], "channel_mean")
    std = _channel_vector(channel_std, x.shape[1], "channel_std")
    return (x - mean) / np.maximum(std, 1e-12)


def sample_latent_vectors(
    latents_NCHW: torch.Tensor | np.ndarray,
    num_points: int,
    seed: int,
    *,
    channel_mean: Optional[Sequence[float] | np.ndarray] = None,
    channel_std: Optional[Sequence[float] | np.ndarray] = None,
) -> np.ndarray:
    """Pooled protocol: sample ``num_points`` per-position vectors ``(P, C)``, normalised per channel.

    The positions of all images are pooled and drawn without replacement, so an image can give
    several vectors (see :func:`sample_one_position_per_image` for VA-VAE's one per image).

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
    mean = vecs.mean(0) if channel_mean is None else _channel_vector(channel_mean, c, "channel_mean")
    std = vecs.std(0) if channel_std is None else _channel_vector(channel_std, c, "channel_std")
    if not np.isfinite(vecs).all():
        raise ValueError("latents contain NaN/Inf: no uniformity can be measured (check the tokenizer's encoder)")
    idx = np.random.default_rng(seed).choice(vecs.shape[0], size=num_points, replace=False)
    if (vecs[idx] == vecs[idx[0]]).all():
        raise ValueError(f"the {num_points} sampled latent vectors are all identical (collapsed latents): "
                         "t-SNE uniformity is undefined; check the tokenizer checkpoint")
    return (vecs[idx] - mean) / np.maximum(std, 1e-12)


@dataclass
class PositionSample:
    """One run's draw of the VA-VAE protocol (:func:`sample_one_position_per_image`).

    Attributes:
        vectors_PC: the drawn latent vectors, not normalised.
        image_P: image index of each vector (distinct).
        h_P, w_P: its position on the latent grid.
        flipped_P: whether it was taken from the latents of the mirrored image.
    """

    vectors_PC: np.ndarray
    image_P: np.ndarray
    h_P: np.ndarray
    w_P: np.ndarray
    flipped_P: np.ndarray


def sample_one_position_per_image(
    latents_NCHW: Latents,
    num_points: int,
    rng: np.random.Generator | int,
    *,
    latents_flip_NCHW: Optional[Latents] = None,
    flip_prob: float = VAVAE_FLIP_PROB,
) -> PositionSample:
    """VA-VAE protocol: ``num_points`` distinct images, one latent vector of each.

    As ``sample_latents`` in VA-VAE's ``tools/latent_vis.py``: draw the images without
    replacement, for each one take its mirrored image's latent with probability ``flip_prob``
    (when ``latents_flip_NCHW`` is given), then a uniformly random grid position ``(h, w)`` of
    that latent map. All draws come from ``rng`` (never NumPy's global state).

    Args:
        latents_NCHW: latents of the images.
        num_points: images to draw, at most N.
        rng: a NumPy generator, or a seed for one.
        latents_flip_NCHW: latents of the horizontally mirrored images, same order and shape.
        flip_prob: chance that a drawn image contributes its mirrored latent.

    Returns:
        :class:`PositionSample` with the raw vectors and the (image, h, w, flipped) they came from.
    """
    z = _as_latents(latents_NCHW)
    zf = None if latents_flip_NCHW is None else _as_latents(latents_flip_NCHW, "mirrored latents")
    if zf is not None and zf.shape != z.shape:
        raise ValueError(f"mirrored latents have shape {zf.shape}, the latents {z.shape}: "
                         "they must pair image by image")
    n, _, h, w = z.shape
    if not 1 <= num_points <= n:
        raise ValueError(f"num_points must be in [1, {n}] (one position per image, {n} images), got {num_points}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    rng = np.random.default_rng(rng)  # a Generator passes through unchanged
    image_P = rng.choice(n, size=num_points, replace=False)
    flipped_P = rng.random(num_points) < flip_prob if zf is not None else np.zeros(num_points, dtype=bool)
    h_P = rng.integers(0, h, size=num_points)
    w_P = rng.integers(0, w, size=num_points)
    vec_PC = z[image_P, :, h_P, w_P]  # (P, C): the advanced indices around the slice come first
    if zf is not None:
        vec_PC = np.where(flipped_P[:, None], zf[image_P, :, h_P, w_P], vec_PC)
    return PositionSample(vec_PC, image_P, h_P, w_P, flipped_P)


def _tsne(
    x_PC: np.ndarray, seed: int, perplexity: float, iterations: int, num_threads: Optional[int]
) -> np.ndarray:
    TSNE = require("sklearn.manifold", "the t-SNE of the uniformity metric").TSNE
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
        runs: per-run ``{"cv", "gini", "entropy", "seed", "tsne_seed"}``.
        points_2d: ``(P, 2)`` t-SNE embedding of the first run (for plotting).
        densities: ``(P,)`` KDE densities of the first run.
        num_points, perplexity, iterations: the settings used.
        protocol: ``"vavae"`` (one random position per image) or ``"pooled"``.
        normalization: ``"train"`` (statistics given by the caller) or ``"eval-set"`` (measured
            on the evaluated latents).
        flip: whether mirrored-image latents were drawn from (probability ``flip_prob``).
        tsne_seed: t-SNE seed of every run, or None where each run used its own seed.
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
    protocol: str = "vavae"
    normalization: str = "eval-set"
    flip: bool = False
    flip_prob: float = VAVAE_FLIP_PROB
    tsne_seed: Optional[int] = VAVAE_TSNE_SEED

    def as_dict(self) -> dict:
        """The summary numbers and the protocol's settings (JSON-serialisable)."""
        return {
            "density_cv": self.cv[0], "density_cv_std": self.cv[1],
            "gini": self.gini[0], "gini_std": self.gini[1],
            "normalized_entropy": self.entropy[0], "normalized_entropy_std": self.entropy[1],
            "num_points": self.num_points, "num_runs": len(self.runs),
            "perplexity": self.perplexity, "iterations": self.iterations,
            "protocol": self.protocol, "normalization": self.normalization,
            "flip": self.flip, "flip_prob": self.flip_prob if self.flip else 0.0,
            "tsne_seed": "per run" if self.tsne_seed is None else self.tsne_seed,
        }


def latent_uniformity(
    latents_NCHW: Latents,
    *,
    protocol: Protocol = "vavae",
    latents_flip_NCHW: Optional[Latents] = None,
    num_points: int = 10_000,
    num_runs: int = 10,
    seed: int = 0,
    perplexity: float = 30.0,
    iterations: int = 1000,
    channel_mean: Optional[ChannelVector] = None,
    channel_std: Optional[ChannelVector] = None,
    tsne_seed: Optional[int] = None,
    num_threads: Optional[int] = None,
) -> UniformityResult:
    """t-SNE + KDE uniformity of latent vectors (HieraTok Table 5 / VA-VAE); see the module doc.

    Args:
        latents_NCHW: tokenizer latents ``(N, C, H, W)`` of the evaluated images.
        protocol: ``"vavae"``: one random position per image, N >= ``num_points`` (VA-VAE's
            analysis and the paper's Table 5); ``"pooled"``: positions pooled over images,
            N*H*W >= ``num_points`` (the earlier sampling of this package).
        latents_flip_NCHW: ``"vavae"`` only: latents of the horizontally mirrored images (encoded
            from the mirrored images, same order); each drawn image then contributes its mirrored
            latent with probability 1/2, as in VA-VAE. None: no flips.
        num_points: points per run (10k in the paper; a few hundred is enough for tests).
        num_runs: runs with seeds ``seed, seed + 1, ...`` (each run's sampling generator).
        seed: first seed.
        perplexity: t-SNE perplexity (must be below ``num_points``).
        iterations: t-SNE optimisation iterations.
        channel_mean, channel_std: the training set's per-channel statistics ``(C,)`` (e.g. a
            latent cache's ``cache.json`` ``mean`` / ``std``, or :func:`channel_stats` of
            training latents); both or neither. Neither: the evaluated latents' own statistics
            (``normalization="eval-set"`` in the result).
        tsne_seed: t-SNE ``random_state`` of every run; None: 42 for ``"vavae"`` (fixed, as VA-VAE)
            and the run's seed for ``"pooled"`` (as before).
        num_threads: cap on OpenMP / BLAS threads during t-SNE (None: library default). Use 1
            on a small or busy machine: Barnes-Hut t-SNE is much slower with contended threads.

    Returns:
        :class:`UniformityResult` with mean/std of each metric, the settings, and the first run's
        embedding.

    Raises:
        ValueError: bad settings, NaN/Inf latents, too few images or positions for
            ``num_points``, statistics of the wrong length, or all sampled vectors identical.
    """
    gaussian_kde = require("scipy.stats", "the density estimate of the uniformity metric").gaussian_kde

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if num_runs < 1:
        raise ValueError(f"num_runs must be >= 1, got {num_runs}")
    if num_points < 3:  # fewer points leave the 2-D KDE's covariance singular
        raise ValueError(f"num_points must be at least 3 (a 2-D Gaussian KDE of the t-SNE points), got {num_points}")
    if not 0 < perplexity < num_points:
        raise ValueError(f"perplexity must be in (0, num_points={num_points}), got {perplexity}")
    if (channel_mean is None) != (channel_std is None):
        raise ValueError("give both channel_mean and channel_std (the training set's statistics), or neither")
    normalization = "eval-set" if channel_mean is None else "train"
    if protocol == "pooled":
        if latents_flip_NCHW is not None:
            raise ValueError("the pooled protocol takes no mirrored latents; use protocol='vavae' for flips")
        fixed_tsne_seed = tsne_seed
    else:
        z = _as_latents(latents_NCHW)
        zf = None if latents_flip_NCHW is None else _as_latents(latents_flip_NCHW, "mirrored latents")
        if channel_mean is None:  # VA-VAE's statistics are of the unmirrored latents
            channel_mean, channel_std = channel_stats(z)
        fixed_tsne_seed = VAVAE_TSNE_SEED if tsne_seed is None else tsne_seed
    runs: list[dict] = []
    first_points = first_dens = None
    for r in range(num_runs):
        s = seed + r
        if protocol == "pooled":
            x = sample_latent_vectors(latents_NCHW, num_points, s, channel_mean=channel_mean, channel_std=channel_std)
        else:
            draw = sample_one_position_per_image(z, num_points, np.random.default_rng(s), latents_flip_NCHW=zf)
            x = normalize_channels(draw.vectors_PC, channel_mean, channel_std)
            if (x == x[0]).all():
                raise ValueError(f"the {num_points} sampled latent vectors are all identical (collapsed latents): "
                                 "t-SNE uniformity is undefined; check the tokenizer checkpoint")
        ts = s if fixed_tsne_seed is None else fixed_tsne_seed
        pts = _tsne(x, ts, perplexity, iterations, num_threads)  # (P, 2)
        dens = gaussian_kde(pts.T)(pts.T)  # (P,)
        runs.append({"seed": s, "tsne_seed": ts, "cv": density_cv(dens), "gini": gini_coefficient(dens),
                     "entropy": normalized_entropy(dens)})
        logger.info("uniformity run %d/%d: %s", r + 1, num_runs, runs[-1])
        if r == 0:
            first_points, first_dens = pts, dens

    def agg(key: str) -> tuple[float, float]:
        v = np.array([run[key] for run in runs])
        return float(v.mean()), float(v.std())

    return UniformityResult(agg("cv"), agg("gini"), agg("entropy"), runs, first_points, first_dens,
                            num_points, perplexity, iterations, protocol=protocol, normalization=normalization,
                            flip=protocol == "vavae" and latents_flip_NCHW is not None,
                            tsne_seed=fixed_tsne_seed)
