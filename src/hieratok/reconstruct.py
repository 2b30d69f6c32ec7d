"""``hieratok reconstruct``: a tokenizer's reconstruction and per-scale pyramid of a user's images.

Two ways to fit an image of any size to the model:

- ``crop`` (default): the ADM centre crop to the model's size (the evaluation protocol);
- ``tile``: reflect-pad to a multiple of the model's size, reconstruct tile by tile, stitch and
  crop back, so the whole image at its own resolution is reconstructed (each scale of the pyramid
  is stitched the same way, at 1/16 ... 1/1 of the size for scales 1 ... 16).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from .data import center_crop_arr, load_rgb, pil_to_tensor, tensor_to_pil

__all__ = ["reconstruct_image", "reconstruct_files"]

log = logging.getLogger(__name__)


@torch.no_grad()
def reconstruct_image(model: Any, x_CHW: torch.Tensor, mode: str = "crop", batch_size: int = 8) -> list[torch.Tensor]:
    """Pyramid (coarse to fine) of one image in [-1, 1]; ``x`` must already be the model size for ``crop``."""
    size, p = model.config.image_size, model.config.patch_size
    dev = next(model.parameters()).device
    if mode == "crop":
        return [r[0].cpu() for r in model.decode(model.encode(x_CHW[None].to(dev)).mode(), all_scales=True)]
    if mode != "tile":
        raise ValueError(f"mode must be 'crop' or 'tile', got {mode!r}")
    _, H, W = x_CHW.shape
    nh, nw = -(-H // size), -(-W // size)
    pad = (0, nw * size - W, 0, nh * size - H)
    xp = F.pad(x_CHW[None], pad, mode="reflect" if min(H, W) > max(pad) else "replicate")[0]
    tiles = xp.unfold(1, size, size).unfold(2, size, size)  # (3, nh, nw, size, size)
    tiles = tiles.permute(1, 2, 0, 3, 4).reshape(nh * nw, 3, size, size)
    levels: list[list[torch.Tensor]] = []
    for i in range(0, tiles.shape[0], batch_size):
        pyr = model.decode(model.encode(tiles[i:i + batch_size].to(dev)).mode(), all_scales=True)
        levels.append([r.cpu() for r in pyr])
    out = []
    for k, s in enumerate(model.config.scales):
        t = torch.cat([lv[k] for lv in levels])  # (nh*nw, 3, s*p, s*p)
        side = s * p
        img = t.reshape(nh, nw, 3, side, side).permute(2, 0, 3, 1, 4).reshape(3, nh * side, nw * side)
        out.append(img[:, : round(H * side / size), : round(W * side / size)])
    return out


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
                      mode: str = "crop", overwrite: bool = False) -> list[Path]:
    """Write ``<stem>.recon.png`` and ``<stem>.pyramid.png`` (and ``<stem>.input.png`` for ``crop``)
    next to each image (or into ``out_dir``); returns the reconstruction files. An image given twice
    is reconstructed once; stems that would collide are numbered (:func:`_output_stems`); existing
    outputs are replaced only with ``overwrite``."""
    from .report import pyramid_strip

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
        pyr = reconstruct_image(model, x, mode)
        d.mkdir(parents=True, exist_ok=True)
        if mode == "crop":
            img.save(d / f"{stem}.input.png")
        tensor_to_pil(pyr[-1].clamp(-1, 1)).save(d / f"{stem}.recon.png")
        if len(pyr) > 1:
            pyramid_strip([p[None] for p in pyr], d / f"{stem}.pyramid.png")
        written.append(d / f"{stem}.recon.png")
        log.info("%s -> %s", path, written[-1])
    return written
