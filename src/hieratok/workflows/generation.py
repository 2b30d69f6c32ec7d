"""Generation workflow: cache latents/codes, sample a trained generator, evaluate samples.

    hieratok cache-latents --checkpoint TOK --data PATH --out CACHE [--flip | --ten-crop]
    hieratok train --task dit --data CACHE --preset dit-xl          (or --task ar --preset gpt-l)
    hieratok sample --generator RUN --num 50000 --cfg 1.0 --seed 0 --out SAMPLES [--all-scales]
    hieratok eval gen SAMPLES --ref VIRTUAL_imagenet256_labeled.npz

Sampling is deterministic per seed: sample ``i`` belongs to batch ``i // batch_size``, whose noise
comes from a generator seeded by (seed, batch); under torchrun rank ``r`` takes the batches
``b % world == r``, so ranks draw disjoint seeds and the result does not depend on the world size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..config import config_from_dict, settings_diff
from ..data import EmbeddedPhotos, build_dataset, tensor_to_pil
from ..data.latent_cache import finalize_cache, read_cache_meta, write_cache
from ..generators import GeneratorObjective, sample_latents
from ..generators.autoregressive import ARObjective, sample_layout
from ..hub import CONFIG_NAME, read_json, write_atomic
from ..metrics import InceptionFeatures, adm_metrics
from ..precision import inference_precision, resolve_precision
from ..registry import GENERATORS, TOKENIZERS, load_model, model_class
from ..report import pyramid_strip
from ..train.parallel import barrier

__all__ = ["cache_latents", "sample_batch", "sample_to_folder", "write_npz", "evaluate_generation"]

log = logging.getLogger(__name__)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def cache_latents(tokenizer: str, data: Optional[str], out: str, *, flip: bool = False, num: Optional[int] = None,
                  batch_size: int = 64, shard_size: int = 4096, device: str = "cpu", num_workers: int = 0,
                  progress: bool = True, ten_crop: bool = False, crop_range: float = 1.1,
                  precision: Optional[str] = None, update_tokenizer: bool = False) -> dict[str, Any]:
    """Encode a dataset with a tokenizer into a cache (latents for HieraTok or a ``diffusers:<dir>``
    AutoencoderKL, codes for ResTok).

    Images: ImageNet-style folders / shards with the ADM centre crop (labels from class folders);
    without ``data``, ``num`` (default 512) deterministic crops of the embedded training photos,
    labelled by photo. ``ten_crop``: LlamaGen's code extraction (ResTok's release): the centre
    crop is ``int(size * crop_range)`` and each image stores the ten ``TenCrop(size)`` views.
    ``precision``: of the tokenizer (:mod:`hieratok.precision`); latents are stored as float32.
    ``update_tokenizer``: also write the latents' per-channel mean / std into the tokenizer
    folder's ``config.json`` (``latent_mean`` / ``latent_std``, read by
    :func:`hieratok.interop.diffusers.as_diffusers_vae`); the command never owns that folder, so
    it is written only on request (a local HieraTok folder; statistics there are replaced, logged).
    """
    from torch.utils.data import Subset


    tok, tok_info = load_model(tokenizer, device=device, expect=TOKENIZERS)
    prec = resolve_precision(precision, device)

    def tokenize(x: torch.Tensor) -> torch.Tensor:
        with inference_precision(prec, device):
            v = tok.tokenize(x)
        return v.float() if v.is_floating_point() else v

    if update_tokenizer:  # refused before anything is encoded
        _check_stats_target(tokenizer, tok_info)
    size = tok.config.image_size
    if ten_crop and not crop_range >= 1.0:
        raise ValueError(f"crop_range must be >= 1 (the crop before TenCrop is crop_range x {size}), got {crop_range}")
    load = int(size * crop_range) if ten_crop else size
    if data is None:
        ds = EmbeddedPhotos("train", load, length=num or 512, seed=0, hflip=False, short_side=2 * size)
    else:
        ds = build_dataset(data, "eval", load)
        if num is not None and hasattr(ds, "__len__"):
            ds = Subset(ds, list(range(min(num, len(ds)))))
    if not hasattr(ds, "__len__"):
        raise ValueError(f"{data}: caching needs an indexable dataset (an image folder); shards are not supported yet")
    kind = "latents" if tok.codebook_size is None else "codes"
    rank, world = _world()
    write_cache(tokenize, ds, out, kind=kind, flip=flip, ten_crop_size=size if ten_crop else None,
                shard_size=shard_size, batch_size=batch_size, num_workers=num_workers, device=device, rank=rank,
                world_size=world, progress=progress,
                source={"tokenizer": tok_info["source"], "tokenizer_weights": tok_info["weights"],
                        "data": None if data is None else str(Path(data).resolve()), "crop_range": crop_range if ten_crop else None,
                        "precision": prec})
    barrier()
    meta: dict[str, Any] = {}
    if rank == 0:
        meta = {"tokenizer": tok_info["source"], "tokenizer_type": tok.model_type,
                "tokenizer_weights": tok_info["weights"], "image_size": size, "flip": flip,
                "views": 10 if ten_crop else 1, "data": data or "embedded photos (train)", "precision": prec}
        if ten_crop:
            meta["ten_crop"] = {"crop_size": load, "crop_range": crop_range}
        if tok.codebook_size is not None:
            meta["codebook_size"] = tok.codebook_size
        meta = finalize_cache(out, meta)
        log.info("cached %d %s of shape %s in %s", meta["num"], kind, meta["shape"], out)
        if update_tokenizer:
            _write_latent_stats(Path(tok_info["model_dir"]), meta["mean"], meta["std"], out)
    barrier()
    return meta


def _check_stats_target(tokenizer: str, tok_info: dict[str, Any]) -> None:
    """ValueError unless ``tokenizer`` is a local HieraTok folder that can take latent statistics."""
    if tok_info["model_type"] != "hieratok":
        raise ValueError(f"--update-tokenizer writes latent statistics into a HieraTok config; {tokenizer} is "
                         f"{tok_info['model_type']!r} (ResTok caches codes; a diffusers VAE keeps its own scaling)")
    if not Path(tokenizer).expanduser().exists():
        raise ValueError(f"--update-tokenizer: {tokenizer} is a Hub repo in the cache, which is not written to; "
                         "save the model to a folder and cache with that")


def _write_latent_stats(model_dir: Path, mean: list[float], std: list[float], cache: str) -> None:
    """Set ``latent_mean`` / ``latent_std`` in ``model_dir/config.json`` (checked, written atomically)."""

    path = model_dir / CONFIG_NAME
    meta = read_json(path)
    old = {k: meta.get(k) for k in ("latent_mean", "latent_std") if meta.get(k) is not None}
    meta.update(latent_mean=list(mean), latent_std=list(std))
    cls = model_class(meta["model_type"])
    config_from_dict(cls.config_class, {k: v for k, v in meta.items() if k not in ("model_type", "hieratok_version")})
    write_atomic(path, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    log.info("latent statistics of %s written into %s%s", cache, path, f" (replacing {old})" if old else "")


def sample_batch(b: int, num: int, batch_size: int, num_classes: int, seed: int,
                 device: torch.device | str = "cpu") -> tuple[list[int], torch.Tensor, torch.Generator]:
    """Sample indices, class labels (index mod ``num_classes``) and random source of batch ``b`` of a
    :func:`sample_to_folder` run: a pure function of these, whichever rank draws the batch."""
    idx = list(range(b * batch_size, min(num, (b + 1) * batch_size)))
    labels = torch.tensor([i % num_classes for i in idx], device=device)
    return idx, labels, torch.Generator().manual_seed(seed * 1_000_003 + b)


@torch.no_grad()
def sample_to_folder(generator_path: str, out: str, *, tokenizer: Optional[str] = None, num: int = 50_000,
                     cfg_scale: float = 1.0, seed: int = 0, batch_size: int = 32, steps: Optional[int] = None,
                     all_scales: bool = False, device: str = "cpu", progress: bool = True,
                     top_p: Optional[float] = None, top_k: Optional[int] = None, temperature: Optional[float] = None,
                     cfg_schedule: Optional[str] = None, precision: Optional[str] = None) -> Path:
    """Generate ``num`` images as PNGs (and pyramids) plus an ADM-format ``samples.npz``; returns the npz path.

    ``precision``: of the generator and the decoding tokenizer (:mod:`hieratok.precision`; default
    tf32 on CUDA, fp32 on CPU), recorded in ``sampling.json``.
    """

    model, info = load_model(generator_path, device=device, expect=GENERATORS)
    prec = resolve_precision(precision, device)
    tc = info["train_config"]
    tok_path = tokenizer or tc.get("tokenizer")
    if tok_path is None and tc.get("data", {}).get("path") and Path(tc["data"]["path"]).is_dir():
        tok_path = read_cache_meta(tc["data"]["path"]).get("tokenizer")
    if tok_path is None:
        raise ValueError("no tokenizer to decode the samples: pass --tokenizer")
    tok, _ = load_model(tok_path, device=device, expect=TOKENIZERS)
    if all_scales and len(tok.output_sides()) < 2:
        raise ValueError("--all-scales needs a multi-scale tokenizer")
    if info["model_type"] != "dit":  # a GPT over codes: N is the code count of the ResTok that decodes them

        if tok.codebook_size is None:
            raise ValueError(f"{tok_path}: a GPT generator samples codes, which only a discrete tokenizer (ResTok) decodes")
        ar_obj = ARObjective.from_dict(tc.get("objective", {}))
        layout = ar_obj.sequence_layout(tok.config.num_latent_tokens)
        ar_kw = ar_obj.sampling_kwargs(top_p=top_p, top_k=top_k, temperature=temperature, cfg_schedule=cfg_schedule)
    out_dir = Path(out)
    rank, world = _world()
    settings = {"generator": info["model_dir"], "tokenizer": str(tok_path), "num": num, "cfg_scale": cfg_scale,
                "seed": seed, "batch_size": batch_size, "steps": steps, "all_scales": all_scales, "top_p": top_p,
                "top_k": top_k, "temperature": temperature, "cfg_schedule": cfg_schedule,
                "objective": tc.get("objective", {}), "precision": prec}
    _check_resume(out_dir, settings)  # every rank, before rank 0 writes
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    if all_scales:
        (out_dir / "pyramids").mkdir(exist_ok=True)
    if rank == 0:
        write_atomic(out_dir / "sampling.json", lambda p: p.write_text(json.dumps(settings, indent=2)))
    barrier()
    num_classes = model.config.num_classes
    batches = [b for b in range((num + batch_size - 1) // batch_size) if b % world == rank]
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches) * batch_size, desc="sample", unit="img", dynamic_ncols=True)
    for b in batches:
        idx, labels, g = sample_batch(b, num, batch_size, num_classes, seed, device)
        if all((out_dir / "images" / f"{i:06d}.png").is_file() for i in idx):  # resume
            continue
        with inference_precision(prec, device):
            if info["model_type"] == "dit":
                obj = GeneratorObjective(**tc.get("objective", {}))
                z = sample_latents(model, obj, labels, cfg_scale, g, num_steps=steps)
            else:
                z = sample_layout(model, labels, layout, cfg_scale=cfg_scale, generator=g, **ar_kw).codes
            pyr = tok.detokenize(z, all_scales=True) if all_scales else [tok.detokenize(z)]
        imgs = pyr[-1]
        if all_scales:
            for j, i in enumerate(idx):
                pyramid_strip([p[j:j + 1].float().cpu() for p in pyr], out_dir / "pyramids" / f"{i:06d}.png")
        for j, i in enumerate(idx):  # atomic: a killed run never leaves a truncated PNG that counts as done
            img = tensor_to_pil(imgs[j].float().clamp(-1, 1).cpu())
            write_atomic(out_dir / "images" / f"{i:06d}.png", lambda p: img.save(p, format="PNG"))
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    barrier()
    npz = out_dir / "samples.npz"
    if rank == 0:
        write_npz(out_dir / "images", npz, num, labels=[i % num_classes for i in range(num)])
    barrier()
    return npz


def _check_resume(out_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to add samples to a folder whose images came from other settings (``num`` may differ).

    Raises:
        ValueError: naming the differing keys of ``sampling.json``, or when ``images/`` holds PNGs
            but there is no ``sampling.json`` to tell where they came from.
    """
    path = out_dir / "sampling.json"
    if not path.is_file():
        if any((out_dir / "images").glob("*.png")):
            raise ValueError(f"{out_dir / 'images'} holds PNGs but {path} is missing, so resuming cannot check they "
                             "come from the same generator and settings; sample into an empty folder")
        return
    diff = settings_diff(read_json(path), settings, ignore=("num",))
    if diff:
        raise ValueError(f"{out_dir} holds samples made with other settings ({'; '.join(diff)}): sample into another folder")


