"""Reconstruction evaluation (paper Table 2 protocol).

Default protocol (what tokenizer papers report): ImageNet val, 50k images, ADM centre crop to the
model's size, reconstructions from the posterior mode, both images quantised to uint8 before every
metric; rFID between the Inception statistics of the originals and of the reconstructions, with
the standard FID Inception weights (the source is recorded); PSNR and SSIM per image, averaged
(an exact 8-bit match, inf dB by definition, is scored as one value off by one level,
``psnr(floor_mse=True)``, and counted in ``psnr_exact_matches``, so the mean stays finite);
LPIPS-VGG when its weights exist, else the offline EfficientNet-Lite0 distance under its own name.
For multi-scale models, PSNR of every scale against the input area-downsampled to that scale.
``color_error``: the mean over images and RGB channels of |mean(reconstruction) - mean(input)| (in
[-1, 1] units), a direct measure of colour casts. ``kid=True`` adds the Kernel Inception Distance
(:mod:`hieratok.metrics.kid`), which stays unbiased on the few hundred images a miniature has.

The ``num`` images are spread evenly over the whole data set (:func:`eval_indices`), not the first
``num`` in sorted order (which would cover only the first classes of a class-sorted folder).
Unreadable images are skipped (each is logged; the count is ``num_skipped``), never replaced by
another image, which would then be scored twice.

Under torchrun every rank evaluates a disjoint shard; sums and feature statistics are all-reduced.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from ..data import build_dataset, collate_drop_none
from ..losses.perceptual import build_perceptual
from ..losses.reconstruction import scale_targets
from ..metrics import (
    CodebookUsage,
    FeatureStats,
    InceptionFeatures,
    all_reduce_feature_stats,
    frechet_distance,
    kernel_inception_distance,
    psnr,
    ssim,
)
from ..metrics.image import color_error, quantize_to_uint8
from ..precision import inference_precision, resolve_precision
from ..report import Report, plot_per_scale_metric, pyramid_strip, reconstruction_grid, simple_table

__all__ = ["ReconEvalConfig", "evaluate_reconstruction", "write_recon_report"]

log = logging.getLogger(__name__)


@dataclass
class ReconEvalConfig:
    """Settings of a reconstruction evaluation (defaults: the paper protocol)."""

    data: Optional[str] = None  # image folder / shards; None = the embedded held-out photos
    num: int = 50_000  # images (fewer if the data has fewer)
    batch_size: int = 32
    perceptual: str = "auto"  # "auto" | "lpips-vgg" | "effnet-lite0" | "none"
    fid: bool = True
    kid: bool = False  # also the Kernel Inception Distance (single process: keeps the features)
    inception_weights: Optional[str] = None
    num_workers: int = 0
    keep_images: int = 8  # originals + pyramids kept for the report
    progress: bool = True
    crops_per_photo: int = 4  # embedded held-out photos only
    short_side: Optional[int] = None  # embedded photos only
    precision: Optional[str] = None  # the tokenizer's: fp32 | tf32 | bf16 | fp16 (None: tf32 on CUDA, fp32 on CPU)
    image_size: Optional[int] = None  # evaluate at this side (centre crops); None: the model's training size


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t


def eval_indices(length: int, num: int, rank: int = 0, world: int = 1) -> list[int]:
    """This rank's evaluation images among ``length``: ``n = min(num, length)`` indices spread evenly
    over the whole set (``i * length // n``; all of them when ``num >= length``), of which rank ``r``
    takes every ``world``-th from ``r``: ``n // world + (r < n % world)`` each, ``n`` in all."""
    n = min(num, length)
    return [i * length // n for i in range(rank, n, world)]


@torch.no_grad()
def evaluate_reconstruction(model: Any, cfg: ReconEvalConfig, device: str | torch.device = "cpu",
                            inception: Optional[InceptionFeatures] = None) -> dict[str, Any]:
    """Run the protocol on ``model`` (a HieraTok or ResTok in eval mode on ``device``).

    Returns:
        metrics (``rfid``, ``psnr``, ``ssim``, the perceptual distance under its own key, ``psnr_per_scale``),
        the names of the networks used, the number of images (``num_images``; ``num_skipped``
        unreadable ones for a folder or the embedded photos), and ``samples`` (kept originals and
        pyramids, CPU tensors) for reports. ``cfg.fid=False`` computes no rFID even when an
        ``inception`` extractor is passed.
    """
    device = torch.device(device)
    rank, world = _world()
    prec = resolve_precision(cfg.precision, device)  # the tokenizer only: Inception and LPIPS stay float32
    size = cfg.image_size or model.config.image_size
    if cfg.image_size is not None:
        model.check_image_size(size, size)  # a ValueError naming the size before any image is read
    # on_error="none": an unreadable image becomes None (dropped by the collate), not its neighbour
    ds = build_dataset(cfg.data, "eval", size, crops_per_photo=cfg.crops_per_photo, short_side=cfg.short_side,
                       on_error="none")
    indexable = hasattr(ds, "__len__")
    if indexable:
        length = len(ds)
        ds = Subset(ds, eval_indices(length, cfg.num, rank, world))
        quota = len(ds)
    else:  # a shard stream: every rank reads its share of cfg.num from its own shards
        quota = cfg.num // world + (rank < cfg.num % world)
    loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate_drop_none)
    perceptual, pname = None, "none"
    if cfg.perceptual != "none":
        perceptual, pname = build_perceptual(cfg.perceptual)
        perceptual = perceptual.to(device)
    if cfg.kid and world > 1:
        raise ValueError("kid=True keeps every Inception feature and runs in one process only")
    if not (cfg.fid or cfg.kid):
        inception = None
    elif inception is None:
        inception = InceptionFeatures(cfg.inception_weights).to(device)
    sides = model.output_sides()  # at another image_size: replaced by the first batch's output sides
    # psnr, ssim, perceptual, exact matches, colour error, per-scale psnr
    sums = torch.zeros(5 + len(sides), dtype=torch.float64, device=device)
    feats: dict[str, list[torch.Tensor]] = {"real": [], "fake": []}
    usage = None
    if model.codebook_size is not None:
        usage = CodebookUsage(model.codebook_size, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    real_stats, fake_stats = FeatureStats(), FeatureStats()
    kept_x: list[torch.Tensor] = []
    kept_pyr: list[list[torch.Tensor]] = []
    stride = max(1, quota // max(1, cfg.keep_images))  # keep images spread over the data
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=quota, desc="eval recon", unit="img", dynamic_ncols=True)
    seen = 0
    for batch in loader:
        if batch is None:
            continue
        x = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device)
        if seen + x.shape[0] > quota:
            x = x[: quota - seen]
        if x.shape[0] == 0:
            break
        with inference_precision(prec, device):
            pyr, idx = model.reconstruct(x)
        if seen == 0:
            sides = [r.shape[-1] for r in pyr]
        if usage is not None:
            usage.update(idx)
        # metrics are computed on what a user would save: 8-bit images (quantize_to_uint8 clamps
        # to [-1, 1] and raises on NaN/Inf, which a clamp here would hide)
        x_u8, rec_u8 = quantize_to_uint8(x), quantize_to_uint8(pyr[-1].float())
        sums[0] += psnr(rec_u8, x_u8, reduction="none", floor_mse=True).sum()
        sums[3] += (rec_u8 == x_u8).flatten(1).all(1).sum()
        sums[1] += ssim(rec_u8, x_u8, reduction="none").sum()
        sums[4] += color_error(rec_u8, x_u8).mean(1).sum()
        if perceptual is not None:
            to_pm1 = lambda u8: u8.float() / 127.5 - 1.0  # noqa: E731
            sums[2] += perceptual(to_pm1(rec_u8), to_pm1(x_u8)).double().sum()
        for k, (rec, tgt) in enumerate(zip(pyr, scale_targets(x, [r.shape[-1] for r in pyr]))):
            sums[5 + k] += psnr(rec.float(), tgt, reduction="none", floor_mse=True).sum()
        if inception is not None:
            fr, ff = inception(x_u8), inception(rec_u8)
            real_stats.update(fr)
            fake_stats.update(ff)
            if cfg.kid:
                feats["real"].append(fr.double().cpu())
                feats["fake"].append(ff.double().cpu())
        count += x.shape[0]
        keep = [j for j in range(x.shape[0]) if (seen + j) % stride == 0]
        if keep and sum(t.shape[0] for t in kept_x) < cfg.keep_images:
            kept_x.append(x[keep].cpu())
            kept_pyr.append([p[keep].float().cpu() for p in pyr])
        seen += x.shape[0]
        if bar is not None:
            bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    short = torch.tensor(float(quota), dtype=torch.float64, device=device) - count  # unreadable, or no more data
    _all_reduce_sum(sums)
    _all_reduce_sum(count)
    _all_reduce_sum(short)
    total, short_total = int(count.item()), int(short.item())
    data_name = cfg.data or "the embedded held-out photos"
    if total == 0:
        raise ValueError(f"no readable images in {data_name}")
    if total != cfg.num and rank == 0:
        why = [f"{data_name} holds {length} images"] if indexable and length < cfg.num else []
        if short_total:
            why.append(f"{short_total} unreadable image(s) skipped" if indexable else "the shards ran out")
        log.warning("evaluated %d images instead of num=%d: %s", total, cfg.num, "; ".join(why))
    avg = (sums / total).tolist()
    out: dict[str, Any] = {"num_images": total, "psnr": avg[0], "ssim": avg[1], "color_error": avg[4],
                           "psnr_exact_matches": int(sums[3].item()), "psnr_per_scale": dict(zip(sides, avg[5:])),
                           "perceptual_name": pname, "data": cfg.data or "embedded held-out photos"}
    if indexable:  # a shard stream reads on past a skipped sample; the dataset logs each one
        out["num_skipped"] = short_total
    if perceptual is not None:
        out[pname] = avg[2]
    if usage is not None:  # ResTok Table: codebook usage and entropy H_C
        st = usage.all_reduce_().compute()
        out.update(codebook_usage=st.usage, codebook_entropy_bits=st.entropy_bits, codebook_perplexity=st.perplexity,
                   codebook_normalized_entropy=st.normalized_entropy)
    if inception is not None:
        if world > 1:
            all_reduce_feature_stats(real_stats)
            all_reduce_feature_stats(fake_stats)
        if total < 2:
            log.warning("rFID needs at least 2 images; skipped")
        elif cfg.fid:
            r, f = real_stats.to_gaussian(), fake_stats.to_gaussian()
            out["rfid"] = float(frechet_distance(r.mu, r.sigma, f.mu, f.sigma))
            if total < 2048:
                out["rfid_note"] = (f"rFID on {total} images (< 2048 feature dimensions): a biased, rank-deficient "
                                    "estimate, comparable only with the same number of images")
        if cfg.kid and total >= 2:
            out["rkid"], out["rkid_std"] = kernel_inception_distance(torch.cat(feats["real"]), torch.cat(feats["fake"]))
        out["inception_source"] = inception.source
    k = cfg.keep_images
    out["samples"] = {"inputs": torch.cat(kept_x)[:k] if kept_x else None,
                      "pyramids": [torch.cat(level)[:k] for level in zip(*kept_pyr)] if kept_pyr else None}
    out["protocol"] = {**asdict(cfg), "precision": prec}
    return out


def write_recon_report(result: dict[str, Any], out_dir: str | Path, title: str = "Reconstruction", info: Optional[dict] = None) -> Path:
    """``metrics.json`` + ``report.html``/``report.md`` with the grid, pyramid strips and per-scale PSNR."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {k: v for k, v in result.items() if k != "samples"}
    if info:
        metrics["checkpoint"] = info
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    rep = Report(title)
    pname = result.get("perceptual_name", "none")
    row = {"rFID": result.get("rfid"), "PSNR": result["psnr"], "SSIM": result["ssim"]}
    if "rkid" in result:
        row["rKID"] = result["rkid"]
    if "color_error" in result:
        row["colour error"] = result["color_error"]
    if pname != "none":
        row[pname] = result.get(pname)
    rep.add_heading("Metrics")
    rep.add_table(simple_table([{"": "model", **row}], floatfmt=".4f"))
    notes = {"images": result["num_images"], "data": result["data"], "perceptual": pname,
             "inception weights": result.get("inception_source", "not computed")}
    if result.get("num_skipped"):
        notes["unreadable images skipped"] = result["num_skipped"]
    if "rfid_note" in result:
        notes["note"] = result["rfid_note"]
    if info:
        notes.update(info)
    if "codebook_usage" in result:
        notes["codebook usage"] = f"{result['codebook_usage']:.1%}"
        notes["codebook entropy H_C (bits)"] = round(result["codebook_entropy_bits"], 3)
    rep.add_key_values(notes, title="Protocol")
    s = result.get("samples") or {}
    if s.get("inputs") is not None:
        reconstruction_grid(s["inputs"], {"recon": s["pyramids"]}, out / "reconstructions.png")
        rep.add_image(out / "reconstructions.png", "input, then the reconstruction at every scale (coarse to fine)")
        pyramid_strip([p[0] for p in s["pyramids"]], out / "pyramid.png")
        rep.add_image(out / "pyramid.png", "the multi-scale pyramid of the first image")
    if len(result["psnr_per_scale"]) > 1:
        sizes = list(result["psnr_per_scale"])
        plot_per_scale_metric({"model": list(result["psnr_per_scale"].values())}, sizes, out / "psnr_per_scale.png", "PSNR (dB)")
        rep.add_image(out / "psnr_per_scale.png", "PSNR of every scale against the input downsampled to its size")
    rep.write(out)
    return out / "report.html"
