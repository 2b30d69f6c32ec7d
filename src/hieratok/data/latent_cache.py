"""Latent / code caches: a dataset encoded once by a tokenizer, for generator training.

    <cache>/cache.json                 what was encoded, by which tokenizer, shapes, statistics
    <cache>/cache_plan.json            the settings the shards are written with (checked on resume)
    <cache>/shard-00000.safetensors    "latents" (n, C, H, W) float32 or "codes" (n, N) int64, and "labels" (n,)

Shard ``k`` holds dataset items ``[k * shard_size, (k + 1) * shard_size)`` (and, with flips, their
mirrored copies right after them), so the cache is deterministic. With ten-crop views (LlamaGen's
code extraction: images centre-cropped to ``crop_range`` times the size, then torchvision's
``TenCrop``) every item stores its ten encodings, "codes" (n, 10, N) / "latents" (n, 10, C, H, W),
and :class:`LatentCacheDataset` returns one view per access, drawn uniformly. Under torchrun rank ``r``
writes the shards ``k % world == r``; every shard is written under a temporary name and renamed,
and shards already present are skipped, so an interrupted run resumes where it stopped.
Per-channel mean and std of the latents are stored in ``cache.json``: the generator normalises
with them and its checkpoint keeps them (no bare scale constants).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import settings_diff
from ..hub import read_json, write_atomic
from .datasets import collate_drop_none
from .transforms import ten_crop

__all__ = ["write_cache", "finalize_cache", "read_cache_meta", "LatentCacheDataset", "CACHE_META", "CACHE_PLAN"]

log = logging.getLogger(__name__)
CACHE_META = "cache.json"
CACHE_PLAN = "cache_plan.json"


def _shard_path(out: Path, k: int) -> Path:
    return out / f"shard-{k:05d}.safetensors"


@torch.no_grad()
def write_cache(
    encode: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    out_dir: str | Path,
    *,
    kind: str = "latents",
    flip: bool = False,
    ten_crop_size: Optional[int] = None,
    shard_size: int = 4096,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    source: Optional[dict[str, Any]] = None,
) -> list[Path]:
    """Encode ``dataset`` ((image, label) items) into shards; returns the shards this rank wrote.

    The first call writes ``cache_plan.json`` (``source``, kind, views, shard size, item count);
    a call into a folder whose plan differs is a ValueError, so an interrupted cache resumes only
    with the settings it was started with and two caches never mix.

    Args:
        encode: images (B, 3, H, W) in [-1, 1] -> latents (B, C, H', W') or codes (B, N).
        kind: "latents" or "codes" (the tensor name in the shards).
        flip: also store the horizontally flipped copy of every image (same label).
        ten_crop_size: store the ten ``TenCrop(ten_crop_size)`` views of every (larger) image
            instead, as one item with a view axis.
        source: JSON-ready identity of what is encoded (tokenizer path and weights, data path),
            part of the plan.
    """
    if kind not in ("latents", "codes"):
        raise ValueError(f"kind must be 'latents' or 'codes', got {kind!r}")
    if flip and ten_crop_size:
        raise ValueError("flip and ten-crop views do not combine (ten-crop views already include the mirror)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    num_shards = math.ceil(n / shard_size)
    _check_plan(out, {**(source or {}), "kind": kind, "flip": flip, "ten_crop_size": ten_crop_size,
                      "shard_size": shard_size, "num_items": n})
    mine = [k for k in range(num_shards) if k % world_size == rank and not _shard_path(out, k).is_file()]
    if len(mine) < len([k for k in range(num_shards) if k % world_size == rank]):
        log.info("resuming the cache in %s: %d shards of this rank left", out, len(mine))
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(min(shard_size, n - k * shard_size) for k in mine), desc=f"cache {kind}", unit="img",
                   dynamic_ncols=True)
    written = []
    for k in mine:
        idx = list(range(k * shard_size, min(n, (k + 1) * shard_size)))
        loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=collate_drop_none)
        vals, labels = [], []
        for batch in loader:
            if batch is None:
                continue
            x, y = batch[0].to(device), batch[1]
            if ten_crop_size:
                views = ten_crop(x, ten_crop_size)  # (B, 10, 3, s, s)
                v = encode(views.flatten(0, 1).contiguous())
                v = v.view(x.shape[0], views.shape[1], *v.shape[1:])
            else:
                v = encode(x)
            if flip:
                vf = encode(x.flip(-1))
                v = torch.stack([v, vf], 1).flatten(0, 1)  # each item followed by its mirror
                y = y.repeat_interleave(2)
            vals.append(v.cpu())
            labels.append(y.long())
            if bar is not None:
                bar.update(x.shape[0])
        if not vals:
            raise ValueError(f"shard {k}: no readable images among dataset items {idx[0]}..{idx[-1]}")
        tensors = {kind: torch.cat(vals).contiguous(), "labels": torch.cat(labels).contiguous()}
        write_atomic(_shard_path(out, k), lambda p: save_file(tensors, str(p)))
        written.append(_shard_path(out, k))
    if bar is not None:
        bar.close()
    return written


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    """Write ``out/cache_plan.json``, or check that the one there is ``plan``."""
    path = out / CACHE_PLAN
    if path.is_file():
        diff = settings_diff(read_json(path), plan)
        if diff:
            raise ValueError(f"{out} holds a cache made with other settings ({'; '.join(diff)}): "
                             "use a new folder, or the settings it was started with to resume it")
        return
    if any(out.glob("shard-*.safetensors")):
        raise ValueError(f"{out} holds shards without a {CACHE_PLAN} (another or an older cache): use a new folder")
    write_atomic(path, lambda p: p.write_text(json.dumps(plan, indent=2) + "\n"))  # every rank writes the same plan


def finalize_cache(out_dir: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Collect the shards the plan of :func:`write_cache` lists into ``cache.json`` with counts,
    shapes, label range and (for latents) per-channel mean and std (computed in float64 over every
    cached latent). A missing shard or plan is a ValueError."""
    out = Path(out_dir)
    if not (out / CACHE_PLAN).is_file():
        raise ValueError(f"{out}: no {CACHE_PLAN}; write the shards with write_cache first")
    plan = read_json(out / CACHE_PLAN)
    shards = [_shard_path(out, k).name for k in range(math.ceil(plan["num_items"] / plan["shard_size"]))]
    missing = [s for s in shards if not (out / s).is_file()]
    if missing or not shards:
        raise ValueError(f"{out}: shards missing ({', '.join(missing[:3]) or 'the dataset was empty'}): run the caching again")
    total, max_label, shape, code_range = 0, -1, None, None
    s1 = s2 = None
    views = int(meta.get("views", 1))
    for name in shards:
        with safe_open(str(out / name), "pt") as f:
            key = "latents" if "latents" in f.keys() else "codes"
            v, y = f.get_tensor(key), f.get_tensor("labels")
        total += v.shape[0]
        if y.numel() and int(y.min()) < 0:
            raise ValueError(f"{out / name}: negative class label {int(y.min())}")
        max_label = max(max_label, int(y.max()))
        if key == "codes" and v.numel():
            lo, hi = (int(t) for t in torch.aminmax(v))
            code_range = [lo, hi] if code_range is None else [min(code_range[0], lo), max(code_range[1], hi)]
        if views > 1:  # (n, views, ...): statistics over every view
            v = v.flatten(0, 1)
        shape = list(v.shape[1:])
        if key == "latents":
            vd = v.double().transpose(0, 1).flatten(1)  # (C, n*H*W)
            s1 = vd.sum(1) if s1 is None else s1 + vd.sum(1)
            s2 = vd.square().sum(1) if s2 is None else s2 + vd.square().sum(1)
    meta = {**meta, "kind": key, "num": total, "shape": shape, "shards": shards, "num_labels": max_label + 1}
    if code_range is not None:
        if code_range[0] < 0 or code_range[1] >= meta.get("codebook_size", math.inf):
            raise ValueError(f"{out}: codes span {code_range}, outside the codebook [0, {meta['codebook_size']})")
        meta["code_range"] = code_range
    if s1 is not None:
        count = total * views * math.prod(shape[1:])
        mean = s1 / count
        meta["mean"] = mean.tolist()
        meta["std"] = (s2 / count - mean.square()).clamp_min(1e-12).sqrt().tolist()
    write_atomic(out / CACHE_META, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


def read_cache_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not (p / CACHE_META).is_file():
        raise FileNotFoundError(f"{p}: not a latent cache (no {CACHE_META}; create one with `hieratok cache-latents`)")
    return json.loads((p / CACHE_META).read_text())


class LatentCacheDataset(Dataset):
    """Random access over a cache's shards (memory-mapped), items ``(latents or codes, label)``."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        self.meta = read_cache_meta(self.root)
        self.key = self.meta["kind"]
        self.views = int(self.meta.get("views", 1))
        self._files = [str(self.root / s) for s in self.meta["shards"]]
        sizes = []
        for f in self._files:
            with safe_open(f, "pt") as h:
                sizes.append(h.get_slice("labels").get_shape()[0])
        self._starts = torch.tensor([0] + sizes).cumsum(0).tolist()
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, i: int) -> tuple[int, int]:
        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} cached items")
        k, j = self._locate(i)
        if k not in self._handles:  # opened lazily, per worker process
            self._handles[k] = safe_open(self._files[k], "pt")
        h = self._handles[k]
        v = h.get_slice(self.key)[j:j + 1][0]
        if self.views > 1:  # one of the stored augmentation views, uniformly (LlamaGen's ten-crop sampling)
            v = v[int(torch.randint(self.views, (1,)))]
        return v, int(h.get_slice("labels")[j:j + 1][0])

    def __getstate__(self) -> dict[str, Any]:  # file handles do not cross process boundaries
        return {**self.__dict__, "_handles": {}}