def write_npz(folder: Path, path: Path, num: int, labels: Optional[list[int]] = None) -> Path:
    """ADM-format sample batch: ``arr_0`` uint8 (N, H, W, 3) (+ ``arr_1`` labels), written atomically."""
    from PIL import Image

    arr = np.stack([np.asarray(Image.open(folder / f"{i:06d}.png").convert("RGB")) for i in range(num)])
    extra = {"arr_1": np.asarray(labels, dtype=np.int64)} if labels is not None else {}

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
            np.savez(f, arr_0=arr, **extra)

    write_atomic(path, save)
    return path


def evaluate_generation(samples: str, ref: str, *, out: Optional[str] = None, inception_weights: Optional[str] = None,
                        device: str = "cpu", batch_size: int = 50, precision_and_recall: bool = True,
                        save_stats: Optional[str] = None, progress: bool = True) -> dict[str, Any]:
    """The ADM evaluator's numbers of samples (folder or npz) against a reference (ADM reference batch or
    statistics npz, images npz or folder): gFID, sFID, precision, recall and, when the Inception
    classifier head is available, IS (otherwise ``is_unavailable`` says which file to add), from one
    Inception pass over the samples (:func:`hieratok.metrics.adm_metrics`). Writes ``gen_metrics.json``."""

    extractor = InceptionFeatures(inception_weights).to(torch.device(device))
    out_d = adm_metrics(samples, ref, extractor, batch_size=batch_size, precision_and_recall=precision_and_recall,
                        save_stats=save_stats, progress=progress)
    p = Path(samples)
    dest = Path(out) if out else (p if p.is_dir() else p.parent)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "gen_metrics.json").write_text(json.dumps(out_d, indent=2) + "\n")
    return out_d
