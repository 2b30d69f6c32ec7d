"""Latent-space uniformity of a tokenizer (paper section 5.2, Table 5; the VA-VAE method)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Subset

from ..data import build_dataset, collate_drop_none
from ..metrics import latent_uniformity
from .recon import eval_indices

__all__ = ["encode_latents", "evaluate_latents"]

log = logging.getLogger(__name__)


@torch.no_grad()
def _encode(model: Any, data: Optional[str], num_images: int, batch_size: int = 32,
            device: str | torch.device = "cpu", **data_kw: Any) -> tuple[torch.Tensor, int]:
    """(latents, number of unreadable images skipped) of :func:`encode_latents`."""
    # on_error="none": an unreadable image is dropped, not replaced by its neighbour (counted twice)
    ds = build_dataset(data, "eval", model.config.image_size, on_error="none", **data_kw)
    wanted = num_images
    if hasattr(ds, "__len__"):
        ds = Subset(ds, eval_indices(len(ds), num_images))
        wanted = len(ds)
    out, n = [], 0
    for batch in DataLoader(ds, batch_size=batch_size, collate_fn=collate_drop_none):
        if batch is None:
            continue
        x = batch[0].to(device)
        out.append(model.encode(x).mode().float().cpu())
        n += x.shape[0]
        if n >= num_images:
            break
    if not out:
        raise ValueError(f"no readable images in {data or 'the embedded held-out photos'}")
    z = torch.cat(out)[:num_images]
    skipped = wanted - z.shape[0] if isinstance(ds, Subset) else 0  # a shard stream reads on past them
    if skipped:
        log.warning("%d unreadable image(s) skipped; %d encoded", skipped, z.shape[0])
    return z, skipped


def encode_latents(model: Any, data: Optional[str], num_images: int, batch_size: int = 32,
                   device: str | torch.device = "cpu", **data_kw: Any) -> torch.Tensor:
    """Posterior modes (N, d, G, G) of ``num_images`` evaluation images (ADM centre crop) spread
    evenly over the data set (:func:`~hieratok.evaluate.recon.eval_indices`); unreadable images
    are skipped with a warning, so N can be smaller. ``data_kw`` go to
    :func:`~hieratok.data.build_dataset` (e.g. ``crops_per_photo``)."""
    return _encode(model, data, num_images, batch_size, device, **data_kw)[0]


def evaluate_latents(model: Any, data: Optional[str], *, num_images: int = 10_000, num_points: int = 10_000,
                     num_runs: int = 10, seed: int = 0, iterations: int = 1000, perplexity: float = 30.0,
                     device: str | torch.device = "cpu", out_dir: Optional[str | Path] = None,
                     latents: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """Density CV, Gini and normalised entropy of t-SNE-embedded latent vectors (mean and spread
    over ``num_runs`` seeds), plus the t-SNE scatter coloured by density when ``out_dir`` is given.

    The points are per-position latent vectors; fewer positions than ``num_points`` use them all,
    and the perplexity is capped at ``(points - 1) / 3`` (scikit-learn's limit). The settings used
    (``num_points``, ``perplexity``, ``iterations``) are in the output, with a warning when they
    differ from the ones asked for; ``num_skipped`` counts unreadable images.
    """
    skipped = 0
    if latents is None:
        latents, skipped = _encode(model, data, num_images, device=device)
    n_pos = latents.shape[0] * latents.shape[2] * latents.shape[3]
    points = min(num_points, n_pos)
    used_perplexity = min(perplexity, (points - 1) / 3)
    if (points, used_perplexity) != (num_points, perplexity):
        log.warning("t-SNE on %d latent vectors with perplexity %.4g (asked: %d, %.4g): %d positions available",
                    points, used_perplexity, num_points, perplexity, n_pos)
    res = latent_uniformity(latents, num_points=points, num_runs=num_runs, seed=seed, iterations=iterations,
                            perplexity=used_perplexity, num_threads=None)
    out = {**res.as_dict(), "num_images": int(latents.shape[0]), "num_skipped": skipped,
           "latent_shape": list(latents.shape[1:])}
    arrays = {"points_2d": res.points_2d, "densities": res.densities}  # first run, for plots
    if out_dir is not None:
        from ..report import plot_tsne

        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        plot_tsne(res.points_2d, res.densities, d / "tsne.png",
                  title=f"t-SNE of {points} latent vectors (CV {res.cv[0]:.3f}, Gini {res.gini[0]:.3f})")
        (d / "latents.json").write_text(json.dumps(out, indent=2) + "\n")
        out["tsne_png"] = str(d / "tsne.png")
    return {**out, **arrays}
