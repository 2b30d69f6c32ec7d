"""Training diagnostics: what a tokenizer run logs so a user can see *why* it behaves as it does.

* :func:`posterior_stats` -- signal-to-noise of the KL posterior on the training batch (every
  step, on the device: the trainer reads it back with the other logs, no extra host sync).
* :func:`reconstruction_diagnostics` -- per-scale PSNR and the per-channel mean-colour error of
  reconstructions of a fixed held-out batch (every ``diag_every`` steps, rank 0).
* :func:`fixed_images` -- that batch: a deterministic choice of images from a dataset.

Shape legend: B batch, C channels (RGB), H height, W width, d latent channels, G latent grid.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import torch

from ..distributions import DiagonalGaussian
from ..losses.reconstruction import scale_targets
from ..metrics.image import color_error, psnr

__all__ = ["posterior_stats", "reconstruction_diagnostics", "fixed_images", "CHANNELS"]

CHANNELS = ("r", "g", "b")  # column suffixes of the per-channel colour error


def posterior_stats(posterior: DiagonalGaussian) -> dict[str, torch.Tensor]:
    """Signal-to-noise of a diagonal Gaussian posterior, detached, on its device.

    ``posterior_snr`` is mean |mu| / mean sigma over every latent element of the batch;
    ``posterior_snr_median`` the median of the element-wise |mu| / sigma (the typical element, not
    dominated by a few large-mean channels; torch's median, the lower middle value of an even
    count); ``posterior_std`` the mean sigma. A large SNR means the
    decoder sees nearly the posterior mean (the KL term barely regularises); an SNR near or below
    1 means the sampled latent is mostly noise.
    """
    mu_abs, std = posterior.mean.detach().float().abs(), posterior.std.detach().float()  # (B, d, G, G)
    return {"posterior_snr": mu_abs.mean() / std.mean(), "posterior_snr_median": (mu_abs / std).median(),
            "posterior_std": std.mean()}


def reconstruction_diagnostics(x_BCHW: torch.Tensor, recs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-scale PSNR and mean-colour error of reconstructions (coarse to fine) of ``x``.

    Keys (``s`` = a reconstruction's side in pixels, as in the loss's ``l1_s{size}``):

    * ``heldout_psnr_s{s}``: PSNR (dB, 8-bit, per image then averaged, an exact match scored at the
      floor, as :func:`hieratok.evaluate.evaluate_reconstruction` does) against the input
      area-downsampled to that size; NaN when the reconstruction is not finite.
    * ``heldout_color_err_{r,g,b}``: at the finest scale, |mean over pixels of (rec - x)| per image
      and channel, averaged over images, in the images' [-1, 1] units (directly comparable with the
      ``l1_s{size}`` columns: an error made only of a colour cast has colour error == L1); the raw
      reconstruction, not clamped.
    * ``heldout_color_err``: the mean of the three.

    Returns 0-d tensors on ``x``'s device (the PSNRs in float64, as :func:`~hieratok.metrics.psnr` computes them).
    """
    out: dict[str, torch.Tensor] = {}
    for rec, tgt in zip(recs, scale_targets(x_BCHW, [tuple(r.shape[-2:]) for r in recs])):
        rec = rec.float()
        finite = torch.isfinite(rec).all()
        # psnr refuses NaN/Inf (no 8-bit value): a diverged model scores NaN instead of stopping the run
        val = psnr(torch.nan_to_num(rec), tgt.float(), reduction="none", floor_mse=True).mean()  # float64
        out[f"heldout_psnr_s{rec.shape[-1]}"] = torch.where(finite, val, torch.full_like(val, float("nan")))
    cast_C = color_error(recs[-1], x_BCHW).mean(0)
    out.update({f"heldout_color_err_{c}": cast_C[i] for i, c in enumerate(CHANNELS[: cast_C.numel()])})
    out["heldout_color_err"] = cast_C.mean()
    return out


def fixed_images(dataset: Any, n: int) -> torch.Tensor:
    """``n`` images (B, C, H, W) chosen deterministically from ``dataset``: indices ``i * len // n``
    (spread over the whole set, e.g. over every held-out photo) of a sized dataset, the first ``n``
    readable ones of a stream. Unreadable items (``None``) are replaced by the next index; fewer
    than ``n`` come back when the data has fewer; an empty tensor when none is readable."""
    def image(item: Any) -> torch.Tensor:
        return item[0] if isinstance(item, (list, tuple)) else item

    got: list[torch.Tensor] = []
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        size, taken = len(dataset), set()
        for i in range(min(n, size)):
            j = i * size // n
            while j < size:
                item = None if j in taken else dataset[j]
                taken.add(j)
                if item is not None:
                    got.append(image(item))
                    break
                j += 1
    else:
        got = [image(item) for item in itertools.islice((s for s in dataset if s is not None), n)]
    return torch.stack(got) if got else torch.empty(0)
