"""The ADM evaluator's numbers (guided-diffusion ``evaluations/evaluator.py``) from one Inception pass.

IS, FID, sFID, precision and recall of a sample batch against a reference batch, as Dhariwal &
Nichol (2021) and every later ImageNet generation paper report them:

* **FID** on the 2048-d pool3 features; **sFID** the same distance on the 2023-d spatial features
  (``mixed_6/conv``, first 7 channels: :meth:`FIDInceptionV3.pool_and_spatial`);
* **IS** from the pool3 features through the bias-free classifier (10 splits: ADM's 5000-image
  splits of 50k samples), when the weights have the classifier;
* **precision / recall** (:mod:`.precision_recall`, k = 3) between the pool3 features of the
  reference *images* and of the samples.

The samples go through the network once; their pool3 features are kept (50k x 2048 float32 =
400 MB) for precision / recall and IS. A reference is read as ADM ships it: an ``.npz`` with
``mu`` / ``sigma`` (pool3 statistics of the whole training set), ``mu_s`` / ``sigma_s`` (spatial)
and ``arr_0`` (10k uint8 NHWC images, run through the network only for precision / recall); or
an image folder / images ``.npz`` (all statistics computed from those images). Statistics files
without ``mu_s`` (pytorch-fid's) give FID but no sFID; without ``arr_0``, no precision / recall.
:func:`save_adm_stats` writes the ADM layout.

Shape legend: N images, D feature dim (2048 pool3, 2023 spatial), K classes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

from .fid import FeatureStats, GaussianStats, frechet_distance, image_batches, npz_keys
from .inception import (
    FID_FEATURE_DIM,
    SFID_FEATURE_DIM,
    InceptionFeatures,
    InceptionScoreUnavailable,
    inception_score_in_splits,
)
from .precision_recall import precision_recall

__all__ = ["BatchFeatures", "batch_features", "load_reference", "save_adm_stats", "adm_metrics"]



@dataclass
class BatchFeatures:
    """What the evaluator needs of one batch of images.

    Attributes:
        pool: pool3 statistics (FID).
        spatial: spatial statistics (sFID), or None when not available (statistics files without them).
        feats: pool3 features ``(N, 2048)`` float32 on the CPU (precision / recall, IS), or None.
        source: where the batch came from.
    """

    pool: GaussianStats
    spatial: Optional[GaussianStats]
    feats: Optional[torch.Tensor]
    source: str


def batch_features(batches: Iterable[torch.Tensor], extractor: InceptionFeatures, *, keep: bool = True,
                   source: str = "", progress: bool = False, total: Optional[int] = None) -> BatchFeatures:
    """One pass of the network over uint8 ``(B, 3, H, W)`` batches: both statistics and (``keep``) the pool3 features."""
    from tqdm.auto import tqdm

    pool, spatial, kept = FeatureStats(FID_FEATURE_DIM), FeatureStats(SFID_FEATURE_DIM), []
    with tqdm(total=total, desc=Path(source).name or "inception", unit="img", disable=not progress) as bar:
        for batch in batches:
            f, s = extractor.pool_and_spatial(batch)
            pool.update(f)
            spatial.update(s)
            if keep:
                kept.append(f.cpu())
            bar.update(batch.shape[0])
    if pool.count < 2:
        raise ValueError(f"{source}: {pool.count} image(s); FID statistics need at least 2")
    return BatchFeatures(pool.to_gaussian(source), spatial.to_gaussian(source), torch.cat(kept) if keep else None,
                         source)


def load_reference(ref: str | os.PathLike, extractor: Optional[InceptionFeatures], *, images: bool = True,
                   batch_size: int = 50, progress: bool = False) -> BatchFeatures:
    """A reference batch: an ADM / pytorch-fid statistics ``.npz`` (its ``arr_0`` run through the network
    for precision / recall when ``images``), an images ``.npz`` or an image folder.

    Raises:
        ValueError: the file is not a statistics or images ``.npz`` / folder, or it holds images and
            no ``extractor`` is given.
    """
    path = Path(ref)
    keys = npz_keys(path) if path.is_file() and path.suffix == ".npz" else set()
    if not {"mu", "sigma"} <= keys:
        if extractor is None:
            raise ValueError(f"{ref} holds images: an InceptionFeatures extractor is needed")
        batches, total = image_batches(path, batch_size)
        return batch_features(batches, extractor, keep=images, source=str(path), progress=progress, total=total)
    pool = GaussianStats.load(path)
    spatial = None
    if {"mu_s", "sigma_s"} <= keys:
        with np.load(path) as f:
            spatial = GaussianStats(f["mu_s"].astype(np.float64), f["sigma_s"].astype(np.float64), pool.num_samples,
                                    str(path))
    feats = None
    if images and "arr_0" in keys and extractor is not None:
        batches, total = image_batches(path, batch_size)
        feats = batch_features(batches, extractor, source=str(path), progress=progress, total=total).feats
    return BatchFeatures(pool, spatial, feats, str(path))


def save_adm_stats(path: str | os.PathLike, feats: BatchFeatures) -> None:
    """Write ``mu``, ``sigma`` (pool3), ``mu_s``, ``sigma_s`` (spatial) and ``num_samples`` in ADM's layout."""
    extra = {"mu_s": feats.spatial.mu, "sigma_s": feats.spatial.sigma} if feats.spatial is not None else {}
    with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to another suffix
        np.savez(f, mu=feats.pool.mu, sigma=feats.pool.sigma, num_samples=np.int64(feats.pool.num_samples), **extra)


