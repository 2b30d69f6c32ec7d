"""Latent-space uniformity of a tokenizer (paper section 5.2, Table 5; the VA-VAE method)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Subset

from ..data import build_dataset, collate_drop_none
from ..metrics import latent_uniformity

__all__ = ["encode_latents", "evaluate_latents"]


@torch.no_grad()
def encode_latents(model: Any, data: Optional[str], num_images: int, batch_size: int = 32,
                   device: str | torch.device = "cpu", **data_kw: Any) -> torch.Tensor:
    """Posterior modes (N, d, G, G) of the first ``num_images`` evaluation images (ADM centre crop);
    ``data_kw`` go to :func:`~hieratok.data.build_dataset` (e.g. ``crops_per_photo``)."""
    ds = build_dataset(data, "eval", model.config.image_size, **data_kw)
    if hasattr(ds, "__len__"):
        ds = Subset(ds, list(range(min(num_images, len(ds)))))
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
    return torch.cat(out)[:num_images]


def evaluate_latents(model: Any, data: Optional[str], *, num_images: int = 10_000, num_points: int = 10_000,
                     num_runs: int = 10, seed: int = 0, iterations: int = 1000, perplexity: float = 30.0,
                     device: str | torch.device = "cpu", out_dir: Optional[str | Path] = None,
                     latents: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """Density CV, Gini and normalised entropy of t-SNE-embedded latent vectors (mean and spread
    over ``num_runs`` seeds), plus the t-SNE scatter coloured by density when ``out_dir`` is given.

    The points are per-position latent vectors; fewer positions than ``num_points`` use them all.
    """
    if latents is None:
        latents = encode_latents(model, data, num_images, device=device)
    n_pos = latents.shape[0] * latents.shape[2] * latents.shape[3]
    points = min(num_points, n_pos)
    res = latent_uniformity(latents, num_points=points, num_runs=num_runs, seed=seed, iterations=iterations,
                            perplexity=min(perplexity, (points - 1) / 3), num_threads=None)
    out = {**res.as_dict(), "num_images": int(latents.shape[0]), "latent_shape": list(latents.shape[1:])}
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
