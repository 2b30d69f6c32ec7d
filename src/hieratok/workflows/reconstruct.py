"""``hieratok reconstruct``: a tokenizer's reconstruction and per-scale pyramid of a user's images.

Ways to fit an image of any size to the model:

- ``crop`` (default): the ADM centre crop to the model's size (the evaluation protocol);
- ``full``: the whole image at once at its own size and aspect (reflect-padded to a multiple of
  the patch size, cropped back): the model resamples its positions to the grid;
- ``tile``: overlapping tiles of the model's size (``tile`` / ``overlap`` pixels), blended
  linearly in pixel space (:mod:`hieratok.tokenizers.tiling`), so a large image costs
  memory per tile and shows no seams; every scale of the pyramid is blended the same way;
- ``auto``: ``full`` up to ``max_pixels`` (default 16 training-size images), ``tile`` above.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..data import center_crop_arr, load_rgb, pil_to_tensor, tensor_to_pil
from ..report import pyramid_strip
from ..tokenizers.tiling import tiled_reconstruct

__all__ = ["reconstruct_image", "reconstruct_files"]

log = logging.getLogger(__name__)


MODES = ("crop", "full", "tile", "auto")


@torch.no_grad()
def reconstruct_image(model: Any, x_CHW: torch.Tensor, mode: str = "crop", batch_size: int = 8,
                      tile: Optional[int] = None, overlap: Optional[int] = None,
                      max_pixels: Optional[int] = None) -> list[torch.Tensor]:
    """Pyramid (coarse to fine) of one image in [-1, 1] (see the module docstring for ``mode``);
    ``x`` must already be the model size for ``crop``. ``tile`` / ``overlap``: the tiles' side and
    blending width in pixels (default: the model's size and a quarter of it)."""
    size, p = model.config.image_size, model.config.patch_size
    dev = next(model.parameters()).device
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _, H, W = x_CHW.shape
    if mode == "auto":
        mode = "full" if H * W <= (max_pixels or 16 * size * size) else "tile"
    if mode == "tile":
        return [r[0] for r in tiled_reconstruct(model, x_CHW[None], tile or size, overlap, batch_size)]
    if mode == "full":  # reflect-pad to a multiple of the patch, crop every scale back
        ph, pw = -H % p, -W % p
        x_CHW = F.pad(x_CHW[None], (0, pw, 0, ph), mode="reflect" if min(H, W) > max(ph, pw) else "replicate")[0]
    pyr = model.decode(model.encode(x_CHW[None].to(dev)).mode(), all_scales=True)
    Hp, Wp = x_CHW.shape[-2:]
    return [r[0, :, : round(H * r.shape[-2] / Hp), : round(W * r.shape[-1] / Wp)].cpu() for r in pyr]


def _output_stems(paths: Sequence[Path], out_dir: Optional[str | Path]) -> list[tuple[Path, str]]:
    """(output folder, name stem) per input, unique: inputs of one stem that land in one folder
    (``a/x.png`` and ``b/x.jpg`` into ``--out``) are numbered ``x-1``, ``x-2`` in input order."""
    targets = [(Path(out_dir) if out_dir else p.parent, p.stem) for p in paths]
    counts: dict[tuple[Path, str], int] = {}
    for t in targets:
        counts[t] = counts.get(t, 0) + 1
    seen: dict[tuple[Path, str], int] = {}
    out = []
    for d, stem in targets:
        if counts[(d, stem)] > 1:
            seen[(d, stem)] = seen.get((d, stem), 0) + 1
            stem = f"{stem}-{seen[(d, stem)]}"
        out.append((d, stem))
    return out


def reconstruct_files(model: Any, paths: Sequence[str | Path], out_dir: Optional[str | Path] = None,
                      mode: str = "crop", overwrite: bool = False, tile: Optional[int] = None,
                      overlap: Optional[int] = None) -> list[Path]:
    """Write ``<stem>.recon.png`` and ``<stem>.pyramid.png`` (and ``<stem>.input.png`` for ``crop``)
    next to each image (or into ``out_dir``); returns the reconstruction files. An image given twice
    is reconstructed once; stems that would collide are numbered (:func:`_output_stems`); existing
    outputs are replaced only with ``overwrite``."""

    unique: dict[Path, Path] = {}
    for p in map(Path, paths):
        unique.setdefault(p.resolve(), p)
    paths = list(unique.values())
    names = _output_stems(paths, out_dir)
    if not overwrite:
        for d, stem in names:
            existing = [d / f"{stem}.{k}.png" for k in ("recon", "pyramid", "input") if (d / f"{stem}.{k}.png").exists()]
            if existing:
                raise ValueError(f"{existing[0]} exists: pass --overwrite to replace it, or --out another folder")
    written = []
    for path, (d, stem) in zip(paths, names):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        img = load_rgb(path)  # raises UnreadableImageError (a ValueError) with the file name
        if mode == "crop":
            img = center_crop_arr(img, model.config.image_size)
        x = pil_to_tensor(img)
        pyr = reconstruct_image(model, x, mode, tile=tile, overlap=overlap)
        d.mkdir(parents=True, exist_ok=True)
        if mode == "crop":
            img.save(d / f"{stem}.input.png")
        tensor_to_pil(pyr[-1].clamp(-1, 1)).save(d / f"{stem}.recon.png")
        if len(pyr) > 1:
            pyramid_strip([p[None] for p in pyr], d / f"{stem}.pyramid.png")
        written.append(d / f"{stem}.recon.png")
        log.info("%s -> %s", path, written[-1])
    return written