def _inception_score(feats: torch.Tensor, extractor: InceptionFeatures, splits: int) -> dict[str, Any]:
    logits = torch.cat([extractor.logits(c).cpu() for c in feats.split(4096)])  # (N, 1008)
    mean, std, splits = inception_score_in_splits(logits, splits)
    return {"is": mean, "is_std": std, "is_splits": splits}


def adm_metrics(samples: str | os.PathLike, ref: str | os.PathLike, extractor: InceptionFeatures, *,
                batch_size: int = 50, precision_and_recall: bool = True, k: int = 3, splits: int = 10,
                save_stats: Optional[str | os.PathLike] = None, progress: bool = True) -> dict[str, Any]:
    """IS, FID, sFID, precision and recall of ``samples`` (folder or images ``.npz``) against ``ref``.

    Args:
        samples: the generated images.
        ref: an ADM reference batch / statistics ``.npz``, an images ``.npz`` or an image folder.
        extractor: the Inception network.
        batch_size: images per forward pass.
        precision_and_recall: compute them (needs the reference images; skipping saves their pass).
        k: neighbourhood size of precision / recall.
        splits: IS splits.
        save_stats: write the samples' ADM-layout statistics here.
        progress: progress bars.

    Returns:
        ``gfid``, ``sfid``, ``precision``, ``recall``, ``is`` / ``is_std`` and counts; a metric that
        cannot be computed is absent and ``<name>_unavailable`` says why.
    """
    batches, total = image_batches(samples, batch_size)
    fake = batch_features(batches, extractor, source=str(samples), progress=progress, total=total)
    real = load_reference(ref, extractor, images=precision_and_recall, batch_size=batch_size, progress=progress)
    if save_stats is not None:
        save_adm_stats(save_stats, fake)
    out: dict[str, Any] = {"num_samples": fake.pool.num_samples, "ref": str(ref), "inception_source": extractor.source,
                           "gfid": frechet_distance(fake.pool.mu, fake.pool.sigma, real.pool.mu, real.pool.sigma)}
    if real.spatial is not None:
        out["sfid"] = frechet_distance(fake.spatial.mu, fake.spatial.sigma, real.spatial.mu, real.spatial.sigma)
    else:
        out["sfid_unavailable"] = f"{ref} has no spatial statistics (mu_s, sigma_s; ADM's reference batches carry them)"
    if real.feats is not None:
        pr = precision_recall(real.feats.to(extractor.device), fake.feats.to(extractor.device), k)
        out.update(precision=pr.precision, recall=pr.recall, pr_k=k, pr_num_ref=pr.num_real)
    else:
        out["precision_recall_unavailable"] = ("skipped (--no-pr)" if not precision_and_recall else
                                               f"{ref} holds statistics but no reference images (arr_0)")
    try:
        out.update(_inception_score(fake.feats, extractor, splits))
    except InceptionScoreUnavailable as e:
        out["is_unavailable"] = str(e)
    return out
