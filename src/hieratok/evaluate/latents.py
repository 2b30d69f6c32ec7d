"""Latent-space uniformity of a tokenizer (paper section 5.2, Table 5; the VA-VAE method).

The default protocol is VA-VAE's (``tools/latent_vis.py`` of hustvl/LightningDiT): one random
latent position per image, each image seen as itself or (with probability 1/2) through the latent
of its mirrored copy, channels normalised by the training set's latent statistics, t-SNE, Gaussian
KDE, density CV / Gini / normalised entropy over 10 runs. See :mod:`hieratok.metrics.uniformity`.

Shape legend: N images, C latent channels, H, W latent grid.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..data import build_dataset, collate_drop_none
from ..data.latent_cache import CACHE_META
from ..hub import read_json
from ..metrics import latent_uniformity
from ..metrics.uniformity import PROTOCOLS, channel_stats
from ..precision import inference_precision, resolve_precision
from ..report import plot_tsne
from .recon import eval_indices

__all__ = ["encode_latents", "encode_latents_and_mirrored", "evaluate_latents", "load_latent_stats"]

log = logging.getLogger(__name__)

StatsPair = tuple[np.ndarray, np.ndarray]
TrainStats = Union[str, Path, Mapping[str, Any], Sequence[Any]]


@torch.no_grad()
def _encode(model: Any, data: Optional[str], num_images: int, batch_size: int = 32,
            device: str | torch.device = "cpu", mirror: bool = False,
            **data_kw: Any) -> tuple[torch.Tensor, Optional[torch.Tensor], int]:
    """(latents, latents of the mirrored images or None, number of unreadable images skipped) of
    :func:`encode_latents`; with ``mirror`` both come from one pass over the data."""
    # on_error="none": an unreadable image is dropped, not replaced by its neighbour (counted twice)
    ds = build_dataset(data, "eval", model.config.image_size, on_error="none", **data_kw)
    wanted = num_images
    if hasattr(ds, "__len__"):
        ds = Subset(ds, eval_indices(len(ds), num_images))
        wanted = len(ds)
    out, out_mirror, n = [], [], 0
    for batch in DataLoader(ds, batch_size=batch_size, collate_fn=collate_drop_none):
        if batch is None:
            continue
        x_BCHW = batch[0].to(device)
        out.append(model.encode(x_BCHW).mode().float().cpu())
        if mirror:  # VA-VAE's order: centre crop, then the horizontal flip, then the encoder
            out_mirror.append(model.encode(x_BCHW.flip(-1)).mode().float().cpu())
        n += x_BCHW.shape[0]
        if n >= num_images:
            break
    if not out:
        raise ValueError(f"no readable images in {data or 'the embedded held-out photos'}")
    z = torch.cat(out)[:num_images]
    z_mirror = torch.cat(out_mirror)[:num_images] if mirror else None
    skipped = wanted - z.shape[0] if isinstance(ds, Subset) else 0  # a shard stream reads on past them
    if skipped:
        log.warning("%d unreadable image(s) skipped; %d encoded", skipped, z.shape[0])
    return z, z_mirror, skipped


def encode_latents(model: Any, data: Optional[str], num_images: int, batch_size: int = 32,
                   device: str | torch.device = "cpu", *, mirror: bool = False, **data_kw: Any) -> torch.Tensor:
    """Posterior modes (N, d, G, G) of ``num_images`` evaluation images (ADM centre crop) spread
    evenly over the data set (:func:`~hieratok.evaluate.recon.eval_indices`); unreadable images
    are skipped with a warning, so N can be smaller. ``data_kw`` go to
    :func:`~hieratok.data.build_dataset` (e.g. ``crops_per_photo``).

    ``mirror=True`` encodes the horizontally mirrored images instead (centre crop, then flip, as
    VA-VAE's feature extraction), in the same order: pass them to :func:`evaluate_latents` as
    ``latents_flip`` for the VA-VAE protocol's random flips.
    """
    z, z_mirror, _ = _encode(model, data, num_images, batch_size, device, mirror=mirror, **data_kw)
    return z_mirror if mirror else z


def encode_latents_and_mirrored(model: Any, data: Optional[str], num_images: int, batch_size: int = 32,
                                device: str | torch.device = "cpu", **data_kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_latents` of the images and of their mirror images, from one pass over the data
    (``latents`` and ``latents_flip`` of :func:`evaluate_latents`'s VA-VAE protocol)."""
    z, z_mirror, _ = _encode(model, data, num_images, batch_size, device, mirror=True, **data_kw)
    assert z_mirror is not None
    return z, z_mirror


def load_latent_stats(path: str | Path) -> StatsPair:
    """Per-channel latent mean and std ``(C,)`` from a file.

    Args:
        path: a latent cache folder or its ``cache.json`` (``hieratok cache-latents``; ``mean`` /
            ``std`` over every cached latent), another JSON object with ``mean`` and ``std``, an
            ``.npz`` with arrays ``mean`` and ``std``, or VA-VAE's ``latents_stats.pt`` (tensors
            ``mean`` / ``std`` of shape (1, C, 1, 1); read with ``weights_only=True``).

    Raises:
        FileNotFoundError: no such file, or a folder without ``cache.json``.
        ValueError: the file holds no ``mean`` / ``std`` (e.g. a code cache) or another format.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / CACHE_META
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no latent statistics file (a latent cache folder, cache.json, .npz or .pt)")
    if p.suffix == ".json":
        stats: Mapping[str, Any] = read_json(p)
    elif p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as f:
            stats = {k: f[k] for k in f.files}
    elif p.suffix == ".pt":
        stats = torch.load(p, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{p}: latent statistics must be a .json, .npz or .pt file")
    if not isinstance(stats, Mapping) or "mean" not in stats or "std" not in stats:
        raise ValueError(f"{p} holds no per-channel 'mean' and 'std' (a code cache, or not latent statistics)")
    return _as_pair(stats["mean"], stats["std"])


def _as_pair(mean: Any, std: Any) -> StatsPair:
    to_np = lambda v: torch.as_tensor(v).detach().to("cpu", torch.float64).numpy().reshape(-1)  # noqa: E731
    m, s = to_np(mean), to_np(std)
    if m.shape != s.shape:
        raise ValueError(f"latent statistics: mean has {m.size} values, std {s.size}")
    return m, s


def _train_statistics(model: Any, train_stats: Optional[TrainStats], train_latents: Optional[torch.Tensor],
                      train_data: Optional[str], num_train_images: int, batch_size: int,
                      device: str | torch.device) -> tuple[Optional[StatsPair], dict[str, Any]]:
    """The training set's per-channel statistics from whichever source was given, and a record of it."""
    given = [name for name, v in (("train_stats", train_stats), ("train_latents", train_latents),
                                  ("train_data", train_data)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one source of training statistics, got {', '.join(given)}")
    if train_stats is not None:
        if isinstance(train_stats, (str, Path)):
            return load_latent_stats(train_stats), {"train_stats_source": str(train_stats)}
        if isinstance(train_stats, Mapping):
            if "mean" not in train_stats or "std" not in train_stats:
                raise ValueError(f"train_stats needs 'mean' and 'std', got keys {sorted(train_stats)}")
            return _as_pair(train_stats["mean"], train_stats["std"]), {"train_stats_source": "given"}
        mean, std = train_stats
        return _as_pair(mean, std), {"train_stats_source": "given"}
    if train_latents is not None:
        return channel_stats(train_latents), {"train_stats_source": "train_latents",
                                              "num_train_images": int(train_latents.shape[0])}
    if train_data is not None:
        # VA-VAE measures its statistics on the cached (centre-cropped, unflipped) training latents
        z, _, _ = _encode(model, train_data, num_train_images, batch_size, device)
        return channel_stats(z), {"train_stats_source": f"train_data: {train_data}",
                                  "num_train_images": int(z.shape[0])}
    return None, {"train_stats_source": None}


def evaluate_latents(model: Any, data: Optional[str], *, protocol: str = "vavae", flip: Optional[bool] = None,
                     train_stats: Optional[TrainStats] = None, train_latents: Optional[torch.Tensor] = None,
                     train_data: Optional[str] = None, num_train_images: int = 10_000,
                     num_images: int = 10_000, num_points: int = 10_000, num_runs: int = 10, seed: int = 0,
                     iterations: int = 1000, perplexity: float = 30.0, tsne_seed: Optional[int] = None,
                     batch_size: int = 32, device: str | torch.device = "cpu", out_dir: Optional[str | Path] = None,
                     latents: Optional[torch.Tensor] = None,
                     latents_flip: Optional[torch.Tensor] = None, precision: Optional[str] = None) -> dict[str, Any]:
    """Density CV, Gini and normalised entropy of t-SNE-embedded latent vectors (mean and spread
    over ``num_runs`` seeds), plus the t-SNE scatter coloured by density when ``out_dir`` is given.

    Args:
        model: the tokenizer (``encode(x).mode()``); only used to encode, so None is fine when
            ``latents`` are given and no ``train_data``.
        data: evaluation images (folder or shards; None: the embedded held-out photos).
        protocol: ``"vavae"`` (default, Table 5): one random position per image per run;
            ``"pooled"``: positions pooled over images, normalised by the evaluated set's own
            statistics unless training statistics are given (this package's earlier protocol).
        flip: ``"vavae"`` only: draw each image as itself or, with probability 1/2, as the latent
            of its mirrored copy (VA-VAE). None: on when encoding ``data``; with ``latents``, on
            when ``latents_flip`` is given. True with ``latents`` needs ``latents_flip``.
        train_stats: training-set latent statistics: a path (latent cache folder, ``cache.json``,
            ``.npz`` or VA-VAE ``latents_stats.pt``; see :func:`load_latent_stats`), a mapping with
            ``mean`` / ``std``, or a ``(mean, std)`` pair of ``(C,)`` vectors.
        train_latents: training-set latents (N', C, H, W) to take the statistics from instead.
        train_data: training images (folder or shards) to encode (centre crop, ``num_train_images``
            spread evenly) and take the statistics from instead. Give at most one of the three;
            none: the evaluated latents' own statistics (``normalization: "eval-set"``).
        num_images: evaluation images to encode (ignored with ``latents``).
        num_points: points per run. With the VA-VAE protocol and fewer images than this, every
            image is used once per run (``all_images_each_run`` in the result); with ``"pooled"``
            and fewer positions, all positions. The perplexity is capped at ``(points - 1) / 3``
            (scikit-learn's limit); both are logged when they differ from the ones asked for.
        num_runs, seed, iterations, perplexity, tsne_seed: see
            :func:`~hieratok.metrics.uniformity.latent_uniformity`.
        batch_size, device: for encoding.
        out_dir: where to write ``latents.json`` and ``tsne.png``.
        latents: already encoded evaluation latents (N, C, H, W) (e.g. from :func:`encode_latents`).
        latents_flip: the latents of the same images mirrored (``encode_latents(..., mirror=True)``).
        precision: of the encoder calls (:mod:`hieratok.precision`; None: tf32 on CUDA, fp32 on CPU).

    Returns:
        The metrics and settings (``protocol``, ``normalization``, ``flip``, ``tsne_seed``,
        ``num_points`` used and ``num_points_requested``, ``perplexity``, ``iterations``,
        ``all_images_each_run``, ``train_stats_source``), ``num_images``, ``num_skipped``
        (unreadable images), ``latent_shape``, and the first run's ``points_2d`` / ``densities``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if latents_flip is not None and latents is None:
        raise ValueError("latents_flip needs the latents of the same (unmirrored) images")
    if protocol == "pooled" and (flip or (flip is None and latents_flip is not None)):
        raise ValueError("the pooled protocol draws no mirrored latents; use protocol='vavae' for flips")
    if latents is not None:
        use_flip = latents_flip is not None if flip is None else flip
        if use_flip and latents_flip is None:
            raise ValueError("flip=True with given latents needs latents_flip "
                             "(the mirrored images' latents: encode_latents(..., mirror=True))")
    else:
        use_flip = protocol == "vavae" if flip is None else flip
    prec = resolve_precision(precision, device)
    skipped = 0
    with inference_precision(prec, device):  # the encoder calls (latents come back as float32)
        stats, stats_info = _train_statistics(model, train_stats, train_latents, train_data, num_train_images,
                                              batch_size, device)
        if latents is None:
            latents, latents_flip, skipped = _encode(model, data, num_images, batch_size, device, mirror=use_flip)
    if not use_flip:
        latents_flip = None
    n_img, _, h, w = latents.shape
    available = n_img if protocol == "vavae" else n_img * h * w
    points = min(num_points, available)
    if points < 3:
        raise ValueError(f"{available} {'images' if protocol == 'vavae' else 'latent positions'} give too few points "
                         "for t-SNE and a KDE (at least 3): encode more images"
                         + (", or use protocol='pooled' (all positions of each image)" if protocol == "vavae" else ""))
    used_perplexity = min(perplexity, (points - 1) / 3)
    if (points, used_perplexity) != (num_points, perplexity):
        what = "images (one position each)" if protocol == "vavae" else "positions"
        log.warning("t-SNE on %d latent vectors with perplexity %.4g (asked: %d, %.4g): %d %s available",
                    points, used_perplexity, num_points, perplexity, available, what)
    mean, std = stats if stats is not None else (None, None)
    res = latent_uniformity(latents, protocol=protocol, latents_flip_NCHW=latents_flip, num_points=points,
                            num_runs=num_runs, seed=seed, iterations=iterations, perplexity=used_perplexity,
                            channel_mean=mean, channel_std=std, tsne_seed=tsne_seed,
                            num_threads=torch.get_num_threads())  # as many as torch uses (see train/threads.py)
    out = {**res.as_dict(), "num_points_requested": num_points,
           "all_images_each_run": protocol == "vavae" and points == n_img, **stats_info,
           "num_images": int(n_img), "num_skipped": skipped, "latent_shape": list(latents.shape[1:]), "precision": prec}
    arrays = {"points_2d": res.points_2d, "densities": res.densities}  # first run, for plots
    if out_dir is not None:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        per = "one per image" if protocol == "vavae" else "pooled positions"
        plot_tsne(res.points_2d, res.densities, d / "tsne.png",
                  title=f"t-SNE of {points} latent vectors, {per} (CV {res.cv[0]:.3f}, Gini {res.gini[0]:.3f})")
        (d / "latents.json").write_text(json.dumps(out, indent=2) + "\n")
        out["tsne_png"] = str(d / "tsne.png")
    return {**out, **arrays}
